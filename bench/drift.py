"""Bounded Evidently vs full Evidently on 1M-row windows with synthetic shifts of known size.

Each trial draws a current window (1M rows over 30 days) from the reference distribution and shifts a
few columns: numeric columns by 0.25, 0.5 or 1.0 standard deviations, categorical columns by moving
probability mass. Full: Evidently's DataDriftPreset (same methods and threshold) on the whole reference
and window, as a user would run it. Bounded: ml_assets.core.drift.detect_drift (one ValueDrift metric per
column) on a 50k-row reference sample (drawn once, as it is once per model version) and a 50k-row
window sample stratified by day. Also timed: detect_drift on the full data, to separate the gain of
sampling from the gain of skipping the preset's repeated work. Last line:
    drift_speedup=<full time / bounded time> verdict_agreement=<share of trials with the same drifted set>
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

import numpy as np
import polars as pl
from evidently import Report
from evidently.presets import DataDriftPreset

from ml_assets.core.dataset import bounded_sample
from ml_assets.core.drift import DEFAULT_BOUND, column_drift, detect_drift, evidently_dataset

CATEGORIES = [f"k{i}" for i in range(8)]
NUMERIC_SHIFTS = (0.25, 0.5, 1.0)


def window(
    rng: np.random.Generator, rows: int, numeric: int, categorical: int, shifts: dict[str, float]
) -> pl.DataFrame:
    start = dt.datetime(2013, 1, 1)
    data: dict[str, object] = {
        "ts": [start + dt.timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 30 * 86400, rows))]
    }
    for i in range(numeric):
        mean, scale = i * 3.0, 1.0 + i % 4
        data[f"x{i}"] = rng.normal(mean + shifts.get(f"x{i}", 0.0) * scale, scale, rows)
    base = np.linspace(2, 1, len(CATEGORIES))
    for i in range(categorical):
        p = base / base.sum()
        if f"c{i}" in shifts:  # move mass from the most common category to the rarest
            p = p.copy()
            p[0] -= shifts[f"c{i}"]
            p[-1] += shifts[f"c{i}"]
        data[f"c{i}"] = rng.choice(CATEGORIES, size=rows, p=p)
    return pl.DataFrame(data)


def preset_drift(
    reference: pl.DataFrame, current: pl.DataFrame, numerical: list[str], categorical: list[str]
) -> set[str]:
    preset = DataDriftPreset(
        columns=[*numerical, *categorical],
        num_method="wasserstein",
        cat_method="jensenshannon",
        threshold=0.1,
    )
    snapshot = Report([preset], include_tests=True).run(
        evidently_dataset(current, numerical, categorical),
        evidently_dataset(reference, numerical, categorical),
    )
    return {c.column for c in column_drift(snapshot) if c.drifted}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="200k rows x 10 columns, 3 trials (under a minute)"
    )
    parser.add_argument("--trials", type=int)
    args = parser.parse_args()
    rows, numeric, categorical, trials = (200_000, 8, 2, 3) if args.quick else (1_000_000, 16, 4, 5)
    trials = args.trials or trials
    rng = np.random.default_rng(0)
    numerical_cols = [f"x{i}" for i in range(numeric)]
    categorical_cols = [f"c{i}" for i in range(categorical)]
    reference = window(rng, rows, numeric, categorical, {})
    reference_sample = bounded_sample(reference, DEFAULT_BOUND, "ts", seed=1)
    full_s, same_metrics_s, bounded_s = [], [], []
    agree, detected, injected, false_alarms, unshifted = 0, 0, 0, 0, 0
    for trial in range(trials):
        # Trial 0 is stationary; the others shift 1-3 numeric columns and maybe one categorical column.
        shifts: dict[str, float] = {}
        if trial:
            for col in rng.choice(numerical_cols, size=rng.integers(1, 4), replace=False):
                shifts[str(col)] = float(rng.choice(NUMERIC_SHIFTS))
            if rng.random() < 0.5:
                shifts[str(rng.choice(categorical_cols))] = 0.1
        current = window(rng, rows, numeric, categorical, shifts)
        started = time.perf_counter()
        full = preset_drift(reference, current, numerical_cols, categorical_cols)
        full_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        same_metrics = detect_drift(reference, current, numerical_cols, categorical_cols)
        same_metrics_s.append(time.perf_counter() - started)
        assert set(same_metrics.drifted) == full, "ValueDrift per column must match the preset's verdicts"
        started = time.perf_counter()
        bounded = detect_drift(
            reference_sample,
            bounded_sample(current, DEFAULT_BOUND, "ts", seed=trial),
            numerical_cols,
            categorical_cols,
        )
        bounded_s.append(time.perf_counter() - started)
        same = full == set(bounded.drifted)
        agree += same
        detected += len(set(shifts) & set(bounded.drifted))
        injected += len(shifts)
        false_alarms += len(set(bounded.drifted) - set(shifts))
        unshifted += numeric + categorical - len(shifts)
        print(
            f"trial {trial}: shifted {shifts or 'nothing'}; full {sorted(full)} in {full_s[-1]:.1f} s "
            f"(same metrics on full data {same_metrics_s[-1]:.1f} s); "
            f"bounded {sorted(bounded.drifted)} in {bounded_s[-1]:.2f} s; same={same}",
            file=sys.stderr,
        )
    print(
        f"rows={rows} columns={numeric + categorical} trials={trials} injected_shifts_detected="
        f"{detected}/{injected} false_alarms={false_alarms}/{unshifted} full_preset_s={np.median(full_s):.2f} "
        f"full_same_metrics_s={np.median(same_metrics_s):.2f} bounded_s={np.median(bounded_s):.2f} "
        f"sampling_only_speedup={np.median(same_metrics_s) / np.median(bounded_s):.1f}"
    )
    print(
        f"drift_speedup={np.median(full_s) / np.median(bounded_s):.1f} verdict_agreement={agree / trials:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
