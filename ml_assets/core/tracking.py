"""MLflow, optional: every trained version logged as an MLflow run, and the champion alias mirrored.

Our registry (DuckDB + version folders) stays the source of truth; MLflow is a window on it for teams
that look there first. So nothing here may fail a run: MLflow being down, slow or refusing costs a
warning, and the run goes on. A pipeline names its tracking server in its `mlflow:` block, or a
deployment names one for every pipeline with `ML_ASSETS_MLFLOW_TRACKING_URI`.

What a version's MLflow run holds: LightGBM's parameters, the CV and test metrics (the baseline's too),
the evaluation plots and HTML report, the manifest, tags with the data fingerprint, code version, our
version id and the Dagster run id with a link back to it; and, for a LightGBM version, the model in
MLflow's LightGBM flavour with an input signature over the transformed features (what the booster reads),
registered as a version of the registered model named like the pipeline and tagged with our version id.
`sync_champion` points the registered model's `champion` alias at the MLflow version of our champion
(after every promotion, rollback check and manual rollback), and removes it when our champion has no
MLflow model (a linear or constant baseline, or a version trained before tracking was configured), so
MLflow never names a champion that does not serve.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import polars as pl

from ml_assets.core import registry
from ml_assets.core.spec import PipelineSpec

TRACKING_URI_ENV = "ML_ASSETS_MLFLOW_TRACKING_URI"
# Where the Dagster UI of this deployment answers, for the link back from an MLflow run.
DAGSTER_URL_ENV = "ML_ASSETS_DAGSTER_URL"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"
VERSION_TAG = "ml_assets.version"
CHAMPION_ALIAS = "champion"
# A tracking server that does not answer within this costs a warning, not minutes of retries.
REACH_TIMEOUT_S = 3.0
# MLflow's limit for a parameter value.
MAX_PARAM_CHARS = 6000

Warn = Callable[[str], None]
Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]


@dataclass(frozen=True)
class Tracker:
    uri: str
    experiment: str
    registered_model: str


def tracker_for(pipeline: PipelineSpec) -> Tracker | None:
    """The pipeline's MLflow settings, the deployment's when the pipeline names no server; None: off."""
    spec = pipeline.mlflow
    uri = spec.tracking_uri or os.environ.get(TRACKING_URI_ENV)
    if not uri:
        return None
    return Tracker(
        uri=uri.rstrip("/"),
        experiment=spec.experiment or f"ml_assets/{pipeline.name}",
        registered_model=spec.registered_model or pipeline.name,
    )


@contextmanager
def _mlflow(tracker: Tracker) -> Iterator[Any]:
    """The mlflow module pointed at the tracker's server for the duration (MLflow's model logging and
    registration read its process-wide tracking URI), with telemetry off and no minutes-long retries."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    if tracker.uri.startswith(("http://", "https://")):
        # Fail fast on a server that is down, before MLflow's own client tries.
        httpx.get(f"{tracker.uri}/health", timeout=REACH_TIMEOUT_S).raise_for_status()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


def _guarded(tracker: Tracker, what: str, warn: Warn, action: Callable[[Any], Any]) -> Any:
    try:
        with _mlflow(tracker) as mlflow:
            return action(mlflow)
    except ImportError:
        warn(
            f"MLflow at {tracker.uri}: {what} skipped: mlflow is not installed (pip install 'ml_assets[mlflow]')"
        )
    except Exception as exc:  # MLflow is a mirror: whatever it raises must not fail the run
        warn(
            f"MLflow at {tracker.uri}: {what} failed ({type(exc).__name__}: {exc}); our registry is unaffected"
        )
    return None


def log_version(
    pipeline: PipelineSpec,
    version_dir: Path,
    manifest: registry.Manifest,
    files: list[tuple[str, Path]],
    dagster_run_id: str,
    warn: Warn,
) -> str | None:
    """Log a registered version as an MLflow run (and its LightGBM model as a registered model version).
    `files`: (artifact folder, file) pairs (plots, the report). Returns the MLflow run id, None when off
    or failed."""
    tracker = tracker_for(pipeline)
    if tracker is None:
        return None
    return _guarded(
        tracker,
        f"logging version {manifest.version}",
        warn,
        lambda mlflow: _log_version(mlflow, tracker, Path(version_dir), manifest, files, dagster_run_id),
    )


def _log_version(
    mlflow: Any,
    tracker: Tracker,
    version_dir: Path,
    manifest: registry.Manifest,
    files: list[tuple[str, Path]],
    dagster_run_id: str,
) -> str:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracker.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracker.experiment)
    base = os.environ.get(DAGSTER_URL_ENV, DEFAULT_DAGSTER_URL).rstrip("/")
    tags = {
        "mlflow.runName": manifest.version,
        VERSION_TAG: manifest.version,
        "ml_assets.pipeline": manifest.pipeline,
        "ml_assets.data_fingerprint": str(manifest.data_fingerprint),
        "ml_assets.code_version": str(manifest.code_version),
        "dagster.run_id": dagster_run_id,
        "dagster.run_url": f"{base}/runs/{dagster_run_id}",
        "mlflow.note.content": f"Trained by Dagster run [{dagster_run_id}]({base}/runs/{dagster_run_id}); "
        f"ml_assets version `{manifest.version}`, registered in ml_assets' registry (the source of truth).",
    }
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in _params(manifest).items()})
        mlflow.log_metrics(_metrics(manifest))
        for folder, path in files:
            mlflow.log_artifact(str(path), artifact_path=folder)
        mlflow.log_artifact(str(version_dir / registry.MANIFEST_FILE))
        if manifest.model_kind == "lightgbm":
            _log_model(mlflow, tracker, version_dir, manifest, run_id)
    return run_id


def _params(manifest: registry.Manifest) -> dict[str, Any]:
    return {
        **manifest.params,
        "best_iteration": manifest.best_iteration,
        "task": manifest.task,
        "metric": manifest.metric,
        "features": ",".join(manifest.features),
        "train_window": manifest.train_window,
        "rows_train": manifest.rows.get("train"),
    }


def _metrics(manifest: registry.Manifest) -> dict[str, float]:
    found: dict[str, float] = {}
    cv = manifest.cv.score
    if cv is not None:
        found[f"cv_{manifest.metric}"] = float(cv)
    for prefix, key in (("test", "test_metrics"), ("baseline_test", "baseline_test_metrics")):
        for name, value in getattr(manifest, key).items():
            if isinstance(value, int | float):
                found[f"{prefix}_{name}"] = float(value)
    return found


def reference_features(version_dir: Path, manifest: registry.Manifest) -> pl.DataFrame:
    """Transformed training rows saved with the version (what the booster reads), in model order."""
    return pl.read_parquet(version_dir / registry.REFERENCE_FILE).select(manifest.features)


def _log_model(
    mlflow: Any, tracker: Tracker, version_dir: Path, manifest: registry.Manifest, run_id: str
) -> None:
    import lightgbm as lgb
    from mlflow.models import infer_signature

    booster = lgb.Booster(model_file=str(version_dir / registry.MODEL_FILE))
    sample = reference_features(version_dir, manifest).head(200).to_pandas().astype("float64")
    signature = infer_signature(sample, booster.predict(sample, num_threads=1))
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model"
        mlflow.lightgbm.save_model(booster, str(saved), signature=signature, input_example=sample.head(3))
        mlflow.log_artifacts(str(saved), artifact_path="model")
    mlflow.register_model(
        f"runs:/{run_id}/model", tracker.registered_model, tags={VERSION_TAG: manifest.version}
    )


def sync_champion(pipeline: PipelineSpec, connect: Connect, warn: Warn) -> str | None:
    """Point MLflow's `champion` alias at our champion's MLflow model version (or remove it when our
    champion has none). Returns the MLflow model version it points at."""
    tracker = tracker_for(pipeline)
    if tracker is None:
        return None
    with connect() as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
    return _guarded(
        tracker,
        f"mirroring the champion alias ({champion})",
        warn,
        lambda mlflow: _sync(mlflow.MlflowClient(), tracker, champion, warn),
    )


def _sync(client: Any, tracker: Tracker, champion: str | None, warn: Warn) -> str | None:
    name = tracker.registered_model
    matches = (
        client.search_model_versions(f"name = '{name}' and tags.`{VERSION_TAG}` = '{champion}'")
        if champion
        else []
    )
    if not matches:
        if _has_alias(client, name):
            client.delete_registered_model_alias(name, CHAMPION_ALIAS)
        if champion:
            warn(
                f"MLflow at {tracker.uri}: champion {champion} has no model in registered model '{name}' "
                "(a baseline, or trained before tracking was configured): its alias was removed"
            )
        return None
    version = max(matches, key=lambda m: int(m.version)).version
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return str(version)


def _has_alias(client: Any, name: str) -> bool:
    try:
        return CHAMPION_ALIAS in (client.get_registered_model(name).aliases or {})
    except Exception:  # no such registered model yet: nothing to remove
        return False
