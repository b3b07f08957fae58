"""The `cluster` deployment for real: a PostgreSQL server (the Dagster instance and the DuckLake catalog of
the shared tables) and a Dask scheduler with two worker processes on loopback, runs launched the way a
user launches them (`ml-assets run`, or a job run from another process).

Fast: deployment selection and its errors, definitions under `cluster`, the cluster dagster.yaml on
PostgreSQL, two concurrent runs of one job on Dask, and a LightGBM fit on both workers. Slow: the flagship
under `cluster` against `local`, a worker killed mid-run, the flagship trained on both workers and
served, and a worker lost mid-fit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import lightgbm as lgb
import pytest
from dagster_dask.executor import DASK_RESOURCE_REQUIREMENTS_KEY

from ml_assets.core import registry, store, train
from ml_assets.core.dask_fit import DaskFit, DistributedFitError
from ml_assets.core.errors import UsageError
from ml_assets.core.metrics import score
from ml_assets.core.serving import bundle
from ml_assets.core.serving.loader import reproduces_training_predictions
from ml_assets.core.spec.load import load_project
from ml_assets.core.tuning import base_params
from ml_assets.orchestration import deployments
from ml_assets.orchestration.build import build_definitions
from ml_assets.orchestration.jobs import RUN_JOB
from ml_assets.orchestration.keys import source_keys
from ml_assets_tests.conftest import FAST_MODEL, catalog_url, write_pipelines
from ml_assets_tests.dask_cluster import DaskCluster, processing, running_dask, wait_until, workers_held
from ml_assets_tests.helpers import local_deployment, synthetic_spec, synthetic_training_data
from ml_assets_tests.postgres_server import postgres_unavailable_reason, running_postgres
from ml_assets_tests.store_helpers import differing, table_contents

REPO = Path(__file__).resolve().parents[1]
ML_ASSETS = str(Path(sys.executable).parent / "ml-assets")
# A folder the cluster's processes name as their local data directory, which none of them may create.
UNUSED_LOCAL = "unused-local-data"
CLUSTER_YAML = REPO / "deploy" / "cluster" / "dagster.yaml"
CLUSTER_VARS = (deployments.PG_URL_ENV, deployments.SHARED_ROOT_ENV, deployments.SCHEDULER_ENV)
RUN_DEADLINE_S = 1200
needs_postgres = pytest.mark.skipif(
    postgres_unavailable_reason() is not None, reason=str(postgres_unavailable_reason())
)

# A job launched from a process of its own (a Dask run rebuilds its job by importing the code location,
# so the launching process must hold the cluster's environment when it imports it): argv = partition,
# asset keys; prints the run id and whether it succeeded.
LAUNCH_PARTITION = """
import os, sys, dagster as dg
from ml_assets.orchestration import dask_executor, definitions
if os.environ.get("UPSTREAM_DASK_KEYS"):  # dagster-dask's own key, to show the collision it causes
    dask_executor.step_key = lambda run, step: f"{run.job_name}.{step}"
with dg.DagsterInstance.get() as instance:
    result = dg.execute_job(dg.reconstructable(definitions.all_assets_job), instance,
        tags={"dagster/asset_partition_range_start": sys.argv[1], "dagster/asset_partition_range_end": sys.argv[1]},
        asset_selection=[dg.AssetKey.from_user_string(k) for k in sys.argv[2:]])
print(result.run_id, result.success)
"""


def cluster_env(monkeypatch: pytest.MonkeyPatch, root: Path, scheduler: str = "tcp://127.0.0.1:8786") -> None:
    monkeypatch.setenv(deployments.DEPLOYMENT_ENV, "cluster")
    monkeypatch.setenv(deployments.PG_URL_ENV, "postgresql+psycopg2://ml:secret@127.0.0.1:5432/dagster")
    monkeypatch.setenv(deployments.SHARED_ROOT_ENV, str(root))
    monkeypatch.setenv(deployments.SCHEDULER_ENV, scheduler)


def test_local_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (deployments.DEPLOYMENT_ENV, *CLUSTER_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ML_ASSETS_DATA_DIR", str(tmp_path))
    deployment = deployments.current()
    assert (deployment.name, deployment.root) == ("local", tmp_path.resolve())
    assert deployment.executor is dg.in_process_executor


def test_unknown_deployment_is_one_line_naming_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deployments.DEPLOYMENT_ENV, "kubernetes")
    with pytest.raises(UsageError) as caught:
        deployments.current()
    message = str(caught.value)
    assert "\n" not in message
    assert all(word in message for word in (deployments.DEPLOYMENT_ENV, "'kubernetes'", "local", "cluster"))


@pytest.mark.parametrize("missing", CLUSTER_VARS)
def test_missing_cluster_setting_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str
) -> None:
    cluster_env(monkeypatch, tmp_path)
    monkeypatch.delenv(missing)
    with pytest.raises(UsageError, match=missing) as caught:
        deployments.current()
    assert "\n" not in str(caught.value)


def test_a_bare_postgresql_url_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster_env(monkeypatch, tmp_path)
    monkeypatch.setenv(deployments.PG_URL_ENV, "postgresql://ml:secret@127.0.0.1:5432/dagster")
    with pytest.raises(UsageError, match=r"postgresql\+psycopg2://"):
        deployments.current()


def test_cluster_definitions_run_steps_on_dask(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster_env(monkeypatch, tmp_path / "shared", scheduler="tcp://10.1.2.3:8786")
    pipelines = write_pipelines(tmp_path / "pipelines", None, FAST_MODEL)
    defs = build_definitions(pipelines, deployments.current())
    job = defs.resolve_job_def(RUN_JOB)
    # The sensors' and schedules' jobs too: every job takes the deployment's executor from Definitions.
    sensor_jobs = {s.job_name for s in defs.sensors}
    assert "flight_delay_retrain_job" in sensor_jobs
    executors = {j.name: j.executor_def.name for j in defs.resolve_all_job_defs()}
    assert sensor_jobs <= set(executors) and set(executors.values()) == {"dask"}, executors
    assert job.executor_def.config_schema.resolve_config({}).value["config"] == {
        "cluster": {"existing": {"address": "tcp://10.1.2.3:8786"}}
    }
    assert defs.resolve_assets_def(dg.AssetKey(["flight_delay", "model"])).op.tags[
        DASK_RESOURCE_REQUIREMENTS_KEY
    ] == json.dumps({"training": 1})
    warehouse = defs.resources["warehouse"]
    assert Path(warehouse.database).parent == (tmp_path / "shared").resolve()


def test_report_links_use_the_deployments_base_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The event log links reports and plots under the deployment's base URL (ML_ASSETS_REPORTS_URL),
    files written under the shared root; a cluster without one links by path, never to the loopback
    report server, which stays the default of `local` only."""
    from ml_assets.core.report_server import DEFAULT_URL, URL_ENV
    from ml_assets.orchestration.figures import figure_metadata, report_metadata

    shared = (tmp_path / "shared").resolve()
    plot = shared / "reports" / "flight_delay" / "v1" / "roc.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"not really a png")

    def links() -> dict:
        artifacts = deployments.current().resources()["artifacts"]
        assert artifacts.reports == shared / "reports"
        return {**figure_metadata(artifacts, {"roc": plot}), **report_metadata(artifacts, plot)}

    cluster_env(monkeypatch, shared)
    monkeypatch.delenv(URL_ENV, raising=False)
    unlinked = links()
    assert set(unlinked) == {"plots_embedded", "report_path"} and "127.0.0.1" not in str(unlinked)
    monkeypatch.setenv(URL_ENV, "https://reports.example.org/ml/")
    linked = links()
    assert linked["report"].value == "https://reports.example.org/ml/flight_delay/v1/roc.png"
    assert linked["plot_roc"].value == "![roc](https://reports.example.org/ml/flight_delay/v1/roc.png)"
    monkeypatch.setenv(deployments.DEPLOYMENT_ENV, "local")
    monkeypatch.delenv(URL_ENV)
    assert deployments.current().resources()["artifacts"].reports_url == DEFAULT_URL


def test_fit_threads_come_from_the_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pipeline = load_project(write_pipelines(tmp_path / "p", None)).pipelines["flight_delay"]
    monkeypatch.delenv(deployments.FIT_THREADS_ENV, raising=False)
    assert deployments.with_fit_threads(pipeline).model.num_threads == pipeline.model.num_threads
    monkeypatch.setenv(deployments.FIT_THREADS_ENV, "3")
    assert deployments.with_fit_threads(pipeline).model.num_threads == 3
    monkeypatch.setenv(deployments.FIT_THREADS_ENV, "two")
    with pytest.raises(UsageError, match=deployments.FIT_THREADS_ENV):
        deployments.with_fit_threads(pipeline)


@needs_postgres
def test_cluster_instance_is_shared_postgres(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two instances from the cluster dagster.yaml (a webserver's and the daemon's) see one run history,
    sensor cursors included, all in PostgreSQL."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(CLUSTER_YAML, home / "dagster.yaml")
    with running_postgres(tmp_path / "pg") as url:
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.setenv(deployments.PG_URL_ENV, url.replace("postgresql://", deployments.PG_SCHEME))
        with dg.DagsterInstance.get() as webserver, dg.DagsterInstance.get() as daemon:
            assert webserver.is_persistent
            storages = (webserver.run_storage, webserver.event_log_storage, webserver.schedule_storage)
            assert [type(s).__name__ for s in storages] == [
                "PostgresRunStorage",
                "PostgresEventLogStorage",
                "PostgresScheduleStorage",
            ]
            result = dg.materialize([dg.asset(name="hello")(lambda: None)], instance=webserver)
            assert [r.run_id for r in daemon.get_runs()] == [result.run_id]
        with psycopg_connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
            assert conn.execute("SELECT count(*) FROM event_logs").fetchone()[0] > 0


def psycopg_connect(url: str, autocommit: bool = False):
    import psycopg

    return psycopg.connect(url, autocommit=autocommit)


class Cluster:
    """A running cluster deployment: its environment, Dask cluster and PostgreSQL URL."""

    def __init__(self, env: dict[str, str], dask: DaskCluster, pg_url: str) -> None:
        self.env, self.dask, self.pg_url = env, dask, pg_url

    @property
    def root(self) -> Path:
        return Path(self.env[deployments.SHARED_ROOT_ENV])

    @property
    def warehouse(self) -> tuple[str, str]:
        """The DuckLake catalog and its data folder, as every process of the cluster names them."""
        return self.env[store.WAREHOUSE_ENV], str(self.root / "warehouse")

    def tables(self):
        return store.connect(*self.warehouse)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*args],
            env={**os.environ, **self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=RUN_DEADLINE_S,
            cwd=REPO,
        )


@pytest.fixture(scope="module")
def cluster(sample_sources: Path) -> Iterator[Cluster]:
    """PostgreSQL, a scheduler and two workers (one `training` unit each), the flagship pipeline alone on
    the sample data, a shared root and a DAGSTER_HOME with the cluster dagster.yaml. Shared by the
    module's tests: it holds what the tests before wrote (months, versions, runs)."""
    yield from _new_cluster(sample_sources)


@pytest.fixture
def fresh_cluster(sample_sources: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, as `cluster` but empty: for a test that compares whole warehouses
    (on the module's cluster, the concurrent-runs test has already validated a month, whose change-log
    row an empty local warehouse never holds)."""
    yield from _new_cluster(sample_sources)


def _new_cluster(sample_sources: Path) -> Iterator[Cluster]:
    if postgres_unavailable_reason():
        pytest.skip(postgres_unavailable_reason())
    # Not under pytest's numbered temporary folders: another pytest session of the same user prunes old
    # ones, and this fixture outlives a test.
    with tempfile.TemporaryDirectory(prefix="ml_assets-cluster-") as tmp:
        yield from _cluster(Path(tmp), sample_sources)


def _cluster(base: Path, sample_sources: Path) -> Iterator[Cluster]:
    sources = shutil.copytree(sample_sources, base / "sources")
    pipelines = write_pipelines(base / "pipelines", sources, FAST_MODEL)
    for other in pipelines.glob("*.yaml"):
        if other.stem != "flight_delay":
            other.unlink()
    home = base / "home"
    home.mkdir()
    shutil.copy(CLUSTER_YAML, home / "dagster.yaml")
    with running_postgres(base / "pg") as url:
        with psycopg_connect(url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE lake")
        env = {
            deployments.DEPLOYMENT_ENV: "cluster",
            deployments.PG_URL_ENV: url.replace("postgresql://", deployments.PG_SCHEME),
            deployments.SHARED_ROOT_ENV: str(base / "shared"),
            # The shared tables: a DuckLake catalog in the same server, its Parquet files under the root.
            store.WAREHOUSE_ENV: catalog_url(url, "lake"),
            # Where a process that wrongly fell back to the local deployment would write (never created).
            store.DATA_DIR_ENV: str(base / UNUSED_LOCAL),
            "ML_ASSETS_PIPELINES_DIR": str(pipelines),
            "DAGSTER_HOME": str(home),
            "DO_NOT_TRACK": "1",
        }
        with running_dask(base / "dask", 2, env) as dask:
            yield Cluster({**env, deployments.SCHEDULER_ENV: dask.address}, dask, url)


def scheduler_keys(dask: DaskCluster) -> set[str]:
    """Every task key the scheduler has seen (its transition log)."""
    with dask.client() as client:
        return client.run_on_scheduler(
            lambda dask_scheduler: {str(t[0]) for t in dask_scheduler.transition_log}
        )


@pytest.mark.parametrize(
    "run_scoped_keys", [True, pytest.param(False, marks=pytest.mark.slow, id="upstream-keys")], ids=str
)
def test_concurrent_runs_of_one_job_both_execute(cluster: Cluster, run_scoped_keys: bool) -> None:
    """Two runs of one job, each ingesting its own month, queued on Dask at the same time (workers held
    until both have submitted). With dagster-dask's keys (`<job>.<step>`, dagster issue 21418) the second
    run is handed the first's result and its month is never ingested; with ours both are."""
    months = ["2013-03-01", "2013-04-01"]
    done: dict[str, subprocess.CompletedProcess] = {}
    upstream = {} if run_scoped_keys else {"UPSTREAM_DASK_KEYS": "1"}

    def launch(month: str) -> None:
        keys = [k.to_user_string() for k in source_keys("flights")]
        done[month] = cluster.run(sys.executable, "-c", LAUNCH_PARTITION, month, *keys, env=upstream)

    threads = [threading.Thread(target=launch, args=(m,)) for m in months]
    with workers_held(cluster.dask, RUN_DEADLINE_S) as release_when_wanted:
        for t in threads:
            t.start()
        release_when_wanted(RUN_JOB, len(months))
    for t in threads:
        t.join()
    with cluster.tables() as conn:
        ingested = {
            m: conn.execute(
                "SELECT count(*) FROM raw.flights WHERE date_trunc('month', _event_time) = ?::TIMESTAMP", [m]
            ).fetchone()[0]
            > 0
            for m in months
        }
    if not run_scoped_keys:
        assert not all(ingested.values()), ingested
        return
    runs = {}
    for month in months:
        assert done[month].returncode == 0, done[month].stderr[-3000:]
        run_id, success = done[month].stdout.split()[-2:]
        assert success == "True", done[month].stderr[-3000:]
        runs[month] = run_id
    assert all(ingested.values()), ingested
    keys = scheduler_keys(cluster.dask)
    for run_id in runs.values():
        assert any(k.startswith(f"{RUN_JOB}.{run_id}.") for k in keys), sorted(keys)


def models(tables) -> dict[str, str]:
    """The champion's model file and the latest LightGBM model's, read through the registry of a
    warehouse (`tables`: store.connect). The gate may crown a simpler candidate (a `-linear` version
    holding model.json) over the LightGBM model."""
    with tables as conn:
        champion = registry.alias_version(conn, "flight_delay", registry.CHAMPION)
        paths = dict(conn.execute(f"SELECT version, path FROM {store.MODEL_VERSIONS}").fetchall())
    latest = max(v for v in paths if not v.endswith("-linear"))  # this run's: ids sort by time
    folder = Path(paths[champion])
    champion_file = folder / registry.MODEL_FILE
    if not champion_file.exists():
        champion_file = folder / registry.MODEL_JSON_FILE
    return {
        "champion": champion_file.read_text(),
        "lightgbm": (Path(paths[latest]) / registry.MODEL_FILE).read_text(),
    }


def local_run(cluster: Cluster, root: Path, *args: str) -> subprocess.CompletedProcess:
    """`ml-assets run` under `local` on the cluster's pipelines and sources, into `root`."""
    return cluster.run(ML_ASSETS, "run", *args, env=local_deployment(root))


def local_database_files(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if p.suffix in (".duckdb", ".wal")]


@pytest.mark.slow
def test_flagship_on_the_cluster_matches_local(
    fresh_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ml-assets run` under `cluster` (DuckLake tables, steps on two Dask workers, the instance in
    PostgreSQL) and under `local` (one DuckDB file, one process) on the same pipeline and data: every
    table holds the same rows (registry, gate decisions and monitoring included; times, run and version
    ids aside), the champion is the same model; the cluster run's steps ran in both worker processes, its
    run and events are in PostgreSQL, and no DuckDB database file was written anywhere for it."""
    on_cluster = fresh_cluster.run(ML_ASSETS, "run", "--max-trials", "2")
    assert on_cluster.returncode == 0, on_cluster.stdout[-3000:] + on_cluster.stderr[-3000:]
    local = local_run(fresh_cluster, tmp_path / "local", "--max-trials", "2")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    local_file = str(store.warehouse_path(tmp_path / "local" / "data"))
    ours, theirs = table_contents(*fresh_cluster.warehouse), table_contents(local_file)
    assert {"raw.flights", "flight_delay.features", store.MODEL_VERSIONS, store.DRIFT_HISTORY} <= set(ours)
    assert ours.keys() == theirs.keys()
    assert all(ours[t] for t in ("validated.flights", store.MODEL_VERSIONS, store.DECISION_LOG))
    differ = differing(ours, theirs)
    assert not differ, f"tables whose contents differ between cluster and local: {differ}"
    assert models(fresh_cluster.tables()) == models(store.connect(local_file))

    base = fresh_cluster.root.parent
    assert local_database_files(base) == [] and not (base / UNUSED_LOCAL).exists()
    assert list((fresh_cluster.root / "warehouse").rglob("*.parquet"))
    # What an API on another host serves: the champion's bundle on the shared root, loaded without the tables.
    project = load_project(Path(fresh_cluster.env["ML_ASSETS_PIPELINES_DIR"]))
    spec = project.pipelines["flight_delay"]
    published = bundle.current(fresh_cluster.root / bundle.BUNDLES_DIR, spec.name)
    loaded = bundle.load(fresh_cluster.root / bundle.BUNDLES_DIR, spec, project.sources_of(spec), published)
    with fresh_cluster.tables() as conn:
        assert loaded.manifest.version == registry.alias_version(conn, spec.name, registry.CHAMPION)
    run_id = on_cluster.stdout.split("ml_assets run ")[1].split(":")[0]
    monkeypatch.setenv("DAGSTER_HOME", fresh_cluster.env["DAGSTER_HOME"])
    monkeypatch.setenv(deployments.PG_URL_ENV, fresh_cluster.env[deployments.PG_URL_ENV])
    with dg.DagsterInstance.get() as instance:
        starts = list(instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START))
        assert instance.get_run_by_id(run_id).is_success
    step_pids = {e.dagster_event.pid for e in starts}
    assert len(starts) > 10 and len(step_pids) >= 2 and step_pids <= fresh_cluster.dask.worker_pids(), (
        step_pids,
        fresh_cluster.dask.worker_pids(),
    )
    with psycopg_connect(fresh_cluster.pg_url) as conn:
        stored = conn.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,)).fetchone()[0]
    assert stored >= len(starts)


def registry_state(cluster: Cluster) -> tuple[dict[str, list[tuple]], list[str]]:
    """The registry's tables and the model folders on the shared root (hidden ones included: a version
    being written is a `.tmp-` folder)."""
    tables = table_contents(*cluster.warehouse)
    registry_tables = {t: rows for t, rows in tables.items() if t.startswith("registry.")}
    models = cluster.root / "models"
    folders = sorted(str(p.relative_to(models)) for p in models.glob("*/*")) if models.exists() else []
    return registry_tables, folders


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_run_and_a_rerun_succeeds(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killing the worker that trains fails the run (the scheduler does not hand the step to another
    worker, and Dagster's retries are off on Dask), leaves the registry and the model folders as they
    were (no version row, no half-written folder), and the next run succeeds on the surviving worker."""
    monkeypatch.setenv("DAGSTER_HOME", cluster.env["DAGSTER_HOME"])
    monkeypatch.setenv(deployments.PG_URL_ENV, cluster.env[deployments.PG_URL_ENV])
    before = registry_state(cluster)
    with dg.DagsterInstance.get() as instance:
        earlier_runs = {r.run_id for r in instance.get_runs()}
    launched = subprocess.Popen(
        [ML_ASSETS, "run", "--max-trials", "2"],
        env={**os.environ, **cluster.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    pid_of_training: list[int] = []

    def training_started() -> bool:
        with dg.DagsterInstance.get() as instance:
            runs = [r for r in instance.get_runs(limit=1) if r.run_id not in earlier_runs]
            if not runs:
                return launched.poll() is not None
            for entry in instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START):
                if entry.step_key and entry.step_key.endswith("model"):
                    pid_of_training.append(entry.dagster_event.pid)
                    return True
        return launched.poll() is not None

    wait_until(training_started, "the model step to start", deadline_s=RUN_DEADLINE_S)
    assert pid_of_training, launched.communicate()[0][-3000:]
    name = next(n for n, p in cluster.dask.workers.items() if p.pid == pid_of_training[0])
    try:
        cluster.dask.kill(name)
        output = launched.communicate(timeout=RUN_DEADLINE_S)[0]
        assert launched.returncode == 1 and "FAILURE" in output, output[-3000:]
        assert registry_state(cluster) == before

        rerun = cluster.run(ML_ASSETS, "run", "--max-trials", "2")
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        registry_tables, folders = registry_state(cluster)
        assert len(registry_tables[store.MODEL_VERSIONS]) > len(before[0].get(store.MODEL_VERSIONS, []))
        assert not [f for f in folders if "/.tmp-" in f]
    finally:  # the next test of the module gets two workers again
        cluster.dask.start_worker(name)
        cluster.dask.wait_for_workers()


def test_dask_fit_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fit goes to Dask only on a cluster, from the rows the run or the workers set, within a timeout."""
    for name in (deployments.DEPLOYMENT_ENV, deployments.DASK_FIT_ROWS_ENV, deployments.DASK_FIT_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(deployments.DASK_FIT_ROWS_ENV, "1000")
    assert deployments.dask_fit() is None and deployments.dask_fit(5) is None  # local: never
    cluster_env(monkeypatch, tmp_path, scheduler="tcp://10.1.2.3:8786")
    monkeypatch.delenv(deployments.DASK_FIT_ROWS_ENV)
    assert deployments.dask_fit() is None
    assert deployments.dask_fit(5) == DaskFit(
        "tcp://10.1.2.3:8786", 5, deployments.DEFAULT_DASK_FIT_TIMEOUT_S
    )
    monkeypatch.setenv(deployments.DASK_FIT_ROWS_ENV, "1000")
    monkeypatch.setenv(deployments.DASK_FIT_TIMEOUT_ENV, "90")
    fit = deployments.dask_fit()
    assert (fit.min_rows, fit.timeout_s, fit.applies(999), fit.applies(1000)) == (1000, 90, False, True)
    monkeypatch.setenv(deployments.DASK_FIT_TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match=deployments.DASK_FIT_TIMEOUT_ENV):
        deployments.dask_fit()


# LightGBM on two workers fits with the same parameters and keeps the round early stopping would; what
# differs is its bins: data-parallel LightGBM finds each feature's bin boundaries on one worker's rows
# (half of them here). The test AUC may differ from the fit in one process by as much as a local fit
# whose bins come from a random half of the rows does (bin_construct_sample_cnt = rows/2, 20 seeds,
# measured 2026-12-07, docs/cluster.md): on 10k synthetic rows with a strong signal -0.0004..+0.0012
# (the distributed fit: +0.0005), so 0.01;
DISTRIBUTED_AUC_TOLERANCE = 0.01
# on the flagship's test sample (11.6k training rows, a 647-row validation window on which early
# stopping keeps anywhere from 1 to 63 rounds) -0.023..+0.004 (the distributed fit: -0.019, the same in
# 4 runs), so 0.03.
FLAGSHIP_DISTRIBUTED_AUC_TOLERANCE = 0.03
# Model-file parameters that only say how the fit was spread over machines.
NETWORK_PARAMETERS = ("machines", "num_machines", "local_listen_port", "time_out", "tree_learner")


def test_a_fit_on_two_dask_workers_scores_as_the_local_fit(cluster: Cluster) -> None:
    """The final fit with LightGBM's Dask interface on both workers (one thread each) yields an ordinary
    text model, stopped at the round early stopping would pick, scoring within the tolerance of the same
    fit in one process."""
    pipeline = synthetic_spec({"max_rounds": 300, "early_stopping_rounds": 20})
    data = synthetic_training_data(20_000)
    params = base_params(pipeline, None)
    local, _, how_local = train.fit_final(pipeline, data, params)
    on_dask = DaskFit(cluster.dask.address, min_rows=1, timeout_s=600)
    distributed, cut, how = train.fit_final(pipeline, data, params, on_dask=on_dask)
    assert how_local == train.LOCAL_FIT and cut is None
    assert how["engine"] == "lightgbm.dask" and how["workers"] == 2
    assert 1 <= distributed.best_iteration < how["rounds_trained"] == pipeline.model.max_rounds
    text = distributed.model_to_string(num_iteration=distributed.best_iteration)
    # Trained data-parallel on two machines, one thread each (never more threads than the worker has).
    assert all(p in text for p in ("[tree_learner: data]", "[num_machines: 2]", "[num_threads: 1]"))
    reloaded = lgb.Booster(model_str=text)
    scores = {
        name: score("binary", "roc_auc", data.test.y, b.predict(data.test.X, num_iteration=b.best_iteration))
        for name, b in (("local", local), ("distributed", distributed))
    }
    assert abs(scores["distributed"] - scores["local"]) <= DISTRIBUTED_AUC_TOLERANCE, scores
    assert (
        reloaded.predict(data.test.X)
        == distributed.predict(data.test.X, num_iteration=distributed.best_iteration)
    ).all()


def training_parameters(model_text: str) -> set[str]:
    """The `[name: value]` parameter lines of a LightGBM text model, the network ones left out."""
    lines = model_text[model_text.index("parameters:") :].splitlines()
    return {
        line for line in lines if line.startswith("[") and line[1:].split(":")[0] not in NETWORK_PARAMETERS
    }


def registered_versions(cluster: Cluster) -> dict[str, registry.Manifest]:
    with cluster.tables() as conn:
        rows = conn.execute(
            f"SELECT version, manifest FROM {store.MODEL_VERSIONS} ORDER BY version"
        ).fetchall()
    return {v: registry.parse_manifest(m, v) for v, m in rows if not v.endswith("-linear")}


@pytest.mark.slow
def test_the_flagship_trains_on_two_workers_and_serves(cluster: Cluster) -> None:
    """`ml-assets retrain --dask-fit-rows 1` on the cluster: the model step fits with LightGBM's Dask
    interface on both workers; the version is registered like any other (text model, manifest), reloads
    in a fresh process and reproduces its training-time predictions (what serving loads), and scores
    within the tolerance of the same pipeline's local fit on the same rows (the run before it)."""
    first = cluster.run(ML_ASSETS, "run", "--max-trials", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = registered_versions(cluster)
    again = cluster.run(ML_ASSETS, "retrain", "flight_delay", "--max-trials", "1", "--dask-fit-rows", "1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = registered_versions(cluster)
    (new,) = set(after) - set(before)
    local = max(before)  # the first run's fit, on the same features
    assert before[local].cv.final_fit == train.LOCAL_FIT
    assert after[new].cv.final_fit["engine"] == "lightgbm.dask" and after[new].cv.final_fit["workers"] == 2
    assert after[new].rows == before[local].rows
    with cluster.tables() as conn:
        version = registry.registered(conn, new, "flight_delay")
        local_version = registry.registered(conn, local, "flight_delay")
    text = (version.path / registry.MODEL_FILE).read_text()
    assert "[num_machines: 2]" in text
    # The same training parameters as the local fit (only how it was spread over machines differs).
    assert training_parameters(text) == training_parameters(
        (local_version.path / registry.MODEL_FILE).read_text()
    )
    metric = after[new].metric
    gap = after[new].test_metrics[metric] - before[local].test_metrics[metric]
    assert abs(gap) <= FLAGSHIP_DISTRIBUTED_AUC_TOLERANCE, (metric, gap)
    ok, why = reproduces_training_predictions(version.path, version.manifest_sha256)
    assert ok, why


@pytest.mark.slow
def test_a_worker_lost_mid_fit_fails_the_distributed_fit(cluster: Cluster) -> None:
    """Killing a worker while LightGBM trains on both fails the fit within its timeout instead of leaving
    it waiting on the lost worker's sockets."""
    pipeline = synthetic_spec({"max_rounds": 100_000, "early_stopping_rounds": 20})
    data = synthetic_training_data(200_000)
    on_dask = DaskFit(cluster.dask.address, min_rows=1, timeout_s=240)
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            on_dask.fit(base_params(pipeline, None), pipeline, data)
        except DistributedFitError as exc:
            failed.append(exc)

    fitting = threading.Thread(target=fit)
    fitting.start()
    try:
        with cluster.dask.client() as client:
            wait_until(
                lambda: client.run_on_scheduler(processing("_train_part")) == 2, "both workers to train"
            )
        cluster.dask.kill("worker-1")
        fitting.join(on_dask.timeout_s + 60)
        assert not fitting.is_alive() and failed, "the fit neither failed nor timed out"
    finally:  # fresh workers for the next test (the survivor may still wait on the lost one's sockets)
        cluster.dask.kill("worker-0")
        for name in ("worker-0", "worker-1"):
            cluster.dask.start_worker(name)
        cluster.dask.wait_for_workers()
