"""Serving the flagship: online latency of the REST API and the batch asset's throughput, in one run.

Trains `flight_delay` on the recorded year (one fixed tuning trial; monthly partitions, as the tests),
makes its model champion, then:
- batch: materializes `flight_delay/predictions` over every partition and takes the step's own duration
  (reading the modelling table, features, scoring, writing the scores) against a bare `Booster.predict` of
  the same rows' feature matrix (one thread, as the project scores): `batch_ratio` = asset rows/s ÷ bare
  rows/s;
- online: starts `ml-assets serve flight_delay` on a free loopback port and sends single-row requests of
  test flights at a fixed rate (open loop: request i leaves at start + i/rate) for a fixed time, one
  keep-alive connection (the standard library's http.client); latency is measured by the client, end to
  end, and requests that left late because the previous answer was slow are counted.

Bounded: at most rate × duration requests, each with a timeout, and an overall deadline; the server is
stopped whatever happens. Last line:
    serve_p50_ms=<p50> serve_p99_ms=<p99> rps=<completed requests/s> batch_ratio=<ratio>
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import polars as pl
import yaml

from ml_assets.core import registry, rollback
from ml_assets.core.dataset import table_name
from ml_assets.core.ingest import package_file
from ml_assets.core.serving import request_parsing
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, default_pipelines_dir, load_project
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.partitions import all_partitions_tags

PIPELINE = "flight_delay"
PREDICTIONS = dg.AssetKey([PIPELINE, "predictions"])


def write_pipeline(dest: Path, every: int, serving: dict[str, float]) -> Path:
    """flight_delay alone, its sources read whole from the package (every `every`-th flight), monthly;
    `serving` overrides its serving block (to measure what the poller and the request log cost)."""
    dest.mkdir(parents=True)
    raw = yaml.safe_load((default_pipelines_dir() / f"{PIPELINE}.yaml").read_text())
    raw["model"] |= {"max_trials": 1, "time_budget_s": 1e9, "cv_folds": 2}
    if serving:
        raw["serving"] = raw.get("serving", {}) | serving
    for name, source in raw["sources"].items():
        replay = source.pop("replay", None)
        if source.pop("landing", False):
            source["path"] = replay["path"]
        if "partitions" in source:
            source["partitions"] = source["partitions"] | {"granularity": "monthly", "end": "2014-02-01"}
        if name == "flights" and every > 1:
            with zipfile.ZipFile(package_file(source["path"])) as archive:
                flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False)
            flights.gather_every(every).write_csv(dest / "flights.csv")
            source["path"] = str(dest / "flights.csv")
    (dest / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def train(pipelines: Path, root: Path) -> None:
    defs = build_definitions(pipelines, root)
    monitors = dg.AssetSelection.assets(
        *(dg.AssetKey([PIPELINE, a]) for a in ("drift_report", "performance"))
    )
    selection = dg.AssetSelection.all() - monitors - dg.AssetSelection.assets(PREDICTIONS)
    tags = all_partitions_tags(load_project(pipelines))
    assert dg.materialize(list(defs.assets), resources=defs.resources, selection=selection, tags=tags).success
    db = functools.partial(connect, warehouse_path(root))
    with db() as conn:
        latest = registry.latest_version(conn, PIPELINE)
        champion = registry.alias_version(conn, PIPELINE, registry.CHAMPION)
    if champion is None:  # the gate refused a first model: the operator's manual move, as in the tests
        project = load_project(pipelines)
        spec = project.pipelines[PIPELINE]
        rollback.rollback(db, spec, project.sources_of(spec), to=latest)


def batch(pipelines: Path, root: Path) -> tuple[int, float, float]:
    """(rows, the predictions step's seconds, a bare Booster.predict's seconds on the same rows)."""
    defs = build_definitions(pipelines, root)
    tags = all_partitions_tags(load_project(pipelines))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        list(defs.assets), resources=defs.resources, selection=[PREDICTIONS], tags=tags, instance=instance
    )
    stamps = {
        e.dagster_event.event_type_value: e.timestamp
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is not None and e.dagster_event.step_key
    }
    step_s = stamps["STEP_SUCCESS"] - stamps["STEP_START"]
    # The run's metadata is on its last partition (orchestration.metadata.once_per_range).
    last = max(result.get_asset_materialization_events(), key=lambda e: e.partition or "")
    rows = int(last.materialization.metadata["rows"].value)
    with connect(warehouse_path(root)) as conn:
        found = registry.registered(conn, registry.alias_version(conn, PIPELINE, registry.CHAMPION), PIPELINE)
        frame = conn.execute(f"SELECT * FROM {table_name(load_project(pipelines).pipelines[PIPELINE])}").pl()
    model = ServableModel.from_registry(found)
    matrix = model.transform.apply(frame).select(model.manifest.features).to_numpy().astype(np.float64)
    bare = []
    for _ in range(3):
        started = time.perf_counter()
        model.booster.predict(matrix, num_threads=1)
        bare.append(time.perf_counter() - started)
    return rows, step_s, statistics.median(bare)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> None:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    if response.status != 200:
        raise SystemExit(f"POST {path} answered {response.status}: {answer[:500]!r}")


def load(
    pipelines: Path, root: Path, rate: float, duration: float, deadline: float
) -> tuple[list[float], float, int]:
    """Latencies (ms) of single-row requests sent at `rate` for `duration` s, the achieved rate, and how
    many requests left more than 1 ms after their scheduled time (the previous answer was late)."""
    project = load_project(pipelines)
    spec = project.pipelines[PIPELINE]
    with connect(warehouse_path(root)) as conn:
        rows = conn.execute(f"SELECT * FROM {table_name(spec)} WHERE _split = 'test' LIMIT 1000").pl()
    bodies = request_parsing.request_rows(
        rows, list(request_parsing.request_fields(spec, project.sources_of(spec)))
    )
    port = _free_port()
    env = os.environ | {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}
    server = subprocess.Popen(
        [sys.executable, "-m", "ml_assets.cli", "serve", PIPELINE, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not become ready: {server.communicate()[1][-2000:]}")
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        # The load itself through the standard library's client on one keep-alive connection: httpx
        # costs ~1.5 ms per request on this machine, which would be the client's time, not the server's.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        path = f"/v1/{PIPELINE}/predict"
        encoded = [json.dumps(b).encode() for b in bodies]
        for body in encoded[:200]:  # warm-up, not measured
            _post(conn, path, body)
        latencies, late, count = [], 0, int(rate * duration)
        started = time.perf_counter()
        for i in range(count):
            due = started + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            # Sustained for `duration`: requests the server could not keep up with are not sent late.
            if time.perf_counter() - started > duration or time.monotonic() > deadline:
                break
            sent = time.perf_counter()
            late += sent - due > 0.001
            _post(conn, path, encoded[i % len(encoded)])
            latencies.append((time.perf_counter() - sent) * 1000)
        conn.close()
        return latencies, len(latencies) / (time.perf_counter() - started), late
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of requests")
    parser.add_argument("--every", type=int, default=1, help="keep every n-th flight (1: the whole year)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument(
        "--poll-s", type=float, help="serving.poll_s of the served pipeline (default: its own)"
    )
    parser.add_argument(
        "--log-sample", type=float, help="serving.request_log_sample (default: its own; 0: no request log)"
    )
    args = parser.parse_args()
    serving = {
        k: v for k, v in (("poll_s", args.poll_s), ("request_log_sample", args.log_sample)) if v is not None
    }
    deadline = time.monotonic() + args.deadline
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        pipelines, root = write_pipeline(Path(tmp) / "pipelines", args.every, serving), Path(tmp) / "data"
        started = time.monotonic()
        train(pipelines, root)
        print(f"trained in {time.monotonic() - started:.1f} s")
        rows, step_s, bare_s = batch(pipelines, root)
        ratio = (rows / step_s) / (rows / bare_s)
        print(
            f"batch: {rows} rows, predictions step {step_s:.2f} s ({rows / step_s:,.0f} rows/s); "
            f"bare Booster.predict {bare_s:.3f} s ({rows / bare_s:,.0f} rows/s)"
        )
        latencies, rps, late = load(pipelines, root, args.rate, args.duration, deadline)
    p50, p99 = np.percentile(latencies, [50, 99])
    print(
        f"online: {len(latencies)} single-row requests in {args.duration:g} s (target {args.rate:g}/s); "
        f"p90 {np.percentile(latencies, 90):.2f} ms, max {max(latencies):.2f} ms; {late} sent over 1 ms late; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"serve_p50_ms={p50:.2f} serve_p99_ms={p99:.2f} rps={rps:.1f} batch_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
