"""A throwaway Dask cluster on loopback for tests: a real `dask scheduler` and `dask worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client, Event

from ml_assets_tests.postgres_server import free_port

REPO = Path(__file__).resolve().parents[1]
# Generous: starting a Python process that imports Dask takes seconds on a busy 2-core machine.
START_DEADLINE_S = 180.0


@dataclass
class DaskCluster:
    address: str
    base_dir: Path
    env: Mapping[str, str]
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self) -> Client:
        return Client(self.address, timeout=START_DEADLINE_S)

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers.values() if p.poll() is None}

    def start_worker(self, name: str) -> None:
        """A single-threaded worker process (no nanny: a killed worker stays dead) offering one unit of
        the `training` resource (wait_for_workers waits for it to join)."""
        self.workers[name] = _dask(
            "worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard",
            "--resources", "training=1", "--local-directory", str(self.base_dir / name),
            log=self.base_dir / f"{name}.log", env=self.env,
        )  # fmt: skip

    def wait_for_workers(self) -> None:
        """Until every live worker process has joined the scheduler."""
        with self.client() as client:
            client.wait_for_workers(len(self.worker_pids()), timeout=START_DEADLINE_S)

    def kill(self, name: str) -> None:
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait(timeout=60)

    def stop(self) -> None:
        for process in self.workers.values():
            _stop(process)


def _dask(*args: str, log: Path, env: Mapping[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@contextmanager
def running_dask(base_dir: Path, workers: int, env: Mapping[str, str]) -> Iterator[DaskCluster]:
    """A scheduler and `workers` single-threaded worker processes (no nanny: a killed worker stays dead),
    each offering one unit of the `training` resource; every process gets `env` and
    ML_ASSETS_DASK_SCHEDULER on top of ours. The
    scheduler gives up on a task whose worker died instead of running it again elsewhere, as the
    cluster's docs tell operators to start it."""
    base_dir.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    # Workers import the code location, which reads the same settings as every other process.
    env = {**env, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0", "ML_ASSETS_DASK_SCHEDULER": address}
    # Tasks of this module (holding a worker) unpickle on workers by importing it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with ExitStack() as stack:
        scheduler = _dask(
            "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard",
            log=base_dir / "scheduler.log", env=env,
        )  # fmt: skip
        stack.callback(_stop, scheduler)
        cluster = DaskCluster(address, base_dir, env)
        stack.callback(cluster.stop)
        for i in range(workers):
            cluster.start_worker(f"worker-{i}")
        cluster.wait_for_workers()
        yield cluster


def wait_until(condition, what: str, deadline_s: float = START_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def wait_for_release(name: str) -> None:
    Event(name).wait()


def queued_wants(prefix: str):
    """A scheduler function: how many clients want tasks whose key starts with `prefix`."""

    def count(dask_scheduler) -> int:
        return sum(
            len(ts.who_wants or ()) for key, ts in dask_scheduler.tasks.items() if str(key).startswith(prefix)
        )

    return count


def processing(prefix: str):
    """A scheduler function: how many tasks whose key starts with `prefix` are running on a worker."""

    def count(dask_scheduler) -> int:
        return sum(
            1
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith(prefix) and ts.state == "processing"
        )

    return count


@contextmanager
def workers_held(cluster: DaskCluster, deadline_s: float) -> Iterator[Callable[[str, int], None]]:
    """Keep every worker busy; the function yielded waits until `n` clients want tasks whose key starts
    with a prefix, then lets the workers go, so that the tasks submitted meanwhile were all queued on the
    scheduler at once (the workers are let go on leaving, in any case)."""
    with cluster.client() as client:
        workers = list(client.scheduler_info()["workers"])
        held = [
            client.submit(wait_for_release, "release", workers=[w], pure=False, key=f"hold-{w}")
            for w in workers
        ]
        release = Event("release", client=client)

        def release_when_wanted(prefix: str, n: int) -> None:
            wait_until(
                lambda: client.run_on_scheduler(queued_wants(prefix)) >= n, f"{n} queued task(s) {prefix}*"
            )
            release.set()

        try:
            yield release_when_wanted
        finally:
            release.set()
            client.gather(held)
