"""The modelling table of a pipeline: validated sources joined (key and as-of joins), derived columns and
the target, built in DuckDB as `<pipeline>.modelling_table`, with a `_split` column for the time split.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import duckdb
import polars as pl

from ml_assets.core import changes
from ml_assets.core.check_results import CheckOutcome
from ml_assets.core.errors import DatasetError
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.spec.schema import ROW_ID
from ml_assets.core.sql import lit, q, table_exists
from ml_assets.core.store import transactions


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


def _split_expr(pipeline: PipelineSpec, rows: str = "__t") -> str:
    """The `_split` of every row of relation `rows` (which holds all the table's rows)."""
    split = pipeline.split
    if split.method == "random":
        return _random_split(pipeline, pipeline.task != "regression")
    ts = q(pipeline.timestamp)
    labelled = f"FROM {rows} WHERE {q(pipeline.target.name)} IS NOT NULL"
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


# Bumped when the rows this module builds from the same config change: a table built before is rebuilt.
BUILD_VERSION = 1


def definition(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> str:
    """Fingerprint of everything a modelling table row is made from: a new one means a full rebuild."""
    parts = [
        str(BUILD_VERSION),
        joined_select(pipeline, sources),
        derived_columns(pipeline),
        pipeline.target.model_dump_json(),
        pipeline.split.model_dump_json(),
        pipeline.history.model_dump_json() if pipeline.history else "",
        *(sources[s].model_dump_json() for s in sorted(sources)),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _ts_lit(value: dt.datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def affected_rows(
    pipeline: PipelineSpec, sources: dict[str, SourceSpec], since: list[changes.Change]
) -> str | None:
    """SQL condition on base rows `b` true for every row whose modelling-table row the changes can alter;
    None when only a full rebuild can tell (a whole table replaced, a changed key join, an as-of join
    not on its source's event time, a base without event times).

    A base row changes with its own event time. A row of an as-of joined source at time t changed in
    lo..hi can only be the match of base rows at or after lo, and only of those with no unchanged row
    of the same keys after hi and at or before their own time (that row, or a later one, is their match
    before and after the change): so a late or corrected hour of weather refreshes exactly the flights
    whose weather it is or was, however late it arrives.
    """
    base = sources[pipeline.base]
    conditions = []
    for change in since:
        if change.lo is None or change.hi is None:
            return None
        lo, hi = _ts_lit(change.lo), _ts_lit(change.hi)
        # The history feature set logs the base timestamps of the rows it rewrote.
        if change.source in (pipeline.base, history_consumer(pipeline)):
            if base.partitions is None or base.timestamp is None:
                return None
            conditions.append(f"b.{q(base.timestamp)} BETWEEN {lo} AND {hi}")
        for join in pipeline.joins:
            if join.source != change.source:
                continue
            if join.asof is None or join.asof.right != sources[join.source].timestamp:
                return None
            left, right = f"b.{q(join.asof.left)}", f"w.{q(join.asof.right)}"
            same_keys = "".join(f" AND w.{q(k)} = b.{q(k)}" for k in join.keys)
            # The first unchanged row after the change, per keys: an equality join DuckDB decorrelates.
            after = f"SELECT min({right}) FROM validated.{q(join.source)} w WHERE {right} > {hi}{same_keys}"
            conditions.append(f"({left} >= {lo} AND {left} < coalesce(({after}), TIMESTAMP 'infinity'))")
    return " OR ".join(conditions) or "false"


def build_modelling_table(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec]
) -> DatasetResult:
    """Build `<pipeline>.modelling_table`: in full the first time (or after a change of config, or of a
    whole source table), else only the rows the validated tables' changes since the last build affect
    (`affected_rows`); either way the split is then recomputed over all rows. Both give the same rows."""
    if pipeline.history is not None and not table_exists(conn, pipeline.name, "history"):
        raise DatasetError(
            f"pipeline '{pipeline.name}': its history feature set is not built yet; materialize "
            f"{pipeline.name}/history first (core.history.build_history)"
        )
    fingerprint = definition(pipeline, sources)
    done = changes.built_up_to(conn, pipeline.name, fingerprint)
    upto = changes.latest(conn) if changes.logging_enabled(conn) else 0
    used = [pipeline.base, *(j.source for j in pipeline.joins), history_consumer(pipeline)]
    where = (
        affected_rows(pipeline, sources, changes.since(conn, done, used))
        if done is not None
        and not pipeline.split.window_days
        and table_exists(conn, pipeline.name, "modelling_table")
        else None
    )
    result = _build(conn, pipeline, sources) if where is None else _update(conn, pipeline, sources, where)
    changes.mark_built(conn, pipeline.name, fingerprint, upto)
    return result


def history_consumer(pipeline: PipelineSpec) -> str:
    """The history feature set's name in the change log (see core.history.consumer)."""
    return f"{pipeline.name}.history"


def _with_history(pipeline: PipelineSpec, joined: str) -> str:
    """The joined rows with the history feature set's columns (by row id): the feature set is built
    first, as its own asset."""
    if pipeline.history is None:
        return joined
    columns = "".join(f", h.{q(c)}" for c in pipeline.history.columns())
    on = " AND ".join(f"j.{q(c)} = h.{q(c)}" for c in pipeline.row_id)
    return f"SELECT j.*{columns} FROM ({joined}) j LEFT JOIN {q(pipeline.name)}.history h ON {on}"


def _joined_rows(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec], where: str
) -> tuple[int, int]:
    """`__t`: the joined, derived rows with their target of the base rows matching `where` (on `b`);
    returns (base rows, rows without a target), after the checks that every build makes."""
    target = pipeline.target
    target_col = f", {target.expr} AS {q(target.name)}" if target.expr else ""
    base = f"(SELECT * FROM validated.{q(pipeline.base)} b WHERE {where})"
    carry = () if sources[pipeline.base].id else (ROW_ID,)
    base_rows = conn.execute(f"SELECT count(*) FROM {base}").fetchone()[0]
    try:
        joined = joined_select(pipeline, sources, base=base, carry=carry)
        conn.execute(f"CREATE OR REPLACE TEMP TABLE __j AS {_with_history(pipeline, joined)}")
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE __t AS SELECT *{derived_columns(pipeline)}{target_col} FROM __j"
        )
    except duckdb.Error as exc:
        raise DatasetError(
            f"pipeline '{pipeline.name}': building the modelling table failed (check joins, "
            f"derived and target.expr): {exc}"
        ) from exc
    joined_rows = conn.execute("SELECT count(*) FROM __t").fetchone()[0]
    if joined_rows != base_rows:
        raise DatasetError(
            f"pipeline '{pipeline.name}': the joins turned {base_rows} rows of '{pipeline.base}' into "
            f"{joined_rows}; a joined source has duplicate keys (give it an id on the join keys)"
        )
    missing = conn.execute(f"SELECT count(*) FROM __t WHERE {q(target.name)} IS NULL").fetchone()[0]
    if missing and target.missing == "fail":
        raise DatasetError(
            f"pipeline '{pipeline.name}': {missing} rows have no target '{target.name}' "
            "(target.missing: fail)"
        )
    return base_rows, missing


def _order(pipeline: PipelineSpec) -> str:
    """The modelling table's row order, a total one: rows share timestamps (flights of one scheduled hour)
    and DuckDB's parallel sort leaves ties in whatever order its threads finished, so a busy machine gave
    the model its rows in another order (a different model, bench/scale.py's same_outputs=False)."""
    ids = [q(c) for c in pipeline.row_id]
    return ", ".join([q(pipeline.timestamp), *ids] if pipeline.timestamp else ids)


def _build(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec]
) -> DatasetResult:
    target = pipeline.target
    try:
        base_rows, missing = _joined_rows(conn, pipeline, sources, "true")
        keep = f"{q(target.name)} IS NOT NULL"
        if pipeline.split.window_days:
            ts = q(pipeline.timestamp)
            keep += (
                f" AND {ts} >= (SELECT date_trunc('day', max({ts})) FROM __t) "
                f"- INTERVAL {pipeline.split.window_days - 1} DAY"
            )
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(pipeline.name)}")
        conn.execute(f"""CREATE OR REPLACE TABLE {table_name(pipeline)} AS
            SELECT *, {_split_expr(pipeline)} AS _split FROM __t
            WHERE {keep} ORDER BY {_order(pipeline)}""")
    finally:
        conn.execute("DROP TABLE IF EXISTS __j")
        conn.execute("DROP TABLE IF EXISTS __t")
    return _result(conn, pipeline, base_rows, missing)


def _update(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec], where: str
) -> DatasetResult:
    """Replace the rows `where` selects (on the table's base columns as on the validated base rows),
    then the split of every row, in one transaction."""
    table = table_name(pipeline)
    try:
        _joined_rows(conn, pipeline, sources, where)
        for attempt in transactions(conn, table):
            with attempt:
                conn.execute(
                    f"DELETE FROM {table} WHERE rowid IN (SELECT b.rowid FROM {table} b WHERE {where})"
                )
                conn.execute(
                    f"INSERT INTO {table} BY NAME SELECT *, NULL AS _split FROM __t "
                    f"WHERE {q(pipeline.target.name)} IS NOT NULL"
                )
                if pipeline.split.method == "random":
                    # Exact shares of the whole: every row's place in the seeded order may have moved.
                    conn.execute(f"""CREATE OR REPLACE TABLE {table} AS SELECT * REPLACE
                        ({_split_expr(pipeline, table)} AS _split) FROM {table} ORDER BY {_order(pipeline)}""")
                else:
                    split = _split_expr(pipeline, table)
                    conn.execute(f"UPDATE {table} SET _split = {split} WHERE _split IS DISTINCT FROM {split}")
    finally:
        conn.execute("DROP TABLE IF EXISTS __j")
        conn.execute("DROP TABLE IF EXISTS __t")
    base_rows = conn.execute(f"SELECT count(*) FROM validated.{q(pipeline.base)}").fetchone()[0]
    return _result(
        conn, pipeline, base_rows, base_rows - conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    )


def _result(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, base_rows: int, missing: int
) -> DatasetResult:
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


def capped_train_rows(conn: duckdb.DuckDBPyConnection, table: str, rank: str, cap: int) -> str:
    """A condition holding the training rows of `table` whose `rank` (a seeded hash) is among the `cap`
    lowest: the same rows every run, spread over the whole training window. The cut-off rank is found over
    one integer a row: sorting whole rows to keep the first `cap` of them costs DuckDB gigabytes at 10M."""
    cutoff = conn.execute(
        f"SELECT max(r) FROM (SELECT {rank} r FROM {table} WHERE _split = 'train' ORDER BY r LIMIT {cap})"
    ).fetchone()[0]
    return f"_split = 'train' AND {rank} <= {cutoff}"


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
