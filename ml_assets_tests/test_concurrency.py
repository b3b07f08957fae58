"""Two runs on one data directory, interleaved in a known order: run A is held right after its model step
registered its version (RunPause, a Unix socket), run B trains, promotes and monitors in full meanwhile,
then A goes on. When A judges its model, B's version is both the latest registered and the champion, so
a hand-off by "latest" (or by alias) makes A judge B's version, which this test catches; every step of A
must judge what A trained, and every monitor and score row must name the run and the version it judged.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV, LOCK_WAIT_ENV, connect, warehouse_path
from ml_assets.orchestration.resources import PAUSE_SOCKET_ENV

# Generous on purpose: a whole run on a loaded 2-core machine. Deadlines only: nothing waits on a clock.
DEADLINE_S = 1800


@contextmanager
def pause_socket() -> Iterator[socket.socket]:
    # A short folder of its own: a Unix socket's path is limited to 107 bytes, pytest's tmp_path can be longer.
    folder = tempfile.mkdtemp(prefix="pause-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.path.join(folder, "s"))
        listener.listen(1)
        yield listener
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)


def wait_until_held(listener: socket.socket, run: subprocess.Popen) -> tuple[socket.socket, str, bytes]:
    """The connection of the held run, what it sent, and its output so far; fails if it ends first."""
    output = b""
    deadline = time.monotonic() + DEADLINE_S
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([listener, run.stdout], [], [], left)
        if listener in ready:
            held, _ = listener.accept()
            message = b""
            while not message.endswith(b"\n"):
                chunk = held.recv(256)
                assert chunk, "the held run closed the pause socket without saying which version it holds"
                message += chunk
            return held, message.decode().strip(), output
        if run.stdout in ready:
            chunk = os.read(run.stdout.fileno(), 65536)
            assert chunk, f"run A ended before its model step was held:\n{output.decode(errors='replace')}"
            output += chunk
    raise AssertionError(f"run A was not held within {DEADLINE_S} s:\n{output.decode(errors='replace')}")


def finished(run: subprocess.Popen, before: bytes = b"") -> tuple[str, str]:
    """(run id, whole output) of a CLI run that must succeed."""
    out = (before + run.communicate(timeout=DEADLINE_S)[0]).decode(errors="replace")
    assert run.returncode == 0, out
    assert "test roc_auc: model" in out
    return re.search(r"ml_assets run (\S+): SUCCESS", out).group(1), out


def test_a_run_held_after_registering_judges_its_own_version_while_another_promotes(sample_project):
    pipelines, root = sample_project
    # One pipeline is enough to interleave two runs; the second shipped one would only double the wait.
    (pipelines / "flight_arr_delay.yaml").unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", PAUSE_SOCKET_ENV)}
    env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines), LOCK_WAIT_ENV: str(DEADLINE_S)}
    cmd = [sys.executable, "-m", "ml_assets.cli", "run"]

    def start(extra: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env | extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    with pause_socket() as listener:
        a = start({PAUSE_SOCKET_ENV: listener.getsockname()})
        try:
            held, message, a_output = wait_until_held(listener, a)
            held_run, held_version = message.split()
            # B runs from start to end (ingest, train, gate, champion, scores, monitors) while A is held.
            run_b, _ = finished(start({}))
            held.sendall(b"go")
            held.close()
            run_a, _ = finished(a, a_output)
        finally:
            if a.poll() is None:
                a.kill()
                a.wait()
    assert held_run == run_a

    with connect(warehouse_path(root)) as conn:
        # Trained versions; a baseline a first promotion registered is derived from one (no run of its own).
        trained = dict(
            conn.execute(
                "SELECT run_id, version FROM registry.model_versions "
                "WHERE json_extract_string(manifest, '$.derived_from') IS NULL"
            ).fetchall()
        )
        gates = conn.execute(
            "SELECT run_id, challenger, champion_after FROM registry.decision_log WHERE action IN "
            "('promote_first', 'promote', 'refuse') ORDER BY decided_at"
        ).fetchall()
        champion = conn.execute("SELECT version FROM registry.aliases WHERE alias = 'champion'").fetchone()[0]
        drift = dict(conn.execute("SELECT run_id, champion FROM monitor.drift_runs").fetchall())
        scored = conn.execute("SELECT DISTINCT run_id, version FROM flight_delay.predictions").fetchall()
        performance = conn.execute(
            "SELECT DISTINCT run_id, champion FROM monitor.performance_history"
        ).fetchall()
    assert trained[run_a] == held_version and set(trained) == {run_a, run_b}
    # The interleaving happened: B's gate decided first, on B's version, registered after A's.
    assert [g[0] for g in gates] == [run_b, run_a]
    # Each run's gate judged the version that same run trained, not the other run's (nor "the latest").
    assert {run: judged for run, judged, _ in gates} == trained
    after_b = gates[0][2]
    # Each run's monitors judged the champion its own champion step settled: B's after B's gate, A's
    # (the last to settle) the one that serves now.
    assert drift == {run_b: after_b, run_a: champion}
    # A re-scored every partition after B: each row names A's run and the champion A settled.
    assert scored == [(run_a, champion)]
    assert (run_a, champion) in performance
