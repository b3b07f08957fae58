"""The history feature set of a pipeline: point-in-time aggregates of earlier source rows (the `history`
block of the pipeline file), built in DuckDB as `<pipeline>.history`, one row per base row.

A row predicted at as_of = t sees exactly the source rows known before t (`known_at < t`) inside each
window [t - w, t); a schedule family (no `known_at`: known in advance) sees the rows whose event time lies
in [at - w, at + ahead) around the row's own time `at`. Each family is one pass of DuckDB window functions
over its events and the rows to answer, sorted together by time within the family's keys (RANGE frames),
so a year of rows costs a sort, not a join of every row with its window.

Sums are taken over DECIMAL values, exact whatever the order DuckDB adds them in: a row recomputed alone
(an incremental build) equals the same row of a full build bit for bit. Per family, the events (keys,
time, value) are kept in `<pipeline>.history_events_<family>`: when a source window is replaced, the old
events' times say which rows' windows saw them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

import duckdb

from ml_assets.core import changes
from ml_assets.core.dataset import history_consumer
from ml_assets.core.errors import DatasetError
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.spec.schema import HistoryFamily, HistorySpec, duration_minutes
from ml_assets.core.sql import q, table_exists
from ml_assets.core.store import MODELLING_BUILDS, transactions

# 2: the shrinkage multiplies the parent's value, not its sum (a last-bit difference, stored rows rebuilt).
BUILD_VERSION = 2
# Values are summed exactly (see the module docstring); a value beyond 10^12 does not fit.
VALUE_TYPE = "DECIMAL(18, 6)"


@dataclass(frozen=True)
class HistoryResult:
    rows: int
    recomputed: int
    full_rebuild: bool
    coverage: dict[str, float]
    fallback_share: dict[str, float]
    latest_known: dict[str, str | None]


def table_name(pipeline: PipelineSpec) -> str:
    return f"{q(pipeline.name)}.history"


def events_table(pipeline: PipelineSpec, family: str) -> str:
    return f"{q(pipeline.name)}.{q(f'history_events_{family}')}"


def consumer(pipeline: PipelineSpec) -> str:
    """The feature set's name in the change log: as a consumer of the validated tables, and as the
    producer whose rewritten rows the modelling table refreshes (a dot: never a source's name)."""
    return history_consumer(pipeline)


def spec_of(pipeline: PipelineSpec) -> HistorySpec:
    if pipeline.history is None:
        raise DatasetError(f"pipeline '{pipeline.name}' has no history block")
    return pipeline.history


def _minutes(n: int) -> str:
    return f"INTERVAL {n} MINUTE"


def as_of_expr(history: HistorySpec) -> str:
    return f"(CAST(({history.at}) AS TIMESTAMP) - {_minutes(duration_minutes(history.horizon))})"


def source_of(pipeline: PipelineSpec, family: HistoryFamily) -> str:
    return family.source or pipeline.base


def event_select(pipeline: PipelineSpec, sources: dict[str, SourceSpec], family: HistoryFamily) -> str:
    """SELECT of a family's events from its validated source: keys, `_t` (when the row counts: known_at,
    or a schedule's event time), `_v` (the value), `_c` (the share condition, 1/0), `_e` (the source
    row's own timestamp, by which the change log names windows)."""
    source = source_of(pipeline, family)
    spec = sources[source]
    time = family.known_at or family.time or q(spec.timestamp)
    condition = (
        f"CAST(CASE WHEN ({family.condition}) THEN 1 ELSE 0 END AS {VALUE_TYPE})"
        if family.condition
        else "NULL"
    )
    stamp = f"CAST({q(spec.timestamp)} AS TIMESTAMP)" if spec.timestamp else "CAST(NULL AS TIMESTAMP)"
    keys = "".join(f"{q(k)}, " for k in family.keys)
    return (
        f"SELECT {keys}CAST(({time}) AS TIMESTAMP) AS _t, CAST(({family.value}) AS {VALUE_TYPE}) AS _v, "
        f"{condition} AS _c, {stamp} AS _e FROM validated.{q(source)}"
    )


def _bounds(family: HistoryFamily) -> tuple[str, dict[str, str]]:
    """The window ends of a family's rows as SQL over __hq: its end (exclusive) and, per window, its
    start (inclusive). Source rows with `_t` in [start, end) are a row's window."""
    anchor = "_at" if family.schedule else "_as_of"
    end = f"{anchor} + {_minutes(duration_minutes(family.ahead))}" if family.ahead else anchor
    return end, {w: f"{anchor} - {_minutes(duration_minutes(w))}" for w in family.windows}


def _function_value(fn: str, p: str) -> str:
    """One function's value from the raw aggregates named `<p>_...` (NULL on an empty window)."""
    n = f"{p}_n"
    return {
        "count": n,
        "sum": f"CAST({p}_s AS DOUBLE)",
        "mean": f"CAST({p}_s AS DOUBLE) / nullif({n}, 0)",
        "share": f"CAST({p}_c AS DOUBLE) / nullif({n}, 0)",
        "std": f"CASE WHEN {n} > 1 THEN sqrt(greatest(0, (CAST({p}_ss AS DOUBLE) - CAST({p}_s AS DOUBLE) "
        f"* CAST({p}_s AS DOUBLE) / {n}) / ({n} - 1))) END",
        "min": f"CAST({p}_min AS DOUBLE)",
        "max": f"CAST({p}_max AS DOUBLE)",
        "last": f"CAST({p}_last AS DOUBLE)",
    }[fn]


def _feature_expr(family: HistoryFamily, fn: str, own: str, parent: str | None) -> str:
    """A feature from its own group's aggregates, or its parent group's where the group is sparse (fewer
    than min_count rows), and mean and share shrunk towards the parent by `prior` rows."""
    value = _function_value(fn, own)
    if fn in ("count", "sum"):
        return value
    if parent is not None and family.prior and fn in ("mean", "share"):
        # Parenthesized: the prior multiplies the parent's value (online repeats this arithmetic).
        n, p = f"{own}_n", _function_value(fn, parent)
        value = f"(coalesce(({value}) * {n}, 0) + {family.prior} * ({p})) / ({n} + {family.prior})"
    if family.min_count > 1 or parent is not None:
        fallback = _function_value(fn, parent) if parent is not None else "NULL"
        value = f"CASE WHEN {own}_n < {family.min_count} THEN {fallback} ELSE {value} END"
    return value


def _running_parts(family: HistoryFamily) -> dict[str, str]:
    """The running totals a family's functions need, as aggregates of one time's events (exact sums)."""
    wide = "CAST(_v AS DECIMAL(38, 6))"
    parts = {"n": "count(*)"}
    if {"sum", "mean", "std"} & set(family.functions):
        parts["s"] = f"sum({wide})"
    if "std" in family.functions:
        parts["ss"] = f"sum({wide} * {wide})"
    if "share" in family.functions:
        parts["c"] = "sum(_c)"
    return parts


def _cumulative(family: HistoryFamily, keys: list[str], events: str) -> str:
    """Per keys and distinct time, the running totals of the events up to it, and the largest value at
    that time (the `last` value: ties broken the same way always); restricted to the events the windows
    of __hq can reach."""
    end, starts = _bounds(family)
    first = " OR ".join(f"_t >= (SELECT min({start}) FROM __hq)" for start in starts.values())
    running = f"OVER (PARTITION BY {', '.join(map(q, keys))} ORDER BY _t" if keys else "OVER (ORDER BY _t"
    running += " ROWS UNBOUNDED PRECEDING)"
    cols = "".join(f"{q(k)}, " for k in keys)
    totals = ", ".join(f"sum({agg}) {running} AS _{part}" for part, agg in _running_parts(family).items())
    return f"""SELECT {cols}_t, max(_v) AS _last, {totals}
        FROM {events} WHERE _v IS NOT NULL AND ({first}) AND _t < (SELECT max({end}) FROM __hq)
        GROUP BY {cols}_t"""


def _extremes(
    conn: duckdb.DuckDBPyConnection, family: HistoryFamily, keys: list[str], events: str, table: str
) -> None:
    """min and max have no running form: a window pass over the events and the rows sorted together,
    framed by time (RANGE), added to `table`."""
    wanted = [fn for fn in ("min", "max") if fn in family.functions]
    if not wanted:
        return
    anchor = "_at" if family.schedule else "_as_of"
    ahead = duration_minutes(family.ahead) if family.ahead else 0
    end = (
        f"{_minutes(ahead)} - INTERVAL 1 MICROSECOND FOLLOWING"
        if ahead
        else "INTERVAL 1 MICROSECOND PRECEDING"
    )
    partition = f"PARTITION BY {', '.join(map(q, keys))} " if keys else ""
    tag = table.removeprefix("__h")
    found = [
        f"{fn}(_v) OVER ({partition}ORDER BY _t RANGE BETWEEN {_minutes(duration_minutes(w))} PRECEDING AND {end}) "
        f"AS {tag}_{w}_{fn}"
        for w in family.windows
        for fn in wanted
    ]
    cols = "".join(f"{q(k)}, " for k in keys)
    _, starts = _bounds(family)
    first = " OR ".join(f"_t >= (SELECT min({start}) FROM __hq)" for start in starts.values())
    conn.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS SELECT h.*, x.* EXCLUDE (_qid) FROM {table} h JOIN (
        SELECT _qid, {", ".join(found)} FROM (
            SELECT {cols}_t, _v, NULL::BIGINT AS _qid FROM {events} WHERE _v IS NOT NULL AND ({first})
            UNION ALL SELECT {cols}{anchor} AS _t, NULL AS _v, _qid FROM __hq)
        QUALIFY _qid IS NOT NULL) x USING (_qid)""")


def _family_pass(
    conn: duckdb.DuckDBPyConnection, family: HistoryFamily, keys: list[str], events: str, tag: str
) -> str:
    """Temp table `__h<tag>`: per row of __hq (`_qid`) the raw aggregates of every window (`<tag>_<w>_n`,
    `_s`, `_ss`, `_c`, `_last`, `_min`, `_max`) at the grouping `keys`: the running totals just before the
    window's end minus those just before its start, found by as-of joins (sorts, not a join of every row
    with its window)."""
    end, starts = _bounds(family)
    conn.execute(f"CREATE OR REPLACE TEMP TABLE __hc AS {_cumulative(family, keys, events)}")

    def same(alias: str) -> str:
        return "".join(f" AND {alias}.{q(k)} = q.{q(k)}" for k in keys)

    select, joins = ["q._qid"], [f"ASOF LEFT JOIN __hc e ON {end} > e._t{same('e')}"]
    for i, (w, start) in enumerate(starts.items()):
        p, alias = f"{tag}_{w}", f"s{i}"
        joins.append(f"ASOF LEFT JOIN __hc {alias} ON {start} > {alias}._t{same(alias)}")
        for part in _running_parts(family):
            diff = f"coalesce(e._{part}, 0) - coalesce({alias}._{part}, 0)"
            select.append(f"{f'CAST({diff} AS BIGINT)' if part == 'n' else diff} AS {p}_{part}")
        select.append(f"CASE WHEN e._t >= {start} THEN e._last END AS {p}_last")
    table = f"__h{tag}"
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {', '.join(select)} FROM __hq q {' '.join(joins)}"
    )
    conn.execute("DROP TABLE IF EXISTS __hc")
    _extremes(conn, family, keys, events, table)
    return table


def _family_columns(name: str, family: HistoryFamily) -> list[str]:
    parent = "p" if family.fallback is not None else None
    out = []
    for w in family.windows:
        own = f"o.o_{w}"
        out.append(f"{own}_n AS {q(f'_n__{name}_{w}')}")
        for fn in family.functions:
            expr = _feature_expr(family, fn, own, f"p.p_{w}" if parent else None)
            out.append(f"{expr} AS {q(f'{name}_{fn}_{w}')}")
    return out


def compute(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> None:
    """Temp table __hf: the feature set of the rows of temp table __hq (ids, _qid, keys, _at, _as_of,
    _ts), from the stored events of every family."""
    history = spec_of(pipeline)
    select = ["q.* EXCLUDE (_qid)"]
    joins = []
    for i, (name, family) in enumerate(history.families.items()):
        events = events_table(pipeline, name)
        own = _family_pass(conn, family, family.keys, events, "o")
        parent = (
            _family_pass(conn, family, family.fallback, events, "p") if family.fallback is not None else None
        )
        parent_join = f" JOIN {parent} p USING (_qid)" if parent else ""
        columns = ", ".join(_family_columns(name, family))
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE __hf{i} AS SELECT _qid, {columns} FROM {own} o{parent_join}"
        )
        select.append(f"f{i}.* EXCLUDE (_qid)")
        joins.append(f"JOIN __hf{i} f{i} USING (_qid)")
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE __hf AS SELECT {', '.join(select)} FROM __hq q {' '.join(joins)}"
    )
    for temp in [*(f"__hf{i}" for i in range(len(history.families))), "__ho", "__hp"]:
        conn.execute(f"DROP TABLE IF EXISTS {temp}")


def query_select(pipeline: PipelineSpec, sources: dict[str, SourceSpec], where: str) -> str:
    """The base rows matching `where` (on `b`) as rows to answer: ids, every family's keys, their own
    time `_at`, the prediction time `_as_of` and the base timestamp `_ts`."""
    history = spec_of(pipeline)
    base = sources[pipeline.base]
    keys = sorted({k for f in history.families.values() for k in f.keys} - set(pipeline.row_id))
    stamp = f"b.{q(base.timestamp)}" if base.timestamp else "NULL"
    cols = ", ".join(f"b.{q(c)}" for c in [*pipeline.row_id, *keys])
    return (
        f"SELECT {cols}, CAST(({history.at}) AS TIMESTAMP) AS _at, {as_of_expr(history)} AS _as_of, "
        f"CAST({stamp} AS TIMESTAMP) AS _ts, row_number() OVER () AS _qid FROM validated.{q(pipeline.base)} b "
        f"WHERE {where}"
    )


def definition(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> str:
    """Fingerprint of everything the feature set is made from: a new one means a full rebuild."""
    used = sorted({pipeline.base, *(source_of(pipeline, f) for f in spec_of(pipeline).families.values())})
    parts = [str(BUILD_VERSION), spec_of(pipeline).model_dump_json(), str(pipeline.row_id)]
    parts += [sources[s].model_dump_json() for s in used]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def used_sources(pipeline: PipelineSpec) -> list[str]:
    return sorted({pipeline.base, *(source_of(pipeline, f) for f in spec_of(pipeline).families.values())})


def build_history(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec]
) -> HistoryResult:
    """Build `<pipeline>.history`: in full the first time (or after a change of its definition, or of a
    whole source table), else only the rows whose windows the validated tables' changes reach. Both
    give the same rows (exact sums). The rows rewritten are logged for the modelling table."""
    fingerprint = definition(pipeline, sources)
    done = changes.built_up_to(conn, consumer(pipeline), fingerprint)
    upto = changes.latest(conn) if changes.logging_enabled(conn) else 0
    since = changes.since(conn, done, used_sources(pipeline)) if done is not None else None
    complete = table_exists(conn, pipeline.name, "history") and all(
        table_exists(conn, pipeline.name, f"history_events_{f}") for f in spec_of(pipeline).families
    )
    try:
        if since is None or not complete or any(c.lo is None or c.hi is None for c in since):
            twin = _twin(conn, pipeline, fingerprint)
            built = _copy(conn, pipeline, twin) if twin else _build(conn, pipeline, sources)
            recomputed, lo, hi = built, None, None
        else:
            recomputed, lo, hi = _update(conn, pipeline, sources, since)
    except duckdb.Error as exc:
        raise DatasetError(
            f"pipeline '{pipeline.name}': building the history feature set failed (check history.at and "
            f"the families' value, condition, known_at and time): {exc}"
        ) from exc
    finally:
        for temp in ("__hq", "__hf"):
            conn.execute(f"DROP TABLE IF EXISTS {temp}")
    if recomputed or lo is None:
        for attempt in transactions(conn, table_name(pipeline)):
            with attempt:
                changes.record(conn, consumer(pipeline), lo, hi)
    changes.mark_built(conn, consumer(pipeline), fingerprint, upto)
    return _result(conn, pipeline, recomputed, full_rebuild=lo is None and hi is None)


def _build(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> int:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(pipeline.name)}")
    for name, family in spec_of(pipeline).families.items():
        conn.execute(
            f"CREATE OR REPLACE TABLE {events_table(pipeline, name)} AS "
            f"SELECT * FROM ({event_select(pipeline, sources, family)}) WHERE _t IS NOT NULL ORDER BY _t"
        )
    conn.execute(f"CREATE OR REPLACE TEMP TABLE __hq AS {query_select(pipeline, sources, 'true')}")
    compute(conn, pipeline)
    conn.execute(
        f"CREATE OR REPLACE TABLE {table_name(pipeline)} AS SELECT * FROM __hf "
        f"ORDER BY {', '.join(map(q, pipeline.row_id))}"
    )
    return conn.execute(f"SELECT count(*) FROM {table_name(pipeline)}").fetchone()[0]


def _twin(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, fingerprint: str) -> str | None:
    """Another pipeline whose feature set has this very definition and is built up to the same change
    (the flagship's two pipelines share theirs): its tables are copied instead of computed again."""
    if not changes.logging_enabled(conn):
        return None
    rows = conn.execute(
        f"SELECT pipeline, change_seq FROM {MODELLING_BUILDS} WHERE definition = ? AND pipeline <> ? "
        "AND pipeline LIKE '%.history' ORDER BY pipeline",
        [fingerprint, consumer(pipeline)],
    ).fetchall()
    tables = ["history", *(f"history_events_{f}" for f in spec_of(pipeline).families)]
    for other, seq in rows:
        name = other.removesuffix(".history")
        # Current: no source it reads changed since it was built.
        if not changes.since(conn, seq, used_sources(pipeline)) and all(
            table_exists(conn, name, t) for t in tables
        ):
            return name
    return None


def _copy(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, twin: str) -> int:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(pipeline.name)}")
    for table in ["history", *(f"history_events_{f}" for f in spec_of(pipeline).families)]:
        conn.execute(
            f"CREATE OR REPLACE TABLE {q(pipeline.name)}.{q(table)} AS SELECT * FROM {q(twin)}.{q(table)}"
        )
    return conn.execute(f"SELECT count(*) FROM {table_name(pipeline)}").fetchone()[0]


def _ts(value: dt.datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def _replace_events(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    since: list[changes.Change],
) -> list[str]:
    """Replace the stored events of every changed source window; returns conditions on a row's columns
    (`{at}`, `{as_of}`, `{ts}` placeholders) true for every row whose windows saw an old or new event."""
    conditions = []
    for change in since:
        window = f"_e BETWEEN {_ts(change.lo)} AND {_ts(change.hi)}"
        if change.source == pipeline.base:
            conditions.append(f"{{ts}} BETWEEN {_ts(change.lo)} AND {_ts(change.hi)}")
        for name, family in spec_of(pipeline).families.items():
            if source_of(pipeline, family) != change.source:
                continue
            table = events_table(pipeline, name)
            old = conn.execute(f"SELECT min(_t), max(_t) FROM {table} WHERE {window}").fetchone()
            conn.execute(f"DELETE FROM {table} WHERE {window}")
            new_rows = (
                f"SELECT * FROM ({event_select(pipeline, sources, family)}) WHERE _t IS NOT NULL AND {window}"
            )
            conn.execute(f"INSERT INTO {table} {new_rows}")
            new = conn.execute(f"SELECT min(_t), max(_t) FROM ({new_rows})").fetchone()
            times = [t for t in (*old, *new) if t is not None]
            if not times:
                continue
            widest = max(duration_minutes(w) for w in family.windows)
            ahead = duration_minutes(family.ahead) if family.ahead else 0
            anchor = "{at}" if family.schedule else "{as_of}"
            # An event at time e is in the window of a row anchored at a when a - w <= e < a + ahead.
            conditions.append(
                f"{anchor} BETWEEN {_ts(min(times))} - {_minutes(ahead)} AND {_ts(max(times))} + {_minutes(widest)}"
            )
    return conditions


def _update(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    since: list[changes.Change],
) -> tuple[int, dt.datetime | None, dt.datetime | None]:
    """Recompute the rows the changes reach, in one transaction; returns (rows recomputed, and the base
    timestamps they span)."""
    table = table_name(pipeline)
    for attempt in transactions(conn, table):
        with attempt:
            conditions = _replace_events(conn, pipeline, sources, since)
            if not conditions:
                return 0, dt.datetime.min, dt.datetime.min
            stored = " OR ".join(c.format(at="_at", as_of="_as_of", ts="_ts") for c in conditions)
            history = spec_of(pipeline)
            base_ts = (
                f"b.{q(sources[pipeline.base].timestamp)}" if sources[pipeline.base].timestamp else "NULL"
            )
            fresh = " OR ".join(
                c.format(at=f"CAST(({history.at}) AS TIMESTAMP)", as_of=as_of_expr(history), ts=base_ts)
                for c in conditions
            )
            lo_old, hi_old = conn.execute(f"SELECT min(_ts), max(_ts) FROM {table} WHERE {stored}").fetchone()
            conn.execute(f"DELETE FROM {table} WHERE {stored}")
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __hq AS {query_select(pipeline, sources, fresh)}")
            compute(conn, pipeline)
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM __hf")
            recomputed, lo_new, hi_new = conn.execute(
                "SELECT count(*), min(_ts), max(_ts) FROM __hf"
            ).fetchone()
    stamps = [t for t in (lo_old, hi_old, lo_new, hi_new) if t is not None]
    if not stamps:
        return recomputed, dt.datetime.min, dt.datetime.min
    return recomputed, min(stamps), max(stamps)


def feature_columns(pipeline: PipelineSpec) -> list[str]:
    return list(spec_of(pipeline).columns())


def _result(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, recomputed: int, full_rebuild: bool
) -> HistoryResult:
    """Rows; per family and window the share of rows with at least one source row (coverage) and with
    fewer than min_count that took the fallback's value; per family the latest time a row became known."""
    history = spec_of(pipeline)
    coverage: dict[str, Any] = {}
    fallback: dict[str, Any] = {}
    parts = ["count(*)"]
    for name, family in history.families.items():
        for w in family.windows:
            n = q(f"_n__{name}_{w}")
            parts.append(f"avg(CASE WHEN {n} > 0 THEN 1.0 ELSE 0 END)")
            parts.append(f"avg(CASE WHEN {n} < {family.min_count} THEN 1.0 ELSE 0 END)")
    values = conn.execute(f"SELECT {', '.join(parts)} FROM {table_name(pipeline)}").fetchone()
    rows, i = values[0], 1
    for name, family in history.families.items():
        for w in family.windows:
            coverage[f"{name}_{w}"] = round(float(values[i] or 0), 6)
            if family.fallback is not None:
                fallback[f"{name}_{w}"] = round(float(values[i + 1] or 0), 6)
            i += 2
    latest = {
        name: _iso(conn.execute(f"SELECT max(_t) FROM {events_table(pipeline, name)}").fetchone()[0])
        for name in history.families
    }
    return HistoryResult(rows, recomputed, full_rebuild, coverage, fallback, latest)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
