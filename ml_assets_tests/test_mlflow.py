"""MLflow against a real `mlflow server` on loopback (SQLite backend, local artifacts): every trained
version is logged with its parameters, metrics, plots, report and model; the model loads back through
`mlflow.pyfunc` and predicts what our serving path predicts; the registered model's `champion` alias
follows a promotion and manual rollbacks (to a version MLflow has no model of, and back); a tracking server that is down makes a run warn, not fail.

The data is made so the gate's first verdict is known: the label is an XOR of two signs, which a linear
model cannot learn and LightGBM can, so the first champion is the LightGBM version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import polars as pl
import pytest
import yaml

from ml_assets import cli
from ml_assets.core import registry
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path
from ml_assets.core.tracking import VERSION_TAG, reference_features
from ml_assets_tests.conftest import materialize_all
from ml_assets_tests.helpers import wait_until_answers
from ml_assets_tests.postgres_server import free_port

NAME = "xor"
START_DEADLINE_S = 240
THROUGH_CHAMPION = (
    dg.AssetSelection.assets(dg.AssetKey([NAME, "champion"])).upstream().required_multi_asset_neighbors()
)
# From the modelling table on: the data is already loaded.
RETRAIN = dg.AssetSelection.assets(
    *(
        dg.AssetKey([NAME, a])
        for a in ("modelling_table", "features", "model", "evaluation", "promotion", "champion")
    )
)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{base / 'mlflow.db'}",
            "--artifacts-destination",
            str(base / "artifacts"),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own process group: the server runs its workers as child processes, stopped with it.
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        health = f"{uri}/health"
        wait_until_answers(
            proc, lambda: httpx.get(health, timeout=5).status_code == 200, START_DEADLINE_S, "mlflow server"
        )
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def write_project(base: Path, uri: str) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    n = 3000
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    flip = rng.random(n) < 0.05
    y = ((x1 > 0) ^ (x2 > 0) ^ flip).astype(int)
    pipelines = base / "pipelines"
    pipelines.mkdir(parents=True)
    pl.DataFrame({"id": np.arange(n), "x1": x1, "x2": x2, "noise": rng.normal(size=n), "y": y}).write_csv(
        pipelines / "xor.csv"
    )
    spec = {
        "name": NAME,
        "task": "binary",
        "sources": {
            "xor": {
                "path": "xor.csv",
                "id": ["id"],
                "columns": {c: {"type": "float"} for c in ("x1", "x2", "noise")}
                | {"id": {"type": "int", "not_null": True}, "y": {"type": "int", "not_null": True}},
            }
        },
        "base": "xor",
        "id": ["id"],
        "target": {"name": "y"},
        "split": {"method": "random", "test_fraction": 0.25, "valid_fraction": 0.15},
        "model": {"time_budget_s": 600, "max_trials": 2, "cv_folds": 2, "max_rounds": 200, "seed": 3},
        "mlflow": {"tracking_uri": uri},
    }
    (pipelines / f"{NAME}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return pipelines, base / "data"


def our_champion(root: Path) -> str | None:
    with connect(warehouse_path(root)) as conn:
        return registry.alias_version(conn, NAME, registry.CHAMPION)


def mlflow_champion(client) -> str | None:
    """Our version id on the MLflow model version the `champion` alias points at."""
    aliases = client.get_registered_model(NAME).aliases
    if "champion" not in aliases:
        return None
    return client.get_model_version(NAME, aliases["champion"]).tags[VERSION_TAG]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tracking_uri):
    pipelines, root = write_project(tmp_path_factory.mktemp("project"), tracking_uri)
    first = materialize_all(pipelines, root, selection=THROUGH_CHAMPION)
    assert first.success
    return pipelines, root


def test_a_trained_version_is_logged_with_metrics_plots_and_a_model_that_predicts_like_serving(
    project, tracking_uri
):
    import mlflow

    pipelines, root = project
    champion = our_champion(root)
    with connect(warehouse_path(root)) as conn:
        found = registry.registered(conn, champion, NAME)
    model = ServableModel.from_registry(found)
    assert model.kind == "lightgbm", "the XOR data should make LightGBM the first champion"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"ml_assets/{NAME}")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{VERSION_TAG}` = '{champion}'")
    manifest = model.manifest
    assert run.data.metrics["test_roc_auc"] == pytest.approx(manifest.test_metrics["roc_auc"])
    assert run.data.metrics["baseline_test_roc_auc"] == pytest.approx(
        manifest.baseline_test_metrics["roc_auc"]
    )
    assert run.data.params["best_iteration"] == str(manifest.best_iteration)
    assert run.data.tags["ml_assets.data_fingerprint"] == manifest.data_fingerprint
    assert (
        run.data.tags["dagster.run_id"]
        and run.data.tags["dagster.run_id"] in run.data.tags["dagster.run_url"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "report", "model", "manifest.json"} <= artifacts
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert any(p.endswith("roc.png") for p in plots) or len(plots) >= 3, plots
    assert mlflow_champion(client) == champion

    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert loaded.metadata.get_input_schema() is not None
    rows = pl.read_parquet(found.path / registry.SAMPLE_FILE)
    features = model.transform.apply(rows).select(manifest.features).to_pandas().astype("float64")
    assert np.allclose(np.asarray(loaded.predict(features)).ravel(), model.predict(rows), atol=1e-9)
    assert list(features.columns) == reference_features(found.path, manifest).columns


def test_a_server_that_is_down_warns_and_the_alias_follows_manual_rollbacks(
    project, tracking_uri, monkeypatch
):
    import mlflow

    pipelines, root = project
    client = mlflow.MlflowClient(tracking_uri)
    first = our_champion(root)
    path = pipelines / f"{NAME}.yaml"
    spec = yaml.safe_load(path.read_text())
    dead = f"http://127.0.0.1:{free_port()}"
    spec["mlflow"]["tracking_uri"], spec["model"]["seed"] = dead, 11
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(pipelines, root, selection=RETRAIN, instance=instance)
    assert result.success, "a tracking server that is down must not fail the run"
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if dead in (e.user_message or "")]
    assert any("logging version" in w for w in warnings), warnings
    assert any("mirroring the champion alias" in w for w in warnings), warnings
    with connect(warehouse_path(root)) as conn:
        unlogged = registry.latest_version(conn, NAME)
    assert unlogged != first

    spec["mlflow"]["tracking_uri"] = tracking_uri
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv(PIPELINES_DIR_ENV, str(pipelines))
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    # A champion MLflow has no model of: the alias is removed rather than left naming another version.
    assert cli.main(["rollback", NAME, "--to", unlogged]) == 0
    assert our_champion(root) == unlogged and mlflow_champion(client) is None
    assert cli.main(["rollback", NAME, "--to", first]) == 0
    assert our_champion(root) == first and mlflow_champion(client) == first
