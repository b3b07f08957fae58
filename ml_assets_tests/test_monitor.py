"""Drift detection at bounded cost, the retrain decision, and the retraining sensor."""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from ml_assets import gate, monitor, registry
from ml_assets.config import MonitoringSpec
from ml_assets.definitions import build_definitions
from ml_assets.resources import Warehouse, connect, warehouse_path
from ml_assets.sensors import DRIFT_RUN_TAG, TRIGGER_TAG
from ml_assets_tests.conftest import materialize_all
from ml_assets_tests.test_promotion import FLAGSHIP

NUMERIC = [f"x{i}" for i in range(5)]


def _window(rng: np.random.Generator, rows: int, shift: dict[str, float] | None = None) -> pl.DataFrame:
    shift = shift or {}
    data = {c: rng.normal(i, 1 + i, rows) + shift.get(c, 0.0) * (1 + i) for i, c in enumerate(NUMERIC)}
    data["kind"] = rng.choice(["a", "b", "c"], rows, p=[0.5, 0.3, 0.2])
    return pl.DataFrame(data)


def test_bounded_sample_keeps_each_days_share():
    start = dt.datetime(2013, 1, 1)
    # Uneven days: day d has 100 * (d + 1) rows.
    stamps = [start + dt.timedelta(days=d, minutes=m) for d in range(10) for m in range(100 * (d + 1))]
    frame = pl.DataFrame({"ts": stamps, "v": range(len(stamps))})
    sample = monitor.bounded_sample(frame, 1100, "ts", seed=3)
    assert 1100 <= sample.height <= 1110  # each day rounds up by at most one row
    per_day = sample.group_by(pl.col("ts").dt.date()).len().sort("ts").get_column("len").to_list()
    assert per_day == [int(np.ceil(100 * (d + 1) * 1100 / frame.height)) for d in range(10)]
    assert monitor.bounded_sample(frame, 10**6, "ts").height == frame.height
    assert sample.get_column("v").n_unique() == sample.height


def test_a_quarter_sd_shift_is_always_detected_and_stationary_windows_rarely_alarm():
    rng = np.random.default_rng(0)
    reference = _window(rng, 5000)
    false_alarms = sum(
        bool(monitor.detect_drift(reference, _window(rng, 5000), NUMERIC, ["kind"]).drifted)
        for _ in range(40)
    )
    assert false_alarms <= 2  # at most 5% of 40 stationary windows
    for trial in range(12):
        column = NUMERIC[trial % len(NUMERIC)]
        result = monitor.detect_drift(reference, _window(rng, 5000, {column: 0.25}), NUMERIC, ["kind"])
        assert column in result.drifted, (trial, column)


def _runs(*windows: tuple[int, bool]) -> pl.DataFrame:
    """drift_runs rows: (day of the window end, dataset drift?) in time order."""
    base = dt.datetime(2013, 7, 1)
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(len(windows))],
            "computed_at": [base + dt.timedelta(hours=i) for i in range(len(windows))],
            "window_end": [base + dt.timedelta(days=d) for d, _ in windows],
            "drift_share": [0.6 if drifted else 0.0 for _, drifted in windows],
            "dataset_drift": [drifted for _, drifted in windows],
            "drifted": [["wx_temp"] if drifted else [] for _, drifted in windows],
        }
    )


NOW = dt.datetime(2013, 8, 1)
SPEC = MonitoringSpec(persist_windows=2, cooldown_hours=24)


@pytest.mark.parametrize(
    ("runs", "last_retrain", "trigger", "drift_run", "reason"),
    [
        (_runs(), None, False, None, "no drift results yet"),
        (_runs((1, True)), None, False, None, "1 of the last 1 window"),
        (_runs((1, False), (2, True)), None, False, None, "1 of the last 2 window"),
        (_runs((1, True), (2, True)), None, True, "r1", "drift in the last 2 windows"),
        # The same window checked twice is one window, not two.
        (_runs((1, True), (1, True)), None, False, None, "1 of the last 1 window"),
        # The latest result of a window counts: a re-check that found no drift clears it.
        (_runs((1, True), (2, True), (2, False)), None, False, None, "1 of the last 2 window"),
        (_runs((1, True), (2, True)), NOW - dt.timedelta(hours=2), False, "r1", "cooldown"),
        (
            _runs((1, True), (2, True)),
            NOW - dt.timedelta(hours=30),
            True,
            "r1",
            "drift in the last 2 windows",
        ),
    ],
)
def test_retrain_decision(runs, last_retrain, trigger, drift_run, reason):
    decision = monitor.retrain_decision(runs, SPEC, last_retrain, NOW)
    assert (decision.trigger, decision.drift_run) == (trigger, drift_run)
    assert reason in decision.reason


def _insert_runs(root, pipeline: str, windows: list[tuple[int, bool]]) -> None:
    """Make these the pipeline's drift results."""
    rows = _runs(*windows).with_columns(pl.lit(pipeline).alias("pipeline"))
    with connect(warehouse_path(root)) as conn:
        conn.execute(monitor.SCHEMA)
        conn.execute("DELETE FROM monitor.drift_runs WHERE pipeline = ?", [pipeline])
        for r in rows.iter_rows(named=True):
            conn.execute(
                "INSERT INTO monitor.drift_runs VALUES (?, ?, ?, 'v1', NULL, ?, 1, 1, ?, ?, ?, '')",
                [
                    r["id"],
                    r["pipeline"],
                    r["computed_at"],
                    r["window_end"],
                    r["drift_share"],
                    r["dataset_drift"],
                    r["drifted"],
                ],
            )


def test_sensor_requests_one_retrain_per_drift_event(sample_project):
    pipelines, root = sample_project
    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def("flight_delay_drift_retrain")
    resources = {"warehouse": Warehouse(database=str(warehouse_path(root)))}

    def tick(cursor: str | None = None):
        with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
            return sensor.evaluate_tick(context)

    assert "no drift results yet" in tick().skip_message
    _insert_runs(root, "flight_delay", [(1, True)])
    assert "2 consecutive needed" in tick().skip_message
    _insert_runs(root, "flight_delay", [(1, True), (2, True)])
    result = tick()
    (request,) = result.run_requests
    assert request.run_key == "drift-flight_delay-r1"
    assert request.tags[TRIGGER_TAG] == "drift" and request.tags[DRIFT_RUN_TAG] == "r1"
    assert sensor.job_name == "flight_delay_retrain_job"
    # With the cursor it wrote, the next tick is inside the cooldown and launches nothing.
    assert json.loads(result.cursor)["drift_run"] == "r1"
    assert "cooldown" in tick(result.cursor).skip_message
    # Without a cursor (e.g. a reset sensor) the same event gets the same run_key, which Dagster runs once.
    assert tick().run_requests[0].run_key == request.run_key


def test_drift_report_feeds_the_sensor_and_the_retrain_is_logged_with_its_trigger(sample_project):
    pipelines, root = sample_project
    assert materialize_all(pipelines, root, selection=FLAGSHIP).success
    db = functools.partial(connect, warehouse_path(root))
    with db() as conn:
        if registry.alias_version(conn, "flight_delay", registry.CHAMPION) is None:
            # On the small sample the first model may not beat its baseline; drift needs a champion.
            gate.rollback(
                db, "flight_delay", to=registry.alias_version(conn, "flight_delay", registry.CHALLENGER)
            )
    drift_key = dg.AssetKey(["flight_delay", "drift_report"])
    for _ in range(2):  # the same window twice: one window for the sensor
        result = materialize_all(pipelines, root, selection=[drift_key])
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    # The test window is December; the reference is January to August: the weather has drifted.
    assert meta["dataset_drift"].value is True
    assert "wx_temp" in meta["drifted_columns"].value
    assert Path(meta["report"].value).read_text()[:200].strip().lower().startswith("<!doctype html")
    with db() as conn:
        runs = monitor.drift_runs(conn, "flight_delay")
        history = conn.execute(
            "SELECT count(*), count(DISTINCT drift_run) FROM monitor.drift_history"
        ).fetchone()
    assert runs.height == 2 and history[1] == 2
    assert history[0] == 2 * len(registry.read_manifest(_champion_dir(db))["features"])

    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def("flight_delay_drift_retrain")
    with dg.build_sensor_context(
        resources={"warehouse": Warehouse(database=str(warehouse_path(root)))}
    ) as ctx:
        assert "1 of the last 1 window" in sensor.evaluate_tick(ctx).skip_message

    # One drifted window is enough when the pipeline says so; the retrain then carries its trigger.
    (pipelines / "flight_delay.yaml").write_text(
        (pipelines / "flight_delay.yaml").read_text() + "monitoring: {persist_windows: 1}\n"
    )
    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def("flight_delay_drift_retrain")
    with dg.build_sensor_context(
        resources={"warehouse": Warehouse(database=str(warehouse_path(root)))}
    ) as ctx:
        (request,) = sensor.evaluate_tick(ctx).run_requests
    assert request.tags[DRIFT_RUN_TAG] == runs.get_column("id")[-1]
    job = defs.resolve_job_def(sensor.job_name)
    assert job.execute_in_process(tags=request.tags, instance=dg.DagsterInstance.ephemeral()).success
    with db() as conn:
        last = conn.execute(
            "SELECT details FROM registry.decision_log WHERE pipeline = 'flight_delay' ORDER BY decided_at DESC LIMIT 1"
        ).fetchone()[0]
    assert json.loads(last)["trigger"][DRIFT_RUN_TAG] == request.tags[DRIFT_RUN_TAG]


def _champion_dir(db):
    with db() as conn:
        return registry.version_dir(conn, registry.alias_version(conn, "flight_delay", registry.CHAMPION))
