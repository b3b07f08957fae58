"""Drift detection at bounded cost, the retrain decision, and the retraining sensor."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ml_assets.core import dataset, drift, performance, registry, retrain_policy, rollback, store
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import MonitoringSpec, PerformanceSpec
from ml_assets.core.spec.load import deep_merge, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.handoff import HandOffStore, SettledChampion
from ml_assets.orchestration.partitions import all_partitions_tags
from ml_assets.orchestration.resources import Warehouse
from ml_assets.orchestration.sensors import EVENT_TAG, TRIGGER_TAG
from ml_assets_tests.conftest import materialize_all, run_metadata
from ml_assets_tests.helpers import (
    FLAGSHIP_MODEL,
    copy_warehouse,
    drift_run_rows,
    gate_chooses_champion,
    insert_drift_runs,
)

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
    sample = dataset.bounded_sample(frame, 1100, "ts", seed=3)
    assert 1100 <= sample.height <= 1110  # each day rounds up by at most one row
    per_day = sample.group_by(pl.col("ts").dt.date()).len().sort("ts").get_column("len").to_list()
    assert per_day == [int(np.ceil(100 * (d + 1) * 1100 / frame.height)) for d in range(10)]
    assert dataset.bounded_sample(frame, 10**6, "ts").height == frame.height
    assert sample.get_column("v").n_unique() == sample.height


def test_a_quarter_sd_shift_is_always_detected_and_stationary_windows_rarely_alarm():
    rng = np.random.default_rng(0)
    reference = _window(rng, 5000)
    false_alarms = sum(
        bool(drift.detect_drift(reference, _window(rng, 5000), NUMERIC, ["kind"]).drifted) for _ in range(40)
    )
    assert false_alarms <= 2  # at most 5% of 40 stationary windows
    for trial in range(12):
        column = NUMERIC[trial % len(NUMERIC)]
        result = drift.detect_drift(reference, _window(rng, 5000, {column: 0.25}), NUMERIC, ["kind"])
        assert column in result.drifted, (trial, column)


def _periods(*degraded: bool | None, champion: str = "v1") -> pl.DataFrame:
    """performance_history rows, one week each: degraded (True/False) or too few rows to judge (None)."""
    base = dt.datetime(2013, 7, 1)
    return pl.DataFrame(
        {
            "champion": [champion] * len(degraded),
            "period_start": [base + dt.timedelta(weeks=i) for i in range(len(degraded))],
            "rows": [100 if d is None else 5000 for d in degraded],
            "metric": ["rmse"] * len(degraded),
            "score": [60.0 if d else 45.0 for d in degraded],
            "expected": [46.0] * len(degraded),
            "change": [-0.3 if d else 0.02 for d in degraded],
            "degraded": list(degraded),
        },
        schema_overrides={"degraded": pl.Boolean},
    )


NOW = dt.datetime(2013, 8, 1)
SPEC = MonitoringSpec(persist_windows=2, cooldown_hours=24)
NO_PERIODS = _periods()


@pytest.mark.parametrize(
    ("runs", "last_retrain", "trigger", "event", "reason"),
    [
        (drift_run_rows(), None, False, None, "no drift results for the champion yet"),
        (drift_run_rows((1, True)), None, False, None, "1 of the last 1 window"),
        (drift_run_rows((1, False), (2, True)), None, False, None, "1 of the last 2 window"),
        (drift_run_rows((1, True), (2, True)), None, True, "drift:r1", "drift in the last 2 windows"),
        # The same window checked twice is one window, not two.
        (drift_run_rows((1, True), (1, True)), None, False, None, "1 of the last 1 window"),
        # The latest result of a window counts: a re-check that found no drift clears it.
        (drift_run_rows((1, True), (2, True), (2, False)), None, False, None, "1 of the last 2 window"),
        (drift_run_rows((1, True), (2, True)), NOW - dt.timedelta(hours=2), False, "drift:r1", "cooldown"),
        (
            drift_run_rows((1, True), (2, True)),
            NOW - dt.timedelta(hours=30),
            True,
            "drift:r1",
            "drift in the last 2 windows",
        ),
    ],
)
def test_drift_decision(runs, last_retrain, trigger, event, reason):
    decision = retrain_policy.retrain_decision("v1", runs, NO_PERIODS, SPEC, last_retrain, NOW)
    assert (decision.trigger, decision.event) == (trigger, event)
    assert reason in decision.reason


def test_only_the_current_champions_results_count_and_an_event_is_acted_on_once():
    drifted = drift_run_rows((1, True), (2, True))
    # Drift measured against an earlier champion says nothing about the new one.
    assert not retrain_policy.retrain_decision("v2", drifted, NO_PERIODS, SPEC, None, NOW).trigger
    assert "no champion" in retrain_policy.retrain_decision(None, drifted, NO_PERIODS, SPEC, None, NOW).reason
    handled = frozenset({"drift:r1"})
    decision = retrain_policy.retrain_decision("v1", drifted, NO_PERIODS, SPEC, None, NOW, handled)
    assert not decision.trigger and "already retrained for drift:r1" in decision.reason


@pytest.mark.parametrize(
    ("periods", "event", "reason"),
    [
        (_periods(True), None, "degraded in 1 of the last 1 labelled period"),
        (_periods(False, True), None, "degraded in 1 of the last 2"),
        (_periods(True, True), "performance:v1:2013-07-08", "30.0% worse than the champion's test score"),
        # A thin period (too few labels) is scored but neither breaks nor makes a streak.
        (_periods(True, None, True), "performance:v1:2013-07-15", "worse than the champion's test score"),
        (_periods(True, True, False), None, "degraded in 1 of the last 2"),
        (_periods(True, True, champion="v0"), None, "degraded in 0 of the last 0"),
    ],
)
def test_performance_decision(periods, event, reason):
    decision = retrain_policy.retrain_decision("v1", drift_run_rows(), periods, SPEC, None, NOW)
    assert (decision.trigger, decision.event) == (event is not None, event)
    assert decision.kind == ("performance" if event else None)
    assert reason in decision.reason


def test_drift_and_degradation_together_are_one_retrain():
    decision = retrain_policy.retrain_decision(
        "v1", drift_run_rows((1, True), (2, True)), _periods(True, True), SPEC, None, NOW
    )
    assert decision.trigger and decision.events == ("drift:r1", "performance:v1:2013-07-08")
    again = retrain_policy.retrain_decision(
        "v1",
        drift_run_rows((1, True), (2, True)),
        _periods(True, True),
        SPEC,
        None,
        NOW,
        frozenset(decision.events),
    )
    assert not again.trigger


DELAY = "flight_delay"
# The sensor's message when nothing fires: the drift verdict, then the performance verdict.
QUIET = "{drift}; performance degraded in {degraded} of the last {periods} labelled period(s); 2 consecutive needed"


def _key(name: str) -> dg.AssetKey:
    return dg.AssetKey([DELAY, name])


# No column can reach a threshold of 1000, and all of them would have to: drift cannot fire.
NO_DRIFT = {"drift_share": 1.0, "threshold": 1000.0, "column_thresholds": None}


def _configure(pipelines: Path, **blocks: object) -> None:
    """Merge `blocks` into the test copy of flight_delay.yaml, key by key (`None` drops a field)."""
    path = pipelines / f"{DELAY}.yaml"
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(path.read_text()), blocks), sort_keys=False))


def _db(root: Path) -> functools.partial:
    return functools.partial(connect, warehouse_path(root))


def _train_champion(pipelines: Path, root: Path) -> str:
    """Set-up for the monitoring tests: train flight_delay's first version and let the gate make it
    champion over the constant baseline (helpers.gate_chooses_champion: an outcome known by
    construction, whatever LightGBM against the linear baseline would give on this 1-in-20 sample)."""
    result = materialize_all(pipelines, root, selection=FLAGSHIP_MODEL)
    assert result.success
    with _db(root)() as conn:
        version = registry.version_of_run(conn, DELAY, result.run_id)
    assert version is not None
    assert gate_chooses_champion(pipelines, root).champion == version
    return version


def _champion_dir(db):
    with db() as conn:
        return registry.version_dir(conn, registry.alias_version(conn, DELAY, registry.CHAMPION))


def _own_tags(request: dg.RunRequest) -> dict[str, str]:
    """The tags the sensor sets (Dagster adds its own, e.g. the sensor's name)."""
    return {k: v for k, v in request.tags.items() if k.startswith("ml_assets/")}


def test_sensor_requests_one_retrain_per_drift_event(sample_project, gated_sample, capsys):
    pipelines, root = sample_project
    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def("flight_delay_retrain")
    resources = {"warehouse": Warehouse(database=str(warehouse_path(root)))}

    def tick(cursor: str | None = None):
        with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
            return sensor.evaluate_tick(context)

    assert tick().skip_message == "no champion yet: nothing to monitor"
    # The reason is in the tick's log too, readable in the UI without hovering over the tick.
    assert "skipped: no champion yet: nothing to monitor" in capsys.readouterr().err
    copy_warehouse(gated_sample[0], root)  # a champion the gate chose, no drift measured against it yet
    champion = gated_sample[1].champion
    no_runs = "no drift results for the champion yet"
    assert tick().skip_message == QUIET.format(drift=no_runs, degraded=0, periods=0)
    assert insert_drift_runs(root, DELAY, [(1, True)]) == champion
    one_window = "drift in 1 of the last 1 window(s); 2 consecutive needed"
    assert tick().skip_message == QUIET.format(drift=one_window, degraded=0, periods=0)
    insert_drift_runs(root, DELAY, [(1, True), (2, True)])
    result = tick()
    (request,) = result.run_requests
    reason = "drift in the last 2 windows (latest: share 0.60; wx_temp)"
    assert f"retrain requested: {reason}" in capsys.readouterr().err
    assert request.run_key == "retrain-flight_delay-drift:r1"
    assert _own_tags(request) == {TRIGGER_TAG: "drift", EVENT_TAG: "drift:r1", "ml_assets/reason": reason}
    assert sensor.job_name == "flight_delay_retrain_job"
    # With the cursor it wrote, the same event is never acted on again, even past the cooldown.
    assert json.loads(result.cursor)["handled"] == ["drift:r1"]
    assert tick(result.cursor).skip_message == "already retrained for drift:r1"
    state = json.loads(result.cursor) | {"last_retrain_at": "2000-01-01T00:00:00"}
    assert tick(json.dumps(state)).skip_message == "already retrained for drift:r1"
    # Without a cursor (e.g. a reset sensor) the same event gets the same run_key, which Dagster runs once.
    assert tick().run_requests[0].run_key == request.run_key
    # A new drifted window is a new event, but it waits for the cooldown.
    insert_drift_runs(root, DELAY, [(1, True), (2, True), (3, True)])
    last = dt.datetime.fromisoformat(json.loads(result.cursor)["last_retrain_at"])
    assert tick(result.cursor).skip_message == (
        f"{reason}, but the last retrain was at {last:%Y-%m-%d %H:%M}; cooldown 24.0 h"
    )
    assert tick(json.dumps(state)).run_requests[0].run_key == "retrain-flight_delay-drift:r2"


def test_drift_report_feeds_the_sensor_and_the_retrain_is_logged_with_its_trigger(sample_project):
    pipelines, root = sample_project
    champion = _train_champion(pipelines, root)
    db = _db(root)
    for _ in range(2):  # the same window twice: one window for the sensor
        result = materialize_all(pipelines, root, selection=[_key("champion"), _key("drift_report")])
    meta = run_metadata(result, _key("drift_report"))
    assert meta["champion"].value == champion
    # The window is December; the reference is January to mid-September: the weather has drifted.
    assert meta["dataset_drift"].value is True
    assert "wx_temp" in meta["drifted_columns"].value
    assert Path(meta["report_path"].value).read_text()[:200].strip().lower().startswith("<!doctype html")
    assert meta["report"].value.startswith("http://127.0.0.1:") and meta["report"].value.endswith(".html")
    assert meta["plot_drift_scores"].value.endswith(".png)")
    with db() as conn:
        runs = drift.drift_runs(conn, DELAY)
        history = conn.execute(
            "SELECT count(*), count(DISTINCT drift_run) FROM monitor.drift_history"
        ).fetchone()
    assert runs.height == 2 and history[1] == 2
    assert runs.get_column("champion").to_list() == [champion, champion]
    assert history[0] == 2 * len(registry.read_manifest(_champion_dir(db)).features)

    resources = {"warehouse": Warehouse(database=str(warehouse_path(root)))}
    sensor = build_definitions(pipelines, root).resolve_sensor_def("flight_delay_retrain")
    with dg.build_sensor_context(resources=resources) as ctx:
        skipped = sensor.evaluate_tick(ctx)
    one_window = "drift in 1 of the last 1 window(s); 2 consecutive needed"
    assert skipped.skip_message == QUIET.format(drift=one_window, degraded=0, periods=0)

    # One drifted window is enough when the pipeline says so; the retrain then carries its trigger.
    _configure(pipelines, monitoring={"persist_windows": 1})
    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def("flight_delay_retrain")
    with dg.build_sensor_context(resources=resources) as ctx:
        (request,) = sensor.evaluate_tick(ctx).run_requests
    event = f"drift:{runs.get_column('id')[-1]}"
    assert request.run_key == f"retrain-flight_delay-{event}"
    assert (request.tags[TRIGGER_TAG], request.tags[EVENT_TAG]) == ("drift", event)
    job = defs.resolve_job_def(sensor.job_name)
    retrain = job.execute_in_process(tags=request.tags, instance=dg.DagsterInstance.ephemeral())
    assert retrain.success
    with db() as conn:
        action, challenger, after, details, run_id = conn.execute(
            "SELECT action, challenger, champion_after, details, run_id FROM registry.decision_log "
            "WHERE pipeline = 'flight_delay' ORDER BY decided_at DESC LIMIT 1"
        ).fetchone()
        retrained = registry.version_of_run(conn, DELAY, retrain.run_id)
    # Same data, same settings: the deterministic retrain is the champion's twin, with no gain to promote.
    assert (action, challenger, after, run_id) == ("refuse", retrained, champion, retrain.run_id)
    assert json.loads(details)["trigger"] == {
        TRIGGER_TAG: "drift",
        EVENT_TAG: event,
        "ml_assets/reason": request.tags["ml_assets/reason"],
    }


def test_the_drift_summary_shows_the_drifted_columns_first_and_links_evidentlys_report(tmp_path):
    columns = [
        drift.ColumnDrift("distance", "wasserstein", 0.05, 0.1, False),
        drift.ColumnDrift("wx_temp", "wasserstein", 0.4, 0.1, True),
        drift.ColumnDrift("carrier", "jensenshannon", 0.2, 0.3, False),  # higher score, own threshold
        drift.ColumnDrift("wx_wind", "wasserstein", 0.12, 0.1, True),
    ]
    result = drift.DriftResult(columns, 0.5, True, 1000, 200)
    page, full = tmp_path / "r1.html", tmp_path / "r1_evidently.html"
    drift.write_summary(
        page, DELAY, "v1", "2013-12-01 to 2013-12-31", result, None, full, tmp_path / "r1.png"
    )
    text = page.read_text()
    cells = re.findall(r"<tr><td>([^<]*)</td>", text)
    assert cells == ["wx_temp", "wx_wind", "carrier", "distance"]
    assert "<th>test</th><th>score</th><th>threshold</th>" in text
    assert "2 of 4 columns drifted" in text and text.index("wx_temp") < text.index("<table>")
    assert 'href="r1_evidently.html"' in text


def test_only_full_weeks_of_enough_rows_are_judged_and_the_table_says_why_not():
    spec = PerformanceSpec(period="week", tolerance=0.05, min_rows=500)
    full = performance.PeriodFacts(rows=6000, days=7, full_days=7, change=-0.16, after_build=True)
    assert performance.period_verdict(full, "roc_auc", spec) == (True, "")
    assert performance.period_verdict(replace(full, change=-0.01), "roc_auc", spec) == (False, "")
    # The same drop on a week labelled for two days only is not read as a full week's.
    partial = replace(full, rows=1700, days=2)
    assert performance.period_verdict(partial, "roc_auc", spec) == (None, "partial: 2 of 7 days labelled")
    for facts, why in (
        (replace(full, rows=499), "499 rows < min_rows 500"),
        (replace(full, after_build=False), "within the champion's own data"),
        (replace(full, change=None), "no roc_auc: one class only"),
    ):
        degraded, reason = performance.period_verdict(facts, "roc_auc", spec)
        assert degraded is None and reason.startswith(why)
    assert [performance.days_in_period(dt.datetime(2013, m, 1), "month") for m in (2, 12)] == [28, 31]

    weeks = [dt.datetime(2013, 12, 16), dt.datetime(2013, 12, 23), dt.datetime(2013, 12, 30)]
    verdicts = [
        performance.period_verdict(f, "roc_auc", spec) for f in (full, replace(full, change=0.0), partial)
    ]
    periods = pl.DataFrame(
        {
            "period_start": weeks,
            "rows": [6000, 6000, 1700],
            "days": [7, 7, 2],
            "score": [0.6, 0.7, 0.6],
            "change": [-0.16, 0.0, -0.16],
            "degraded": [v[0] for v in verdicts],
            "why": [v[1] for v in verdicts],
        }
    )
    shown = performance.readable_periods(periods)
    assert shown.get_column("period_start").to_list() == ["2013-12-30", "2013-12-23", "2013-12-16"]
    assert shown.select("days", "judged").rows() == [
        ("2 (partial)", "not judged"),
        ("7", "ok"),
        ("7", "degraded"),
    ]
    assert shown.get_column("why")[0] == "partial: 2 of 7 days labelled"
    legend = performance.periods_legend("roc_auc", 0.7123456, spec)
    assert "0.7123" in legend and "change < -0.05" in legend and "500 rows" in legend


# A later delivery lands this many weeks after the rows it repeats: whole weeks keep their weekdays, and
# 14 of them put the champion's test quarter (October to December) after the last day it was built from.
LATER = dt.timedelta(weeks=14)
# The sources, then flight_delay's modelling table: what loads a delivery.
LOAD = dg.AssetSelection.assets(_key("modelling_table")).upstream().required_multi_asset_neighbors()


def _deliver_again(pipelines: Path, since: dt.datetime, contradicting: bool = False) -> None:
    """A later delivery, as the sources receive one: the flights from `since` on and the weather they flew
    in, again `LATER`, appended to the files the sources read (replacing an earlier such delivery), with the
    sources' partitions extended to hold them. Flights keep their ids' day in step (year, month, day).
    `contradicting`: every late flight arrives on time and every other one late (the world changed under
    the champion). Through the files, not the modelling table: the online path completes requests from the
    validated tables, so a modelling table edited by hand no longer agrees with it (the skew check fails)."""
    project = load_project(pipelines)
    flights, weather = (Path(project.sources[n].path) for n in ("flights", "weather"))
    stamp = pl.col("time_hour").str.to_datetime("%Y-%m-%dT%H:%M:%SZ")

    def later(frame: pl.DataFrame, start: dt.datetime) -> pl.DataFrame:
        own = frame.filter(stamp < since + LATER)  # what the file held before any delivery
        again = own.filter(stamp >= start).with_columns(
            (stamp + LATER).dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("time_hour")
        )
        return pl.concat([own, again])

    rows = later(pl.read_csv(flights, infer_schema=False), since)
    day = pl.date(*(pl.col(c).cast(pl.Int32) for c in ("year", "month", "day")))
    moved = pl.when(stamp >= since + LATER)
    rows = rows.with_columns(
        *(
            moved.then(getattr((day + LATER).dt, c)()).otherwise(pl.col(c)).cast(pl.String).alias(c)
            for c in ("year", "month", "day")
        ),
    )
    if contradicting:
        delay = pl.col("arr_delay").cast(pl.Float64, strict=False)
        flipped = pl.when(delay >= 15).then(pl.lit("0")).when(delay.is_not_null()).then(pl.lit("30"))
        rows = rows.with_columns(
            moved.then(flipped.otherwise(pl.col("arr_delay")))
            .otherwise(pl.col("arr_delay"))
            .alias("arr_delay")
        )
    rows.write_csv(flights)
    # The weather from a day before: the as-of join gives the first flights the hour before theirs.
    later(pl.read_csv(weather, infer_schema=False), since - dt.timedelta(days=1)).write_csv(weather)
    # The rows it repeats span less than `LATER`: the month after since + 2 * LATER holds every one.
    end = {"partitions": {"end": f"{(since + 2 * LATER + dt.timedelta(days=31)):%Y-%m}-01"}}
    _configure(pipelines, sources={"flights": end, "weather": end})


def test_performance_scores_each_unseen_week_and_a_sustained_drop_triggers_a_retrain(sample_project):
    pipelines, root = sample_project
    # The sample keeps one flight in 20: about 300 labelled flights a week, whose ROC-AUC varies by a few
    # hundredths from week to week; only a drop of a fifth counts here. Drift cannot fire, so the one
    # event the sensor can act on is the performance one.
    _configure(pipelines, monitoring={"performance": {"min_rows": 100, "tolerance": 0.2}, **NO_DRIFT})
    champion = _train_champion(pipelines, root)
    db = _db(root)
    perf_key = _key("performance")
    model = ServableModel.load(_champion_dir(db))
    start = dt.datetime.fromisoformat(model.manifest.test_start)
    built_from = dt.datetime.fromisoformat(model.manifest.data_end)
    # Labels arriving after the champion was built: its test quarter again, 14 weeks later.
    _deliver_again(pipelines, start)
    monitors = [_key("champion"), _key("drift_report")]
    assert materialize_all(pipelines, root, selection=LOAD | dg.AssetSelection.assets(*monitors)).success
    for _ in range(2):  # scoring again replaces each period's row
        assert materialize_all(pipelines, root, selection=[perf_key]).success
    with db() as conn:
        runs = drift.drift_runs(conn, DELAY)
        history = performance.performance_history(conn, DELAY)
        unseen = conn.execute("SELECT * FROM flight_delay.modelling_table WHERE time_hour >= ?", [start]).pl()
    assert runs.select("champion", "dataset_drift", "drifted").rows() == [(champion, False, [])]
    assert history.get_column("champion").unique().to_list() == [champion]
    # Every labelled row the champion never learned from is in exactly one week, starting on Mondays.
    assert history.get_column("rows").sum() == unseen.height
    assert history.get_column("period_start").dt.weekday().unique().to_list() == [1]
    assert history.get_column("period_start").is_unique().all()
    assert history.get_column("period_start")[0] <= start < history.get_column("period_start")[1]
    assert history.get_column("expected").unique().to_list() == [model.manifest.test_metrics["roc_auc"]]
    # Its own test weeks are scored but not judged: they were known when it was promoted.
    judged = history.filter(pl.col("degraded").is_not_null())
    assert judged.height >= 10 and (judged.get_column("period_start") > built_from).all()
    assert history.filter(pl.col("period_start") <= built_from).get_column("degraded").null_count() > 0
    week = judged.row(3, named=True)
    rows = unseen.filter(
        (pl.col("time_hour") >= week["period_start"])
        & (pl.col("time_hour") < week["period_start"] + dt.timedelta(weeks=1))
    )
    y = (rows.get_column("late") == model.manifest.classes[1]).to_numpy()
    assert week["score"] == pytest.approx(roc_auc_score(y, model.predict(rows)))
    assert not history.get_column("degraded").any()

    sensor = build_definitions(pipelines, root).resolve_sensor_def("flight_delay_retrain")
    resources = {"warehouse": Warehouse(database=str(warehouse_path(root)))}
    with dg.build_sensor_context(resources=resources) as ctx:
        skipped = sensor.evaluate_tick(ctx)
    no_drift = "drift in 0 of the last 1 window(s); 2 consecutive needed"
    assert skipped.skip_message == QUIET.format(drift=no_drift, degraded=0, periods=2)

    # Labels that arrive contradicting the champion (the world changed under it): every new week degrades.
    _deliver_again(pipelines, start, contradicting=True)
    result = materialize_all(pipelines, root, selection=LOAD | dg.AssetSelection.assets(perf_key))
    meta = run_metadata(result, perf_key)
    assert meta["scored_champion"].value == champion
    assert meta["latest_period_roc_auc"].value < 0.5
    assert meta["degraded_periods"].value == judged.height
    with dg.build_sensor_context(resources=resources) as ctx:
        (request,) = sensor.evaluate_tick(ctx).run_requests
    event = f"performance:{champion}:{judged.get_column('period_start')[-1]:%Y-%m-%d}"
    assert request.run_key == f"retrain-flight_delay-{event}"
    assert (request.tags[TRIGGER_TAG], request.tags[EVENT_TAG]) == ("performance", event)
    assert "worse than the champion's test score" in request.tags["ml_assets/reason"]


class RollbackAfterSettling(HandOffStore):
    """The hand-off store, with an operator's manual rollback landing right after the champion step
    stored what it settled: between `champion` and the steps after it, in the same run."""

    pipelines: str
    to: str

    def handle_output(self, context: dg.OutputContext, obj: SettledChampion) -> None:
        super().handle_output(context, obj)
        project = load_project(Path(self.pipelines))
        spec = project.pipelines[DELAY]
        rollback.rollback(_db(Path(self.root).parent), spec, project.sources_of(spec), to=self.to)


def test_monitors_judge_the_champion_the_run_settled_whatever_the_alias_says_after(sample_project):
    """The champion step rolls back a bad champion, then an operator's manual rollback lands before the
    steps after it: they judge what the champion step settled (the rolled-back-to version), not the alias."""
    pipelines, root = sample_project
    db = _db(root)
    previous = _train_champion(pipelines, root)
    # A second version learns labels contradicting the real ones (late <-> on time): on the real labels it
    # ranks flights backwards (ROC-AUC about 1 - the first version's), far beyond the rollback margin.
    with db() as conn:
        conn.execute("UPDATE flight_delay.modelling_table SET late = NOT late")
    trained = materialize_all(pipelines, root, selection=[_key("features"), _key("model")])
    assert trained.success
    with db() as conn:
        worse = registry.version_of_run(conn, DELAY, trained.run_id)
        # Set-up: it is made champion by hand (the gate would refuse it), as if a bad model got through.
        registry.record_decision(
            conn, DELAY, "promote", "test set-up: forced promotion", challenger=worse, new_champion=worse
        )
    assert worse not in (None, previous)
    # The real labels are back (rebuilt from the validated tables) before the monitors run. The hand edit
    # above is invisible to the validated tables' change log, so the build record is dropped: the next
    # build is a full one, as after a change of config.
    with db() as conn:
        conn.execute(f"DELETE FROM {store.MODELLING_BUILDS} WHERE pipeline = ?", [DELAY])
    assert materialize_all(pipelines, root, selection=[_key("modelling_table")]).success

    defs = build_definitions(pipelines, root)
    meanwhile = RollbackAfterSettling(root=str(root / "handoff"), pipelines=str(pipelines), to=worse)
    result = dg.materialize(
        list(defs.assets),
        resources=defs.resources | {"handoff": meanwhile},
        selection=[_key(n) for n in ("champion", "performance", "predictions", "drift_report")],
        tags=all_partitions_tags(load_project(pipelines)),
    )
    assert result.success
    meta = {
        e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()
    }
    assert meta["champion"]["action"].value == "auto_rollback"
    assert meta["champion"]["champion"].value == previous
    with db() as conn:
        champion = registry.alias_version(conn, DELAY, registry.CHAMPION)
        auto, manual = registry.decisions(conn, DELAY).rows(named=True)[-2:]
        drifts = conn.execute("SELECT champion, run_id FROM monitor.drift_runs").fetchall()
        periods = conn.execute("SELECT DISTINCT champion, run_id FROM monitor.performance_history").fetchall()
        scores = conn.execute(f"SELECT DISTINCT version, run_id FROM {DELAY}.predictions").fetchall()
    assert (auto["action"], auto["champion_before"], auto["champion_after"]) == (
        "auto_rollback",
        worse,
        previous,
    )
    assert f"champion {worse} trails previous champion {previous} on roc_auc" in auto["reason"]
    # The operator's rollback landed mid-run, after the champion step settled.
    assert (manual["action"], manual["champion_after"], champion) == ("rollback", worse, worse)
    # No monitor or score had run before this run: every row it wrote names the champion the automatic
    # rollback restored (not the one that was champion when the run started, nor the one serving after
    # the manual rollback) and this run.
    assert drifts == [(previous, result.run_id)]
    assert meta["drift_report"]["champion"].value == previous
    assert periods == [(previous, result.run_id)]
    assert meta["performance"]["scored_champion"].value == previous
    assert scores == [(previous, result.run_id)]
