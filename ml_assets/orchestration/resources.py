"""Dagster resources: the DuckDB warehouse, the artifact store, per-launch training overrides, and the
point where a test can hold a run."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field

from ml_assets.core.report_server import DEFAULT_URL, url_of
from ml_assets.core.serving.bundle import bundle_root
from ml_assets.core.store import connect


class Warehouse(DuckDBResource):
    """The project's tables (raw, validated, quarantine, feature, registry, monitoring): `database` is a
    DuckDB file, or a DuckLake catalog (`ducklake:postgres:...`) whose Parquet files live under
    `data_path` (a folder every worker sees; unset: `$ML_ASSETS_SHARED_ROOT/warehouse`).

    Connections are short-lived (opened per step, closed on error too), with the platform's tables
    migrated on open; a file's single write lock is waited for, a DuckLake write conflict retried.
    """

    data_path: str | None = Field(None, description="DuckLake only: the folder of the warehouse's data files")

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(self.database, self.data_path) as conn:
            yield conn


class ArtifactStore(ConfigurableResource):
    """Root folder for files: model versions, feature transforms, reports and serving bundles;
    `reports_url` is where the browser finds the reports folder (the deployment's: the project's loopback
    report server for `local`, see core.report_server; None: metadata links reports by path only)."""

    root: str
    reports_url: str | None = Field(
        DEFAULT_URL, description="Base URL of the reports folder (ML_ASSETS_REPORTS_URL); unset: paths only"
    )

    def path(self, *parts: str) -> Path:
        out = Path(self.root).joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def transforms(self, pipeline: str) -> Path:
        """Fitted feature transforms of a pipeline, each named by its sha256."""
        return Path(self.root) / "features" / pipeline

    @property
    def models(self) -> Path:
        return Path(self.root) / "models"

    @property
    def reports(self) -> Path:
        return Path(self.root) / "reports"

    @property
    def bundles(self) -> Path:
        """Where the champions' serving bundles are published (core.serving.bundle)."""
        return bundle_root(Path(self.root))

    def url_of(self, path: Path) -> str | None:
        """The browser's URL of a file under the reports folder; None without a base URL."""
        return url_of(self.reports_url, self.reports, path)


class TrainingOverrides(ConfigurableResource):
    """Overrides of every pipeline's tuning budget for one launch (the CLI's --time-budget/--max-trials,
    or the launchpad's resource config); unset, each pipeline's model settings apply. Also, on a cluster,
    the rows from which a fit goes to Dask (--dask-fit-rows; unset, the workers' setting applies)."""

    time_budget_s: float | None = Field(None, description="Seconds of hyper-parameter search per model")
    max_trials: int | None = Field(None, description="At most this many search trials per model")
    dask_fit_rows: int | None = Field(
        None,
        description="Cluster only: fit with LightGBM's Dask interface when the training split has at least "
        "this many rows (over the workers' ML_ASSETS_DASK_FIT_ROWS)",
    )


# A Unix socket where the model step of every run started with it set reports its version and waits.
PAUSE_SOCKET_ENV = "ML_ASSETS_PAUSE_SOCKET"


class RunPause(ConfigurableResource):
    """Where a test holds a run to interleave it with another in a known order, without sleeps: with
    `socket` set (from ML_ASSETS_PAUSE_SOCKET), the model step, once its version is registered, connects
    to that Unix socket, sends `<run id> <version>` and waits until the other end answers or closes.
    Unset (always, outside tests), it does nothing."""

    socket: str = ""

    def after_registering(self, run_id: str, version: str) -> None:
        if not self.socket:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
            held.connect(self.socket)
            held.sendall(f"{run_id} {version}\n".encode())
            held.recv(1)
