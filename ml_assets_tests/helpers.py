"""Helpers shared by several test modules (a test module imports from here or conftest.py, never from
another test module)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pandas as pd
import polars as pl

from ml_assets.core import registry, tuning
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import connect, warehouse_path

ROOT = Path(__file__).resolve().parents[1]
# The flagship pipeline and the sources it reads.
FLAGSHIP = dg.AssetSelection.groups("flight_delay").upstream().required_multi_asset_neighbors()


def validate_definitions(pipelines_dir: Path | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != PIPELINES_DIR_ENV}
    tmp_path.mkdir(parents=True, exist_ok=True)
    env["DAGSTER_HOME"] = str(tmp_path)
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    if pipelines_dir is not None:
        env[PIPELINES_DIR_ENV] = str(pipelines_dir)
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_registry_consistent(root: Path) -> str:
    """Every alias points at a registered, intact, loadable version; the log agrees with the alias."""
    with connect(warehouse_path(root)) as conn:
        champion = registry.alias_version(conn, "flight_delay", registry.CHAMPION)
        challenger = registry.alias_version(conn, "flight_delay", registry.CHALLENGER)
        paths = [Path(p) for (p,) in conn.execute("SELECT path FROM registry.model_versions").fetchall()]
        last = registry.decisions(conn, "flight_delay").row(-1, named=True)
        champion_dir = registry.version_dir(conn, champion)
        registry.version_dir(conn, challenger)
    assert last["champion_after"] == champion
    for path in paths:
        registry.read_manifest(path)  # present and hash-verified
    ServableModel.load(champion_dir)
    return champion


def drift_run_rows(*windows: tuple[int, bool]) -> pl.DataFrame:
    """monitor.drift_runs rows (as drift.drift_runs returns them): (day of the window end, dataset drift?) in time order."""
    base = dt.datetime(2013, 7, 1)
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(len(windows))],
            "champion": ["v1"] * len(windows),
            "computed_at": [base + dt.timedelta(hours=i) for i in range(len(windows))],
            "window_end": [base + dt.timedelta(days=d) for d, _ in windows],
            "drift_share": [0.6 if drifted else 0.0 for _, drifted in windows],
            "dataset_drift": [drifted for _, drifted in windows],
            "drifted": [["wx_temp"] if drifted else [] for _, drifted in windows],
        }
    )


def insert_drift_runs(root, pipeline: str, windows: list[tuple[int, bool]]) -> None:
    """Set-up for the retrain sensor's tests: a champion alias 'v1' (no model behind it: the sensor reads only
    the alias and the monitoring tables) and these drift results, measured against it."""
    rows = drift_run_rows(*windows).with_columns(pl.lit(pipeline).alias("pipeline"))
    with connect(warehouse_path(root)) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO registry.aliases VALUES (?, 'champion', 'v1', now())", [pipeline]
        )
        conn.execute("DELETE FROM monitor.drift_runs WHERE pipeline = ?", [pipeline])
        for r in rows.iter_rows(named=True):
            conn.execute(
                "INSERT INTO monitor.drift_runs (id, pipeline, computed_at, champion, window_start, window_end, "
                "current_rows, reference_rows, drift_share, dataset_drift, drifted, report) "
                "VALUES (?, ?, ?, 'v1', NULL, ?, 1, 1, ?, ?, ?, '')",
                [
                    r["id"],
                    r["pipeline"],
                    r["computed_at"],
                    r["window_end"],
                    r["drift_share"],
                    r["dataset_drift"],
                    r["drifted"],
                ],
            )


def wait_until_answers(
    proc: subprocess.Popen, answers: Callable[[], bool], deadline_s: float, what: str
) -> None:
    """Poll a server a test started until `answers()` (a transport error counts as not yet), failing at
    once if the process exits and after `deadline_s` seconds if it never answers."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if answers():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer within {deadline_s} s"
        time.sleep(0.2)


def synthetic_frame(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Features a (numeric), b (numeric, 10% missing), c (4 categories as codes); a binary label and
    the value it thresholds, from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
            "c": rng.integers(0, 4, size=n).astype(np.int32),
        }
    )
    z = X["a"] - 0.5 * X["b"].fillna(0) + 0.7 * (X["c"] == 2) + rng.normal(scale=0.5, size=n)
    return X, (z > 0).astype(int).to_numpy(), z.to_numpy()


def synthetic_spec(model: dict, task: str = "binary", **fields: object) -> PipelineSpec:
    """A pipeline over synthetic rows, with these model settings (and other fields: split, timestamp)."""
    return PipelineSpec.model_validate(
        {
            "name": "synthetic",
            "task": task,
            "base": "s",
            "target": {"name": "y"},
            "features": [{"name": "a", "type": "numeric"}],
            "split": {"method": "random"},
            "model": model,
        }
        | fields
    )


def synthetic_training_data(n: int) -> tuning.TrainingData:
    """n synthetic rows split in halves and quarters: train, valid, test."""
    X, y, _ = synthetic_frame(n, 7)
    parts = {}
    for name, idx in (
        ("train", slice(0, n // 2)),
        ("valid", slice(n // 2, 3 * n // 4)),
        ("test", slice(3 * n // 4, n)),
    ):
        keys = np.arange(n)[idx].astype(str)
        parts[name] = tuning.Split(X.iloc[idx].reset_index(drop=True), y[idx], keys, keys)
    return tuning.TrainingData(
        **parts, features=["a", "b", "c"], categorical=["c"], classes=[0, 1], time_window={}
    )
