"""Serving on a sample of the real data: the `<pipeline>/predictions` asset (partitioned, re-scoring
replaces rows, the rescore sensor), the skew check between the online and the batch path, the as-of
weather of an online request, `ml-assets predict` through the real CLI, and the REST API on a real uvicorn
server on loopback (happy path, bad requests, a hot swap during traffic, a tampered champion refused).

One module fixture trains both pipelines once (flight_delay twice: two versions to swap between).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import polars as pl
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ml_assets.api import create_app
from ml_assets.core import registry, rollback
from ml_assets.core.dataset import table_name
from ml_assets.core.registry import MODEL_FILE
from ml_assets.core.serving import bundle, online_model, request_parsing, skew
from ml_assets.core.serving.lookups import Lookups
from ml_assets.core.serving.request_log import RequestLog, log_dir, read_window
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, load_project
from ml_assets.core.store import (
    DATA_DIR_ENV,
    DEPLOYMENT_ENV,
    SHARED_ROOT_ENV,
    change_marker,
    connect,
    warehouse_path,
)
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.resources import Warehouse
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, run_metadata, stop_process, write_pipelines
from ml_assets_tests.helpers import wait_until_answers

DELAY, ARR = "flight_delay", "flight_arr_delay"
MAX_BATCH, MAX_BODY = 50, 64 * 1024
DEADLINE_S = 120
MONITORS = dg.AssetSelection.assets(
    *(dg.AssetKey([p, a]) for p in (DELAY, ARR) for a in ("drift_report", "performance"))
)


@dataclass(frozen=True)
class Served:
    pipelines: Path
    root: Path
    first: str
    second: str

    def db(self):
        return connect(warehouse_path(self.root))

    def spec(self, name: str = DELAY):
        project = load_project(self.pipelines)
        return project, project.pipelines[name]

    def champion(self, name: str = DELAY) -> str | None:
        with self.db() as conn:
            return registry.alias_version(conn, name, registry.CHAMPION)

    def make_champion(self, version: str) -> None:
        project, spec = self.spec()
        rollback.rollback(
            functools.partial(connect, warehouse_path(self.root)), spec, project.sources_of(spec), version
        )


def _serving_config(pipelines: Path) -> None:
    path = pipelines / f"{DELAY}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["serving"] = {
        "poll_s": 0.5,
        "max_batch": MAX_BATCH,
        "max_body_bytes": MAX_BODY,
        "rescore_partitions": 3,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, sample_sources: Path
) -> tuple[Served, dg.ExecuteInProcessResult]:
    """Both pipelines trained with champions (made by the operator's manual move when the gate refuses a
    first model on the sample, as in test_cli), then flight_delay trained again: two versions."""
    base = tmp_path_factory.mktemp("serving")
    pipelines = write_pipelines(base / "pipelines", sample_sources, FAST_MODEL)
    _serving_config(pipelines)
    root = base / "data"
    db = functools.partial(connect, warehouse_path(root))
    train = (
        dg.AssetSelection.all()
        - MONITORS
        - dg.AssetSelection.assets(*(dg.AssetKey([p, "predictions"]) for p in (DELAY, ARR)))
    )
    assert materialize_all(pipelines, root, selection=train).success
    project = load_project(pipelines)
    for name in (DELAY, ARR):
        with db() as conn:
            latest = registry.latest_version(conn, name)
            champion = registry.alias_version(conn, name, registry.CHAMPION)
        if champion is None:
            spec = project.pipelines[name]
            rollback.rollback(db, spec, project.sources_of(spec), to=latest)
    with db() as conn:
        first = registry.alias_version(conn, DELAY, registry.CHAMPION)
    again = (
        dg.AssetSelection.assets(dg.AssetKey([DELAY, "model"])).upstream().required_multi_asset_neighbors()
    )
    assert materialize_all(pipelines, root, selection=again).success
    with db() as conn:
        second = registry.latest_version(conn, DELAY)
    assert first != second
    s = Served(pipelines, root, first, second)
    return s, _score(s)


@pytest.fixture(scope="module")
def served(trained) -> Served:
    return trained[0]


def _predictions(s: Served, name: str = DELAY) -> pl.DataFrame:
    with s.db() as conn:
        return conn.execute(f"SELECT * FROM {name}.predictions").pl()


def _score(s: Served) -> dg.ExecuteInProcessResult:
    """Both pipelines' predictions over every partition, with the skew checks."""
    keys = [dg.AssetKey([p, "predictions"]) for p in (DELAY, ARR)]
    checks = dg.AssetSelection.checks_for_assets(*(dg.AssetKey([p, "champion"]) for p in (DELAY, ARR)))
    return materialize_all(s.pipelines, s.root, selection=dg.AssetSelection.assets(*keys) | checks)


# --- batch scores -----------------------------------------------------------------------------------------


def test_predictions_score_every_row_once_with_the_champion_and_the_skew_check_passes(trained):
    served, result = trained
    assert result.success
    checks = {(c.asset_key.path[0], c.check_name): c for c in result.get_asset_check_evaluations()}
    for name in (DELAY, ARR):
        check = checks[(name, "online_matches_batch")]
        assert check.passed, check.description
        assert check.metadata["rows"].value > 0 and check.metadata["max_abs_diff"].value <= 1e-9
        assert check.metadata["single_row_requests"].value == skew.SKEW_SINGLE_ROWS
        # Over the run's range of partitions, the scores' metadata is on the last one, which the UI shows.
        events = sorted(
            (
                e
                for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey([name, "predictions"])
            ),
            key=lambda e: e.partition,
        )
        *earlier, last = (e.materialization.metadata for e in events)
        assert earlier and all(set(m) == {"run_range"} for m in earlier)
        assert last["rows"].value > 0
        assert last["version"].value in _predictions(served, name).get_column("version").to_list()
    # The regression model's scores vary, so its agreement is not that of a constant.
    with served.db() as conn:
        modelling = conn.execute(f"SELECT count(*) FROM {table_name(served.spec(ARR)[1])}").fetchone()[0]
        threshold = json.loads(
            conn.execute(
                "SELECT manifest FROM registry.model_versions WHERE version = ?", [served.first]
            ).fetchone()[0]
        )["decision_threshold"]
    arr = _predictions(served, ARR)
    assert arr.get_column("score").n_unique() > 100
    for name, champion in ((DELAY, served.first), (ARR, served.champion(ARR))):
        scores = _predictions(served, name)
        assert scores.height == modelling
        assert scores.select(served.spec(name)[1].id).is_duplicated().sum() == 0
        assert scores.get_column("version").unique().to_list() == [champion]
    delay = _predictions(served, DELAY)
    expected = pl.when(pl.col("score") >= threshold).then(pl.lit("true")).otherwise(pl.lit("false"))
    assert delay.select((pl.col("decision") == expected).all()).item()
    meta = run_metadata(result, dg.AssetKey([DELAY, "predictions"]))
    assert meta["version"].value == served.first and meta["rows"].value == modelling
    # Readable as Parquet: one file per (monthly) partition, together the table's rows.
    files = sorted((served.root / "predictions" / DELAY).glob("*.parquet"))
    assert meta["parquet_files"].value == len(files) > 1
    assert not list((served.root / "predictions" / DELAY).glob(".*"))  # no temporary file left
    exported = pl.read_parquet(files).sort(served.spec()[1].id)
    assert exported.equals(delay.sort(served.spec()[1].id))
    assert set(meta["score_summary"].value) >= {"rows", "mean", "p05", "p50", "p95", "decision_share"}


def test_rescoring_a_partition_replaces_its_rows_and_the_sensor_rescores_after_a_rollback(served):
    before = _predictions(served)
    served.make_champion(served.second)
    defs = build_definitions(served.pipelines, served.root)
    sensor = defs.resolve_sensor_def(f"{DELAY}_rescore")
    resources = {"warehouse": Warehouse(database=str(warehouse_path(served.root)))}
    with dg.build_sensor_context(resources=resources) as context:
        (request,) = sensor.evaluate_tick(context).run_requests
    # rescore_partitions: 3 -> the (monthly) partitions holding the last 3 days with rows.
    last_days = before.get_column("time_hour").dt.truncate("1d").unique().sort().tail(3)
    months = last_days.dt.strftime("%Y-%m-01").unique().sort().to_list()
    assert request.run_key == f"rescore-{DELAY}-{served.second}-{months[0]}-{months[-1]}"
    # What the sensor launches: its job settles the champion, then scores with the version it settled.
    result = defs.resolve_job_def(sensor.job_name).execute_in_process(tags=request.tags)
    assert result.success
    after = _predictions(served)
    rescored = pl.col("time_hour") >= pl.lit(months[0]).str.to_datetime("%Y-%m-%d")
    assert after.height == before.height and after.select(served.spec()[1].id).is_duplicated().sum() == 0
    assert after.filter(rescored).get_column("version").unique().to_list() == [served.second]
    assert after.filter(~rescored).get_column("version").unique().to_list() == [served.first]
    meta = run_metadata(result, dg.AssetKey([DELAY, "predictions"]))
    assert meta["rows_replaced"].value == meta["rows"].value == before.filter(rescored).height > 0
    # Each re-scored partition's Parquet file was replaced by the new scores; the others were not touched.
    for month in months:
        exported = pl.read_parquet(served.root / "predictions" / DELAY / f"{month}.parquet")
        assert exported.get_column("version").unique().to_list() == [served.second]
    older = pl.read_parquet(sorted((served.root / "predictions" / DELAY).glob("*.parquet"))[0])
    assert older.get_column("version").unique().to_list() == [served.first]
    with dg.build_sensor_context(resources=resources) as context:
        assert sensor.evaluate_tick(context).run_requests == []
    served.make_champion(served.first)


def test_predictions_without_a_champion_are_skipped_with_a_message(tmp_path, sample_sources):
    pipelines = write_pipelines(tmp_path / "pipelines", sample_sources, FAST_MODEL)
    key, champion = dg.AssetKey([DELAY, "predictions"]), dg.AssetKey([DELAY, "champion"])
    # Alone, before any champion step settled a version, there is nothing to judge: it says what to do.
    alone = materialize_all(pipelines, tmp_path / "data", False, dg.AssetSelection.assets(key))
    (failure,) = [e for e in alone.all_events if e.is_step_failure]
    assert f"{DELAY}/champion has not been materialized yet" in failure.step_failure_data.error.message
    result = materialize_all(pipelines, tmp_path / "data", selection=dg.AssetSelection.assets(champion, key))
    assert result.success
    meta = run_metadata(result, key)
    assert meta["status"].value == "skipped: no champion yet"


# --- online completion ----------------------------------------------------------------------------------


def test_an_online_request_gets_the_as_of_weather_the_modelling_table_has(served):
    project, spec = served.spec()
    model = online_model.OnlineModel(spec, project.sources_of(spec), served.db)
    model.refresh()
    with served.db() as conn:
        # Rows whose origin has no reading at their exact hour: only an as-of join finds their weather.
        rows = conn.execute(
            f"""SELECT m.* FROM {table_name(spec)} m WHERE m.wx_temp IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM validated.weather w WHERE w.origin = m.origin AND w.time_hour = m.time_hour)
                ORDER BY m.time_hour LIMIT 20"""
        ).pl()
        latest = conn.execute(
            "SELECT temp FROM validated.weather WHERE origin = ? AND time_hour <= ? ORDER BY time_hour DESC LIMIT 1",
            [rows["origin"][0], rows["time_hour"][0]],
        ).fetchone()[0]
    assert rows.height > 0
    request = request_parsing.parse_rows(
        model.fields, request_parsing.request_rows(rows, list(model.fields)), MAX_BATCH
    )
    done = model.served.lookups.complete(request)
    wx = [c for c in rows.columns if c.startswith("wx_")]
    assert done.select(wx).equals(rows.select(wx))
    assert done["wx_temp"][0] == rows["wx_temp"][0] == latest
    # Half an hour after a reading, a request gets that reading, never the next one.
    half_past = request.head(1).with_columns(pl.col("time_hour").dt.offset_by("30m"))
    assert model.served.lookups.complete(half_past)["wx_temp"][0] == latest


def test_per_key_lookups_complete_requests_exactly_as_the_sql(served):
    """The path every API request takes (per-key dictionaries, bisect for the as-of join) against the
    modelling table's SQL on the same lookups, on many rows and the as-of edge cases."""
    project, spec = served.spec()
    model = online_model.OnlineModel(spec, project.sources_of(spec), served.db)
    model.refresh()
    lookups = model.served.lookups
    assert lookups.keyed is not None, lookups.keyed_problem
    assert lookups.keyed._memos is not None  # the flagship's derived columns are remembered: tested too
    with served.db() as conn:
        rows = conn.execute(
            f"SELECT * FROM {table_name(spec)} USING SAMPLE reservoir(2000 ROWS) REPEATABLE (1)"
        ).pl()
        first = conn.execute("SELECT min(time_hour) FROM validated.weather WHERE origin = 'JFK'").fetchone()[
            0
        ]
        exact = conn.execute(
            "SELECT time_hour FROM validated.weather WHERE origin = 'JFK' ORDER BY time_hour LIMIT 1 OFFSET 50"
        ).fetchone()[0]
    request = request_parsing.parse_rows(
        model.fields, request_parsing.request_rows(rows, list(model.fields)), 10_000
    )
    one = request.head(1)
    edges = pl.concat(
        [
            one.with_columns(origin=pl.lit("JFK"), time_hour=pl.lit(exact)),  # a reading's exact time
            one.with_columns(origin=pl.lit("JFK"), time_hour=pl.lit(exact) - pl.duration(microseconds=1)),
            one.with_columns(origin=pl.lit("JFK"), time_hour=pl.lit(first) - pl.duration(hours=1)),  # before
            one.with_columns(origin=pl.lit("XYZ")),  # a key no reading has
            one.with_columns(tailnum=pl.lit("N0NE")),  # a plane the registry lacks
            one.with_columns(tailnum=pl.lit(None, dtype=pl.String)),  # a NULL key
            one.with_columns(origin=pl.lit(None, dtype=pl.String)),
        ]
    )
    everything = pl.concat([request, edges])
    expected = lookups.complete_sql(everything)
    for size in (1, 7, MAX_BATCH):  # single rows, small lists, the largest request
        for attempt in range(2):  # derived values computed, then remembered
            done = pl.concat(
                [lookups.complete(everything.slice(i, size)) for i in range(0, everything.height, size)]
            )
            assert done.schema == expected.schema
            assert done.equals(expected), (size, attempt)
    # The edge cases are what they claim: the exact match takes that reading, before/missing/NULL nothing.
    edge = lookups.complete(edges)
    with served.db() as conn:
        at_exact = conn.execute(
            "SELECT temp FROM validated.weather WHERE origin = 'JFK' AND time_hour = ?", [exact]
        ).fetchone()[0]
    assert edge["wx_temp"][0] == at_exact
    assert edge["wx_temp"].is_null().to_list()[2:4] == [True, True]
    assert edge["plane_seats"].is_null().to_list()[4:6] == [True, True]
    assert edge["wx_temp"][6] is None
    assert edge["route"][3] == edges["origin"][3] + "-" + edges["dest"][3]


def test_derived_values_of_the_base_sources_inputs_are_ready_before_the_first_request(served, monkeypatch):
    """A refresh remembers each derived expression's value for every distinct input of the validated
    base table, so requests like the data trained on complete without a DuckDB query; an input never
    seen is computed (and then remembered), and both equal the modelling table's SQL."""
    project, spec = served.spec()
    model = online_model.OnlineModel(spec, project.sources_of(spec), served.db)
    model.refresh()
    lookups = model.served.lookups
    with served.db() as conn:
        rows = conn.execute(
            f"SELECT * FROM {table_name(spec)} USING SAMPLE reservoir(300 ROWS) REPEATABLE (2)"
        ).pl()
    request = request_parsing.parse_rows(
        model.fields, request_parsing.request_rows(rows, list(model.fields)), 1_000
    )
    unseen = request.head(1).with_columns(
        origin=pl.lit("XYZ"), sched_dep_time=pl.lit(2399, dtype=request.schema["sched_dep_time"])
    )
    expected = lookups.complete_sql(pl.concat([request, unseen]))
    queries = []
    run = lookups._run
    monkeypatch.setattr(lookups, "_run", lambda sql, params: queries.append(sql) or run(sql, params))
    seen = pl.concat([lookups.complete(request.slice(i, 1)) for i in range(request.height)])
    assert queries == []
    assert seen.equals(expected.head(request.height))
    assert lookups.complete(unseen).equals(expected.tail(1))
    assert len(queries) == 1
    assert lookups.complete(unseen).equals(expected.tail(1))
    assert len(queries) == 1  # remembered


def test_online_history_features_are_computed_as_of_each_request_and_equal_the_batch_ones(served):
    """The API computes a request's history features from the state the refresh loaded, not by finding
    its row: a flight that was never landed (a flight number no row has) gets the very values the batch
    feature set gave the landed flight with the same route, carrier, aircraft and time, and a request
    one day later sees a day more of history."""
    project, spec = served.spec()
    model = online_model.OnlineModel(spec, project.sources_of(spec), served.db)
    model.refresh()
    lookups = model.served.lookups
    columns = list(spec.history.columns())
    with served.db() as conn:
        rows = conn.execute(
            f"SELECT * FROM {table_name(spec)} WHERE _split = 'test' USING SAMPLE reservoir(200 ROWS) "
            "REPEATABLE (3) ORDER BY ALL"
        ).pl()
    request = request_parsing.parse_rows(
        model.fields, request_parsing.request_rows(rows, list(model.fields)), 500
    )
    never_landed = request.with_columns(flight=pl.lit(99_999, dtype=request.schema["flight"]))
    # Both completions: the per-key one every API request takes, the SQL one of large files.
    assert lookups.keyed is not None
    for complete in (lookups.keyed.complete, lookups.complete_sql):
        assert complete(never_landed).select(columns).equals(rows.select(columns))
    later = never_landed.with_columns(time_hour=pl.col("time_hour") + pl.duration(days=1))
    moved = lookups.keyed.complete(later).get_column("route_count_28d") - rows.get_column("route_count_28d")
    assert (moved != 0).any()


def test_keyed_completion_steps_aside_for_duplicate_keys(served):
    project, spec = served.spec()
    sources = project.sources_of(spec)
    with served.db() as conn:
        tables = {
            "planes": conn.execute("SELECT * FROM validated.planes").fetch_arrow_table(),
            "weather": conn.execute(
                "SELECT * FROM validated.weather UNION ALL (SELECT * FROM validated.weather LIMIT 1)"
            ).fetch_arrow_table(),
        }
        rows = conn.execute(f"SELECT * FROM {table_name(spec)} LIMIT 20").pl()
    lookups = Lookups(spec, sources, tables, ())
    assert lookups.keyed is None and "duplicate keys" in lookups.keyed_problem
    request = request_parsing.parse_rows(
        request_parsing.request_fields(spec, sources), request_parsing.request_rows(rows, _fields(served)), 50
    )
    assert lookups.complete(request).equals(lookups.complete_sql(request))


def test_the_skew_check_fails_when_the_online_lookups_differ_from_the_batch_rows(served):
    with served.db() as conn:
        conn.execute("CREATE TABLE validated.weather_kept AS SELECT * FROM validated.weather")
        conn.execute(
            "UPDATE validated.weather SET temp = temp + 40, dewp = dewp + 40, visib = 0, precip = 2, "
            "humid = 100, wind_speed = 60, pressure = 950"
        )
    try:
        check = dg.AssetSelection.checks_for_assets(dg.AssetKey([ARR, "champion"]))
        result = materialize_all(served.pipelines, served.root, selection=check, raise_on_error=False)
        (evaluation,) = result.get_asset_check_evaluations()
        assert not evaluation.passed
        assert evaluation.metadata["max_abs_diff"].value > 1e-9
    finally:
        with served.db() as conn:
            conn.execute("CREATE OR REPLACE TABLE validated.weather AS SELECT * FROM validated.weather_kept")
            conn.execute("DROP TABLE validated.weather_kept")


# --- the CLI --------------------------------------------------------------------------------------------


def _env(s: Served) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", DATA_DIR_ENV, PIPELINES_DIR_ENV)}
    return env | {DATA_DIR_ENV: str(s.root), PIPELINES_DIR_ENV: str(s.pipelines), "DO_NOT_TRACK": "1"}


def _test_rows(s: Served, n: int) -> pl.DataFrame:
    with s.db() as conn:
        return conn.execute(
            f"SELECT * FROM {table_name(s.spec()[1])} WHERE _split = 'test' ORDER BY time_hour, flight LIMIT {n}"
        ).pl()


def test_cli_predict_scores_a_file_like_the_batch_asset_and_refuses_a_bad_one(served, tmp_path):
    project, spec = served.spec()
    rows = _test_rows(served, 30)
    # The file may carry more than request-time columns (here the whole flight): they are ignored.
    source = rows.select(list(project.sources["flights"].columns)).with_columns(
        pl.col("time_hour").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    source.write_csv(tmp_path / "flights.csv")
    bad = source.with_columns(pl.lit("soon").alias("time_hour"))
    bad.write_csv(tmp_path / "bad.csv")
    cli = [sys.executable, "-m", "ml_assets.cli", "predict", DELAY]
    # Both at once: each pays seconds of imports.
    ok_proc, refused_proc = (
        subprocess.Popen(args, env=_env(served), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (
            [*cli, str(tmp_path / "flights.csv"), "-o", str(tmp_path / "scores.parquet")],
            [*cli, str(tmp_path / "bad.csv")],
        )
    )
    ok_err = ok_proc.communicate(timeout=600)[1]
    refused_err = refused_proc.communicate(timeout=600)[1]
    assert ok_proc.returncode == 0, ok_err
    assert refused_proc.returncode == 2, refused_err
    (line,) = refused_err.strip().splitlines()
    assert line.startswith("ml-assets predict: ") and "time_hour" in line and "'soon'" in line
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    batch = _predictions(served).join(scores.select(spec.id), on=spec.id)
    joined = scores.join(batch, on=spec.id, suffix="_batch")
    assert joined.height == rows.height
    assert joined.select((pl.col("score") - pl.col("score_batch")).abs().max()).item() <= 1e-9
    assert joined.get_column("version").unique().to_list() == [served.champion()]


# --- the REST API on a real server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served: Served):
    """`ml-assets serve` as a user starts it, on a free loopback port; stopped after the module."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ml_assets.cli", "serve", DELAY, ARR, "--port", str(port)],
        env=_env(served),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until_answers(
            proc, lambda: client.get("/ready").status_code == 200, DEADLINE_S, "ml-assets serve"
        )
        yield client
    finally:
        client.close()
        stop_process(proc, timeout=30)


def _fields(s: Served) -> list[str]:
    project, spec = s.spec()
    return list(request_parsing.request_fields(spec, project.sources_of(spec)))


def _request(s: Served) -> dict:
    (row,) = request_parsing.request_rows(_test_rows(s, 1), _fields(s))
    return row


def test_the_server_scores_one_object_or_a_list_like_the_batch_asset(served, server):
    spec = served.spec()[1]
    rows = _test_rows(served, 10)
    body = request_parsing.request_rows(rows, _fields(served))
    one = server.post(f"/v1/{DELAY}/predict", json=body[0])
    many = server.post(f"/v1/{DELAY}/predict", json=body)
    assert one.status_code == many.status_code == 200, many.text
    assert one.json()["version"] == many.json()["version"] == served.champion()
    answered = pl.DataFrame(many.json()["predictions"])
    batch = rows.select(spec.id).join(_predictions(served), on=spec.id, how="left")
    assert answered.select(spec.id).equals(batch.select(spec.id))
    assert (answered["score"] - batch["score"]).abs().max() <= 1e-9
    assert one.json()["predictions"][0]["score"] == answered["score"][0]
    info = server.get(f"/v1/{DELAY}/model").json()
    assert info["version"] == served.champion() and "wx_temp" in info["features"]
    assert info["completion"] == "per-key lookups"  # what the answers above (equal to batch) went through
    assert "arr_delay" not in info["request_fields"] and info["request_fields"]["time_hour"]["required"]
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/docs").status_code == 200
    assert "/v1/{pipeline}/predict" in server.get("/openapi.json").json()["paths"]


def _bad(
    server: httpx.Client, body, status: int, *needles: str, path: str = f"/v1/{DELAY}/predict", raw=None
):
    response = server.post(path, content=raw) if raw is not None else server.post(path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "Traceback" not in response.text
    for needle in needles:
        assert needle in detail, detail
    return response.json()


def test_bad_requests_are_4xx_naming_the_field_and_the_problem(served, server):
    good = _request(served)
    missing = {k: v for k, v in good.items() if k != "time_hour"}
    _bad(server, missing, 422, "time_hour: missing")
    errors = _bad(server, [good, good | {"distance": "far"}], 422, "row 1: distance: expected a number")[
        "errors"
    ]
    assert errors == [{"row": 1, "field": "distance", "problem": "expected a number, got 'far'"}]
    _bad(server, good | {"flight": 12.5}, 422, "flight: expected an integer")
    _bad(server, good | {"flight": 10**20}, 422, "flight: 100000000000000000000 is out of range")
    _bad(server, good | {"time_hour": "yesterday"}, 422, "time_hour: expected an ISO 8601 datetime")
    _bad(server, good | {"carrier": None}, 422, "carrier: must not be null")
    _bad(server, good | {"arr_delay": 3}, 422, "arr_delay: not a request-time input")
    _bad(
        server,
        None,
        400,
        "not valid JSON",
        raw=json.dumps(good).replace('"distance": ', '"distance": NaN, "x": '),
    )
    _bad(
        server,
        None,
        422,
        "distance: must be a finite number",
        raw=json.dumps(good | {"distance": 1}).replace('"distance": 1', '"distance": 1e999'),
    )
    _bad(server, [good] * (MAX_BATCH + 1), 413, f"more than the limit of {MAX_BATCH}")
    _bad(server, None, 413, f"larger than the limit of {MAX_BODY} bytes", raw=b"[" + b" " * MAX_BODY + b"]")
    _bad(server, [], 422, "empty list")
    _bad(server, [1], 422, "expected an object")
    _bad(server, good, 404, "unknown pipeline 'nope'", path="/v1/nope/predict")
    # An airline the model never saw is a valid request: scored like any other rare carrier.
    unseen = server.post(f"/v1/{DELAY}/predict", json=good | {"carrier": "ZZ", "dest": "XYZ"})
    assert unseen.status_code == 200 and math.isfinite(unseen.json()["predictions"][0]["score"])


def test_a_rollback_swaps_the_served_model_during_traffic_without_a_failed_request(served, server):
    good = _request(served)
    assert served.champion() == served.first
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not stop.is_set() and time.monotonic() < deadline and len(seen) + len(failures) < 20_000:
            try:
                response = server.post(f"/v1/{DELAY}/predict", json=good)
                if response.status_code == 200:
                    seen.append(response.json()["version"])
                else:
                    failures.append(f"{response.status_code} {response.text}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        while len(seen) < 20 and thread.is_alive():
            time.sleep(0.05)
        served.make_champion(served.second)
        deadline = time.monotonic() + DEADLINE_S
        while (not seen or seen[-1] != served.second) and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
        after_swap = len(seen)
        while len(seen) < after_swap + 20 and thread.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
        served.make_champion(served.first)
    assert failures == []
    assert seen[0] == served.first and seen[-1] == served.second
    # Once swapped, every later answer came from the new champion.
    assert set(seen[seen.index(served.second) :]) == {served.second}
    assert server.get(f"/v1/{DELAY}/model").json()["version"] in (served.first, served.second)


def test_a_champion_failing_its_hash_check_is_never_loaded(served, server):
    with served.db() as conn:
        path = registry.registered(conn, served.second, DELAY).path
    model_file = path / MODEL_FILE
    original = model_file.read_bytes()
    deadline = time.monotonic() + DEADLINE_S
    while server.get(f"/v1/{DELAY}/model").json()["version"] != served.first:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    model_file.write_bytes(original + b"\n# tampered\n")
    try:
        # Straight to the alias: the rollback command itself refuses a tampered version.
        with served.db() as conn:
            registry.record_decision(
                conn, DELAY, "manual", "test: tampered champion", new_champion=served.second
            )
        while "sha256" not in str(server.get("/ready").json()["pipelines"][DELAY]["problem"]):
            assert time.monotonic() < deadline, server.get("/ready").json()
            time.sleep(0.2)
        ready = server.get("/ready").json()["pipelines"][DELAY]
        assert served.second in ready["problem"] and ready["version"] == served.first
        good = _request(served)
        answer = server.post(f"/v1/{DELAY}/predict", json=good)
        assert answer.status_code == 200 and answer.json()["version"] == served.first
    finally:
        model_file.write_bytes(original)
        with served.db() as conn:
            registry.record_decision(conn, DELAY, "manual", "test: restored", new_champion=served.first)


# --- bundles: serving off the warehouse file -------------------------------------------------------------


def _publish(s: Served, root: Path) -> str | None:
    project, spec = s.spec()
    return bundle.publish(s.db, spec, project.sources_of(spec), root)


def _from_bundles(s: Served, root: Path) -> online_model.OnlineModel:
    """What an API on another host serves: no warehouse connection at all (None), only the bundles."""
    project, spec = s.spec()
    return online_model.OnlineModel(spec, project.sources_of(spec), None, bundles=root)


def _answers(model: online_model.OnlineModel, body: list[dict]) -> dict:
    return {k: v for k, v in model.predict(body).items() if k != "latency_ms"}


def test_a_published_bundle_answers_as_the_warehouse_and_a_new_champion_swaps_it(served, tmp_path):
    root = tmp_path / "bundles"
    body = request_parsing.request_rows(_test_rows(served, 40), _fields(served))
    project, spec = served.spec()
    from_warehouse = online_model.OnlineModel(spec, project.sources_of(spec), served.db)
    first = _publish(served, root)
    assert _publish(served, root) == first  # same champion, same joined tables: the same bundle
    files = [p for p in (root / DELAY / first).rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".parquet"}  # text, JSON and Parquet: no pickle
    assert (root / DELAY / bundle.POINTER).read_text().strip() == first
    model = _from_bundles(served, root)
    assert model.refresh() and from_warehouse.refresh()
    assert model.served.bundle == first and model.served.lookups.keyed is not None
    assert _answers(model, body) == _answers(from_warehouse, body)
    assert not model.refresh()  # the pointer did not move: nothing reloaded
    before = served.champion()
    other = served.second if before == served.first else served.first
    served.make_champion(other)
    try:
        second = _publish(served, root)
        assert second != first and bundle.read_manifest(root / DELAY / second).version == other
        assert model.refresh() and from_warehouse.refresh()
        assert model.served.version == other and model.served.bundle == second
        assert _answers(model, body) == _answers(from_warehouse, body)
    finally:
        served.make_champion(before)


def test_a_broken_bundle_is_refused_naming_the_file_and_the_last_good_one_keeps_serving(served, tmp_path):
    root = tmp_path / "bundles"
    good = _publish(served, root)
    model = _from_bundles(served, root)
    assert model.refresh()
    version, request = model.served.version, _request(served)
    folder = root / DELAY
    before = served.champion()
    served.make_champion(served.second if before == served.first else served.first)
    try:
        tampered = _publish(served, root)
    finally:
        served.make_champion(before)
    weather = folder / tampered / bundle.LOOKUPS_DIR / "weather.parquet"
    weather.write_bytes(weather.read_bytes() + b"tampered")
    # And one a writer left without its manifest (the pointer written by hand, as a broken publisher might).
    incomplete = folder / "20990101T000000000000Z-incomplete"
    shutil.copytree(folder / good / bundle.MODEL_DIR, incomplete / bundle.MODEL_DIR)
    for pointer, named in ((tampered, str(weather)), (incomplete.name, str(incomplete / bundle.MANIFEST))):
        (folder / bundle.POINTER).write_text(pointer)
        assert not model.refresh()
        assert named in model.problem and f"bundle {pointer} refused" in model.problem, model.problem
        assert model.served.version == version and model.served.bundle == good
        assert model.predict(request)["version"] == version
    # Published by a pipeline file that completes requests differently (one more derived column): a new
    # bundle, which this API (the old file) refuses by name rather than completing requests otherwise.
    project, spec = served.spec()
    altered = spec.model_copy(update={"derived": {**spec.derived, "twice_the_distance": "distance * 2"}})
    changed = bundle.publish(served.db, altered, project.sources_of(spec), root)
    assert changed not in (good, tampered) and not model.refresh()
    assert (
        str(folder / changed / bundle.MANIFEST) in model.problem and "completion_sql_sha256" in model.problem
    )
    assert model.predict(request)["version"] == version
    bundle.point(root, DELAY, good)
    assert not model.refresh() and model.problem is None and model.served.bundle == good


def test_the_api_serves_the_bundles_on_a_host_without_the_warehouse(served, tmp_path):
    """`ml-assets serve` under the cluster deployment on a machine that sees the shared root but no
    warehouse (nor PostgreSQL, nor Dask): it serves the published bundle, answers as the batch scores, and
    never creates a warehouse file."""
    shared = tmp_path / "shared"
    published = _publish(served, bundle.bundle_root(shared))
    port = _free_port()
    env = _env(served) | {DEPLOYMENT_ENV: "cluster", SHARED_ROOT_ENV: str(shared)}
    env.pop(DATA_DIR_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ml_assets.cli", "serve", DELAY, "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until_answers(proc, lambda: client.get("/ready").status_code == 200, DEADLINE_S, "serve")
        rows = _test_rows(served, 10)
        answer = client.post(f"/v1/{DELAY}/predict", json=request_parsing.request_rows(rows, _fields(served)))
        info = client.get(f"/v1/{DELAY}/model").json()
    finally:
        client.close()
        stop_process(proc, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == served.champion() and info["bundle"] == published
    spec = served.spec()[1]
    answered = pl.DataFrame(answer.json()["predictions"])
    batch = rows.select(spec.id).join(_predictions(served), on=spec.id, how="left")
    assert (answered["score"] - batch["score"]).abs().max() <= 1e-9
    assert not list(tmp_path.rglob("*.duckdb")), "the API created a warehouse file"


# --- the request log and drift -------------------------------------------------------------------------


def test_request_log_samples_whole_requests_and_rotates_a_file_per_flush(tmp_path):
    rows = pl.DataFrame({"origin": ["JFK", "EWR"], "distance": [1.0, 2.0]})
    scored = pl.DataFrame({"score": [0.1, 0.2], "decision": ["false", "false"], "version": ["v1", "v1"]})
    none = RequestLog(tmp_path / "none", sample=0.0)
    none.record(rows, scored, 1.0)
    assert none.flush() is None and not (tmp_path / "none").exists()
    half = RequestLog(tmp_path / "half", sample=0.5, seed=0)
    for _ in range(200):
        half.record(rows, scored, 1.0)
    first = half.flush()
    half.record(rows, scored, 2.0)
    second = half.flush()
    logged = read_window(tmp_path / "half", days=1)
    assert first != second and sorted((tmp_path / "half").glob("*.parquet")) == sorted([first, second])
    assert logged.height % 2 == 0 and 120 < logged.height < 280  # whole requests, about half of them
    assert set(logged.columns) >= {"origin", "distance", "score", "decision", "version", "_latency_ms"}


def _drift(s: Served, **monitoring) -> dg.AssetMaterialization:
    path = s.pipelines / f"{DELAY}.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    raw["monitoring"] = raw["monitoring"] | monitoring
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        # With the champion step, as every run that monitors: drift judges the version the step settles
        # now (the one the server serves), not one an earlier test's run left settled before a rollback.
        keys = [dg.AssetKey([DELAY, "champion"]), dg.AssetKey([DELAY, "drift_report"])]
        result = materialize_all(s.pipelines, s.root, selection=keys)
    finally:
        path.write_text(original)
    (event,) = (e for e in result.get_asset_materialization_events() if e.asset_key == keys[1])
    return event.materialization


def test_drift_reads_the_request_log_or_the_batch_scores_as_its_current_window(served, server):
    # Its own requests (the other server tests may not run in the same selection); the poller writes them
    # within a poll interval.
    answered = server.post(
        f"/v1/{DELAY}/predict", json=request_parsing.request_rows(_test_rows(served, 20), _fields(served))
    )
    assert answered.status_code == 200, answered.text
    folder = log_dir(served.root, DELAY)
    deadline = time.monotonic() + DEADLINE_S
    files: list[Path] = []
    while not files or sorted(folder.glob("*.parquet")) != files:  # until the last flush is in
        assert time.monotonic() < deadline, "no request log was written"
        files = sorted(folder.glob("*.parquet"))
        time.sleep(1.5)  # three poll intervals
    logged = read_window(folder, days=30)
    assert logged.height > 0 and {"wx_temp", "score", "version", "_latency_ms"} <= set(logged.columns)
    from_log = _drift(served, current="request_log").metadata
    assert from_log["current"].value == "request_log"
    assert from_log["rows_current_reference"].value.startswith(f"{min(logged.height, 50_000)} / ")
    assert "prediction_drift" in from_log
    # Batch scores count only when the champion wrote them (the rescore test left December to another).
    assert _score(served).success
    batch = _drift(served).metadata
    assert batch["current"].value == "modelling_table" and "prediction_drift" in batch
    with served.db() as conn:
        drifted = conn.execute(
            "SELECT count(*) FROM monitor.drift_history WHERE drift_run = ? AND column_name = '_prediction'",
            [batch["drift_run"].value],
        ).fetchone()[0]
    assert drifted == 1


def test_without_a_champion_the_api_is_not_ready_and_predict_says_why(tmp_path, sample_sources):
    pipelines = write_pipelines(tmp_path / "pipelines", sample_sources, FAST_MODEL)
    db = functools.partial(connect, warehouse_path(tmp_path / "data"))
    app = create_app(load_project(pipelines), db, [DELAY], poll=False)

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.get("/ready"), await client.post(f"/v1/{DELAY}/predict", json={})

    ready, predict = asyncio.run(calls())
    assert ready.status_code == 503
    assert ready.json()["pipelines"][DELAY]["problem"] == f"pipeline '{DELAY}' has no champion yet"
    assert predict.status_code == 503 and "no champion yet" in predict.json()["detail"]


def test_a_poll_with_an_unchanged_warehouse_does_not_connect_and_a_swap_is_seen(served):
    project, spec = served.spec()
    opened = []

    def counting():
        opened.append(1)
        return served.db()

    marker = functools.partial(change_marker, warehouse_path(served.root))
    model = online_model.OnlineModel(spec, project.sources_of(spec), counting, marker=marker)
    model.refresh()
    before = model.served.version
    assert len(opened) == 1
    assert not model.refresh() and len(opened) == 1  # nothing written since: no connection
    other = served.second if before == served.first else served.first
    served.make_champion(other)
    try:
        assert model.refresh() and model.served.version == other and len(opened) == 2
    finally:
        served.make_champion(before)


def test_the_request_log_writes_the_requests_rows_and_scores_as_they_were(tmp_path):
    """The logged file holds each request's completed rows and scores with their own types (times,
    NULLs, a multiclass model's probabilities), around a swap that changed the columns too."""
    at = dt.datetime(2013, 5, 1, 12, 30)
    first = pl.DataFrame(
        {"origin": ["JFK", None], "time_hour": [at, None], "n": pl.Series([1, 2], dtype=pl.Int32)}
    )
    scored = pl.DataFrame(
        {
            "score": [0.25, 0.5],
            "decision": ["a", "b"],
            "version": ["v1", "v1"],
            "probabilities": [[{"class": "a", "probability": 0.75}], [{"class": "b", "probability": 0.5}]],
        }
    )
    swapped = first.head(1).with_columns(wx_temp=pl.lit(3.5))
    log = RequestLog(tmp_path)
    log.record(first, scored, 1.5)
    log.record(swapped, scored.head(1).with_columns(version=pl.lit("v2")), 2.5)
    logged = pl.read_parquet(log.flush())
    expected = pl.concat(
        [
            first.hstack(scored).with_columns(_latency_ms=pl.lit(1.5)),
            swapped.hstack(scored.head(1).with_columns(version=pl.lit("v2"))).with_columns(
                _latency_ms=pl.lit(2.5)
            ),
        ],
        how="diagonal_relaxed",
    )
    assert logged.drop("_logged_at").equals(expected.select(logged.drop("_logged_at").columns))
    assert set(logged.columns) == set(expected.columns) | {"_logged_at"}
    assert (
        logged.schema["_logged_at"] == pl.Datetime("us") and logged.get_column("_logged_at").null_count() == 0
    )


def test_the_request_log_holds_at_most_max_rows_between_flushes(tmp_path):
    rows = pl.DataFrame({"origin": ["JFK", "EWR"], "distance": [1.0, 2.0]})
    scored = pl.DataFrame({"score": [0.1, 0.2], "decision": ["false", "false"], "version": ["v1", "v1"]})
    log = RequestLog(tmp_path, max_rows=5)
    for latency in range(4):
        log.record(rows, scored, float(latency))
    assert log.dropped == 2
    logged = pl.read_parquet(log.flush())
    assert logged.get_column("_latency_ms").to_list() == [0.0, 0.0, 1.0, 1.0]
    log.record(rows, scored, 9.0)  # a flush frees the room
    assert pl.read_parquet(log.flush()).height == 2


def test_request_rows_parse_to_the_values_polars_holds_and_answer_as_its_text():
    """parse_rows builds one typed frame from the rows and _records formats times in Python: the same
    values and types as polars' own, at the extremes of each type, before the epoch, with offsets and
    nulls too, and the same text as polars' cast."""
    from ml_assets.core.spec import ColumnSpec

    kinds = {"at": "datetime", "on": "date", "n": "int", "x": "float", "b": "bool", "s": "str"}
    fields = {name: ColumnSpec(type=kind) for name, kind in kinds.items()}
    payload = [
        {"at": "2013-01-01T05:00:00.000120", "on": "2013-01-02", "n": 1, "x": 1.5, "b": True, "s": "JFK"},
        {"at": "1969-12-31T23:59:59.999999", "on": "1901-03-04", "n": -(2**63), "x": 5e-324, "b": False},
        {"at": "2013-06-01T12:30:00+02:00", "on": None, "n": 2**63 - 1, "x": -1e308, "s": "é"},
        {"at": None, "on": "2024-02-29", "n": None, "x": 3, "s": ""},
    ]
    parsed = request_parsing.parse_rows(fields, payload, 10)
    expected = pl.DataFrame(
        {
            "at": [
                dt.datetime(2013, 1, 1, 5, 0, 0, 120),
                dt.datetime(1969, 12, 31, 23, 59, 59, 999999),
                dt.datetime(2013, 6, 1, 10, 30),
                None,
            ],
            "on": [dt.date(2013, 1, 2), dt.date(1901, 3, 4), None, dt.date(2024, 2, 29)],
            "n": [1, -(2**63), 2**63 - 1, None],
            "x": [1.5, 5e-324, -1e308, 3.0],
            "b": [True, False, None, None],
            "s": ["JFK", None, "é", ""],
        },
        schema={
            "at": pl.Datetime("us"),
            "on": pl.Date,
            "n": pl.Int64,
            "x": pl.Float64,
            "b": pl.Boolean,
            "s": pl.String,
        },
    )
    assert parsed.schema == expected.schema
    assert parsed.equals(expected)
    as_text = expected.with_columns(pl.col("at", "on").cast(pl.String)).to_dicts()
    assert request_parsing.request_rows(parsed, list(fields)) == as_text


def _scrape(server: httpx.Client) -> dict[tuple[str, frozenset], float]:
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_the_requests_made_and_name_the_version_served(served, server):
    route = "/v1/{pipeline}/predict"
    body = request_parsing.request_rows(_test_rows(served, 3), _fields(served))
    before = _scrape(server)
    for _ in range(4):
        assert server.post(f"/v1/{DELAY}/predict", json=body).status_code == 200
    assert server.post(f"/v1/{DELAY}/predict", json={"year": 2013}).status_code == 422
    assert server.post("/v1/no_such_pipeline/predict", json=body[0]).status_code == 404
    assert server.get("/no/such/route").status_code == 404
    after = _scrape(server)
    version = server.get(f"/v1/{DELAY}/model").json()["version"]

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "ml_assets_http_requests_total"
    assert grew(requests, route=route, method="POST", status="200", pipeline=DELAY) == 4
    assert grew(requests, route=route, method="POST", status="422", pipeline=DELAY) == 1
    # An unknown pipeline or path gets no label of its own: probing cannot grow the series.
    assert grew(requests, route=route, method="POST", status="404", pipeline="") == 1
    assert grew(requests, route="unmatched", method="GET", status="404", pipeline="") == 1
    assert grew("ml_assets_rows_scored_total", pipeline=DELAY) == 4 * len(body)
    assert grew("ml_assets_http_request_duration_seconds_count", route=route, method="POST") == 6
    assert after[("ml_assets_model_info", frozenset({("pipeline", DELAY), ("version", version)}))] == 1


def test_metrics_count_a_model_swap_and_follow_the_served_version(served, server):
    def served_version() -> str:
        return server.get(f"/v1/{DELAY}/model").json()["version"]

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while served_version() != version:
            assert time.monotonic() < deadline, f"the server did not swap to {version} in time"
            time.sleep(0.2)

    start = served.champion()
    wait_for(start)  # an earlier test's swap may still be on its way to the server
    other = served.second if start == served.first else served.first
    swaps = ("ml_assets_model_swaps_total", frozenset({("pipeline", DELAY)}))
    before = _scrape(server).get(swaps, 0.0)
    try:
        served.make_champion(other)
        wait_for(other)
        after = _scrape(server)
        assert after.get(swaps, 0.0) - before == 1
        assert after[("ml_assets_model_info", frozenset({("pipeline", DELAY), ("version", other)}))] == 1
        assert ("ml_assets_model_info", frozenset({("pipeline", DELAY), ("version", start)})) not in after
    finally:
        served.make_champion(start)
        wait_for(start)
