"""The `cluster` deployment against `local` on this machine: the flagship's full recorded year
(`ml-assets run flight_delay`, fixed trials, no time budget) under `local` (SQLite instance, one DuckDB
file, steps in one process) and under `cluster` (PostgreSQL instance, DuckLake tables on PostgreSQL,
steps on a Dask scheduler with 1 and with 2 worker processes), each on fresh data. PostgreSQL and Dask
run on loopback, started as the tests start them (ml_assets_tests.postgres_server, .dask_cluster).

Also: what Dagster's per-partition bookkeeping costs on each instance storage (one daily asset doing
nothing, materialized over a year of partitions in one run, on SQLite and on PostgreSQL).

Prints the seconds of each side, the ingest rows/s (raw flights rows over the flights and weather
ingest steps' seconds) and the training rows/s (training rows over the model step's seconds); last line:
    cluster1_vs_local=<ratio> cluster2_vs_cluster1=<ratio> partitions_pg_vs_sqlite=<ratio>
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import psycopg

from ml_assets.core import store
from ml_assets.orchestration import deployments

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from e2e import pipelines_with  # noqa: E402

from ml_assets_tests.conftest import catalog_url  # noqa: E402
from ml_assets_tests.dask_cluster import running_dask  # noqa: E402
from ml_assets_tests.postgres_server import running_postgres  # noqa: E402

ML_ASSETS = str(Path(sys.executable).parent / "ml-assets")
PIPELINE = "flight_delay"


def run_side(env: dict[str, str], max_trials: int) -> tuple[float, str]:
    """`ml-assets run flight_delay` with `env`: its wall seconds and run id."""
    started = time.perf_counter()
    done = subprocess.run(
        [ML_ASSETS, "run", PIPELINE, "--max-trials", str(max_trials)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    elapsed = time.perf_counter() - started
    found = re.search(r"ml_assets run (\S+): SUCCESS", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed, found.group(1)


def step_seconds(env: dict[str, str], run_id: str) -> dict[str, float]:
    """Each step's seconds, from the run's own instance (the one `env` names)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with dg.DagsterInstance.get() as instance:
            stats = instance.get_run_step_stats(run_id)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {s.step_key: s.end_time - s.start_time for s in stats if s.end_time and s.start_time}


def rates(steps: dict[str, float], database: str, data_path: str | None) -> dict[str, float]:
    """Ingest rows/s (raw flights rows over the flights and weather raw/validated steps) and training
    rows/s (training rows over the model step)."""
    with store.connect(database, data_path) as conn:
        flights = conn.execute("SELECT count(*) FROM raw.flights").fetchone()[0]
        manifest = conn.execute(
            f"SELECT manifest FROM {store.MODEL_VERSIONS} WHERE NOT version LIKE '%-linear' "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()[0]
    train_rows = int(re.search(r'"train":\s*(\d+)', manifest).group(1))
    ingest_s = sum(s for k, s in steps.items() if re.match(r"(raw|validated)__(flights|weather)_", k))
    model_s = next(s for k, s in steps.items() if k == f"{PIPELINE}__model")
    return {"ingest_rows_per_s": flights / ingest_s, "train_rows_per_s": train_rows / model_s}


def local_side(base: Path, pipelines: Path, max_trials: int) -> dict[str, object]:
    home = base / "home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        deployments.DEPLOYMENT_ENV: "local",
        store.DATA_DIR_ENV: str(base / "data"),
        "DAGSTER_HOME": str(home),
        "ML_ASSETS_PIPELINES_DIR": str(pipelines),
    }
    seconds, run_id = run_side(env, max_trials)
    steps = step_seconds(env, run_id)
    return {"s": seconds} | rates(steps, str(store.warehouse_path(base / "data")), None)


def cluster_side(
    base: Path, pipelines: Path, pg_url: str, workers: int, max_trials: int
) -> dict[str, object]:
    lake = f"lake_{workers}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {lake}")
        conn.execute(f"CREATE DATABASE dagster_{workers}")
    home = base / "home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "cluster" / "dagster.yaml", home / "dagster.yaml")
    instance_url = pg_url.rsplit("/", 1)[0] + f"/dagster_{workers}"
    env = {
        deployments.DEPLOYMENT_ENV: "cluster",
        deployments.PG_URL_ENV: instance_url.replace("postgresql://", deployments.PG_SCHEME),
        deployments.SHARED_ROOT_ENV: str(base / "shared"),
        store.WAREHOUSE_ENV: catalog_url(pg_url, lake),
        "DAGSTER_HOME": str(home),
        "ML_ASSETS_PIPELINES_DIR": str(pipelines),
    }
    with running_dask(base / "dask", workers, env) as dask:
        env[deployments.SCHEDULER_ENV] = dask.address
        seconds, run_id = run_side(env, max_trials)
    steps = step_seconds(env, run_id)
    return {"s": seconds} | rates(steps, env[store.WAREHOUSE_ENV], str(base / "shared" / "warehouse"))


def bookkeeping_s(instance_env: dict[str, str]) -> float:
    """One daily asset doing nothing, over 366 partitions in one run, on the instance `instance_env`
    names: Dagster's per-partition events and nothing else."""
    days = dg.DailyPartitionsDefinition(start_date="2013-01-01", end_date="2014-01-01")

    @dg.asset(partitions_def=days)
    def daily(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})

    saved = dict(os.environ)
    os.environ.update(instance_env)
    try:
        with dg.DagsterInstance.get() as instance:
            started = time.perf_counter()
            result = dg.materialize(
                [daily],
                instance=instance,
                tags={
                    "dagster/asset_partition_range_start": "2013-01-01",
                    "dagster/asset_partition_range_end": "2013-12-31",
                },
            )
            elapsed = time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.success
    return elapsed


def bookkeeping(base: Path, pg_url: str) -> dict[str, float]:
    homes = {"sqlite": REPO / "dagster.yaml", "postgres": REPO / "deploy" / "cluster" / "dagster.yaml"}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bookkeeping")
    out = {}
    for name, config in homes.items():
        home = base / f"home-{name}"
        home.mkdir(parents=True)
        shutil.copy(config, home / "dagster.yaml")
        url = pg_url.rsplit("/", 1)[0].replace("postgresql://", deployments.PG_SCHEME) + "/bookkeeping"
        out[name] = bookkeeping_s({"DAGSTER_HOME": str(home), deployments.PG_URL_ENV: url})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-trials", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        pipelines = pipelines_with(args.max_trials, base / "pipelines")
        with running_postgres(base / "pg") as pg_url:
            sides = {"local": local_side(base / "local", pipelines, args.max_trials)}
            for workers in (1, 2):
                sides[f"cluster{workers}"] = cluster_side(
                    base / f"cluster{workers}", pipelines, pg_url, workers, args.max_trials
                )
            partitions = bookkeeping(base / "bookkeeping", pg_url)
    for name, side in sides.items():
        print(
            f"{name}: {side['s']:.1f} s, ingest {side['ingest_rows_per_s']:.0f} rows/s, "
            f"training {side['train_rows_per_s']:.0f} rows/s"
        )
    print(f"partition bookkeeping (366 daily partitions, one run): sqlite {partitions['sqlite']:.1f} s, "
          f"postgres {partitions['postgres']:.1f} s")  # fmt: skip
    print(
        f"cluster1_vs_local={sides['cluster1']['s'] / sides['local']['s']:.3f} "
        f"cluster2_vs_cluster1={sides['cluster2']['s'] / sides['cluster1']['s']:.3f} "
        f"partitions_pg_vs_sqlite={partitions['postgres'] / partitions['sqlite']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
