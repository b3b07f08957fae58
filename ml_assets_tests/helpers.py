"""Helpers shared by several test modules (a test module imports from here or conftest.py, never from
another test module)."""

from __future__ import annotations

import datetime as dt
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl

from ml_assets.core import promotion, registry, tuning
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, load_project
from ml_assets.core.store import DATA_DIR_ENV, WAREHOUSE_ENV, connect, warehouse_path
from ml_assets.orchestration.deployments import DEPLOYMENT_ENV

ROOT = Path(__file__).resolve().parents[1]
# The flagship pipeline and the sources it reads.
FLAGSHIP = dg.AssetSelection.groups("flight_delay").upstream().required_multi_asset_neighbors()
# Its sources -> modelling table -> features -> model: a registered version, not yet judged by the gate.
FLAGSHIP_MODEL = (
    dg.AssetSelection.assets(dg.AssetKey(["flight_delay", "model"]))
    .upstream()
    .required_multi_asset_neighbors()
)


def local_deployment(root: Path) -> dict[str, str]:
    """The environment of a `local` deployment writing under `root`: a DAGSTER_HOME of its own with the
    project's dagster.yaml (SQLite), its data folder, no shared tables."""
    home = root / "home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return {
        DEPLOYMENT_ENV: "local",
        WAREHOUSE_ENV: "",
        DATA_DIR_ENV: str(root / "data"),
        "DAGSTER_HOME": str(home),
    }


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


@dataclass(frozen=True)
class GatedChampion:
    """The champion the gate chose (`gate_chooses_champion`) and the first champion it replaced."""

    champion: str  # the trained LightGBM version
    previous: str  # the constant baseline derived from it, registered as its own version


def gate_chooses_champion(pipelines: Path, root: Path, pipeline: str = "flight_delay") -> GatedChampion:
    """Set-up for tests that need a champion: the real gate (core/promotion.py) picks it between two models
    whose order is known by construction, instead of a test moving the alias by hand.

    The pipeline's latest trained version (LightGBM, registered by a run without the gate) and the constant
    baseline trained beside it (the training split's prior: every row scores the same, ROC-AUC exactly 0.5)
    are the two models. First the gate judges the version with a margin no model can reach (1.0 of
    ROC-AUC), so the first-champion ladder keeps its floor: the constant baseline becomes champion,
    registered as its own version (test_e2e proves that outcome). Then the pipeline's own gate judges the
    LightGBM version against that champion and promotes it: on the sample it ranks flights far better
    than a constant (ROC-AUC about 0.6-0.7, the bootstrap interval far above the 0.0005 margin).
    Both verdicts are asserted, so a gate that judged otherwise fails the set-up, not a later assert."""
    project = load_project(pipelines)
    spec = project.pipelines[pipeline]
    db = functools.partial(connect, warehouse_path(root))
    with db() as conn:
        assert registry.alias_version(conn, pipeline, registry.CHAMPION) is None, "a champion exists already"
        trained = registry.latest_version(conn, pipeline)
    unreachable = spec.model_copy(update={"gate": spec.gate.model_copy(update={"margin": 1.0})})
    first = promotion.promote_or_refuse(db, unreachable, trained)
    assert first.action == "promote_first" and first.details["champion_kind"] == "constant", first.reason
    second = promotion.promote_or_refuse(db, spec, trained)
    assert (second.action, second.champion_before, second.champion_after) == (
        "promote",
        first.champion_after,
        trained,
    ), second.reason
    return GatedChampion(trained, first.champion_after)


def copy_warehouse(source_root: Path, root: Path) -> None:
    """Put a copy of `source_root`'s warehouse at `root` (whose registry rows then point at the model
    folders under `source_root`: for tests that read the registry and write only monitoring rows)."""
    root.mkdir(parents=True, exist_ok=True)
    source, dest = warehouse_path(source_root), warehouse_path(root)
    for name in (source.name, source.name + ".wal"):
        # A write-ahead log left beside the destination would be replayed onto the copy.
        dest.with_name(name).unlink(missing_ok=True)
        if source.with_name(name).exists():
            shutil.copyfile(source.with_name(name), dest.with_name(name))


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


def insert_drift_runs(root, pipeline: str, windows: list[tuple[int, bool]]) -> str:
    """Set-up for the retrain sensor's tests: these drift results, measured against the pipeline's
    champion (which the gate chose: see `gate_chooses_champion` and the `gated_sample` fixture), in place
    of any earlier ones; returns the champion."""
    rows = drift_run_rows(*windows).with_columns(pl.lit(pipeline).alias("pipeline"))
    with connect(warehouse_path(root)) as conn:
        champion = registry.alias_version(conn, pipeline, registry.CHAMPION)
        assert champion is not None, f"pipeline '{pipeline}' has no champion to measure drift against"
        conn.execute("DELETE FROM monitor.drift_runs WHERE pipeline = ?", [pipeline])
        for r in rows.iter_rows(named=True):
            conn.execute(
                "INSERT INTO monitor.drift_runs (id, pipeline, computed_at, champion, window_start, window_end, "
                "current_rows, reference_rows, drift_share, dataset_drift, drifted, report) "
                "VALUES (?, ?, ?, ?, NULL, ?, 1, 1, ?, ?, ?, '')",
                [
                    r["id"],
                    r["pipeline"],
                    r["computed_at"],
                    champion,
                    r["window_end"],
                    r["drift_share"],
                    r["dataset_drift"],
                    r["drifted"],
                ],
            )
    return champion


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


def slow_boosting(monkeypatch, round_s: float) -> None:
    """Every LightGBM boosting round sleeps `round_s`: fits long enough for a deadline to cut them."""
    real_train = lgb.train

    def slow_train(*args, **kwargs):
        def sleep(env):
            time.sleep(round_s)

        kwargs["callbacks"] = [sleep, *kwargs.get("callbacks", [])]
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lgb, "train", slow_train)


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
