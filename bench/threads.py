"""LightGBM threads per fit: the same fit with 1, 2 and LightGBM's default (one per core) threads.

    .venv/bin/python bench/threads.py [--rows 200000] [--repeat 3]

Prints each setting's median wall time and its ratio to one thread, measured in the same run, so the
ratio is about this machine as loaded now (run it on an idle machine and on a busy one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightgbm as lgb
import numpy as np


def fit_seconds(X: np.ndarray, y: np.ndarray, threads: int | None) -> float:
    params = {
        "objective": "binary",
        "verbosity": -1,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
    }
    if threads is not None:
        params["num_threads"] = threads
    started = time.perf_counter()
    lgb.train(params, lgb.Dataset(X, y), num_boost_round=200)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 20))
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=args.rows) > 0).astype(int)
    settings = {"1 thread": 1, "2 threads": 2, f"default ({os.cpu_count()} cores)": None}
    times = {name: [] for name in settings}
    for _ in range(args.repeat):  # interleaved, so a change of load hits every setting alike
        for name, threads in settings.items():
            times[name].append(fit_seconds(X, y, threads))
    one = statistics.median(times["1 thread"])
    print(
        f"{args.rows} rows x 20 features, 200 rounds, median of {args.repeat}; load {os.getloadavg()[0]:.1f}"
    )
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"  {name:<22} {median:6.2f} s   x{median / one:.2f} of one thread")


if __name__ == "__main__":
    main()
