"""Modelling table behaviour on small hand-made `validated.*` tables: as-of and key joins, target, splits."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from ml_assets.core import changes
from ml_assets.core.dataset import (
    build_modelling_table,
    check_splits_populated,
    check_target_not_null,
    table_name,
)
from ml_assets.core.errors import DatasetError
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.store import connect

T = dt.datetime

SOURCES: dict[str, Any] = {
    "flights": {
        "path": "unused.csv",
        "id": ["fid"],
        "timestamp": "time_hour",
        "columns": {
            "fid": {"type": "int"},
            "origin": {"type": "str"},
            "tailnum": {"type": "str"},
            "time_hour": {"type": "datetime"},
            "delay": {"type": "float"},
        },
    },
    "weather": {
        "path": "unused.csv",
        "id": ["origin", "time_hour"],
        "timestamp": "time_hour",
        "columns": {"origin": {"type": "str"}, "time_hour": {"type": "datetime"}, "temp": {"type": "float"}},
    },
    "planes": {
        "path": "unused.csv",
        "id": ["tailnum"],
        "columns": {"tailnum": {"type": "str"}, "seats": {"type": "int"}},
    },
}
WEATHER_JOIN = {
    "source": "weather",
    "keys": ["origin"],
    "asof": {"left": "time_hour", "right": "time_hour"},
    "prefix": "wx_",
    "columns": ["temp"],
}
PLANES_JOIN = {"source": "planes", "keys": ["tailnum"], "prefix": "plane_", "columns": ["seats"]}


def make_pipeline(**overrides: Any) -> PipelineSpec:
    raw: dict[str, Any] = {
        "name": "demo",
        "task": "binary",
        "sources": SOURCES,
        "base": "flights",
        "joins": [],
        "id": ["fid"],
        "timestamp": "time_hour",
        "target": {"name": "late", "expr": "delay >= 15", "source_columns": ["delay"]},
        "features": [{"name": "origin", "type": "categorical"}],
        "split": {"method": "time", "valid_start": "2013-06-01", "test_start": "2013-09-01"},
    }
    return PipelineSpec.model_validate(raw | overrides)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with connect(tmp_path / "w.duckdb") as c:
        c.execute("CREATE SCHEMA validated")
        yield c


def put(conn: duckdb.DuckDBPyConnection, source: str, frame: pl.DataFrame) -> None:
    """(Re)create `validated.<source>` with exactly the rows of a polars frame, logged as a whole-table
    change as validation logs its writes (the modelling table rebuilds from what the log says changed)."""
    conn.register("_frame", frame.to_arrow())
    try:
        conn.execute(f"CREATE OR REPLACE TABLE validated.{source} AS SELECT * FROM _frame")
        changes.record(conn, source, None, None)
    finally:
        conn.unregister("_frame")


def flights(rows: list[tuple[int, str, dt.datetime, float | None]], tailnum: str = "N1") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "fid": [r[0] for r in rows],
            "origin": [r[1] for r in rows],
            "tailnum": [tailnum] * len(rows),
            "time_hour": [r[2] for r in rows],
            "delay": [r[3] for r in rows],
        },
        schema={
            "fid": pl.Int64,
            "origin": pl.String,
            "tailnum": pl.String,
            "time_hour": pl.Datetime("us"),
            "delay": pl.Float64,
        },
    )


def weather(rows: list[tuple[str, dt.datetime, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"origin": [r[0] for r in rows], "time_hour": [r[1] for r in rows], "temp": [r[2] for r in rows]},
        schema={"origin": pl.String, "time_hour": pl.Datetime("us"), "temp": pl.Float64},
    )


def planes(rows: list[tuple[str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"tailnum": [r[0] for r in rows], "seats": [r[1] for r in rows]},
        schema={"tailnum": pl.String, "seats": pl.Int64},
    )


def table(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> pl.DataFrame:
    return conn.execute(f"SELECT * FROM {table_name(pipeline)}").pl()


def splits_by_id(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> dict[int, str]:
    return dict(conn.execute(f"SELECT fid, _split FROM {table_name(pipeline)}").fetchall())


# --- joins -------------------------------------------------------------------------------------------


def test_asof_join_takes_latest_row_at_or_before_per_key(conn: duckdb.DuckDBPyConnection) -> None:
    day = dt.date(2013, 3, 5)
    at = lambda h, m=0: T(day.year, day.month, day.day, h, m)  # noqa: E731
    wx = [
        ("JFK", at(10), 10.0),
        ("JFK", at(12), 12.0),
        ("JFK", at(12, 1), 99.0),  # one minute after the 12:00 flight: must never be used for it
        ("LGA", at(8), -5.0),  # earlier than the 09:00 JFK flight, but at another airport
        ("LGA", at(11, 30), 55.0),
    ]
    fl = [
        (1, "JFK", at(11, 59), 0.0),
        (2, "JFK", at(12), 20.0),
        (3, "JFK", at(9), 5.0),
        (4, "LGA", at(12), 30.0),
        (5, "LGA", at(7), 1.0),
    ]
    put(conn, "flights", flights(fl))
    put(conn, "weather", weather(wx))
    pipeline = make_pipeline(joins=[WEATHER_JOIN])

    result = build_modelling_table(conn, pipeline, pipeline.sources)

    def latest_before(origin: str, when: dt.datetime) -> float | None:
        candidates = [(t, temp) for o, t, temp in wx if o == origin and t <= when]
        return max(candidates)[1] if candidates else None

    expected = {fid: latest_before(origin, when) for fid, origin, when, _ in fl}
    got = dict(conn.execute(f"SELECT fid, wx_temp FROM {table_name(pipeline)}").fetchall())
    assert got == expected
    # The cases the brief spells out, stated literally as well.
    assert (got[1], got[2], got[3]) == (10.0, 12.0, None)
    assert result.base_rows == result.rows == len(fl)
    columns = table(conn, pipeline).columns
    assert "wx_temp" in columns and "wx_time_hour" not in columns and "wx_origin" not in columns


def test_key_join_with_duplicate_right_keys_fails_and_keeps_previous_table(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    fl = [(i, "JFK", T(2013, m, 1), float(i * 10)) for i, m in enumerate([1, 2, 7, 10], start=1)]
    base = flights(fl, tailnum="N1")
    base = base.with_columns(pl.Series("tailnum", ["N1", "N2", "N1", "N3"]))
    plane_rows = [("N1", 100), ("N2", 200), ("N3", 300)]
    put(conn, "flights", base)
    put(conn, "planes", planes(plane_rows))
    pipeline = make_pipeline(joins=[PLANES_JOIN])

    first = build_modelling_table(conn, pipeline, pipeline.sources)
    before = table(conn, pipeline).sort("fid")
    assert first.rows == len(fl)
    seats = dict(plane_rows)
    assert before.get_column("plane_seats").to_list() == [seats[t] for t in base.get_column("tailnum")]

    # Duplicate plane N1: every flight of N1 would now appear twice.
    dup = "N1"
    put(conn, "planes", planes([*plane_rows, (dup, 999)]))
    multiplied = base.height + base.get_column("tailnum").to_list().count(dup)

    with pytest.raises(DatasetError) as info:
        build_modelling_table(conn, pipeline, pipeline.sources)

    message = str(info.value)
    assert "'demo'" in message
    assert "duplicate keys" in message
    assert f"{base.height} rows of 'flights' into {multiplied}" in message
    after = table(conn, pipeline).sort("fid")
    assert after.height == first.rows
    assert after.equals(before)
    leftovers = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name IN ('__j', '__t')"
    ).fetchone()[0]
    assert leftovers == 0


# --- target ------------------------------------------------------------------------------------------


TARGET_ROWS = [
    (1, "JFK", T(2013, 1, 1), 20.0),
    (2, "JFK", T(2013, 2, 1), None),
    (3, "LGA", T(2013, 3, 1), 3.0),
    (4, "LGA", T(2013, 7, 1), 15.0),
    (5, "EWR", T(2013, 8, 1), None),
    (6, "EWR", T(2013, 10, 1), 14.9),
    (7, "EWR", T(2013, 11, 1), None),
]


def test_target_expr_drops_rows_without_target(conn: duckdb.DuckDBPyConnection) -> None:
    put(conn, "flights", flights(TARGET_ROWS))
    pipeline = make_pipeline()

    result = build_modelling_table(conn, pipeline, pipeline.sources)

    expected = {fid: delay >= 15 for fid, _, _, delay in TARGET_ROWS if delay is not None}
    n_missing = sum(delay is None for *_, delay in TARGET_ROWS)
    assert result.base_rows == len(TARGET_ROWS)
    assert result.dropped_missing_target == n_missing
    assert result.rows == len(TARGET_ROWS) - n_missing
    assert sum(result.split_rows.values()) == result.rows
    got = dict(conn.execute(f"SELECT fid, late FROM {table_name(pipeline)}").fetchall())
    assert got == expected


def test_target_missing_fail_names_pipeline_and_row_count(conn: duckdb.DuckDBPyConnection) -> None:
    put(conn, "flights", flights(TARGET_ROWS))
    pipeline = make_pipeline(
        name="strict_target", target={"name": "late", "expr": "delay >= 15", "missing": "fail"}
    )
    n_missing = sum(delay is None for *_, delay in TARGET_ROWS)

    with pytest.raises(
        DatasetError, match=rf"pipeline 'strict_target': {n_missing} rows have no target 'late'"
    ):
        build_modelling_table(conn, pipeline, pipeline.sources)

    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'strict_target' AND table_name = 'modelling_table'"
    ).fetchone()[0]
    assert exists == 0

    # Without missing targets the same pipeline builds.
    put(conn, "flights", flights([r for r in TARGET_ROWS if r[3] is not None]))
    result = build_modelling_table(conn, pipeline, pipeline.sources)
    assert result.dropped_missing_target == 0
    assert result.rows == len(TARGET_ROWS) - n_missing


def test_derived_columns_and_target_expr_over_them(conn: duckdb.DuckDBPyConnection) -> None:
    put(conn, "flights", flights(TARGET_ROWS))
    pipeline = make_pipeline(
        derived={"delay_hours": "delay / 60", "route": "origin || '-' || tailnum"},
        target={"name": "late", "expr": "delay_hours >= 0.25"},
    )

    build_modelling_table(conn, pipeline, pipeline.sources)

    got = {
        fid: (hours, route, late)
        for fid, hours, route, late in conn.execute(
            f"SELECT fid, delay_hours, route, late FROM {table_name(pipeline)}"
        ).fetchall()
    }
    assert got == {
        fid: (delay / 60, f"{origin}-N1", delay / 60 >= 0.25)
        for fid, origin, _, delay in TARGET_ROWS
        if delay is not None
    }


def test_invalid_target_expr_raises_dataset_error_and_keeps_previous_table(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    put(conn, "flights", flights(TARGET_ROWS))
    good = make_pipeline()
    build_modelling_table(conn, good, good.sources)
    before = table(conn, good).sort("fid")

    bad = make_pipeline(target={"name": "late", "expr": "no_such_column >= 15"})
    with pytest.raises(
        DatasetError, match=r"pipeline 'demo': building the modelling table failed.*no_such_column"
    ):
        build_modelling_table(conn, bad, bad.sources)

    assert table(conn, good).sort("fid").equals(before)


# --- splits ------------------------------------------------------------------------------------------


def test_time_split_dates_put_boundary_rows_in_the_later_split(conn: duckdb.DuckDBPyConnection) -> None:
    valid_start, test_start = dt.date(2013, 9, 1), dt.date(2013, 10, 1)
    stamps = [
        T(2013, 1, 1),
        T(2013, 8, 31, 23, 59, 59),
        T(2013, 9, 1),  # exactly valid_start
        T(2013, 9, 1, 0, 0, 1),
        T(2013, 9, 30, 23, 59, 59, 999999),
        T(2013, 10, 1),  # exactly test_start
        T(2013, 12, 31, 23),
    ]
    put(conn, "flights", flights([(i, "JFK", ts, 20.0) for i, ts in enumerate(stamps)]))
    pipeline = make_pipeline(
        split={"method": "time", "valid_start": str(valid_start), "test_start": str(test_start)}
    )

    result = build_modelling_table(conn, pipeline, pipeline.sources)

    def expected_split(ts: dt.datetime) -> str:
        if ts >= dt.datetime.combine(test_start, dt.time()):
            return "test"
        return "valid" if ts >= dt.datetime.combine(valid_start, dt.time()) else "train"

    expected = {i: expected_split(ts) for i, ts in enumerate(stamps)}
    assert splits_by_id(conn, pipeline) == expected
    assert expected[2] == "valid" and expected[5] == "test"
    assert result.split_rows == {s: Counter(expected.values())[s] for s in ("train", "valid", "test")}


def test_time_split_fractions_put_the_latest_rows_in_test(conn: duckdb.DuckDBPyConnection) -> None:
    n = 100
    start = T(2013, 1, 1)
    stamps = [start + dt.timedelta(hours=7 * i) for i in range(n)]
    rng = random.Random(3)
    rows = [(i, "JFK", ts, 20.0) for i, ts in enumerate(stamps)]
    rng.shuffle(rows)  # insertion order must not matter
    put(conn, "flights", flights(rows))
    valid_fraction, test_fraction = 0.1, 0.2
    pipeline = make_pipeline(split={"valid_fraction": valid_fraction, "test_fraction": test_fraction})

    result = build_modelling_table(conn, pipeline, pipeline.sources)

    frame = table(conn, pipeline)
    by_split = {
        s: frame.filter(pl.col("_split") == s).get_column("time_hour") for s in ("train", "valid", "test")
    }
    assert by_split["train"].max() < by_split["valid"].min()
    assert by_split["valid"].max() < by_split["test"].min()
    assert max(stamps) in by_split["test"].to_list()
    assert abs(by_split["test"].len() - test_fraction * n) <= 1
    assert abs(by_split["valid"].len() - valid_fraction * n) <= 1
    assert result.split_rows == {s: v.len() for s, v in by_split.items()}
    # The table is written in time order.
    assert frame.get_column("time_hour").to_list() == sorted(stamps)


def test_random_split_is_deterministic_and_respects_fractions(conn: duckdb.DuckDBPyConnection) -> None:
    n = 5000
    rows = [(i, "JFK", T(2013, 1, 1) + dt.timedelta(minutes=i), float(i % 30)) for i in range(n)]
    valid_fraction, test_fraction = 0.15, 0.25
    pipeline = make_pipeline(
        split={
            "method": "random",
            "valid_fraction": valid_fraction,
            "test_fraction": test_fraction,
            "seed": 7,
        }
    )
    put(conn, "flights", flights(rows))
    build_modelling_table(conn, pipeline, pipeline.sources)
    first = splits_by_id(conn, pipeline)

    # Same rows in another order: the assignment depends on the ids only.
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    put(conn, "flights", flights(shuffled))
    result = build_modelling_table(conn, pipeline, pipeline.sources)
    second = splits_by_id(conn, pipeline)

    assert first == second
    counts = Counter(first.values())
    assert counts["test"] / n == pytest.approx(test_fraction, abs=0.03)
    assert counts["valid"] / n == pytest.approx(valid_fraction, abs=0.03)
    assert counts["train"] / n == pytest.approx(1 - test_fraction - valid_fraction, abs=0.03)
    assert result.split_rows == {s: counts[s] for s in ("train", "valid", "test")}

    # A different seed changes the assignment (but not the proportions much).
    reseeded = make_pipeline(
        split={
            "method": "random",
            "valid_fraction": valid_fraction,
            "test_fraction": test_fraction,
            "seed": 8,
        }
    )
    build_modelling_table(conn, reseeded, reseeded.sources)
    assert splits_by_id(conn, reseeded) != first


# --- checks ------------------------------------------------------------------------------------------


def test_checks_pass_on_a_good_table_and_fail_on_empty_split_or_null_target(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    rows = [(i, "JFK", T(2013, m, 15), float(10 * i)) for i, m in enumerate([1, 3, 5, 7, 9, 11], start=1)]
    put(conn, "flights", flights(rows))
    pipeline = make_pipeline(
        split={"method": "time", "valid_start": "2013-06-01", "test_start": "2013-09-01"}
    )
    build_modelling_table(conn, pipeline, pipeline.sources)

    target = check_target_not_null(conn, pipeline)
    splits = check_splits_populated(conn, pipeline)
    assert target.passed is True
    assert target.metadata == {"null_targets": 0, "rows": len(rows)}
    assert splits.passed is True
    assert sum(splits.metadata["split_rows"].values()) == len(rows)

    # test_start after every row: the test split is empty.
    late_test = make_pipeline(
        split={"method": "time", "valid_start": "2013-06-01", "test_start": "2014-01-01"}
    )
    build_modelling_table(conn, late_test, late_test.sources)
    empty = check_splits_populated(conn, late_test)
    assert empty.passed is False
    assert "test" in empty.description
    assert "test" not in empty.metadata["split_rows"]

    # A modelling table that somehow holds rows without target fails the target check.
    conn.execute(f"UPDATE {table_name(pipeline)} SET late = NULL WHERE fid IN (1, 2)")
    broken = check_target_not_null(conn, pipeline)
    assert broken.passed is False
    assert broken.metadata == {"null_targets": 2, "rows": len(rows)}
    assert f"2 of {len(rows)} rows" in broken.description


# --- regressions of fixed bugs --------------------------------------------------------------------------------------


def test_time_split_fractions_apply_to_rows_with_a_target(conn: duckdb.DuckDBPyConnection) -> None:
    n, unlabelled = 100, 20
    start = T(2013, 1, 1)
    rows = [(i, "JFK", start + dt.timedelta(hours=i), 20.0 if i < n - unlabelled else None) for i in range(n)]
    put(conn, "flights", flights(rows))
    valid_fraction, test_fraction = 0.1, 0.2
    pipeline = make_pipeline(split={"valid_fraction": valid_fraction, "test_fraction": test_fraction})

    result = build_modelling_table(conn, pipeline, pipeline.sources)

    kept = n - unlabelled
    assert result.rows == kept
    assert abs(result.split_rows["test"] - test_fraction * kept) <= 1
    assert abs(result.split_rows["valid"] - valid_fraction * kept) <= 1


def test_rows_sharing_a_timestamp_are_ordered_by_id_on_every_build(conn: duckdb.DuckDBPyConnection) -> None:
    # 40 rows an hour, inserted shuffled: DuckDB's parallel sort leaves ties in any order unless the order
    # is total, and the model's rows (hence the model) follow the table's order.
    rows = [(i, "JFK", T(2013, 1, 1) + dt.timedelta(hours=i // 40), 20.0) for i in range(20_000)]
    random.Random(5).shuffle(rows)
    conn.execute("SET threads = 2")
    pipeline = make_pipeline(split={"method": "random", "valid_fraction": 0.1, "test_fraction": 0.2})
    orders = set()
    for _ in range(3):
        put(conn, "flights", flights(rows))  # a whole-table change: each build sorts every row again
        build_modelling_table(conn, pipeline, pipeline.sources)
        orders.add(tuple(table(conn, pipeline).get_column("fid")))
    assert orders == {tuple(range(20_000))}
