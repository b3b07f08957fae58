"""Deployments: one set of definitions, resources and executor chosen by ML_ASSETS_DEPLOYMENT (as Dagster's
project_fully_featured example picks them by an environment variable).

- `local` (the default): the data directory (ML_ASSETS_DATA_DIR), one DuckDB file, every step of a run in
  one process. `make run` and `make test` need nothing else.
- `cluster`: the same pipelines; data, model files and reports under ML_ASSETS_SHARED_ROOT (a mount every
  machine sees), steps on a Dask cluster (ML_ASSETS_DASK_SCHEDULER), the Dagster instance on PostgreSQL
  (ML_ASSETS_PG_URL, read by deploy/cluster/dagster.yaml). docs/cluster.md says how to start one.

Nothing here reads a variable a deployment does not use, so a local run never asks for cluster settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from ml_assets.core.dask_fit import DaskFit
from ml_assets.core.errors import UsageError
from ml_assets.core.report_server import reports_url
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.store import DEPLOYMENT_ENV, SHARED_ROOT_ENV, data_dir, warehouse
from ml_assets.orchestration.handoff import HandOffStore
from ml_assets.orchestration.resources import (
    PAUSE_SOCKET_ENV,
    ArtifactStore,
    RunPause,
    TrainingOverrides,
    Warehouse,
)

DEPLOYMENTS = ("local", "cluster")
SCHEDULER_ENV = "ML_ASSETS_DASK_SCHEDULER"
PG_URL_ENV = "ML_ASSETS_PG_URL"
PG_SCHEME = "postgresql+psycopg2://"
# Set on a worker: LightGBM threads of each fit it runs, over the pipeline's model.num_threads.
FIT_THREADS_ENV = "ML_ASSETS_FIT_THREADS"
# Cluster only: training splits of at least this many rows are fitted with LightGBM's Dask interface on
# every worker (core/dask_fit.py), within the timeout (seconds) below. Unset: every fit is local.
DASK_FIT_ROWS_ENV = "ML_ASSETS_DASK_FIT_ROWS"
DASK_FIT_TIMEOUT_ENV = "ML_ASSETS_DASK_FIT_TIMEOUT_S"
DEFAULT_DASK_FIT_TIMEOUT_S = 3600
# A training step asks its Dask worker for one unit of `training` (dagster-dask's tag, spelled out so
# that a local run imports no Dask): a worker started with `--resources training=1` runs one fit at a
# time, however many threads it has. Ignored by the local in-process executor.
TRAINING_STEP_TAGS = {"dagster-dask/resource_requirements": json.dumps({"training": 1})}
# What each cluster setting is, for the one-line error when it is missing.
CLUSTER_SETTINGS = {
    SCHEDULER_ENV: "the Dask scheduler's address, e.g. tcp://10.0.0.5:8786",
    SHARED_ROOT_ENV: "a folder every machine mounts, for data, model files and reports",
    PG_URL_ENV: "the Dagster instance's database, postgresql+psycopg2://user:password@host:5432/dagster",
}


@dataclass(frozen=True)
class Deployment:
    """Where a deployment keeps things and how it runs steps.

    `warehouse` is the one setting that names the shared tables' location: $ML_ASSETS_WAREHOUSE (a DuckLake
    catalog, store.warehouse) or else the DuckDB file under the root (the shared root's, in a cluster)."""

    name: str
    root: Path
    warehouse: str
    executor: dg.ExecutorDefinition
    # The base URL of `<root>/reports` in the event log's links: a local convenience (the loopback report
    # server) by default for `local` only; a cluster's is ML_ASSETS_REPORTS_URL or none (paths only).
    reports_url: str | None = None

    def resources(self) -> dict[str, dg.ConfigurableResource]:
        return {
            "warehouse": Warehouse(database=self.warehouse),
            "artifacts": ArtifactStore(root=str(self.root), reports_url=self.reports_url),
            "training": TrainingOverrides(),
            "handoff": HandOffStore(root=str(self.root / "handoff")),
            "pause": RunPause(socket=os.environ.get(PAUSE_SOCKET_ENV, "")),
        }


def deployment_name() -> str:
    name = os.environ.get(DEPLOYMENT_ENV, "local").strip() or "local"
    if name not in DEPLOYMENTS:
        raise UsageError(
            f"{DEPLOYMENT_ENV}={name!r} is not a deployment; use one of: {', '.join(DEPLOYMENTS)}"
        )
    return name


def cluster_setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise UsageError(
            f"{DEPLOYMENT_ENV}=cluster needs {name}: {CLUSTER_SETTINGS[name]} (see docs/cluster.md)"
        )
    return value


def local(root: Path | None = None) -> Deployment:
    root = data_dir() if root is None else root
    # One process per run: steps are short compared with a fresh process each (~1.5 s), and DuckDB has one
    # writer per file anyway. Training uses LightGBM's own threads.
    return Deployment("local", root, warehouse(root), dg.in_process_executor, reports_url())


def cluster() -> Deployment:
    # The Dagster instance's URL is read by dagster.yaml, not here; asking for it up front turns a
    # worker or webserver started without it into one line instead of a database driver's traceback.
    pg_url = cluster_setting(PG_URL_ENV)
    if not pg_url.startswith(PG_SCHEME):
        raise UsageError(
            f"{PG_URL_ENV} must start with {PG_SCHEME} (dagster-postgres needs the psycopg2 driver, and "
            "SQLAlchemy picks psycopg 3 for a bare postgresql://)"
        )
    root = Path(cluster_setting(SHARED_ROOT_ENV)).resolve()
    scheduler = cluster_setting(SCHEDULER_ENV)
    from ml_assets.orchestration.dask_executor import run_scoped_dask_executor  # Dask only when used

    executor = run_scoped_dask_executor.configured(
        {"cluster": {"existing": {"address": scheduler}}}, name="dask"
    )
    return Deployment("cluster", root, warehouse(root), executor, reports_url(default=None))


def current() -> Deployment:
    """The deployment ML_ASSETS_DEPLOYMENT names (default: local)."""
    return cluster() if deployment_name() == "cluster" else local()


def with_fit_threads(pipeline: PipelineSpec) -> PipelineSpec:
    """The pipeline with this worker's threads per fit (ML_ASSETS_FIT_THREADS), if the worker sets them."""
    threads = _whole_number(FIT_THREADS_ENV, None)
    if threads is None:
        return pipeline
    model = pipeline.model.model_copy(update={"num_threads": threads})
    return pipeline.model_copy(update={"model": model})


def _whole_number(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"{name}={raw!r}: expected a whole number, 1 or more")
    return int(raw)


def dask_fit(min_rows: int | None = None) -> DaskFit | None:
    """How this worker's model steps fit on the Dask cluster: only under `cluster`, and only when the run
    (`min_rows`) or ML_ASSETS_DASK_FIT_ROWS sets the training rows from which a fit is distributed."""
    if deployment_name() != "cluster":
        return None
    min_rows = min_rows or _whole_number(DASK_FIT_ROWS_ENV, None)
    if min_rows is None:
        return None
    timeout_s = _whole_number(DASK_FIT_TIMEOUT_ENV, DEFAULT_DASK_FIT_TIMEOUT_S)
    return DaskFit(cluster_setting(SCHEDULER_ENV), min_rows, float(timeout_s))
