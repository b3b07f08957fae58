"""Landing zone, daily partitions and replay, on the shipped flight pipelines and the real 2013 data."""

from __future__ import annotations

import datetime as dt
import shutil
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from ml_assets.core import ingest
from ml_assets.core.ingest import replay
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import TABLE_LAYERS, layer_key, source_keys
from ml_assets_tests.conftest import FAST_MODEL, nycflights_file
from ml_assets_tests.landing_helpers import land, settle, tick

SOURCES = ("flights", "weather")


@pytest.fixture(scope="module")
def months() -> dict[str, pl.DataFrame]:
    """The real tables, read independently of the code under test (UTC month = time_hour's prefix)."""
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False)
    weather = pl.read_csv(nycflights_file("weather.csv"), infer_schema=False)
    return {"flights": flights, "weather": weather}


def _rows_between(frame: pl.DataFrame, first: str, last: str) -> int:
    """Rows whose UTC day (time_hour's prefix) is in [first, last]: what partitions hold."""
    day = frame.get_column("time_hour").str.slice(0, 10)
    return int(((day >= first) & (day <= last)).sum())


def _local_day(frame: pl.DataFrame) -> pl.Expr:
    return pl.date(*(pl.col(c).cast(pl.Int32) for c in ("year", "month", "day")))


def _rows_on_days(frame: pl.DataFrame, first: str, last: str) -> int:
    """Rows whose New York calendar day (year/month/day) is in [first, last]: what a replay file holds."""
    return frame.filter(
        _local_day(frame).is_between(dt.date.fromisoformat(first), dt.date.fromisoformat(last))
    ).height


@pytest.fixture
def project(tmp_path: Path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    for path in default_pipelines_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        raw["model"] = raw.get("model", {}) | FAST_MODEL
        (pipelines / path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "data"
    defs = build_definitions(pipelines, root)
    # Planes is not a landing source: loaded once, as `ml-assets run` does before any batch lands.
    planes = source_keys("planes")
    assert dg.materialize(list(defs.assets), selection=planes, resources=defs.resources).success
    return load_project(pipelines), defs, root


def _run(defs: dg.Definitions, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(defs.assets), selection=request.asset_selection, tags=request.tags, resources=defs.resources
    )


def _counts(root: Path, source: str, first: str, last: str) -> dict[str, int]:
    with connect(warehouse_path(root)) as conn:
        return {
            layer: conn.execute(
                f"SELECT count(*) FROM {layer}.{source} WHERE _event_time >= '{first}' "
                f"AND _event_time < CAST('{last}' AS DATE) + 1"
            ).fetchone()[0]
            for layer in ("raw", "validated", "quarantine")
        }


def test_replay_drops_monthly_slices_with_the_source_rows(project, months):
    proj, _, root = project
    written = replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 2, 28))
    assert sorted(p.name for p in written["flights"]) == [
        "flights_2013-01-01_2013-01-31.csv",
        "flights_2013-02-01_2013-02-28.csv",
    ]
    for path in written["flights"]:
        _, first, last = path.stem.split("_")
        assert pl.read_csv(path).height == _rows_on_days(months["flights"], first, last)
    # The next call continues where the last stopped.
    again = replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 3, 31))
    assert [p.name for p in again["weather"]] == ["weather_2013-03-01_2013-03-31.csv"]


def test_replay_injects_numeric_and_categorical_shifts(project, months):
    proj, _, root = project
    shifts = (replay.Shift.parse("flights.distance=+300"), replay.Shift.parse("carrier:AA->UA"))
    (path,) = replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 1, 31), shifts=shifts)[
        "flights"
    ]
    shifted = pl.read_csv(path, infer_schema=False)
    original = months["flights"].filter(pl.col("month") == "1")
    assert shifted.get_column("distance").cast(pl.Int64).sum() == (
        original.get_column("distance").cast(pl.Int64).sum() + 300 * original.height
    )
    assert (shifted.get_column("carrier") == "AA").sum() == 0
    assert (shifted.get_column("carrier") == "UA").sum() == original.get_column("carrier").is_in(
        ["AA", "UA"]
    ).sum()
    with pytest.raises(ValueError, match="expected"):
        replay.Shift.parse("distance+=3")


def test_resampled_replay_moves_whole_reference_days_with_their_weather_and_clock_times(project, months):
    proj, defs, root = project
    for source in SOURCES:  # as if January-June had been replayed: July is next
        ingest.landing_dir(root, source).mkdir(parents=True)
        (ingest.landing_dir(root, source) / replay.STATE_FILE).write_text('{"until": "2013-06-30"}')
    winter = replay.Resample.parse("2013-01-07..2013-01-27")
    written = replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 7, 7), resample=winter)
    assert [p.name for p in written["flights"]] == ["flights_2013-07-01_2013-07-07_resampled.csv"]
    flights = pl.read_csv(written["flights"][0], infer_schema=False)
    weather = pl.read_csv(written["weather"][0], infer_schema=False)
    by_day = {
        name: frame.with_columns(_local_day(frame).alias("_day"))
        for name, frame in (
            ("flights", flights),
            ("weather", weather),
            *((f"{source}_orig", frame) for source, frame in months.items()),
        )
    }
    # Each New York day of July 1-7 is one January day of the same weekday, moved whole.
    for offset in range(7):
        day = dt.date(2013, 7, 1) + dt.timedelta(days=offset)
        drawn = winter.day_for(day)
        assert drawn.weekday() == day.weekday() and winter.start <= drawn <= winter.end
        for source in SOURCES:
            new = by_day[source].filter(pl.col("_day") == day)
            old = by_day[f"{source}_orig"].filter(pl.col("_day") == drawn)
            assert new.height == old.height > 0
        # Flights and weather drew the same day: July 1's temperatures are that January day's.
        key = ["origin", "hour"]
        assert (
            by_day["weather"].filter(pl.col("_day") == day).sort(key).get_column("temp").to_list()
            == by_day["weather_orig"].filter(pl.col("_day") == drawn).sort(key).get_column("temp").to_list()
        )
    # Timestamps moved by whole local days: a 5 am winter departure is a 5 am summer departure (EDT, not EST).
    local_hour = (
        flights.get_column("time_hour")
        .str.to_datetime(time_zone="UTC")
        .dt.convert_time_zone("America/New_York")
        .dt.hour()
    )
    assert (local_hour == flights.get_column("hour").cast(pl.Int8)).all()

    # The batch ingests like any other: every row valid, no duplicated id (one week alone is too little
    # to split for training, so only the source layers run here).
    settle(root)
    request, _ = land(defs, None)
    assert request is not None and request.tags["dagster/asset_partition_range_start"] == "2013-07-01"
    layers = [k for k in request.asset_selection if k.path[0] in TABLE_LAYERS]
    assert _run(defs, request._replace(asset_selection=layers)).success
    counts = _counts(root, "flights", "2013-07-01", "2013-07-08")  # July 7's evening is July 8 in UTC
    assert counts == {"raw": flights.height, "validated": flights.height, "quarantine": 0}
    with pytest.raises(ValueError, match="at least 7 days"):
        replay.Resample.parse("2013-01-01..2013-01-03")


def test_sensor_ingests_landed_partitions_once_and_ignores_a_redropped_file(project, months):
    proj, defs, root = project
    # Six months, as `ml-assets run` seeds: fewer leave the time split (92 + 14 days) little to train on.
    replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 6, 30))
    settle(root)
    request, cursor = land(defs, None)
    assert request is not None and request.tags["dagster/asset_partition_range_start"] == "2013-01-01"
    assert request.tags["dagster/asset_partition_range_end"] == "2013-07-01"  # June 30 evening, New York
    assert layer_key("validated", "flights") in request.asset_selection
    assert dg.AssetKey(["flight_delay", "drift_report"]) in request.asset_selection
    assert _run(defs, request).success
    expected = _rows_between(months["flights"], "2013-01-01", "2013-06-30")
    counts = _counts(root, "flights", "2013-01-01", "2013-06-30")
    assert counts["raw"] == expected == counts["validated"] + counts["quarantine"]

    # Nothing new: no run, neither from this sensor nor from a fresh one (no cursor, e.g. the first
    # `dagster dev` after `make run`): the ledger is the memory.
    assert not tick(defs, cursor).run_requests
    assert not tick(defs, None).run_requests
    # The same content under another name: a new name is checked, found to be a copy, and loads nothing.
    landing = ingest.landing_dir(root, "flights")
    shutil.copy(landing / "flights_2013-01-01_2013-01-31.csv", landing / "copy_of_january.csv")
    settle(root)
    load, cursor = land(defs, cursor)
    assert load is None

    # Re-materializing the same partitions leaves identical counts (the copy is skipped by content).
    assert _run(defs, request).success
    assert _counts(root, "flights", "2013-01-01", "2013-06-30") == counts

    # A new month: its run covers only July; January-June stay as they were.
    replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 7, 31))
    settle(root)
    july, cursor = land(defs, cursor)
    assert july is not None and july.tags["dagster/asset_partition_range_start"] == "2013-07-01"
    assert july.run_key != request.run_key
    assert _run(defs, july).success
    assert _counts(root, "flights", "2013-01-01", "2013-06-30") == counts
    assert _counts(root, "flights", "2013-07-01", "2013-07-31")["raw"] == _rows_between(
        months["flights"], "2013-07-01", "2013-07-31"
    )
    with connect(warehouse_path(root)) as conn:
        log = ingest.ledger(conn, "flights")
    loaded = log.filter(pl.col("status") == "loaded")
    assert loaded.height == 7  # seven distinct contents; the copy is the same content as January
    (copy,) = log.filter(pl.col("status") != "loaded").iter_rows(named=True)
    assert copy["file"] == str(landing / "copy_of_january.csv") and copy["status"] == "ignored"
    assert "same content" in copy["reason"] and "flights_2013-01-01_2013-01-31.csv" in copy["reason"]


def test_corrupt_landed_file_is_rejected_with_its_reason_and_loads_nothing(project):
    proj, defs, root = project
    replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 1, 31))
    settle(root)
    first, cursor = land(defs, None)
    assert first is not None
    sources_only = [key for s in SOURCES for key in source_keys(s)]
    request = dg.RunRequest(asset_selection=sources_only, tags=first.tags)
    assert _run(defs, request).success
    before = _counts(root, "flights", "2013-01-01", "2013-01-31")

    landing = ingest.landing_dir(root, "flights")
    good = pl.read_csv(landing / "flights_2013-01-01_2013-01-31.csv", infer_schema=False)
    broken = landing / "flights_broken.csv"
    good.head(100).drop("distance").write_csv(broken)
    settle(root)
    load, _ = land(defs, cursor)
    assert load is None  # the intake rejected it: nothing to load
    with connect(warehouse_path(root)) as conn:
        rejected = ingest.ledger(conn, "flights").filter(pl.col("status") == "rejected")
    (reason,) = rejected.get_column("reason")
    assert str(broken) in reason and "'distance'" in reason and "rule: schema" in reason

    # A run over January (e.g. a backfill) skips the rejected file; nothing loaded changes.
    assert _run(defs, request).success
    assert _counts(root, "flights", "2013-01-01", "2013-01-31") == before


@pytest.mark.slow  # a whole run (2 min); test_landing_entries lands such a file through the source layers
def test_nan_and_infinity_in_a_landed_file_are_quarantined_or_missing_and_the_run_succeeds(project, months):
    proj, defs, root = project
    replay.replay(proj, root, proj.pipelines["flight_delay"], dt.date(2013, 6, 30))
    path = ingest.landing_dir(root, "flights") / "flights_2013-02-01_2013-02-28.csv"
    rows = pl.read_csv(path, infer_schema=False).with_row_index("i", offset=1)
    # Rows 1-10: a NaN arrival delay (the target's input); 11-15: +inf departure delay (no range: the
    # finite rule); 16-18: -inf air time (below its min 0). Polars and DuckDB read all of them as floats.
    rows.with_columns(
        pl.when(pl.col("i") <= 10).then(pl.lit("NaN")).otherwise(pl.col("arr_delay")).alias("arr_delay"),
        pl.when(pl.col("i").is_between(11, 15))
        .then(pl.lit("inf"))
        .otherwise(pl.col("dep_delay"))
        .alias("dep_delay"),
        pl.when(pl.col("i").is_between(16, 18))
        .then(pl.lit("-inf"))
        .otherwise(pl.col("air_time"))
        .alias("air_time"),
    ).drop("i").write_csv(path)
    settle(root)
    request, _ = land(defs, None)
    assert request is not None
    assert _run(defs, request).success  # training, plots, profile and monitors saw no NaN or infinity

    with connect(warehouse_path(root)) as conn:
        quarantined = conn.execute(
            "SELECT _source_row, _rule, _column, _reasons FROM quarantine.flights WHERE _source_file = ? "
            "AND _source_row <= 18 ORDER BY _source_row",
            [str(path)],
        ).fetchall()
        nan_rows = conn.execute(
            "SELECT count(*), count(v.arr_delay) FROM validated.flights v JOIN raw.flights r USING "
            "(year, month, day, carrier, flight, origin) WHERE r._source_file = ? AND r._source_row <= 10",
            [str(path)],
        ).fetchone()
        non_finite = conn.execute(
            "SELECT count(*) FROM validated.flights WHERE isinf(dep_delay) OR isnan(dep_delay) "
            "OR isinf(arr_delay) OR isnan(arr_delay) OR isinf(air_time) OR isnan(air_time)"
        ).fetchone()[0]
        trained_on = conn.execute(
            "SELECT count(*) FROM flight_delay.modelling_table m JOIN raw.flights r USING "
            "(year, month, day, carrier, flight, origin) WHERE r._source_file = ? AND r._source_row <= 10",
            [str(path)],
        ).fetchone()[0]
    assert [(r, rule, column) for r, rule, column, _ in quarantined] == [
        *((r, "finite", "dep_delay") for r in range(11, 16)),
        *((r, "min", "air_time") for r in range(16, 19)),
    ]
    assert "dep_delay: inf is not a finite number (rule finite)" in quarantined[0][3]
    assert "air_time: -inf is below min 0" in quarantined[-1][3]
    # The NaN delays are missing values: the rows stay valid, and without a target they are not trained on.
    assert nan_rows == (10, 0)
    assert non_finite == 0 and trained_on == 0
