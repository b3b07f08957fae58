"""The modelling table built incrementally by partition equals a full rebuild, row for row: for data
landed in other orders and batches (late weather included), and for a corrected partition landed again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from ml_assets.core import dataset, history, ingest, validate
from ml_assets.core.ingest.batch import batch_of
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect
from ml_assets_tests.conftest import write_pipelines

PIPELINE = "flight_delay"
JAN, JUL, NEXT_YEAR = dt.datetime(2013, 1, 1), dt.datetime(2013, 7, 1), dt.datetime(2014, 1, 2)


@pytest.fixture(scope="module")
def project(sample_sources: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_project(write_pipelines(tmp_path_factory.mktemp("pipelines"), sample_sources))


@pytest.fixture(scope="module")
def frames(project) -> dict[str, tuple[ingest.Batch, list]]:
    """Every source's file as read (strings), once."""
    out = {}
    for name in project.sources_of(project.pipelines[PIPELINE]):
        spec = project.sources[name]
        files = ingest.resolve_files(name, spec, project.source_files[name].parent, Path("."))
        out[name] = ingest.read_files(name, spec, files)
    return out


def land(conn, project, frames, name: str, start: dt.datetime | None = None, end: dt.datetime | None = None):
    """Load and validate one batch: the rows of [start, end) of a partitioned source, or the whole table."""
    spec = project.sources[name]
    frame, records = frames[name]
    window = ingest.TimeWindow(start, end) if spec.partitions else None
    ingest.load_raw(conn, name, spec, frame, records, window)
    validate.validate_source(conn, name, spec, ingest.window_condition(window) if window else None)


def build(conn, project) -> pl.DataFrame:
    pipeline = project.pipelines[PIPELINE]
    history.build_history(conn, pipeline, project.sources_of(pipeline))
    dataset.build_modelling_table(conn, pipeline, project.sources_of(pipeline))
    return conn.execute(f"SELECT * FROM {dataset.table_name(pipeline)}").pl().sort(pipeline.row_id)


def full_build(tmp: Path, project, frames) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(modelling table, history feature set) built in one go over every row."""
    with connect(tmp / "full.duckdb") as conn:
        for name in frames:
            land(conn, project, frames, name, JAN, NEXT_YEAR)
        return build(conn, project), stored_history(conn, project)


@pytest.fixture
def incremental_only(monkeypatch):
    """From now on a build that falls back to a full rebuild fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the modelling table or the history was rebuilt in full, not incrementally")

    def arm():
        monkeypatch.setattr(dataset, "_build", refuse)
        monkeypatch.setattr(history, "_build", refuse)

    return arm


def stored_history(conn, project) -> pl.DataFrame:
    pipeline = project.pipelines[PIPELINE]
    return conn.execute(f"SELECT * FROM {history.table_name(pipeline)}").pl().sort(pipeline.row_id)


def test_batches_in_any_order_give_the_full_rebuild(tmp_path, project, frames, incremental_only):
    expected, expected_history = full_build(tmp_path, project, frames)
    with connect(tmp_path / "batches.duckdb") as conn:
        land(conn, project, frames, "planes")
        land(conn, project, frames, "flights", JAN, JUL)
        land(conn, project, frames, "weather", JAN, JUL)
        first_half = build(conn, project)
        incremental_only()
        # Flights before their weather: July's flights first match June's last hour, then get their own.
        land(conn, project, frames, "flights", JUL, dt.datetime(2013, 10, 1))
        early = build(conn, project)
        land(conn, project, frames, "weather", JUL, NEXT_YEAR)
        land(conn, project, frames, "flights", dt.datetime(2013, 10, 1), NEXT_YEAR)
        result = build(conn, project)
        result_history = stored_history(conn, project)
    assert first_half.height < early.height < result.height
    # Late weather, flights landed in three steps: the feature set equals one built over every row.
    assert result_history.equals(expected_history)
    july = pl.col("time_hour").dt.month() == 7
    assert early.filter(july)["wx_temp"].n_unique() < result.filter(july)["wx_temp"].n_unique()
    assert result.equals(expected)


def _edited(batch: ingest.Batch, edit: pl.Expr) -> ingest.Batch:
    return batch_of(pl.read_parquet(batch.parts).with_columns(edit))


def corrected(frames) -> dict[str, tuple[ingest.Batch, list]]:
    """A day of weather re-measured and a day of flights with corrected arrival delays."""
    (weather, weather_files), (flights, flight_files) = frames["weather"], frames["flights"]
    on = pl.col("time_hour").str.starts_with
    temp = pl.col("temp").cast(pl.Float64)
    return frames | {
        "weather": (
            _edited(weather, pl.when(on("2013-03-05")).then(temp + 20).otherwise(temp).cast(pl.String)),
            weather_files,
        ),
        "flights": (
            _edited(flights, pl.when(on("2013-08-20")).then(pl.lit("60")).otherwise(pl.col("arr_delay"))),
            flight_files,
        ),
    }


def test_a_corrected_partition_landed_again_gives_the_full_rebuild(
    tmp_path, project, frames, incremental_only
):
    fixed = corrected(frames)
    expected, expected_history = full_build(tmp_path, project, fixed)
    with connect(tmp_path / "corrected.duckdb") as conn:
        for name in frames:
            land(conn, project, frames, name, JAN, NEXT_YEAR)
        before = build(conn, project)
        incremental_only()
        land(conn, project, fixed, "weather", dt.datetime(2013, 3, 5), dt.datetime(2013, 3, 6))
        land(conn, project, fixed, "flights", dt.datetime(2013, 8, 20), dt.datetime(2013, 8, 21))
        result = build(conn, project)
        result_history = stored_history(conn, project)
    assert not result.equals(before)
    assert result.equals(expected)
    # The corrected arrival delays of Aug 20 reach the route and carrier history of the days after.
    assert result_history.equals(expected_history)


def test_a_partition_run_skips_only_landed_files_wholly_outside_its_window(tmp_path):
    def loaded(sha: str, first: dt.datetime, last: dt.datetime) -> dict:
        return {"sha256": sha, "file": f"{sha}.csv", "first_partition": first, "last_partition": last}

    files = [
        loaded("jan", JAN, dt.datetime(2013, 1, 31, 23)),
        loaded("feb", dt.datetime(2013, 2, 1), dt.datetime(2013, 2, 28, 23)),
    ]
    with connect(tmp_path / "w.duckdb") as conn:
        ingest.record_files(conn, "flights", [f | {"status": "loaded"} for f in files], "run")
        ingest.record_files(conn, "weather", [loaded("other", JAN, JAN) | {"status": "loaded"}], "run")
        assert ingest.loaded_outside(conn, "flights", dt.datetime(2013, 2, 5), dt.datetime(2013, 2, 6)) == {
            "jan"
        }
        assert (
            ingest.loaded_outside(conn, "flights", dt.datetime(2013, 1, 31), dt.datetime(2013, 2, 2)) == set()
        )
        assert ingest.loaded_outside(conn, "flights", dt.datetime(2013, 3, 1), dt.datetime(2013, 3, 2)) == {
            "jan",
            "feb",
        }
