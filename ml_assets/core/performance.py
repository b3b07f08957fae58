"""The champion's real performance on labelled periods it never saw, recorded per period.

Labels arrive after predictions: each period (day, week or month) from the champion's own test split on
is scored with its real metric and stored next to the test score it was promoted on, so a sustained drop
can trigger retraining (see retrain_policy).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import polars as pl

from ml_assets.core import registry
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ConfigError
from ml_assets.core.metrics import improvement
from ml_assets.core.serve import ServableModel
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.sql import q
from ml_assets.core.store import PERFORMANCE_HISTORY, insert_many, transaction

TRUNCATE = {"day": "1d", "week": "1w", "month": "1mo"}


@dataclass(frozen=True)
class PerformanceRun:
    champion: str
    metric: str
    expected: float
    periods: pl.DataFrame


def run_performance(connect: Any, pipeline: PipelineSpec) -> PerformanceRun | None:
    """Score the champion on every labelled period from its own test split on (rows it never learned
    from) and record each period's metric against the test score it was promoted on. Only periods that
    begin after the data it was built from are judged: its test weeks were known when it was promoted,
    and a seasonal dip inside them is no news. None when there is no champion yet."""
    spec = pipeline.monitoring.performance
    if not pipeline.timestamp:
        raise ConfigError(f"pipeline '{pipeline.name}': performance monitoring needs a timestamp column")
    ts = q(pipeline.timestamp)
    with connect() as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if champion is None:
            return None
        model = ServableModel.from_registry(registry.registered(conn, champion, pipeline.name))
        manifest = model.manifest
        start = manifest.get("test_start") or manifest["train_window"]["end"]
        built_from = dt.datetime.fromisoformat(manifest.get("data_end") or start)
        rows = conn.execute(
            f"SELECT * FROM {table_name(pipeline)} WHERE {ts} >= CAST(? AS TIMESTAMP) ORDER BY {ts}", [start]
        ).pl()
    metric, expected = pipeline.metric, float(manifest["test_metrics"][pipeline.metric])
    rows = rows.with_columns(pl.col(pipeline.timestamp).dt.truncate(TRUNCATE[spec.period]).alias("_period"))
    scored = []
    for (period,), part in rows.group_by("_period", maintain_order=True):
        # A week of one class only has no ROC-AUC: scored as missing, never judged.
        scorable = pipeline.task == "regression" or part.get_column(pipeline.target.name).n_unique() > 1
        value = model.score(part, metric) if scorable else None
        change = (
            improvement(metric, value, expected) / abs(expected) if value is not None and expected else None
        )
        judged = part.height >= spec.min_rows and change is not None and period > built_from
        scored.append(
            (
                period,
                part.get_column(pipeline.timestamp).max(),
                part.height,
                value,
                change,
                change < -spec.tolerance if judged else None,
            )
        )
    periods = pl.DataFrame(
        scored,
        schema={
            "period_start": pl.Datetime("us"),
            "period_end": pl.Datetime("us"),
            "rows": pl.Int64,
            "score": pl.Float64,
            "change": pl.Float64,
            "degraded": pl.Boolean,
        },
        orient="row",
    )
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with connect() as conn, transaction(conn):
        # A period is rescored as more of its labels arrive: its row is replaced, never duplicated.
        conn.execute(
            f"DELETE FROM {PERFORMANCE_HISTORY} WHERE pipeline = ? AND champion = ?",
            [pipeline.name, champion],
        )
        insert_many(
            conn,
            PERFORMANCE_HISTORY,
            (
                r
                | {
                    "pipeline": pipeline.name,
                    "champion": champion,
                    "metric": metric,
                    "expected": expected,
                    "computed_at": now,
                }
                for r in periods.iter_rows(named=True)
            ),
        )
    return PerformanceRun(champion, metric, expected, periods)


PERIOD_LENGTH = {"day": dt.timedelta(days=1), "week": dt.timedelta(weeks=1), "month": dt.timedelta(days=28)}


def readable_periods(periods: pl.DataFrame, period: str) -> pl.DataFrame:
    """Newest first, for people: each period `judged` as `degraded`, `ok` or `not judged`, and a period
    whose labelled rows stop before its end (the latest, still filling up) marked `partial`, so a partial
    week's score is not read as a full week's."""
    partial = (pl.col("period_end") - pl.col("period_start")) < PERIOD_LENGTH[period] - dt.timedelta(days=1)
    return periods.sort("period_start", descending=True).select(
        pl.col("period_start").dt.strftime("%Y-%m-%d"),
        pl.when(partial).then(pl.lit("partial")).otherwise(pl.lit("")).alias("complete"),
        "rows",
        pl.col("score").round(4),
        pl.col("change").round(4),
        pl.when(pl.col("degraded").is_null())
        .then(pl.lit("not judged"))
        .when(pl.col("degraded"))
        .then(pl.lit("degraded"))
        .otherwise(pl.lit("ok"))
        .alias("judged"),
    )


def performance_history(conn: Any, pipeline: str) -> pl.DataFrame:
    return conn.execute(
        "SELECT champion, period_start, period_end, rows, metric, score, expected, change, degraded "
        f"FROM {PERFORMANCE_HISTORY} WHERE pipeline = ? ORDER BY champion, period_start",
        [pipeline],
    ).pl()
