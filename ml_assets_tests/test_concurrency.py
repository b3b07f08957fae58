"""Two runs at once on one data directory: DuckDB allows one writer per file, so steps wait their turn
(short-lived connections, retried on the lock) instead of failing with "Could not set lock on file"."""

from __future__ import annotations

import os
import subprocess
import sys

from ml_assets.resources import DATA_DIR_ENV, PIPELINES_DIR_ENV, connect, warehouse_path


def test_two_concurrent_cli_runs_both_succeed(sample_project):
    pipelines, root = sample_project
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}
    cmd = [sys.executable, "-m", "ml_assets.cli", "run"]
    runs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    for proc, out in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert "SUCCESS" in out and "test roc_auc: model" in out
    with connect(warehouse_path(root)) as conn:
        per_pipeline = dict(
            conn.execute("SELECT pipeline, count(*) FROM registry.model_versions GROUP BY 1").fetchall()
        )
        raw, valid, bad = conn.execute(
            "SELECT (SELECT count(*) FROM raw.flights), (SELECT count(*) FROM "
            "validated.flights), (SELECT count(*) FROM quarantine.flights)"
        ).fetchone()
    assert per_pipeline == {"flight_delay": 2, "flight_arr_delay": 2}
    assert raw == valid + bad > 0
