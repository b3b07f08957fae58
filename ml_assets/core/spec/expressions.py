"""The SQL a pipeline file holds (`derived` expressions, `target.expr`) and its regular expressions,
checked with DuckDB's own parser and regex engine before anything runs.

The modelling table is built with `SELECT *, <expr> AS <name>, ... FROM <joined rows>` on the warehouse
connection, the one that also holds the registry. In DuckDB one process cannot open the same file twice
with different modes, so that SQL cannot run on a separate read-only connection; the guard is this
parse-time allowlist instead. An expression that passes it is exactly one SELECT-list item, with no
FROM, no subquery (so no table reference at all: it cannot read or write any table, the registry's
included), no statement keyword, and only DuckDB's built-in functions minus those that touch files,
the network, settings, sequences or the session. Table functions (read_csv, read_parquet, read_text,
glob, query, ...) cannot appear outside a FROM clause or subquery, and are not scalar functions either.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import duckdb

# The alias the expression is parsed under: a trailing `--` comment would swallow it (and, in the
# modelling table's query, everything after the expression), so a missing alias is refused.
_PROBE = "__ml_assets_expression"

_ONE_ITEM = "must be a single SQL expression (what follows SELECT for one column of a query)"

# Words that start statements. Most cannot parse inside an expression at all, but DuckDB reads e.g.
# `ATTACH 'x'` as a cast to a type named ATTACH; refusing the words outright leaves no such doubt.
STATEMENT_KEYWORDS = frozenset(
    {
        "alter", "attach", "call", "checkpoint", "copy", "create", "delete", "detach", "drop", "execute",
        "export", "import", "insert", "install", "load", "pragma", "prepare", "reset", "set", "truncate",
        "update", "use", "vacuum",
    }
)  # fmt: skip

# Expression node classes of DuckDB's parse tree an expression may hold. Left out on purpose: SUBQUERY
# (reads tables), STAR / COLUMNS(*) (several columns, not one value), PARAMETER (nothing is bound).
ALLOWED_CLASSES = frozenset(
    {"BETWEEN", "CASE", "CAST", "COLLATE", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "CONSTANT"}
    | {"FUNCTION", "LAMBDA", "OPERATOR", "WINDOW"}
)

# Built-in scalar functions whose result is not a function of the row: they read or change settings,
# variables, sequences, the catalog, the session or the environment, or have side effects.
DENIED_FUNCTIONS = frozenset(
    {
        # settings, variables and the environment
        "current_setting", "getvariable", "getenv", "version", "get_block_size",
        # sequences (nextval writes the catalog) and the session's random state
        "nextval", "currval", "setseed",
        # the session and the catalog
        "current_catalog", "current_connection_id", "current_database", "current_query",
        "current_query_id", "current_role", "current_schema", "current_schemas", "current_transaction_id",
        "current_user", "session_user", "user", "txid_current", "in_search_path", "col_description",
        "obj_description", "shobj_description", "format_type",
        # SQL text planned against the catalog, or turned back into SQL
        "json_serialize_sql", "json_deserialize_sql", "json_serialize_plan",
        # side effects: logging, sleeping
        "write_log", "sleep_ms",
    }
)  # fmt: skip
# Families: PostgreSQL catalog stand-ins (pg_get_viewdef reads duckdb_views(), ...), privilege and
# network-address lookups, and DuckDB's internal functions.
DENIED_PREFIXES = ("pg_", "has_", "inet_", "__internal")


@functools.cache
def _database() -> duckdb.DuckDBPyConnection:
    # Connecting costs ~0.1 s (extensions load), so one in-memory database serves the process; each
    # check takes its own cursor, which is safe across threads.
    return duckdb.connect(":memory:")


@functools.cache
def builtin_functions() -> dict[str, frozenset[str]]:
    """DuckDB's built-in functions, name -> kinds (scalar, aggregate, macro, table, ...), as a fresh
    database has them (so no user-defined macro of a data directory)."""
    with _database().cursor() as cur:
        rows = cur.execute(
            "SELECT lower(function_name), list(DISTINCT function_type) FROM duckdb_functions() GROUP BY 1"
        ).fetchall()
    return {name: frozenset(kinds) for name, kinds in rows}


def shorten(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def expression_problem(text: str) -> str | None:
    """Why `text` is not one safe SQL expression, or None when it is (see the module docstring)."""
    if not text.strip():
        return "is empty"
    with _database().cursor() as cur:
        try:
            statements = cur.extract_statements(f"SELECT {text}")
        except duckdb.Error as exc:
            return _keyword_problem(text) or f"DuckDB cannot parse it: {str(exc).splitlines()[0]}"
        if len(statements) != 1:
            kinds = ", ".join(s.type.name for s in statements)
            return f"holds {len(statements)} SQL statements ({kinds}); give one expression, without ';'"
        problem = _keyword_problem(text)
        if problem:
            return problem
        tree = _parse_tree(cur, f"SELECT {text}")
        probe = _parse_tree(cur, f"SELECT {text} AS {_PROBE}")
    if "error_message" in tree:
        return f"DuckDB cannot parse it: {tree['error_message']}"
    problem = _shape_problem(tree)
    if problem:
        return problem
    if probe.get("select_list", [{}])[0].get("alias") != _PROBE:
        return (
            f"{_ONE_ITEM}; it does not end where it seems to (a trailing -- comment would swallow the rest "
            "of the query)"
        )
    return _tree_problem(tree["select_list"][0])


def _parse_tree(cur: duckdb.DuckDBPyConnection, query: str) -> dict[str, Any]:
    """The query's parse tree (its one statement's root node), or the parser's error."""
    tree = json.loads(cur.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    return tree if tree.get("error") else tree["statements"][0]["node"]


def _keyword_problem(text: str) -> str | None:
    # DuckDB's tokenizer tells keywords from quoted identifiers, string literals and comments.
    for start, kind in duckdb.tokenize(text):
        word = re.match(r"\w*", text[start:]).group().lower()
        if kind == duckdb.token_type.keyword and word in STATEMENT_KEYWORDS:
            return (
                f"uses the statement keyword {word.upper()}; an expression computes a value and runs no "
                f'statement (if {word} is a column, quote it: "{word}")'
            )
    return None


def _shape_problem(node: dict[str, Any]) -> str | None:
    if node.get("type") != "SELECT_NODE":
        return f"{_ONE_ITEM}, not several queries combined (UNION, INTERSECT, EXCEPT)"
    clauses = [
        name
        for name, present in (
            ("FROM", node.get("from_table", {}).get("type") != "EMPTY"),
            ("WHERE", node.get("where_clause")),
            ("GROUP BY", node.get("group_expressions") or node.get("group_sets")),
            ("HAVING", node.get("having")),
            ("QUALIFY", node.get("qualify")),
            ("SAMPLE", node.get("sample")),
            ("DISTINCT/ORDER BY/LIMIT", node.get("modifiers")),
        )
        if present
    ]
    if clauses:
        return f"{_ONE_ITEM}, without {', '.join(clauses)}"
    if len(node["select_list"]) != 1:
        return f"{_ONE_ITEM}; it lists {len(node['select_list'])} comma-separated expressions"
    if node["select_list"][0].get("alias"):
        return f"{_ONE_ITEM}, without AS: the column is named by the field's key"
    return None


def _tree_problem(expr: Any) -> str | None:
    """The first forbidden node of an expression tree: each dict with a `class` is an expression node."""
    if isinstance(expr, list):
        return next((p for p in map(_tree_problem, expr) if p), None)
    if not isinstance(expr, dict):
        return None
    kind = expr.get("class")
    if kind is not None and kind not in ALLOWED_CLASSES:
        what = {
            "SUBQUERY": "a subquery (it would read a table)",
            "STAR": "* or COLUMNS(...)",
            "PARAMETER": "a parameter (? or $1), which nothing binds",
        }
        return f"must compute one value from the row's columns; it uses {what.get(kind, kind.lower())}"
    if kind in ("FUNCTION", "WINDOW"):
        problem = _function_problem(expr)
        if problem:
            return problem
    return next((p for p in map(_tree_problem, expr.values()) if p), None)


def _function_problem(expr: dict[str, Any]) -> str | None:
    name = expr.get("function_name", "").lower()
    # The parser itself writes some calls as main.<function> (list_value for [1, 2], date_part, ...).
    if expr.get("schema", "") not in ("", "main") or expr.get("catalog", "") not in ("", "system"):
        qualified = ".".join(p for p in (expr.get("catalog"), expr.get("schema"), name) if p)
        return f"calls {qualified}(); only DuckDB's built-in functions, unqualified, are allowed"
    if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
        return (
            f"calls {name}(), which reads or changes state outside the row (settings, the environment, the "
            "catalog, the session); an expression may only compute from the row's columns"
        )
    kinds = builtin_functions().get(name, frozenset()) & {"scalar", "aggregate", "macro"}
    if not kinds:
        what = (
            "a table function (those produce rows, read from files, tables or settings)"
            if name in builtin_functions()
            else "which DuckDB does not have"
        )
        return (
            f"calls {name}(), {what}; an expression may use DuckDB's built-in scalar, aggregate and "
            "window functions"
        )
    return None


def regex_problem(pattern: str) -> str | None:
    """Why DuckDB's regex engine (RE2, which checks `pattern` rules on every row) rejects `pattern`."""
    with _database().cursor() as cur:
        try:
            cur.execute("SELECT regexp_full_match('', ?)", [pattern]).fetchone()
        except duckdb.Error as exc:
            return str(exc).splitlines()[0].removeprefix("Invalid Input Error: ")
    return None


def _constant_at_least_one(node: dict[str, Any] | None, default: bool) -> bool:
    if node is None:
        return default
    value = node.get("value", {}) if node.get("class") == "CONSTANT" else {}
    return isinstance(value.get("value"), int) and value["value"] >= 1


def _strictly_past(window: dict[str, Any], time_column: str | None) -> bool:
    """A window that sees only earlier rows in time order: lag(x[, n >= 1]), or a frame ending n >= 1
    rows PRECEDING, ordered by the time column ascending."""
    orders = window.get("orders") or []
    if time_column is None or not orders or orders[0].get("type") in ("DESCENDING", "ORDER_DESCENDING"):
        return False
    first = orders[0].get("expression", {})
    if first.get("class") != "COLUMN_REF" or first["column_names"][-1].lower() != time_column.lower():
        return False
    if window.get("type") == "WINDOW_LAG":
        return _constant_at_least_one(window.get("offset_expr"), default=True)
    return window.get("end") == "EXPR_PRECEDING_ROWS" and _constant_at_least_one(
        window.get("end_expr"), default=False
    )


def reads_other_rows(text: str) -> bool:
    """Whether an expression holds a window function (`lag(y) OVER (...)`, a moving average): its value
    for a row depends on other rows, so it cannot be computed from one request's fields."""
    with _database().cursor() as cur:
        tree = _parse_tree(cur, f"SELECT {text}")

    def has_window(node: Any) -> bool:
        if isinstance(node, list):
            return any(map(has_window, node))
        if not isinstance(node, dict):
            return False
        return node.get("class") == "WINDOW" or any(map(has_window, node.values()))

    return has_window(tree.get("select_list", []))


def current_column_refs(text: str, time_column: str | None) -> set[str]:
    """Lower-cased names of the columns an expression reads at the current row or later. A reference
    inside a strictly-past window (see `_strictly_past`) reads only earlier rows' values, known at
    prediction time, and is left out; one in its PARTITION BY, ORDER BY or default is not."""
    with _database().cursor() as cur:
        tree = _parse_tree(cur, f"SELECT {text}")
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if node.get("class") == "COLUMN_REF":
            refs.add(node["column_names"][-1].lower())
            return
        past = node.get("class") == "WINDOW" and _strictly_past(node, time_column)
        for key, value in node.items():
            if not (past and key == "children"):
                walk(value)

    walk(tree.get("select_list", []))
    return refs
