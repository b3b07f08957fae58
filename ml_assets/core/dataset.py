"""The modelling table of a pipeline: validated sources joined (key and as-of joins), derived columns and
the target, built in DuckDB as `<pipeline>.modelling_table`, with a `_split` column for the time split.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import polars as pl

from ml_assets.core.errors import DatasetError
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.spec.schema import ROW_ID
from ml_assets.core.sql import lit, q
from ml_assets.core.validate import CheckOutcome


@dataclass(frozen=True)
class DatasetResult:
    rows: int
    base_rows: int
    dropped_missing_target: int
    split_rows: dict[str, int]
    # Rows older than split.window_days: loaded partitions the model does not train on.
    outside_window: int = 0


def table_name(pipeline: PipelineSpec) -> str:
    return f"{q(pipeline.name)}.modelling_table"


def joined_select(
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    base: str | None = None,
    carry: tuple[str, ...] = (),
) -> str:
    """The base rows with every join's columns. `base` is the relation holding the base rows (default
    `validated.<base>`): online serving runs this same SQL over a request's rows and an in-memory copy of
    the joined sources' validated tables, so batch and online rows cannot be completed differently. `carry`
    names extra columns of `base` kept in the result (a request's row numbers)."""
    select = [f"b.{q(c)}" for c in [*sources[pipeline.base].columns, *carry]]
    if not sources[pipeline.base].id and base is None:
        # The built-in row id lives in the validated table; a request's rows are numbered by `carry`.
        select.append(f"b.{ROW_ID}")
    clauses = [f"FROM {base or f'validated.{q(pipeline.base)}'} b"]
    for i, join in enumerate(pipeline.joins):
        alias = f"j{i}"
        spec = sources[join.source]
        right_keys = {*join.keys, *([join.asof.right] if join.asof else [])}
        for col in join.columns or [c for c in spec.columns if c not in right_keys]:
            select.append(f"{alias}.{q(col)} AS {q(join.prefix + col)}")
        condition = " AND ".join(f"b.{q(k)} = {alias}.{q(k)}" for k in join.keys)
        if join.asof:
            # Latest row of the joined source at or before the base row's time: no look-ahead.
            condition += f" AND b.{q(join.asof.left)} >= {alias}.{q(join.asof.right)}"
            clauses.append(f"ASOF LEFT JOIN validated.{q(join.source)} {alias} ON {condition}")
        else:
            clauses.append(f"LEFT JOIN validated.{q(join.source)} {alias} ON {condition}")
    return f"SELECT {', '.join(select)} {' '.join(clauses)}"


def derived_columns(pipeline: PipelineSpec) -> str:
    """`, <expr> AS <name>` for every derived column, to append to a SELECT * list."""
    return "".join(f", {expr} AS {q(name)}" for name, expr in pipeline.derived.items())


def _random_split(pipeline: PipelineSpec, classification: bool) -> str:
    """Exact shares of the whole: rows (or groups, with group_by) are ordered by a seeded hash and the
    first test_fraction of them, then the next valid_fraction, taken; stratified, within each class."""
    split = pipeline.split

    def text(columns: list[str]) -> str:
        return "concat_ws('|', " + ", ".join(f"CAST({q(c)} AS VARCHAR)" for c in columns) + ")"

    unit = text(split.group_by or pipeline.row_id)
    # md5 is stable across DuckDB versions and machines, unlike hash(); the seed salts it.
    order = f"md5({lit(str(split.seed))} || {unit}), {unit}"
    # A group with rows of several classes cannot be kept whole in every stratum: groups win.
    stratified = split.stratify and classification and not split.group_by
    strata = f"PARTITION BY {q(pipeline.target.name)}" if stratified else ""
    if split.group_by:
        # Rows of one group are peers in this order: the running count jumps by the whole group, and a
        # group goes where its first row would, so it never straddles two splits.
        done = f"(count(*) OVER ({strata} ORDER BY {order}) - count(*) OVER ({strata} ORDER BY {order} "
        done += "RANGE BETWEEN CURRENT ROW AND CURRENT ROW))"
    else:
        done = f"(row_number() OVER ({strata} ORDER BY {order}) - 1)"
    share = f"({done} / count(*) OVER ({strata}))"
    return (
        f"CASE WHEN {share} < {split.test_fraction} THEN 'test' "
        f"WHEN {share} < {split.test_fraction + split.valid_fraction} THEN 'valid' ELSE 'train' END"
    )


def _split_expr(pipeline: PipelineSpec) -> str:
    split = pipeline.split
    if split.method == "random":
        return _random_split(pipeline, pipeline.task != "regression")
    ts = q(pipeline.timestamp)
    labelled = f"FROM __t WHERE {q(pipeline.target.name)} IS NOT NULL"
    if split.valid_start:
        valid, test = lit(str(split.valid_start)), lit(str(split.test_start))
    elif split.test_days:
        # Whole days counted back from the latest labelled day: the split moves as partitions arrive.
        last_day = f"(SELECT date_trunc('day', max({ts})) {labelled})"
        test = f"({last_day} - INTERVAL {split.test_days - 1} DAY)"
        valid = f"({test} - INTERVAL {split.valid_days} DAY)"
    else:
        # The latest test_fraction of the labelled rows is the test set, the valid_fraction before it
        # validation (rows without a target are dropped, so they must not count).
        valid = f"(SELECT quantile_disc({ts}, {1 - split.test_fraction - split.valid_fraction}) {labelled})"
        test = f"(SELECT quantile_disc({ts}, {1 - split.test_fraction}) {labelled})"
    return (
        f"CASE WHEN {ts} >= CAST({test} AS TIMESTAMP) THEN 'test' "
        f"WHEN {ts} >= CAST({valid} AS TIMESTAMP) THEN 'valid' ELSE 'train' END"
    )


def build_modelling_table(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec]
) -> DatasetResult:
    base_rows = conn.execute(f"SELECT count(*) FROM validated.{q(pipeline.base)}").fetchone()[0]
    derived = derived_columns(pipeline)
    target = pipeline.target
    target_col = f", {target.expr} AS {q(target.name)}" if target.expr else ""
    try:
        try:
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __j AS {joined_select(pipeline, sources)}")
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __t AS SELECT *{derived}{target_col} FROM __j")
        except duckdb.Error as exc:
            raise DatasetError(
                f"pipeline '{pipeline.name}': building the modelling table failed (check joins, "
                f"derived and target.expr): {exc}"
            ) from exc
        joined = conn.execute("SELECT count(*) FROM __t").fetchone()[0]
        if joined != base_rows:
            raise DatasetError(
                f"pipeline '{pipeline.name}': the joins turned {base_rows} rows of '{pipeline.base}' into {joined}; "
                "a joined source has duplicate keys (give it an id on the join keys)"
            )
        missing = conn.execute(f"SELECT count(*) FROM __t WHERE {q(target.name)} IS NULL").fetchone()[0]
        if missing and target.missing == "fail":
            raise DatasetError(
                f"pipeline '{pipeline.name}': {missing} rows have no target '{target.name}' "
                "(target.missing: fail)"
            )
        keep = f"{q(target.name)} IS NOT NULL"
        if pipeline.split.window_days:
            ts = q(pipeline.timestamp)
            keep += (
                f" AND {ts} >= (SELECT date_trunc('day', max({ts})) FROM __t) "
                f"- INTERVAL {pipeline.split.window_days - 1} DAY"
            )
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(pipeline.name)}")
        order = q(pipeline.timestamp) if pipeline.timestamp else ", ".join(q(c) for c in pipeline.row_id)
        conn.execute(f"""CREATE OR REPLACE TABLE {table_name(pipeline)} AS
            SELECT *, {_split_expr(pipeline)} AS _split FROM __t
            WHERE {keep} ORDER BY {order}""")
    finally:
        conn.execute("DROP TABLE IF EXISTS __j")
        conn.execute("DROP TABLE IF EXISTS __t")
    split_rows = dict(
        conn.execute(f"SELECT _split, count(*) FROM {table_name(pipeline)} GROUP BY 1").fetchall()
    )
    return DatasetResult(
        rows=sum(split_rows.values()),
        base_rows=base_rows,
        dropped_missing_target=missing,
        split_rows={s: split_rows.get(s, 0) for s in ("train", "valid", "test")},
        outside_window=base_rows - missing - sum(split_rows.values()),
    )


def check_target_not_null(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> CheckOutcome:
    nulls, rows = conn.execute(
        f"SELECT count(*) FILTER (WHERE {q(pipeline.target.name)} IS NULL), count(*) FROM {table_name(pipeline)}"
    ).fetchone()
    return CheckOutcome(
        nulls == 0,
        f"{nulls} of {rows} rows have no target '{pipeline.target.name}'",
        {"null_targets": nulls, "rows": rows},
    )


def check_splits_populated(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> CheckOutcome:
    counts = dict(conn.execute(f"SELECT _split, count(*) FROM {table_name(pipeline)} GROUP BY 1").fetchall())
    empty = [s for s in ("train", "valid", "test") if not counts.get(s)]
    return CheckOutcome(
        not empty, f"empty split(s): {empty}" if empty else f"split sizes {counts}", {"split_rows": counts}
    )


def bounded_sample(
    frame: pl.DataFrame, bound: int, time_column: str | None = None, seed: int = 0
) -> pl.DataFrame:
    """At most about `bound` rows; with a time column, every day keeps its share of rows."""
    if frame.height <= bound:
        return frame
    if time_column is None:
        return frame.sample(bound, seed=seed)
    fraction = bound / frame.height
    day = pl.col(time_column).dt.truncate("1d")
    rank = pl.int_range(pl.len()).shuffle(seed=seed).over(day)
    return frame.filter(rank < (pl.len().over(day) * fraction).ceil())
