"""The SQL of a pipeline file (`derived` expressions, `target.expr`) is one expression over the row: a
second statement, a statement keyword, a subquery or a function that reads files, settings or the
environment is refused when the file loads (so by `dagster definitions validate` and `dagster dev` too),
naming the file, the field, the rule and the text.

Every bad file is a copy of the shipped pipelines (the flagship and the file extending it) with one
defect in the flagship.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from ml_assets.core.spec import ConfigError
from ml_assets.core.spec.expressions import STATEMENT_KEYWORDS, expression_problem
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets_tests.helpers import validate_definitions

SHIPPED = default_pipelines_dir()
FLAGSHIP = "flight_delay"


def shipped_copy(directory: Path, change) -> Path:
    """The shipped pipelines copied into `directory`, the flagship changed; returns the flagship's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in SHIPPED.glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    flagship = directory / f"{FLAGSHIP}.yaml"
    raw = yaml.safe_load(flagship.read_text())
    change(raw)
    flagship.write_text(yaml.safe_dump(raw, sort_keys=False))
    return flagship


def derived(name: str, expr: str):
    def change(raw):
        raw["derived"][name] = expr

    return change


def target_expr(expr: str):
    def change(raw):
        raw["target"]["expr"] = expr

    return change


REFUSED = [
    # (id, change, field, fragments of the rule broken)
    (
        "second_and_third_statement",
        derived("route", "origin || '-' || dest; DROP TABLE registry.aliases; SELECT 1"),
        "derived.route",
        ["3 SQL statements", "DROP", "without ';'"],
    ),
    ("ddl", derived("wipe", "DROP TABLE registry.aliases"), "derived.wipe", ["statement keyword DROP"]),
    (
        "dml_after_a_select",
        target_expr("(SELECT 1); UPDATE registry.aliases SET version = 1"),
        "target.expr",
        ["2 SQL statements", "UPDATE"],
    ),
    ("file_read", derived("rows", "read_csv('x')"), "derived.rows", ["read_csv()", "table function"]),
    (
        "subquery_on_the_registry",
        target_expr("(SELECT count(*) FROM registry.aliases) > 0"),
        "target.expr",
        ["subquery", "read a table"],
    ),
    ("environment", derived("home", "getenv('HOME')"), "derived.home", ["getenv()", "the environment"]),
    (
        "attach",
        derived("db", "ATTACH '/tmp/other.duckdb'"),
        "derived.db",
        ["statement keyword ATTACH"],
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_unsafe_sql_is_refused_at_load(tmp_path, change, field, expected):
    bad_file = shipped_copy(tmp_path, change)

    with pytest.raises(ConfigError) as excinfo:
        load_project(tmp_path)

    message = str(excinfo.value)
    assert message.startswith(f"{bad_file}: {field}: "), message
    for fragment in expected:
        assert fragment in message, message
    # The offending text is quoted (its start, at least: long text is shortened).
    raw = yaml.safe_load(bad_file.read_text())
    text = raw["target"]["expr"] if field == "target.expr" else raw["derived"][field.split(".")[1]]
    assert text[:40] in message.partition("; got ")[2], message


def test_long_offending_text_is_shortened(tmp_path):
    long_text = "1; " + " ".join(f"SELECT {i};" for i in range(200))
    shipped_copy(tmp_path, derived("noise", long_text))

    with pytest.raises(ConfigError) as excinfo:
        load_project(tmp_path)

    message = str(excinfo.value)
    assert "derived.noise" in message and "201 SQL statements" in message
    assert len(message) < len(long_text) and "..." in message


@pytest.mark.parametrize("keyword", sorted(STATEMENT_KEYWORDS))
def test_statement_keywords_are_refused(keyword):
    """Whether DuckDB would parse the text or not, a statement's keyword is never part of an expression."""
    for text in (f"{keyword} x", f"1 + {keyword}", f"{keyword.upper()} TABLE registry.aliases"):
        assert keyword.upper() in expression_problem(text), text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("COPY registry.aliases TO '/tmp/aliases.csv'", "COPY"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("PRAGMA version", "PRAGMA"),
        ("SET threads = 1", "SET"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("INSERT INTO registry.aliases VALUES (1)", "INSERT"),
        ("DELETE FROM registry.aliases", "DELETE"),
        ("ALTER TABLE registry.aliases RENAME TO a", "ALTER"),
        ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
        ("IMPORT DATABASE '/tmp/x'", "IMPORT"),
        ("CALL pragma_version()", "CALL"),
        ("1 FROM registry.aliases", "without FROM"),
        ("champion WHERE true", "without WHERE"),
        ("1 UNION SELECT champion FROM registry.aliases", "UNION"),
        ("a, b", "2 comma-separated expressions"),
        ("1 AS x", "without AS"),
        # In the modelling table's query the comment would swallow the rest of the SELECT.
        ("1 --", "-- comment"),
        ("x IN (SELECT version FROM registry.aliases)", "subquery"),
        ("EXISTS (SELECT 1)", "subquery"),
        ("*", "* or COLUMNS"),
        ("?", "parameter"),
        ("current_setting('threads')", "current_setting()"),
        ("getvariable('v')", "getvariable()"),
        ("nextval('seq')", "nextval()"),
        ("pg_get_viewdef(1)", "pg_get_viewdef()"),
        ("read_parquet('/tmp/x.parquet')", "read_parquet()"),
        ("read_text('/etc/passwd')", "read_text()"),
        ("glob('*')", "glob()"),
        ("query('SELECT 1')", "query()"),
        ("registry.my_macro(1)", "registry.my_macro()"),
        ("no_such_function(1)", "does not have"),
        ("x +", "cannot parse"),
        ("", "empty"),
    ],
)
def test_what_an_expression_may_not_hold(text, fragment):
    problem = expression_problem(text)
    assert problem is not None and fragment in problem, problem


# What the modelling table computes: functions, operators, CASE, casts, lambdas and window functions over
# the row's columns, with strings that merely contain SQL.
ACCEPTED = [
    "lag(y) OVER (ORDER BY t)",
    "y - lag(y) OVER (PARTITION BY g ORDER BY t)",
    "avg(y) OVER (PARTITION BY g ORDER BY t ROWS BETWEEN 3 PRECEDING AND 1 PRECEDING)",
    "CASE WHEN y >= 15 THEN 'late' ELSE 'on time' END",
    "CAST(y AS INTEGER) // 60",
    "strftime(t, '%Y-%m') || '; DROP TABLE x'",
    "coalesce(y, 0) + abs(-1)",
    "list_transform([1, 2], lambda v: v * y)[1]",
    "extract(hour FROM t) BETWEEN 6 AND 9",
    "g IN ('a', 'b') AND NOT y IS NULL",
    '"load" + 1',  # a column that shares a keyword's name, quoted
    "y -- a comment\n + 1",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_expressions_over_the_row_are_accepted_and_run(text):
    assert expression_problem(text) is None
    with duckdb.connect() as conn:
        conn.execute(
            "CREATE TABLE r AS SELECT * FROM (VALUES ('a', TIMESTAMP '2013-01-01 07:00', 20.0, 1), "
            "('a', TIMESTAMP '2013-01-01 08:00', 5.0, 2)) v(g, t, y, \"load\")"
        )
        # Embedded the way the modelling table embeds it.
        rows = conn.execute(f"SELECT *, {text} AS computed FROM r").fetchall()
    assert len(rows) == 2


def test_shipped_expressions_are_accepted():
    project = load_project(SHIPPED)
    texts = [
        text
        for spec in project.pipelines.values()
        for text in [*spec.derived.values(), spec.target.expr]
        if text is not None
    ]
    assert len(texts) >= 4
    assert [t for t in texts if expression_problem(t) is not None] == []


def test_a_lag_of_the_target_loads(tmp_path):
    expr = "lag(arr_delay) OVER (PARTITION BY origin, dest ORDER BY time_hour)"
    shipped_copy(tmp_path, derived("previous_arr_delay", expr))

    project = load_project(tmp_path)

    assert project.pipelines[FLAGSHIP].derived["previous_arr_delay"] == expr


def test_dagster_definitions_validate_refuses_a_second_statement(tmp_path):
    pipelines = tmp_path / "pipelines"
    shipped_copy(pipelines, derived("route", "origin || '-' || dest; DROP TABLE registry.aliases; SELECT 1"))

    result = validate_definitions(pipelines, tmp_path / "home")

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{pipelines / 'flight_delay.yaml'}: derived.route: holds 3 SQL statements" in output, output
