"""The flagship's history feature set at scale, against a hand-written DuckDB window query over the same
rows, and one new day against a full build.

Rows: the real 2013 flights (ingested and validated as the pipeline does), repeated year after year
(year k: every flight of 2013 moved k years on, ids kept distinct by the year) up to the row count; the
last local day is held back. Per size, in one warehouse:
  * full:        `history.build_history` over every row but the last day (what the asset pays, its
                 metadata included);
  * handwritten: one CREATE TABLE of a plain window query a DuckDB user would write for the same
                 features (per family, events and rows to answer in one RANGE-framed window pass per
                 window, the fallback's pass, the shrinkage) over the same rows; its values are compared
                 with the build's (largest difference printed; `last` is compared where the latest time
                 holds one value);
  * new day:     the held-back day landed (validated rows and the change log), `build_history` again:
                 only the rows whose windows reach it are recomputed.

    .venv/bin/python bench/features.py [--rows 1000000] [--rows 10000000]
Last line: per size, features_ratio_<rows>=<full / handwritten> new_day_share_<rows>=<new day / full>
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ml_assets.core import changes, history, ingest, validate
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.spec.load import load_project
from ml_assets.core.spec.schema import HistoryFamily, duration_minutes
from ml_assets.core.sql import q
from ml_assets.core.store import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import pipelines_with  # noqa: E402

PIPELINE = "flight_delay"
BASELINE = "bench_features.handwritten"


def land(db: Path, project, rows: int) -> tuple[dt.datetime, dt.datetime]:
    """validated.flights with `rows` rows but the last local day's (returned as its time_hour span)."""
    spec = project.sources["flights"]
    files = ingest.resolve_files("flights", spec, project.source_files["flights"].parent, db.parent)
    window = ingest.TimeWindow(dt.datetime(2013, 1, 1), dt.datetime(2014, 1, 2))
    with connect(db) as conn:
        ingest.load_raw(conn, "flights", spec, *ingest.read_files("flights", spec, files), window)
        validate.validate_source(conn, "flights", spec, ingest.window_condition(window))
        real = conn.execute("SELECT count(*) FROM validated.flights").fetchone()[0]
        shifted = [
            f"{q(c)} + to_years(CAST(k AS INTEGER)) AS {q(c)}"
            if t.startswith("TIMESTAMP")
            else f"{q(c)} + k AS {q(c)}"
            for c, t in conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'validated' AND table_name = 'flights'"
            ).fetchall()
            if c == "year" or t.startswith("TIMESTAMP")
        ]
        conn.execute(
            f"CREATE TABLE __all AS SELECT * REPLACE ({', '.join(shifted)}) FROM validated.flights, "
            f"range({math.ceil(rows / real)}) r(k) ORDER BY k, time_hour, flight LIMIT {rows}"
        )
        last_day = conn.execute("SELECT max(make_date(year, month, day)) FROM __all").fetchone()[0]
        held = f"make_date(year, month, day) = DATE '{last_day}'"
        conn.execute(f"CREATE OR REPLACE TABLE validated.flights AS SELECT * FROM __all WHERE NOT ({held})")
        conn.execute(f"CREATE TABLE bench_held AS SELECT * FROM __all WHERE {held}")
        conn.execute("DROP TABLE __all")
        changes.record(conn, "flights", None, None)
        return conn.execute("SELECT min(time_hour), max(time_hour) FROM bench_held").fetchone()


def _window_frame(family: HistoryFamily, window: str) -> str:
    span = duration_minutes(window)
    if family.ahead:
        end = f"INTERVAL {duration_minutes(family.ahead)} MINUTE - INTERVAL 1 MICROSECOND FOLLOWING"
    else:
        end = "INTERVAL 1 MICROSECOND PRECEDING"
    return f"ORDER BY _t RANGE BETWEEN INTERVAL {span} MINUTE PRECEDING AND {end}"


def _family_pass(pipeline: PipelineSpec, family: HistoryFamily, keys: list[str], tag: str) -> str:
    """Per base row (_id): count, sum, conditioned count, last value per window, plain window functions."""
    at = f"CAST(({pipeline.history.at}) AS TIMESTAMP)"
    horizon = duration_minutes(pipeline.history.horizon)
    anchor = at if family.schedule else f"{at} - INTERVAL {horizon} MINUTE"
    when = family.known_at or family.time or "time_hour"
    present = "".join(f" AND {q(k)} IS NOT NULL" for k in keys)
    condition = f"CASE WHEN ({family.condition}) THEN 1 ELSE 0 END" if family.condition else "NULL"
    cols = "".join(f"{q(k)}, " for k in keys)
    partition = f"PARTITION BY {', '.join(map(q, keys))} " if keys else ""
    aggregates = []
    for w in family.windows:
        over = f"OVER ({partition}{_window_frame(family, w)})"
        aggregates += [
            f"count(_v) {over} AS {tag}_n_{w}",
            f"sum(_v) {over} AS {tag}_s_{w}",
            f"sum(_c) {over} AS {tag}_c_{w}",
        ]
    # `last`: the latest earlier event (its largest value when several share the time), within the window.
    latest = f"OVER ({partition}ORDER BY _t, _id IS NULL, _v ROWS UNBOUNDED PRECEDING)"
    return f"""SELECT _id, {", ".join(aggregates)},
            last_value(_v IGNORE NULLS) {latest} AS {tag}_last_v,
            last_value(CASE WHEN _v IS NOT NULL THEN _t END IGNORE NULLS) {latest} AS {tag}_last_t, _t AS {tag}_at
        FROM (
            SELECT {cols}CAST(({when}) AS TIMESTAMP) AS _t, CAST(({family.value}) AS DOUBLE) AS _v,
                {condition} AS _c, NULL::BIGINT AS _id
            FROM validated.flights WHERE ({when}) IS NOT NULL AND ({family.value}) IS NOT NULL{present}
            UNION ALL
            SELECT {cols}{anchor} AS _t, NULL, NULL, _id FROM __rows)
        QUALIFY _id IS NOT NULL"""


def _feature(family: HistoryFamily, fn: str, w: str) -> str:
    n, s, c = f"o_n_{w}", f"o_s_{w}", f"o_c_{w}"
    own = {
        "count": n,
        "mean": f"{s} / nullif({n}, 0)",
        "share": f"{c} / nullif({n}, 0)",
        "last": f"CASE WHEN o_last_t >= o_at - INTERVAL {duration_minutes(w)} MINUTE THEN o_last_v END",
    }[fn]
    if family.fallback is None or fn in ("count", "last"):
        return own
    parent = {"mean": f"p_s_{w} / nullif(p_n_{w}, 0)", "share": f"p_c_{w} / nullif(p_n_{w}, 0)"}[fn]
    shrunk = f"(coalesce({own} * {n}, 0) + {family.prior} * {parent}) / ({n} + {family.prior})"
    return f"CASE WHEN {n} < {family.min_count} THEN {parent} ELSE {shrunk} END"


def handwritten(conn, pipeline: PipelineSpec) -> None:
    """The feature set as one plain query (the flagship's functions: count, mean, share, last; a sparse
    group's fallback and shrinkage as the flagship's route family has them)."""
    conn.execute("CREATE SCHEMA IF NOT EXISTS bench_features")
    ids = ", ".join(map(q, pipeline.row_id))
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE __rows AS SELECT *, row_number() OVER () AS _id FROM validated.flights"
    )
    select, joins = [f"r.{q(c)}" for c in pipeline.row_id], []
    for i, (name, family) in enumerate(pipeline.history.families.items()):
        passes = [f"({_family_pass(pipeline, family, family.keys, 'o')}) o"]
        if family.fallback is not None:
            passes.append(f"({_family_pass(pipeline, family, family.fallback, 'p')}) p USING (_id)")
        columns = [
            f"{_feature(family, fn, w)} AS {q(f'{name}_{fn}_{w}')}"
            for w in family.windows
            for fn in family.functions
        ]
        joins.append(f"JOIN (SELECT _id, {', '.join(columns)} FROM {' JOIN '.join(passes)}) f{i} USING (_id)")
        select.append(f"f{i}.* EXCLUDE (_id)")
    conn.execute(
        f"CREATE OR REPLACE TABLE {BASELINE} AS SELECT {', '.join(select)} FROM __rows r {' '.join(joins)} ORDER BY {ids}"
    )


def largest_difference(conn, pipeline: PipelineSpec) -> tuple[float, str]:
    """The largest relative difference between the build's and the hand-written values (NULL on one side
    only counts as 1), over every row and feature."""
    on = " AND ".join(f"b.{q(c)} = h.{q(c)}" for c in pipeline.row_id)
    worst = []
    for column in pipeline.history.columns():
        a, b = f"b.{q(column)}", f"h.{q(column)}"
        diff = (
            f"max(CASE WHEN ({a} IS NULL) <> ({b} IS NULL) THEN 1.0 "
            f"ELSE abs({a} - {b}) / greatest(1.0, abs({a})) END)"
        )
        value = conn.execute(
            f"SELECT {diff} FROM {history.table_name(pipeline)} b JOIN {BASELINE} h ON {on}"
        ).fetchone()[0]
        worst.append((value or 0.0, column))
    return max(worst)


def land_new_day(conn, held: tuple[dt.datetime, dt.datetime]) -> None:
    conn.execute("INSERT INTO validated.flights SELECT * FROM bench_held")
    changes.record(conn, "flights", *held)


def measure(rows: int, trials_dir: Path) -> dict[str, float]:
    project = load_project(pipelines_with(1, trials_dir / f"pipelines_{rows}"))
    pipeline = project.pipelines[PIPELINE]
    sources: dict[str, SourceSpec] = project.sources_of(pipeline)
    db = trials_dir / f"w_{rows}.duckdb"
    held = land(db, project, rows)
    with connect(db) as conn:
        started = time.perf_counter()
        built = history.build_history(conn, pipeline, sources)
        full = time.perf_counter() - started
        assert built.full_rebuild, "the first build must be a full one"
        started = time.perf_counter()
        handwritten(conn, pipeline)
        plain = time.perf_counter() - started
        worst, column = largest_difference(conn, pipeline)
        land_new_day(conn, held)
        started = time.perf_counter()
        day = history.build_history(conn, pipeline, sources)
        new_day = time.perf_counter() - started
        assert not day.full_rebuild
    print(
        f"rows={rows}: full build {full:.1f} s ({built.rows} rows), hand-written query {plain:.1f} s, "
        f"largest relative difference {worst:.2e} ({column}); new day {new_day:.1f} s "
        f"({day.recomputed} rows recomputed); load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return {f"features_ratio_{rows}": full / plain, f"new_day_share_{rows}": new_day / full}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, action="append", help="row count (repeatable; default 1,000,000)")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows or [1_000_000]:
            results |= measure(rows, Path(tmp))
    print(" ".join(f"{k}={v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
