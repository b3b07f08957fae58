"""Validation: `raw.<source>` -> typed `validated.<source>` + `quarantine.<source>`, and the data checks.

Every configured column is coerced to its type; a row that fails any rule (wrong type, not-null, range,
finite, allowed values, pattern, timezone, duplicate id) goes to quarantine with the first failing rule
and column, a readable reason for every failure, and its file and line. In a number column NaN is a
missing value (not_null and target.missing apply) and a float's ±inf breaks its range or, without one,
the rule `finite`: every stage after validation reads finite numbers or NULL. Both tables are replaced in one
transaction, so a failed validation never leaves a half-written pair.

Datetimes are stored as naive UTC: a value with an offset (`-05:00`, `Z`) is converted to its UTC instant,
one without is taken as UTC. `timezones: reject` instead quarantines values whose offset is not the most
common one of their partition (a naive value counting as an offset of its own), for sources meant to
carry a single offset (a source in local time across a daylight-saving change carries two).

Duplicate ids are quarantined within a partition (the whole table, unpartitioned): the later rows go. An
id in two partitions is kept in both and judged by the unique_ids check (`duplicate_ids: block|warn`), so
a partition's validated rows never depend on which other partitions shared its run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from ml_assets.core import changes
from ml_assets.core.check_results import CheckOutcome
from ml_assets.core.errors import ValidationFailure
from ml_assets.core.spec import ColumnSpec, SourceSpec
from ml_assets.core.spec.schema import ROW_ID
from ml_assets.core.sql import (
    DUCKDB_TYPES,
    EVENT_TIME,
    LINEAGE,
    cast_expr,
    drop_unpartitioned,
    lit,
    nan_as_missing,
    q,
    replace_rows,
    table_columns,
)
from ml_assets.core.store import transactions

NUMBER_TYPES = ("int", "float")


def typed_sql(raw: str, ctype: str) -> str:
    """A raw value as its config type; a number column's NaN as NULL (nan_as_missing)."""
    if ctype not in NUMBER_TYPES:
        return cast_expr(raw, ctype)
    return f"CASE WHEN {nan_as_missing(raw)} THEN NULL ELSE {cast_expr(raw, ctype)} END"


def rule_conditions(column: str, spec: ColumnSpec, typed: str) -> list[tuple[str, str, str]]:
    """(rule, SQL condition that is true when the rule is broken, reason SQL) for a typed expression."""
    shown = f"coalesce(CAST({typed} AS VARCHAR), 'NULL')"
    out = []
    if spec.not_null:
        # A number column's NaN is typed as missing (nan_as_missing), so it breaks this rule too.
        missing = (
            "value is missing (NaN counts as missing)" if spec.type in NUMBER_TYPES else "value is missing"
        )
        out.append(("not_null", f"{typed} IS NULL", lit(f"{column}: {missing} (rule not_null)")))
    if spec.min is not None:
        out.append(
            ("min", f"{typed} < {spec.min}", f"{lit(column + ': ')} || {shown} || ' is below min {spec.min}'")
        )
    if spec.max is not None:
        out.append(
            ("max", f"{typed} > {spec.max}", f"{lit(column + ': ')} || {shown} || ' is above max {spec.max}'")
        )
    if spec.type == "float":
        # After min/max, so a range names the rule an infinity breaks; without one, this rule does.
        out.append(
            (
                "finite",
                f"isinf({typed})",
                f"{lit(column + ': ')} || {shown} || ' is not a finite number (rule finite); give a number or "
                "leave the value empty'",
            )
        )
    if spec.allowed is not None:
        values = ", ".join(lit(v) for v in spec.allowed)
        out.append(
            (
                "allowed",
                f"{typed} NOT IN ({values})",
                f"{lit(column + ': ')} || {shown} || ' is not one of the allowed values'",
            )
        )
    if spec.pattern is not None:
        out.append(
            (
                "pattern",
                f"NOT regexp_full_match({typed}, {lit(spec.pattern)})",
                f"{lit(column + ': ')} || {shown} || ' does not match pattern ' || {lit(spec.pattern)}",
            )
        )
    return out


def _failure(rule: str, column: str, condition: str, reason: str) -> str:
    return (
        f"CASE WHEN {condition} THEN {{'rule': {lit(rule)}, 'column': {lit(column)}, 'reason': {reason}}} END"
    )


def _quoted(ref: str) -> str:
    return f"{lit(chr(39))} || CAST({ref} AS VARCHAR) || {lit(chr(39))}"


# The wall-clock part of a datetime string, and a zone designator after its time (Z, +05:30, -0500, UTC,
# America/New_York); a date alone or a time without a designator is naive.
_WALL_CLOCK = r"^\s*\d{4}-\d{1,2}-\d{1,2}([T ]\d{1,2}:\d{2}(:\d{2}(\.\d*)?)?)?"
_DESIGNATOR = r"\d:\d\d(:\d\d(\.\d*)?)?\s*(Z|z|[+-]\d\d(:?\d\d)?|[A-Za-z][A-Za-z0-9_/+-]*)\s*$"
NO_OFFSET = "none"


def _datetime_columns(spec: SourceSpec) -> list[str]:
    return [c for c, s in spec.columns.items() if s.type == "datetime"]


def _offset_parts(raw: str, column: str) -> list[str]:
    """Per datetime column, the wall-clock time its string shows (__w_) and whether it names a zone
    (__z_): computed once per row, for utc_offset_sql."""
    # The plain cast drops a numeric offset; only a named zone needs the (slower) regular expression.
    wall = (
        f"CASE WHEN TRY_CAST({raw} AS TIMESTAMP) IS NULL "
        f"THEN TRY_CAST(trim(regexp_extract({raw}, {lit(_WALL_CLOCK)})) AS TIMESTAMP) "
        f"ELSE TRY_CAST({raw} AS TIMESTAMP) END"
    )
    return [
        f"{wall} AS {q('__w_' + column)}",
        f"regexp_matches({raw}, {lit(_DESIGNATOR)}) AS {q('__z_' + column)}",
    ]


def utc_offset_sql(column: str) -> str:
    """SQL of the UTC offset a datetime value carried, as '+HH:MM' ('none' without a zone, NULL when it
    is no datetime): the wall-clock time it showed minus the UTC instant it denotes (over _offset_parts)."""
    instant, wall, zoned = (q(prefix + column) for prefix in ("__t_", "__w_", "__z_"))
    minutes = f"datediff('minute', {instant}, {wall})"
    return (
        f"CASE WHEN {instant} IS NULL THEN NULL WHEN NOT {zoned} THEN {lit(NO_OFFSET)} "
        f"ELSE printf('%s%02d:%02d', CASE WHEN {minutes} < 0 THEN '-' ELSE '+' END, "
        f"abs({minutes}) // 60, abs({minutes}) % 60) END"
    )


def partition_sql(spec: SourceSpec, column: str = EVENT_TIME) -> str:
    """SQL of the first instant of the partition holding `column`'s time (NULL: one unpartitioned batch)."""
    axis = spec.partitions
    if axis is None:
        return "CAST(NULL AS TIMESTAMP)"
    if axis.granularity == "weekly":
        start = f"TIMESTAMP '{axis.start}'"
        return f"{start} + to_days(CAST(7 * (datediff('day', {start}, {column}) // 7) AS INTEGER))"
    return f"date_trunc('{'day' if axis.granularity == 'daily' else 'month'}', {column})"


def _timezone_failure(column: str, raw: str, partitioned: bool) -> str:
    offset, usual = q("__o_" + column), q("__m_" + column)

    def shown(ref: str, none: str) -> str:
        return f"CASE WHEN {ref} = {lit(NO_OFFSET)} THEN {lit(none)} ELSE {lit('UTC offset ')} || {ref} END"

    where = "'partition ' || strftime(__p, '%Y-%m-%d')" if partitioned else "'the batch'"
    return _failure(
        "timezone",
        column,
        f"{offset} <> {usual}",
        f"{lit(column + ': ')} || {_quoted(raw)} || ' has ' || {shown(offset, 'no UTC offset')} || "
        f"', not the most common ' || {shown(usual, 'no offset')} || ' of ' || {where} || "
        "' (rule timezones: reject); give its values one offset, or set timezones: normalize'",
    )


def _typed_rows(spec: SourceSpec, source: str, raw_ref: Callable[[str], str], partitioned: bool) -> str:
    """SELECT of the batch with each column typed (__t_), each datetime's UTC offset (__o_, from __w_ and
    __z_), the row's partition (__p) and, under timezones: reject, each datetime's most common offset in
    that partition (__n_ counts, __m_)."""
    datetimes = _datetime_columns(spec)
    added = [f"{typed_sql(raw_ref(c), s.type)} AS {q('__t_' + c)}" for c, s in spec.columns.items()]
    added += [part for c in datetimes for part in _offset_parts(raw_ref(c), c)]
    added.append(f"{partition_sql(spec) if partitioned else 'NULL'} AS __p")
    rows = f"SELECT *, {', '.join(added)} FROM {source}"
    if datetimes:
        offsets = ", ".join(f"{utc_offset_sql(c)} AS {q('__o_' + c)}" for c in datetimes)
        rows = f"SELECT *, {offsets} FROM ({rows})"
    if spec.timezones != "reject" or not datetimes:
        return rows
    counts = ", ".join(
        f"count(*) OVER (PARTITION BY __p, {q('__o_' + c)}) AS {q('__n_' + c)}" for c in datetimes
    )
    # Ties go to the offset of the earliest row, so the verdict does not depend on the engine's order.
    usual = ", ".join(
        f"first_value({q('__o_' + c)}) OVER (PARTITION BY __p ORDER BY {q('__o_' + c)} IS NULL, "
        f"{q('__n_' + c)} DESC, _source_file, _source_row "
        f"ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS {q('__m_' + c)}"
        for c in datetimes
    )
    return f"SELECT *, {usual} FROM (SELECT *, {counts} FROM ({rows}))"


@dataclass(frozen=True)
class ValidationResult:
    raw_rows: int
    valid_rows: int
    quarantined_rows: int
    by_rule: list[dict[str, object]]
    examples: list[str]
    # Per datetime column: validated values whose offset was not +00:00, converted to UTC.
    tz_offsets_normalised: dict[str, int]
    # The quarantine_share verdict on the tables as this validation left them.
    quarantine: CheckOutcome

    @property
    def quarantine_limit_hit(self) -> bool:
        return not self.quarantine.passed


def validate_source(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, where: str | None = None
) -> ValidationResult:
    """Validate raw.<name>: all of it (tables replaced), or only the raw rows matching `where` (a
    partition window on _event_time: exactly those rows of validated/quarantine are replaced)."""
    present = table_columns(conn, "raw", name)
    source = f"(SELECT * FROM raw.{q(name)} WHERE {where})" if where else f"raw.{q(name)}"
    _require_columns(conn, name, spec, present, source)
    policy = spec.schema_evolution

    def raw_ref(column: str) -> str:
        # An optional column no batch has carried yet is all null (schema_evolution.missing_columns: null).
        return q(column) if column in present else "CAST(NULL AS VARCHAR)"

    partitioned = spec.partitions is not None and EVENT_TIME in present
    failure_list = _failure_list(spec, raw_ref, partitioned)
    id_cols = ", ".join(q("__t_" + c) for c in spec.id)
    duplicate_of_earlier = (
        f"len(__f) = 0 AND row_number() OVER (PARTITION BY len(__f) = 0, __p, {id_cols} "
        f"ORDER BY _source_file, _source_row) > 1"
        if spec.id
        else "false"
    )
    id_reason = lit(
        f"duplicate id ({', '.join(spec.id)}): an earlier row "
        f"{'of the same partition ' if partitioned else ''}has the same values"
    )
    platform = [EVENT_TIME] if EVENT_TIME in present else []
    out_cols = ", ".join(
        [f"{q('__t_' + c)} AS {q(c)}" for c in spec.columns] + platform + _row_id(spec, raw_ref)
    )
    raw_cols = ", ".join(q(c) for c in present)
    datetimes = _datetime_columns(spec)
    try:
        conn.execute(f"""
            CREATE OR REPLACE TEMP TABLE __typed AS
            SELECT *, {failure_list} AS __f FROM ({_typed_rows(spec, source, raw_ref, partitioned)})
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
                   array_to_string(list_transform(__f, lambda __r: __r.reason), '; ') AS _reasons
            FROM __checked WHERE len(__f) > 0 ORDER BY _source_file, _source_row""")
        _replace_tables(conn, name, where, partitioned)
        result = _result(conn, name, spec, datetimes)
    finally:
        for temp in ("__typed", "__checked", "__valid", "__quarantined"):
            conn.execute(f"DROP TABLE IF EXISTS {temp}")
    return result


def _require_columns(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, present: list[str], source: str
) -> None:
    """Refuse, before anything is written, a batch lacking a column it must have."""
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


def _failure_list(spec: SourceSpec, raw_ref: Callable[[str], str], partitioned: bool) -> str:
    """SQL for a typed row's list of failed rules (empty when the row is valid)."""
    failures = []
    for column, cspec in spec.columns.items():
        typed = q("__t_" + column)
        failures.append(
            _failure(
                "type",
                column,
                f"{raw_ref(column)} IS NOT NULL AND {typed} IS NULL AND NOT {nan_as_missing(raw_ref(column))}",
                f"{lit(column + ': ')} || {_quoted(raw_ref(column))} || ' is not a valid {cspec.type}'",
            )
        )
        if cspec.type == "datetime" and spec.timezones == "reject":
            failures.append(_timezone_failure(column, raw_ref(column), partitioned))
        failures += [
            _failure(rule, column, cond, reason)
            for rule, cond, reason in rule_conditions(column, cspec, typed)
        ]
    return f"list_filter([{', '.join(failures)}], lambda __r: __r IS NOT NULL)"


def _replace_tables(conn: duckdb.DuckDBPyConnection, name: str, where: str | None, partitioned: bool) -> None:
    """validated and quarantine from the temp tables, both in one transaction (whole, or the window)."""
    for attempt in transactions(conn, f"validated.{name}"):
        with attempt:
            conn.execute("CREATE SCHEMA IF NOT EXISTS validated")
            conn.execute("CREATE SCHEMA IF NOT EXISTS quarantine")
            changed = _changed_range(conn, name, where, partitioned)
            for schema, temp in (("validated", "__valid"), ("quarantine", "__quarantined")):
                if where:
                    drop_unpartitioned(conn, schema, name)
                    replace_rows(conn, f"{schema}.{q(name)}", temp, where)
                else:
                    conn.execute(f"CREATE OR REPLACE TABLE {schema}.{q(name)} AS SELECT * FROM {temp}")
            if changed is not None:
                changes.record(conn, name, *changed)


def _result(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, datetimes: list[str]
) -> ValidationResult:
    """What the validation did, counted on its temp tables (still present)."""
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
    normalised = [
        f"count(*) FILTER (WHERE {q('__o_' + c)} NOT IN ('+00:00', {lit(NO_OFFSET)}))" for c in datetimes
    ]
    tz_counts = (
        conn.execute(f"SELECT {', '.join(normalised)} FROM __checked WHERE len(__f) = 0").fetchone()
        if datetimes
        else ()
    )
    return ValidationResult(
        raw_rows=raw_rows,
        valid_rows=valid_rows,
        quarantined_rows=raw_rows - valid_rows,
        by_rule=by_rule,
        examples=examples,
        tz_offsets_normalised=dict(zip(datetimes, tz_counts, strict=True)),
        quarantine=check_quarantine_share(conn, name, spec),
    )


def _changed_range(
    conn: duckdb.DuckDBPyConnection, name: str, where: str | None, partitioned: bool
) -> tuple[dt.datetime | None, dt.datetime | None] | None:
    """Event times the write about to happen changes: those of the rows it removes and of the rows it
    adds; (None, None): the whole table (no window, or no event times); None: no row at all."""
    present = table_columns(conn, "validated", name)
    if not where or not partitioned or (present and EVENT_TIME not in present):
        return None, None
    ranges = [conn.execute(f"SELECT min({EVENT_TIME}), max({EVENT_TIME}) FROM __valid").fetchone()]
    if present:
        old = f"SELECT min({EVENT_TIME}), max({EVENT_TIME}) FROM validated.{q(name)} WHERE {where}"
        ranges.append(conn.execute(old).fetchone())
    los = [lo for lo, _ in ranges if lo is not None]
    return (min(los), max(hi for _, hi in ranges if hi is not None)) if los else None


def _row_id(spec: SourceSpec, raw_ref: Callable[[str], str]) -> list[str]:
    """The built-in id of a source without `id`: md5 of the row's raw values plus its occurrence among
    identical rows (in file order), so the same rows re-ingested keep their ids whatever the file name."""
    if spec.id:
        return []
    values = "concat_ws(chr(31), " + ", ".join(f"coalesce({raw_ref(c)}, chr(0))" for c in spec.columns) + ")"
    occurrence = f"row_number() OVER (PARTITION BY {values} ORDER BY _source_file, _source_row)"
    return [f"md5({values} || '#' || CAST({occurrence} AS VARCHAR)) AS {ROW_ID}"]


def _fail_on_type_change(conn: duckdb.DuckDBPyConnection, name: str) -> None:
    bad = conn.execute("""
        SELECT count(*) OVER (), _source_file, _source_row, __r.column, __r.reason
        FROM (SELECT *, unnest(list_filter(__f, lambda __r: __r.rule = 'type')) AS __r FROM __checked)
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
    problems += [f"{c}: not in config" for c in actual if c not in expected and c not in (EVENT_TIME, ROW_ID)]
    return CheckOutcome(
        not problems,
        "; ".join(problems) or "columns and types match the config",
        {"expected": expected, "problems": problems},
    )


def check_row_conservation(
    conn: duckdb.DuckDBPyConnection, name: str, where: str | None = None
) -> CheckOutcome:
    """raw = validated + quarantined, within `where` (the checking run's partitions, a condition on
    _event_time) or over the whole tables. Another run may have loaded raw rows of its own partitions and not
    validated them yet: counted over the whole tables, that run's half-done step would fail this one's."""
    scope = f" WHERE {where}" if where else ""
    raw, valid, quarantined = conn.execute(
        f"SELECT (SELECT count(*) FROM raw.{q(name)}{scope}), (SELECT count(*) FROM validated.{q(name)}{scope}), "
        f"(SELECT count(*) FROM quarantine.{q(name)}{scope})"
    ).fetchone()
    ok = raw == valid + quarantined
    return CheckOutcome(
        ok,
        f"raw {raw} {'=' if ok else '!='} validated {valid} + quarantined {quarantined}"
        + (f" (rows with {where})" if where else ""),
        {"raw": raw, "validated": valid, "quarantined": quarantined, "scope": where or "whole tables"},
    )


def check_unique_ids(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    """No id on two validated rows. Validation quarantines duplicates within a partition, so what this
    finds is an id in two partitions; `duplicate_ids` says whether that blocks consumers or warns."""
    if not spec.id:
        return CheckOutcome(True, "no id configured")
    ids = ", ".join(spec.id)
    found = conn.execute(
        f"SELECT count(*) OVER (), * FROM (SELECT {', '.join(q(c) for c in spec.id)} FROM validated.{q(name)} "
        "GROUP BY ALL HAVING count(*) > 1) ORDER BY ALL LIMIT 1"
    ).fetchone()
    meta: dict[str, object] = {
        "duplicated_ids": 0,
        "id_columns": spec.id,
        "duplicate_ids": spec.duplicate_ids,
    }
    if found is None:
        return CheckOutcome(True, f"every id ({ids}) is on one row of validated.{name}", meta)
    dupes, values = found[0], found[1:]
    example = ", ".join(
        f"{c}={v!r}" if isinstance(v, str) else f"{c}={v}" for c, v in zip(spec.id, values, strict=True)
    )
    places = [
        f"partition {part} ({file} row {row})" if part else f"{file} row {row}"
        for file, row, part in _rows_with_id(conn, name, spec, values)
    ]
    meta |= {"duplicated_ids": dupes, "example": example, "example_rows": places}
    found_text = (
        f"{dupes} id value(s) of ({ids}) are on more than one row of validated.{name}, e.g. ({example}) in "
        f"{' and '.join(places)} (duplicate_ids: {spec.duplicate_ids})"
    )
    if spec.duplicate_ids == "warn":
        return CheckOutcome(False, f"warning only: {found_text}; consumers still use the table", meta, "warn")
    return CheckOutcome(
        False,
        f"{found_text}: fix or remove the duplicated rows in the source, or set duplicate_ids: warn to accept "
        "them",
        meta,
    )


def _rows_with_id(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, values: tuple[object, ...]
) -> list[tuple[str, int, str | None]]:
    """(file, row, partition) of the validated rows with this id, read back from raw minus quarantine."""
    match = " AND ".join(f"{cast_expr(q(c), spec.columns[c].type)} IS NOT DISTINCT FROM ?" for c in spec.id)
    partitioned = spec.partitions is not None and EVENT_TIME in table_columns(conn, "raw", name)
    part = f"strftime({partition_sql(spec)}, '%Y-%m-%d')" if partitioned else "NULL"
    return conn.execute(
        f"SELECT _source_file, _source_row, {part} AS p FROM raw.{q(name)} r WHERE {match} AND NOT EXISTS "
        f"(SELECT 1 FROM quarantine.{q(name)} x WHERE x._source_file = r._source_file "
        "AND x._source_row = r._source_row) ORDER BY p, _source_file, _source_row LIMIT 3",
        list(values),
    ).fetchall()


def check_rules(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    """Ranges, allowed values, not-null and patterns hold on every validated row."""
    rules = {
        f"{rule}:{column}": cond
        for column, cspec in spec.columns.items()
        for rule, cond, _ in rule_conditions(column, cspec, q(column))
    }
    if not rules:
        return CheckOutcome(True, "no value rules configured")
    counts = [f"count(*) FILTER (WHERE {cond})" for cond in rules.values()]
    row = conn.execute(f"SELECT {', '.join(counts)} FROM validated.{q(name)}").fetchone()
    names = list(rules)
    broken = {n: v for n, v in zip(names, row, strict=True) if v}
    return CheckOutcome(
        not broken,
        f"rule violations: {broken}" if broken else f"{len(names)} rules hold",
        {"violations": broken, "rules_checked": len(names)},
    )


def _percent(share: float) -> str:
    return f"{100 * share:.4g}%"


def check_quarantine_share(conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec) -> CheckOutcome:
    """At most max_quarantine_share of the source's rows quarantined: more means a broken batch."""
    raw, quarantined = conn.execute(
        f"SELECT (SELECT count(*) FROM raw.{q(name)}), (SELECT count(*) FROM quarantine.{q(name)})"
    ).fetchone()
    share = quarantined / raw if raw else 1.0
    ok = share <= spec.max_quarantine_share
    # The earliest row of each rule, with its own reasons (a struct compares field by field).
    top = conn.execute(
        f"SELECT _rule, _column, count(*) n, min({{'f': _source_file, 'r': _source_row, 'why': _reasons}}) "
        f"FROM quarantine.{q(name)} GROUP BY _rule, _column ORDER BY n DESC, _rule, _column LIMIT 3"
    ).fetchall()
    reasons = "; ".join(
        f"{r} on {c}: {n} rows (e.g. {e['f']} row {e['r']}: {e['why']})" for r, c, n, e in top
    )
    limit = f"max_quarantine_share = {_percent(spec.max_quarantine_share)} of source '{name}'"
    verdict = (
        f"within the limit {limit}"
        if ok
        else f"above the limit {limit}; the batch must not reach training: fix or remove the rows listed in "
        f"quarantine.{name}, or raise max_quarantine_share if they are expected"
    )
    counted = f"{_percent(share)} of rows quarantined ({quarantined} of {raw})" if raw else "no raw rows"
    return CheckOutcome(
        ok,
        f"{counted}, {verdict}" + (f"; top: {reasons}" if top else ""),
        {
            "quarantine_share": share,
            "max_quarantine_share": spec.max_quarantine_share,
            "quarantine_limit_hit": not ok,
        },
    )
