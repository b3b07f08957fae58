"""Dagster resources: the DuckDB warehouse, the artifact store, and per-launch training overrides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field

from ml_assets.core.report_server import DEFAULT_URL, url_of
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
    """Root folder for files: model versions, feature transforms and reports; `reports_url` is where the
    browser finds the reports folder (the project's report server, see core.report_server)."""

    root: str
    reports_url: str = DEFAULT_URL

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

    def url_of(self, path: Path) -> str:
        """The browser's URL of a file under the reports folder."""
        return url_of(self.reports_url, self.reports, path)


class TrainingOverrides(ConfigurableResource):
    """Overrides of every pipeline's tuning budget for one launch (the CLI's --time-budget/--max-trials,
    or the launchpad's resource config); unset, each pipeline's model settings apply."""

    time_budget_s: float | None = Field(None, description="Seconds of hyper-parameter search per model")
    max_trials: int | None = Field(None, description="At most this many search trials per model")
