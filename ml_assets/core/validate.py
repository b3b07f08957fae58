"""Validation: `raw.<source>` -> typed `validated.<source>` + `quarantine.<source>`, and the data checks.

Every configured column is coerced to its type; a row that fails any rule (wrong type, not-null, range,
allowed values, pattern, duplicate id) goes to quarantine with the first failing rule and column, a
readable reason for every failure, and its file and line. Both tables are replaced in one transaction,
so a failed validation never leaves a half-written pair.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb

from ml_assets.core.errors import ValidationFailure
from ml_assets.core.spec import ColumnSpec, SourceSpec
from ml_assets.core.sql import (
    DUCKDB_TYPES,
    EVENT_TIME,
    LINEAGE,
    cast_expr,
    drop_unpartitioned,
    lit,
    q,
    replace_rows,
    table_columns,
)
from ml_assets.core.store import CHECK_RESULTS, insert


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, object] = field(default_factory=dict)


def record_check(
    conn: duckdb.DuckDBPyConnection, asset: str, check: str, outcome: CheckOutcome, run_id: str | None
) -> None:
    """Keep a check's latest verdict beside the data it judges: a blocking check stops downstream steps
    only inside its own run, so a consumer launched later reads this to refuse failed data."""
    insert(
        conn,
        CHECK_RESULTS,
        {
            "asset": asset,
            "check_name": check,
            "passed": outcome.passed,
            "description": outcome.description,
            "run_id": run_id,
            "checked_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
        },
        replace=True,
    )


def failed_checks(conn: duckdb.DuckDBPyConnection, assets: list[str]) -> list[str]:
    """'asset:check' for every check of these assets whose latest verdict failed."""
    if not assets:
        return []
    rows = conn.execute(
        f"SELECT asset || ':' || check_name FROM {CHECK_RESULTS} WHERE NOT passed AND list_contains(?, asset) "
        "ORDER BY 1",
        [assets],
    ).fetchall()
    return [r[0] for r in rows]


def rule_conditions(column: str, spec: ColumnSpec, typed: str) -> list[tuple[str, str, str]]:
    """(rule, SQL condition that is true when the rule is broken, reason SQL) for a typed expression."""
    shown = f"coalesce(CAST({typed} AS VARCHAR), 'NULL')"
    out = []
    if spec.not_null:
        out.append(("not_null", f"{typed} IS NULL", f"'{column}: value is missing (rule not_null)'"))
    if spec.min is not None:
        out.append(("min", f"{typed} < {spec.min}", f"'{column}: ' || {shown} || ' is below min {spec.min}'"))
    if spec.max is not None:
        out.append(("max", f"{typed} > {spec.max}", f"'{column}: ' || {shown} || ' is above max {spec.max}'"))
    if spec.allowed is not None:
        values = ", ".join(lit(v) for v in spec.allowed)
        out.append(
            (
                "allowed",
                f"{typed} NOT IN ({values})",
                f"'{column}: ' || {shown} || ' is not one of the allowed values'",
            )
        )
    if spec.pattern is not None:
        out.append(
            (
                "pattern",
                f"NOT regexp_full_match({typed}, {lit(spec.pattern)})",
                f"'{column}: ' || {shown} || ' does not match pattern ' || {lit(spec.pattern)}",
            )
        )
    return out


def _failure(rule: str, column: str, condition: str, reason: str) -> str:
    return (
        f"CASE WHEN {condition} THEN {{'rule': {lit(rule)}, 'column': {lit(column)}, 'reason': {reason}}} END"
    )


@dataclass(frozen=True)
class ValidationResult:
    raw_rows: int
    valid_rows: int
    quarantined_rows: int
    by_rule: list[dict[str, object]]
    examples: list[str]


def validate_source(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, where: str | None = None
) -> ValidationResult:
    """Validate raw.<name>: all of it (tables replaced), or only the raw rows matching `where` (a
    partition window on _event_time: exactly those rows of validated/quarantine are replaced)."""
    present = table_columns(conn, "raw", name)
    source = f"(SELECT * FROM raw.{q(name)} WHERE {where})" if where else f"raw.{q(name)}"
    files = [r[0] for r in conn.execute(f"SELECT DISTINCT _source_file FROM {source}").fetchall()]
    policy = spec.schema_evolution
    missing = [c for c in spec.columns if c not in present]
    keys = {*spec.id, *([spec.timestamp] if spec.timestamp else [])}
    fatal = [c for c in missing if policy.missing_columns == "fail" or spec.columns[c].not_null or c in keys]
    if fatal:
        raise ValidationFailure(
            f"source '{name}': required column(s) {fatal} missing (rule: schema) in file(s) {files}; "
            f"columns found: {[c for c in present if c not in LINEAGE]}. The previous validated table is kept."
        )

    def raw_ref(column: str) -> str:
        # An optional column no batch has carried yet is all null (schema_evolution.missing_columns: null).
        return q(column) if column in present else "CAST(NULL AS VARCHAR)"

    typed_cols = [f"{cast_expr(raw_ref(c), s.type)} AS {q('__t_' + c)}" for c, s in spec.columns.items()]
    failures = []
    for column, cspec in spec.columns.items():
        typed = q("__t_" + column)
        failures.append(
            _failure(
                "type",
                column,
                f"{raw_ref(column)} IS NOT NULL AND {typed} IS NULL",
                f"'{column}: ' || {lit(chr(39))} || CAST({raw_ref(column)} AS VARCHAR) || {lit(chr(39))} || "
                f"' is not a valid {cspec.type}'",
            )
        )
        failures += [
            _failure(rule, column, cond, reason)
            for rule, cond, reason in rule_conditions(column, cspec, typed)
        ]
    failure_list = f"list_filter([{', '.join(failures)}], x -> x IS NOT NULL)"
    id_cols = ", ".join(q("__t_" + c) for c in spec.id)
    duplicate_of_earlier = (
        f"len(__f) = 0 AND row_number() OVER (PARTITION BY len(__f) = 0, {id_cols} "
        f"ORDER BY _source_file, _source_row) > 1"
        if spec.id
        else "false"
    )
    id_reason = lit(f"duplicate id ({', '.join(spec.id)}): an earlier row has the same values")
    platform = [EVENT_TIME] if EVENT_TIME in present else []
    out_cols = ", ".join([f"{q('__t_' + c)} AS {q(c)}" for c in spec.columns] + platform)
    raw_cols = ", ".join(q(c) for c in present)
    try:
        conn.execute(f"""
            CREATE OR REPLACE TEMP TABLE __typed AS
            SELECT *, {failure_list} AS __f FROM (SELECT *, {", ".join(typed_cols)} FROM {source})
        """)
        conn.execute(f"""
            CREATE OR REPLACE TEMP TABLE __checked AS
            SELECT * REPLACE (CASE WHEN {duplicate_of_earlier}
                              THEN [{{'rule': 'unique', 'column': {lit(",".join(spec.id))}, 'reason': {id_reason}}}]
                              ELSE __f END AS __f)
            FROM __typed
        """)
        if policy.type_changes == "fail":
            _fail_on_type_change(conn, name)
        conn.execute(f"""CREATE OR REPLACE TEMP TABLE __valid AS
            SELECT {out_cols} FROM __checked WHERE len(__f) = 0 ORDER BY _source_file, _source_row""")
        conn.execute(f"""CREATE OR REPLACE TEMP TABLE __quarantined AS
            SELECT {raw_cols}, __f[1].rule AS _rule, __f[1].column AS _column,
                   array_to_string(list_transform(__f, x -> x.reason), '; ') AS _reasons
            FROM __checked WHERE len(__f) > 0 ORDER BY _source_file, _source_row""")
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS validated")
            conn.execute("CREATE SCHEMA IF NOT EXISTS quarantine")
            for schema, temp in (("validated", "__valid"), ("quarantine", "__quarantined")):
                if where:
                    drop_unpartitioned(conn, schema, name)
                    replace_rows(conn, f"{schema}.{q(name)}", temp, where)
                else:
                    conn.execute(f"CREATE OR REPLACE TABLE {schema}.{q(name)} AS SELECT * FROM {temp}")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        raw_rows = conn.execute("SELECT count(*) FROM __checked").fetchone()[0]
        valid_rows = conn.execute("SELECT count(*) FROM __valid").fetchone()[0]
        by_rule = [
            {"rule": r, "column": c, "rows": n}
            for r, c, n in conn.execute(
                "SELECT _rule, _column, count(*) n FROM __quarantined GROUP BY ALL ORDER BY n DESC, _rule"
            ).fetchall()
        ]
        examples = [
            f"{f} row {row}: {reason}"
            for f, row, reason in conn.execute(
                "SELECT _source_file, _source_row, _reasons FROM __quarantined LIMIT 5"
            ).fetchall()
        ]
    finally:
        for temp in ("__typed", "__checked", "__valid", "__quarantined"):
            conn.execute(f"DROP TABLE IF EXISTS {temp}")
    return ValidationResult(raw_rows, valid_rows, raw_rows - valid_rows, by_rule, examples)


def _fail_on_type_change(conn: duckdb.DuckDBPyConnection, name: str) -> None:
    bad = conn.execute("""
        SELECT count(*) OVER (), _source_file, _source_row, x.column, x.reason
        FROM (SELECT *, unnest(list_filter(__f, x -> x.rule = 'type')) AS x FROM __checked)
        ORDER BY _source_file, _source_row LIMIT 1""").fetchone()
    if bad:
        rows, file, row, column, reason = bad
        raise ValidationFailure(
            f"source '{name}': file {file} row {row}: {reason} (column '{column}', rule: type, "
            f"schema_evolution.type_changes: fail); {rows} value(s) do not parse. Nothing was written"
        )


# --- checks: re-verify what validation promised, on the tables as they are now -------------------------


def check_schema(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    actual = dict(
        conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'validated' AND table_name = ?",
            [name],
        ).fetchall()
    )
    expected = {c: DUCKDB_TYPES[s.type] for c, s in spec.columns.items()}
    problems = [
        f"{c}: expected {t}, found {actual.get(c, 'missing')}"
        for c, t in expected.items()
        if actual.get(c) != t
    ]
    problems += [f"{c}: not in config" for c in actual if c not in expected and c != EVENT_TIME]
    return CheckOutcome(
        not problems,
        "; ".join(problems) or "columns and types match the config",
        {"expected": expected, "problems": problems},
    )


def check_row_conservation(conn: duckdb.DuckDBPyConnection, name: str) -> CheckOutcome:
    raw, valid, quarantined = conn.execute(
        f"SELECT (SELECT count(*) FROM raw.{q(name)}), (SELECT count(*) FROM validated.{q(name)}), "
        f"(SELECT count(*) FROM quarantine.{q(name)})"
    ).fetchone()
    ok = raw == valid + quarantined
    return CheckOutcome(
        ok,
        f"raw {raw} {'=' if ok else '!='} validated {valid} + quarantined {quarantined}",
        {"raw": raw, "validated": valid, "quarantined": quarantined},
    )


def check_unique_ids(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    if not spec.id:
        return CheckOutcome(True, "no id configured")
    cols = ", ".join(q(c) for c in spec.id)
    dupes = conn.execute(
        f"SELECT count(*) FROM (SELECT {cols} FROM validated.{q(name)} GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()[0]
    return CheckOutcome(dupes == 0, f"{dupes} duplicated id value(s) on {spec.id}", {"duplicated_ids": dupes})


def check_rules(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    """Ranges, allowed values, not-null and patterns hold on every validated row."""
    counts = [
        f"count(*) FILTER (WHERE {cond}) AS {q(rule + ':' + column)}"
        for column, cspec in spec.columns.items()
        for rule, cond, _ in rule_conditions(column, cspec, q(column))
    ]
    if not counts:
        return CheckOutcome(True, "no value rules configured")
    row = conn.execute(f"SELECT {', '.join(counts)} FROM validated.{q(name)}").fetchone()
    names = [c.rsplit(" AS ", 1)[1].strip('"') for c in counts]
    broken = {n: v for n, v in zip(names, row, strict=True) if v}
    return CheckOutcome(
        not broken,
        f"rule violations: {broken}" if broken else f"{len(names)} rules hold",
        {"violations": broken, "rules_checked": len(names)},
    )


def check_quarantine_share(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    raw, quarantined = conn.execute(
        f"SELECT (SELECT count(*) FROM raw.{q(name)}), (SELECT count(*) FROM quarantine.{q(name)})"
    ).fetchone()
    share = quarantined / raw if raw else 1.0
    ok = share <= spec.max_quarantine_share
    top = conn.execute(
        f"SELECT _rule, _column, count(*) n, min(_source_file), min(_reasons) FROM quarantine.{q(name)} "
        "GROUP BY _rule, _column ORDER BY n DESC LIMIT 3"
    ).fetchall()
    reasons = "; ".join(f"{r} on {c}: {n} rows (e.g. {f}: {why})" for r, c, n, f, why in top)
    return CheckOutcome(
        ok,
        f"{share:.2%} of rows quarantined (max {spec.max_quarantine_share:.2%})"
        + (f"; top: {reasons}" if top else ""),
        {"quarantine_share": share, "max_quarantine_share": spec.max_quarantine_share},
    )
