"""Drift monitoring on the real data: false alarms on stationary windows, and detection of injected
shifts on the champion's most important features.

Each window is `window_days` consecutive days, each a whole day of the champion's training period with
the same weekday (exactly what `ml-assets replay --resample-from` drops), passed through the champion's
saved transform,
bounded like the asset's window and compared with the champion's stored reference. Per column: the
median, 95th percentile and maximum score over all windows, and how often it crossed the default
threshold and the configured one. Then, in the same windows, each of the champion's `--top` most
important features (LightGBM gain) in turn is shifted by `--shift-sd` reference standard deviations
(a categorical feature: that share of rows moved to its rarest category) and checked for a drift verdict
on that column. Needs a champion: run `make run` first. Last line:
    false_alarm_rate=<share of windows with dataset drift under the config> detection_rate=<share of
    shifted (window, feature) pairs flagged> windows=<n>
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import polars as pl

from ml_assets.core import registry
from ml_assets.core.dataset import bounded_sample, table_name
from ml_assets.core.drift import check_window, drift_reference, watched_features
from ml_assets.core.ingest.replay import Resample
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, data_dir, warehouse_path

FAR = dt.date(2030, 1, 7)  # any Monday: the window's days only need their weekdays


def shift(
    frame: pl.DataFrame, reference: pl.DataFrame, column: str, categorical: bool, sd: float
) -> pl.DataFrame:
    if categorical:
        rarest = reference.get_column(column).drop_nulls().value_counts().sort("count").row(0)[0]
        moved = pl.int_range(pl.len()).shuffle(seed=0) < pl.len() * sd
        return frame.with_columns(pl.when(moved).then(pl.lit(rarest)).otherwise(pl.col(column)).alias(column))
    return frame.with_columns(pl.col(column) + sd * reference.get_column(column).std())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", default="flight_delay")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--shift-sd", type=float, default=0.25)
    args = parser.parse_args(argv)
    pipeline = load_project(default_pipelines_dir()).pipelines[args.pipeline]
    spec = pipeline.monitoring
    with connect(warehouse_path(data_dir())) as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if champion is None:
            print(f"no champion for {pipeline.name}: run `make run` first", file=sys.stderr)
            return 1
        version = registry.registered(conn, champion, pipeline.name)
        version_dir = version.path
        model = ServableModel.from_registry(version)
        window = model.manifest.train_window
        ts = pipeline.timestamp
        rows = conn.execute(
            f'SELECT * FROM {table_name(pipeline)} WHERE "{ts}" BETWEEN CAST(? AS TIMESTAMP) AND CAST(? AS TIMESTAMP)',
            [window["start"], window["end"]],
        ).pl()
    features = model.transform.apply(rows).with_columns(rows.get_column(ts).alias("_ts"))
    features = features.with_columns(pl.col("_ts").dt.date().alias("_day"))
    reference = drift_reference(pipeline, Path(version_dir))
    numerical, categorical = watched_features(pipeline, model.manifest)
    days = features.get_column("_day").unique().sort().to_list()
    scores: dict[str, list[float]] = {c: [] for c in [*numerical, *categorical]}
    alarms = 0
    gain = model.booster.feature_importance(importance_type="gain")
    top = [name for _, name in sorted(zip(gain, model.booster.feature_name(), strict=True), reverse=True)][
        : args.top
    ]
    detected = {c: 0 for c in top}
    print(
        f"{pipeline.name}: champion {champion}, {len(days)} training days, {args.windows} windows of "
        f"{spec.window_days} days"
    )
    for i in range(args.windows):
        resample = Resample(days[0], days[-1], seed=args.seed + i)
        drawn = pl.DataFrame(
            {"_day": [resample.day_for(FAR + dt.timedelta(days=d)) for d in range(spec.window_days)]}
        )
        current = bounded_sample(drawn.join(features, on="_day"), spec.sample_rows, "_ts", seed=i)
        result = check_window(spec, reference, current, numerical, categorical)
        alarms += result.dataset_drift
        for c in result.columns:
            scores[c.column].append(c.score)
        for column in top:
            kind = ([], [column]) if column in categorical else ([column], [])
            shifted = shift(current, reference, column, column in categorical, args.shift_sd)
            check = check_window(spec, reference, shifted, *kind)
            detected[column] += check.columns[0].drifted
    table = pl.DataFrame(
        [
            (
                c,
                float(np.median(v)),
                float(np.quantile(v, 0.95)),
                max(v),
                float(np.mean(np.array(v) > spec.threshold)),
                spec.column_thresholds.get(c, spec.threshold),
                float(np.mean(np.array(v) > spec.column_thresholds.get(c, spec.threshold))),
            )
            for c, v in scores.items()
        ],
        schema=["column", "median", "p95", "max", f"over_{spec.threshold}", "configured", "over_configured"],
        orient="row",
    ).sort("p95", descending=True)
    with pl.Config(tbl_rows=60, tbl_width_chars=160, float_precision=3):
        print(table)
    print(f"date={dt.date.today()} drift_share_threshold={spec.drift_share}")
    for column in top:
        print(f"shift {args.shift_sd} sd on {column}: detected in {detected[column]}/{args.windows} windows")
    rate = sum(detected.values()) / (args.windows * len(top))
    print(f"false_alarm_rate={alarms / args.windows:.3f} detection_rate={rate:.3f} windows={args.windows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
