"""The `cluster` deployment against `local` on this machine, in one sitting: the flagship
(`ml-assets run flight_delay`, fixed trials, no time budget) over a range of days (default: the whole
recorded year 2013) under `local` (SQLite instance, one DuckDB file, steps in one process) and under
`cluster` (PostgreSQL instance, DuckLake tables with their catalog in PostgreSQL, steps on a Dask
scheduler with 1 and then 2 single-threaded worker processes), each on fresh data. PostgreSQL and Dask
run on loopback, started as the tests start them (ml_assets_tests.postgres_server, .dask_cluster).

Also: what Dagster's per-partition bookkeeping costs on each instance storage: one daily asset doing
nothing, materialized over N partitions in one run (a single-run backfill, as the sources are), on SQLite
and on PostgreSQL.

A range shorter than the year (`--until`) keeps the flagship's split in proportion (its test and
validation windows are 92 and 14 of the year's 365 days).

Prints each side's seconds, its ingest rows/s (raw flights and weather rows over the seconds of their raw
and validate steps) and training rows/s (training rows over the model step's seconds), the bookkeeping
seconds, then the goals (cluster with one worker within 1.25x of local; two workers faster than one) and
last:
    cluster1_vs_local=<ratio> cluster2_vs_cluster1=<ratio> partitions_pg_vs_sqlite=<ratio>
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from e2e import pipelines_with  # noqa: E402

from ml_assets.core import registry, store  # noqa: E402
from ml_assets.core.spec.package_data import package_file  # noqa: E402
from ml_assets.orchestration import deployments  # noqa: E402
from ml_assets_tests.conftest import catalog_url  # noqa: E402
from ml_assets_tests.dask_cluster import running_dask  # noqa: E402
from ml_assets_tests.helpers import local_deployment  # noqa: E402
from ml_assets_tests.postgres_server import running_postgres  # noqa: E402

ML_ASSETS = str(Path(sys.executable).parent / "ml-assets")
PIPELINE = "flight_delay"
YEAR_START, YEAR_END = dt.date(2013, 1, 1), dt.date(2014, 1, 1)
# The raw and validate steps of the two partitioned sources (planes is a few thousand rows).
INGEST_STEP = re.compile(r"raw__(flights|weather)_raw|validate_(flights|weather)")
GOAL_CLUSTER1_VS_LOCAL = 1.25


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with `env` on top (DagsterInstance.get reads DAGSTER_HOME from it)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read(path: str) -> pl.DataFrame:
    file = package_file(path)
    if file.suffix == ".zip":
        with zipfile.ZipFile(file) as archive:
            return pl.read_csv(archive.read(archive.namelist()[0]), infer_schema=False)
    return pl.read_csv(file, infer_schema=False)


def pipelines_until(max_trials: int, until: dt.date, dest: Path) -> Path:
    """The flagship alone with fixed trials (bench/e2e.py's files), its partitioned sources cut to the
    local days before `until` (written under dest/sources), the split in proportion to the range."""
    pipelines = pipelines_with(max_trials, dest / "pipelines")
    for other in pipelines.glob("*.yaml"):
        if other.stem != PIPELINE:
            other.unlink()
    path = pipelines / f"{PIPELINE}.yaml"
    raw = yaml.safe_load(path.read_text())
    if until < YEAR_END:
        (dest / "sources").mkdir()
        for name, source in raw["sources"].items():
            if "partitions" not in source:
                continue
            day = pl.date(*(pl.col(c).cast(pl.Int32) for c in ("year", "month", "day")))
            cut = dest / "sources" / f"{name}.csv"
            _read(source["path"]).filter(day < until).write_csv(cut)
            source["path"] = str(cut)
            # One day more, as the shipped file's end (2014-01-02): the axis is checked on UTC times, and
            # the last New York evening is past midnight in UTC.
            end = until + dt.timedelta(days=1)
            source["partitions"] = source["partitions"] | {"end": end.isoformat()}
        share = (until - YEAR_START).days / (YEAR_END - YEAR_START).days
        split = raw["split"]
        split["test_days"] = max(7, round(split["test_days"] * share))
        split["valid_days"] = max(3, round(split["valid_days"] * share))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return pipelines


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


def measured(env: dict[str, str], run_id: str, seconds: float, *warehouse: str) -> dict[str, float]:
    """The run's seconds, ingest rows/s and training rows/s, from its instance and warehouse."""
    with environment(env), dg.DagsterInstance.get() as instance:
        stats = instance.get_run_step_stats(run_id)
    steps = {s.step_key: s.end_time - s.start_time for s in stats if s.end_time and s.start_time}
    with store.connect(*warehouse) as conn:
        ingested = sum(
            conn.execute(f"SELECT count(*) FROM raw.{t}").fetchone()[0] for t in ("flights", "weather")
        )
        version, manifest = conn.execute(
            f"SELECT version, manifest FROM {store.MODEL_VERSIONS} WHERE NOT version LIKE '%-linear' "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
    train_rows = registry.parse_manifest(manifest, version).rows["train"]
    ingest_s = sum(s for k, s in steps.items() if INGEST_STEP.fullmatch(k))
    return {
        "s": seconds,
        "ingest_rows_per_s": ingested / ingest_s,
        "train_rows_per_s": train_rows / steps[f"{PIPELINE}__model"],
        "model_step_s": steps[f"{PIPELINE}__model"],
        "ingest_s": ingest_s,
    }


def local_side(base: Path, pipelines: Path, max_trials: int) -> dict[str, float]:
    env = local_deployment(base) | {"ML_ASSETS_PIPELINES_DIR": str(pipelines), "DO_NOT_TRACK": "1"}
    seconds, run_id = run_side(env, max_trials)
    return measured(env, run_id, seconds, str(store.warehouse_path(base / "data")))


def cluster_side(base: Path, pipelines: Path, pg_url: str, workers: int, max_trials: int) -> dict[str, float]:
    """A fresh instance database and DuckLake catalog, and a fresh Dask cluster of `workers` workers."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE lake_{workers}")
        conn.execute(f"CREATE DATABASE dagster_{workers}")
    home = base / "home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "cluster" / "dagster.yaml", home / "dagster.yaml")
    instance_url = pg_url.rsplit("/", 1)[0] + f"/dagster_{workers}"
    env = {
        deployments.DEPLOYMENT_ENV: "cluster",
        deployments.PG_URL_ENV: instance_url.replace("postgresql://", deployments.PG_SCHEME),
        deployments.SHARED_ROOT_ENV: str(base / "shared"),
        store.WAREHOUSE_ENV: catalog_url(pg_url, f"lake_{workers}"),
        store.DATA_DIR_ENV: str(base / "unused-local-data"),
        "DAGSTER_HOME": str(home),
        "ML_ASSETS_PIPELINES_DIR": str(pipelines),
        "DO_NOT_TRACK": "1",
    }
    with running_dask(base / "dask", workers, env) as dask:
        env[deployments.SCHEDULER_ENV] = dask.address
        seconds, run_id = run_side(env, max_trials)
    return measured(env, run_id, seconds, env[store.WAREHOUSE_ENV], str(base / "shared" / "warehouse"))


def bookkeeping_s(partitions: int) -> float:
    """One daily asset doing nothing over `partitions` days in one run, on the instance the environment
    names: Dagster's per-partition events and nothing else."""
    days = dg.DailyPartitionsDefinition(start_date="2013-01-01")

    @dg.asset(partitions_def=days, backfill_policy=dg.BackfillPolicy.single_run())
    def daily(context) -> dg.MaterializeResult:  # Dagster reads the hint, which is a string here
        return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})

    last = (YEAR_START + dt.timedelta(days=partitions - 1)).isoformat()
    with dg.DagsterInstance.get() as instance:
        started = time.perf_counter()
        result = dg.materialize(
            [daily],
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            tags={
                "dagster/asset_partition_range_start": YEAR_START.isoformat(),
                "dagster/asset_partition_range_end": last,
            },
        )
        elapsed = time.perf_counter() - started
    assert result.success
    return elapsed


def bookkeeping(base: Path, pg_url: str, partitions: int, repeats: int = 2) -> dict[str, float]:
    """The fastest of `repeats` runs on each storage, alternating, each storage in a fresh instance."""
    configs = {"sqlite": REPO / "dagster.yaml", "postgres": REPO / "deploy" / "cluster" / "dagster.yaml"}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE bookkeeping")
    url = pg_url.rsplit("/", 1)[0].replace("postgresql://", deployments.PG_SCHEME) + "/bookkeeping"
    out: dict[str, float] = {}
    for name, config in configs.items():
        home = base / f"home-{name}"
        home.mkdir(parents=True)
        shutil.copy(config, home / "dagster.yaml")
    for _ in range(repeats):
        for name in configs:
            with environment({"DAGSTER_HOME": str(base / f"home-{name}"), deployments.PG_URL_ENV: url}):
                seconds = bookkeeping_s(partitions)
            out[name] = min(out.get(name, seconds), seconds)
    return out


def show(name: str, side: dict[str, float]) -> None:
    print(
        f"{name}: {side['s']:.1f} s (ingest steps {side['ingest_s']:.1f} s, model step "
        f"{side['model_step_s']:.1f} s), ingest {side['ingest_rows_per_s']:.0f} rows/s, "
        f"training {side['train_rows_per_s']:.0f} rows/s",
        flush=True,
    )


def report(sides: dict[str, dict[str, float]], partitions: int, bookkept: dict[str, float]) -> None:
    print(
        f"partition bookkeeping ({partitions} daily partitions, one run, nothing done): "
        f"sqlite {bookkept['sqlite']:.1f} s, postgres {bookkept['postgres']:.1f} s"
    )
    c1 = sides["cluster1"]["s"] / sides["local"]["s"]
    c2 = sides["cluster2"]["s"] / sides["cluster1"]["s"]
    print(
        f"goal cluster1_vs_local <= {GOAL_CLUSTER1_VS_LOCAL}: {'met' if c1 <= GOAL_CLUSTER1_VS_LOCAL else 'NOT met'}"
    )
    print(f"goal cluster2_vs_cluster1 < 1: {'met' if c2 < 1 else 'NOT met'}")
    print(
        f"cluster1_vs_local={c1:.3f} cluster2_vs_cluster1={c2:.3f} "
        f"partitions_pg_vs_sqlite={bookkept['postgres'] / bookkept['sqlite']:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-trials", type=int, default=3)
    parser.add_argument(
        "--until",
        type=dt.date.fromisoformat,
        default=YEAR_END,
        help="first day left out (default 2014-01-01)",
    )
    parser.add_argument("--partitions", type=int, default=366, help="daily partitions of the bookkeeping run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        pipelines = pipelines_until(args.max_trials, args.until, base)
        with running_postgres(base / "pg") as pg_url:
            sides = {"local": local_side(base / "local", pipelines, args.max_trials)}
            show("local", sides["local"])
            for workers in (1, 2):
                name = f"cluster{workers}"
                sides[name] = cluster_side(base / name, pipelines, pg_url, workers, args.max_trials)
                show(name, sides[name])
            bookkept = bookkeeping(base / "bookkeeping", pg_url, args.partitions)
    report(sides, args.partitions, bookkept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
