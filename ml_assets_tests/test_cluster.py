"""The `cluster` deployment for real: a PostgreSQL server and a Dask scheduler with two worker processes on
loopback, runs launched the way a user launches them (`ml-assets run`, or a job run from another process).

Fast: deployment selection and its errors, definitions under `cluster`, the cluster dagster.yaml on
PostgreSQL, and two concurrent runs of one job on Dask. Slow: the flagship under `cluster` against `local`,
and a worker killed mid-run.
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
import duckdb
import polars as pl
import pytest
from dagster_dask.executor import DASK_RESOURCE_REQUIREMENTS_KEY

from ml_assets.core.errors import UsageError
from ml_assets.orchestration import deployments
from ml_assets.orchestration.build import build_definitions
from ml_assets.orchestration.jobs import RUN_JOB
from ml_assets.orchestration.keys import source_keys
from ml_assets_tests.conftest import FAST_MODEL, write_pipelines
from ml_assets_tests.dask_cluster import DaskCluster, running_dask, wait_until, workers_held
from ml_assets_tests.postgres_server import postgres_unavailable_reason, running_postgres

REPO = Path(__file__).resolve().parents[1]
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


def test_fit_threads_come_from_the_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ml_assets.core.spec.load import load_project

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


def psycopg_connect(url: str):
    import psycopg

    return psycopg.connect(url)


class Cluster:
    """A running cluster deployment: its environment, Dask cluster and PostgreSQL URL."""

    def __init__(self, env: dict[str, str], dask: DaskCluster, pg_url: str) -> None:
        self.env, self.dask, self.pg_url = env, dask, pg_url

    @property
    def root(self) -> Path:
        return Path(self.env[deployments.SHARED_ROOT_ENV])

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
    the sample data, a shared root and a DAGSTER_HOME with the cluster dagster.yaml."""
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
        env = {
            deployments.DEPLOYMENT_ENV: "cluster",
            deployments.PG_URL_ENV: url.replace("postgresql://", deployments.PG_SCHEME),
            deployments.SHARED_ROOT_ENV: str(base / "shared"),
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
    with duckdb.connect(str(cluster.root / "warehouse.duckdb"), read_only=True) as conn:
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


DATA_TABLES = [
    "raw.flights",
    "raw.weather",
    "raw.planes",
    "validated.flights",
    "validated.weather",
    "validated.planes",
    "quarantine.weather",
    "flight_delay.modelling_table",
    "flight_delay.features",
]
# Without data_fingerprint: it hashes the training frame's Arrow bytes, which follow how the frame was
# read (its chunks), not only its values; the tables themselves are compared whole.
REGISTRY = (
    "SELECT model_sha256, cv_score, test_score, baseline_test_score, train_start, train_end "
    "FROM registry.model_versions ORDER BY version"
)


def warehouse_state(root: Path) -> dict[str, object]:
    """What two runs on the same data must agree on: tables, registry rows (without names and times
    that belong to a run), the gate's decision and the champion's model file."""
    with duckdb.connect(str(root / "warehouse.duckdb"), read_only=True) as conn:
        state: dict[str, object] = {
            t: conn.sql(f"SELECT * FROM {t}").pl().sort(pl.all()) for t in DATA_TABLES
        }
        state["registry"] = conn.execute(REGISTRY).fetchall()
        state["decision"] = conn.execute("SELECT action, reason FROM registry.decision_log").fetchall()
        model = conn.execute(
            "SELECT path FROM registry.model_versions WHERE NOT version LIKE '%-linear'"
        ).fetchone()[0]
    state["decision"] = [(a, r.split(" registered as ")[0]) for a, r in state["decision"]]
    state["model.txt"] = (Path(model) / "model.txt").read_text()
    return state


@pytest.mark.slow
def test_flagship_on_the_cluster_matches_local(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ml-assets run` under `cluster` and under `local` on the same pipeline and data: the same tables,
    registry rows, gate decision and model; the cluster run's steps ran in both worker processes, its run
    and events are in PostgreSQL, and nothing was written to a local data directory."""
    unused_local = tmp_path / "unused-local-data"
    ml_assets = str(Path(sys.executable).parent / "ml-assets")
    on_cluster = cluster.run(
        ml_assets, "run", "--max-trials", "2", env={"ML_ASSETS_DATA_DIR": str(unused_local)}
    )
    assert on_cluster.returncode == 0, on_cluster.stdout[-3000:] + on_cluster.stderr[-3000:]
    local_home = tmp_path / "local-home"
    local_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", local_home / "dagster.yaml")
    local = cluster.run(
        ml_assets,
        "run",
        "--max-trials",
        "2",
        env={
            deployments.DEPLOYMENT_ENV: "local",
            "ML_ASSETS_DATA_DIR": str(tmp_path / "local"),
            "DAGSTER_HOME": str(local_home),
        },
    )
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert not unused_local.exists()

    ours, theirs = warehouse_state(cluster.root), warehouse_state(tmp_path / "local")
    for table in DATA_TABLES:
        assert ours[table].height > 0 or table.startswith("quarantine"), table
        assert ours[table].equals(theirs[table]), table
    for what in ("registry", "decision", "model.txt"):
        assert ours[what] == theirs[what], what

    run_id = on_cluster.stdout.split("ml_assets run ")[1].split(":")[0]
    monkeypatch.setenv("DAGSTER_HOME", cluster.env["DAGSTER_HOME"])
    monkeypatch.setenv(deployments.PG_URL_ENV, cluster.env[deployments.PG_URL_ENV])
    with dg.DagsterInstance.get() as instance:
        starts = list(instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START))
        assert instance.get_run_by_id(run_id).is_success
    step_pids = {e.dagster_event.pid for e in starts}
    assert len(starts) > 10 and step_pids == cluster.dask.worker_pids(), (
        step_pids,
        cluster.dask.worker_pids(),
    )
    with psycopg_connect(cluster.pg_url) as conn:
        stored = conn.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,)).fetchone()[0]
    assert stored >= len(starts)


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_run_and_a_rerun_succeeds(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killing the worker that trains fails the run (the scheduler does not hand the step to another
    worker, and Dagster's retries are off on Dask), registers no model version, and the next run
    succeeds on the surviving worker."""
    monkeypatch.setenv("DAGSTER_HOME", cluster.env["DAGSTER_HOME"])
    monkeypatch.setenv(deployments.PG_URL_ENV, cluster.env[deployments.PG_URL_ENV])
    ml_assets = str(Path(sys.executable).parent / "ml-assets")
    with duckdb.connect(str(cluster.root / "warehouse.duckdb"), read_only=True) as conn:
        exists = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'registry'"
        ).fetchone()[0]
        before = conn.execute("SELECT count(*) FROM registry.model_versions").fetchone()[0] if exists else 0
    launched = subprocess.Popen(
        [ml_assets, "run", "--max-trials", "2"],
        env={**os.environ, **cluster.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    pid_of_training: list[int] = []

    def training_started() -> bool:
        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs(limit=1)
            if not runs:
                return False
            for entry in instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START):
                if entry.step_key and entry.step_key.endswith("model"):
                    pid_of_training.append(entry.dagster_event.pid)
                    return True
        return launched.poll() is not None

    wait_until(training_started, "the model step to start", deadline_s=RUN_DEADLINE_S)
    assert pid_of_training, launched.communicate()[0][-3000:]
    name = next(n for n, p in cluster.dask.workers.items() if p.pid == pid_of_training[0])
    cluster.dask.kill(name)
    output = launched.communicate(timeout=RUN_DEADLINE_S)[0]
    assert launched.returncode == 1 and "FAILURE" in output, output[-3000:]
    with duckdb.connect(str(cluster.root / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM registry.model_versions").fetchone()[0] == before

    rerun = cluster.run(ml_assets, "run", "--max-trials", "2")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
