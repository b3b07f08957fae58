"""Two runs at once on one data directory: DuckDB allows one writer per file, so steps wait their turn
(short-lived connections, retried on the lock) instead of failing with "Could not set lock on file", and
each run's evaluation and promotion judge the model that run trained, whatever the other registered."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV, LOCK_WAIT_ENV, connect, warehouse_path

# Generous on purpose: on a loaded 2-core machine one run can wait minutes for the other's lock.
DEADLINE_S = 1800


def test_two_concurrent_cli_runs_both_succeed_and_each_promotes_its_own_model(sample_project):
    pipelines, root = sample_project
    # One pipeline is enough to race two runs; the second shipped one would only double the wait.
    (pipelines / "flight_arr_delay.yaml").unlink()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines), LOCK_WAIT_ENV: str(DEADLINE_S)}
    cmd = [sys.executable, "-m", "ml_assets.cli", "run"]
    runs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=DEADLINE_S)[0] for p in runs]
    run_ids = []
    for proc, out in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert "test roc_auc: model" in out
        run_ids.append(re.search(r"ml_assets run (\S+): SUCCESS", out).group(1))
    with connect(warehouse_path(root)) as conn:
        # Trained versions; a baseline the first promotion registered is derived from one (no run of its own).
        trained = dict(
            conn.execute(
                "SELECT run_id, version FROM registry.model_versions "
                "WHERE json_extract_string(manifest, '$.derived_from') IS NULL"
            ).fetchall()
        )
        judged = dict(
            conn.execute(
                "SELECT run_id, challenger FROM registry.decision_log WHERE action IN "
                "('promote_first', 'promote', 'refuse')"
            ).fetchall()
        )
        raw, valid, bad = conn.execute(
            "SELECT (SELECT count(*) FROM raw.flights), (SELECT count(*) FROM "
            "validated.flights), (SELECT count(*) FROM quarantine.flights)"
        ).fetchone()
    assert sorted(trained) == sorted(run_ids)
    # Each run's gate judged the version that same run trained, not the other run's (nor "the latest").
    assert judged == trained
    assert raw == valid + bad > 0
