"""The champion's real performance on labelled periods it never saw, recorded per period.

Labels arrive after predictions: each period (day, week or month) from the champion's own test split on
is scored with its real metric and stored next to the test score it was promoted on, so a sustained drop
can trigger retraining (see retrain_policy).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from ml_assets.core import registry
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ConfigError
from ml_assets.core.metrics import improvement
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import PerformanceSpec, PipelineSpec
from ml_assets.core.sql import q
from ml_assets.core.store import PERFORMANCE_HISTORY, Connect, insert_many, transactions

TRUNCATE = {"day": "1d", "week": "1w", "month": "1mo"}


@dataclass(frozen=True)
class PerformanceRun:
    champion: str
    metric: str
    expected: float
    periods: pl.DataFrame


def run_performance(
    connect: Connect, pipeline: PipelineSpec, champion: str | None, run_id: str | None = None
) -> PerformanceRun | None:
    """Score the champion (the version the caller's champion step settled) on every labelled period from
    its own test split on (rows it never learned from) and record each period's metric against the test
    score it was promoted on, with the `run_id` that judged it. Only periods that begin after the data it
    was built from are judged: its test weeks were known when it was promoted, and a seasonal dip inside
    them is no news. None when there is no champion yet."""
    if not pipeline.timestamp:
        raise ConfigError(f"pipeline '{pipeline.name}': performance monitoring needs a timestamp column")
    ts = q(pipeline.timestamp)
    if champion is None:
        return None
    with connect() as conn:
        model = ServableModel.from_registry(registry.registered(conn, champion, pipeline.name))
        manifest = model.manifest
        start = manifest.test_start or manifest.train_window["end"]
        built_from = dt.datetime.fromisoformat(manifest.data_end or start)
        rows = conn.execute(
            f"SELECT * FROM {table_name(pipeline)} WHERE {ts} >= CAST(? AS TIMESTAMP) ORDER BY {ts}", [start]
        ).pl()
    metric, expected = pipeline.metric, float(manifest.test_metrics[pipeline.metric])
    periods = score_periods(pipeline, rows, expected, built_from, lambda part: model.score(part, metric))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with connect() as conn:
        for attempt in transactions(conn, PERFORMANCE_HISTORY):
            with attempt:
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
                            "run_id": run_id,
                        }
                        # The labelled days and the reason are for people (readable_periods), not the history.
                        for r in periods.drop("days", "why").iter_rows(named=True)
                    ),
                )
    return PerformanceRun(champion, metric, expected, periods)


def score_periods(
    pipeline: PipelineSpec,
    rows: pl.DataFrame,
    expected: float,
    built_from: dt.datetime,
    score: Callable[[pl.DataFrame], float],
) -> pl.DataFrame:
    """One row per period of labelled `rows` (frames in, a frame out): its `score` (the champion's metric
    on the period's rows), its change against `expected`, and whether it counts as degraded (only
    periods starting after `built_from` are judged)."""
    spec = pipeline.monitoring.performance
    metric = pipeline.metric
    # A date (a daily series) is its day's midnight here: periods are datetimes, compared with built_from.
    rows = rows.with_columns(pl.col(pipeline.timestamp).cast(pl.Datetime("us")))
    rows = rows.with_columns(pl.col(pipeline.timestamp).dt.truncate(TRUNCATE[spec.period]).alias("_period"))
    scored = []
    for (period,), part in rows.group_by("_period", maintain_order=True):
        # A week of one class only has no ROC-AUC: scored as missing, never judged.
        scorable = pipeline.task == "regression" or part.get_column(pipeline.target.name).n_unique() > 1
        value = score(part) if scorable else None
        change = (
            improvement(metric, value, expected) / abs(expected) if value is not None and expected else None
        )
        days = part.get_column(pipeline.timestamp).dt.date().n_unique()
        degraded, why = period_verdict(
            PeriodFacts(part.height, days, days_in_period(period, spec.period), change, period > built_from),
            metric,
            spec,
        )
        scored.append(
            (
                period,
                part.get_column(pipeline.timestamp).max(),
                part.height,
                days,
                value,
                change,
                degraded,
                why,
            )
        )
    return pl.DataFrame(
        scored,
        schema={
            "period_start": pl.Datetime("us"),
            "period_end": pl.Datetime("us"),
            "rows": pl.Int64,
            "days": pl.Int64,
            "score": pl.Float64,
            "change": pl.Float64,
            "degraded": pl.Boolean,
            "why": pl.String,
        },
        orient="row",
    )


@dataclass(frozen=True)
class PeriodFacts:
    rows: int
    days: int  # distinct calendar days with labelled rows
    full_days: int  # days in a full period
    change: float | None  # relative to the test score, positive = better; None: no score
    after_build: bool  # the period began after the data the champion was built from


def days_in_period(start: dt.datetime, period: str) -> int:
    if period == "month":
        return ((start.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - start.replace(day=1)).days
    return {"day": 1, "week": 7}[period]


def period_verdict(facts: PeriodFacts, metric: str, spec: PerformanceSpec) -> tuple[bool | None, str]:
    """Degraded (True/False), or None with why the period is not judged: only a full period of enough
    rows, after the champion's data, says anything (a partial week 16% worse is a few days' noise)."""
    if facts.change is None:
        return None, f"no {metric}: one class only"
    if not facts.after_build:
        return None, "within the champion's own data (known when it was promoted)"
    if facts.days < facts.full_days:
        return None, f"partial: {facts.days} of {facts.full_days} days labelled"
    if facts.rows < spec.min_rows:
        return None, f"{facts.rows} rows < min_rows {spec.min_rows}"
    return facts.change < -spec.tolerance, ""


def readable_periods(periods: pl.DataFrame) -> pl.DataFrame:
    """Newest first, for people: each period `judged` as `degraded`, `ok` or `not judged` with `why`, and
    a period with fewer labelled days than a full one marked `partial` (its `days` say how many)."""
    return periods.sort("period_start", descending=True).select(
        pl.col("period_start").dt.strftime("%Y-%m-%d"),
        pl.col("days").cast(pl.String)
        + pl.when(pl.col("why").str.starts_with("partial")).then(pl.lit(" (partial)")).otherwise(pl.lit("")),
        "rows",
        pl.col("score").round(4),
        pl.col("change").round(4),
        pl.when(pl.col("degraded").is_null())
        .then(pl.lit("not judged"))
        .when(pl.col("degraded"))
        .then(pl.lit("degraded"))
        .otherwise(pl.lit("ok"))
        .alias("judged"),
        "why",
    )


def periods_legend(metric: str, expected: float, spec: PerformanceSpec) -> str:
    return (
        f"**period_start**: the {spec.period}'s first day; **days**: days with labelled rows (partial: fewer than a full "
        f"{spec.period}); **score**: the champion's real {metric}; **change**: relative to its test score "
        f"{expected:.4f}, positive = better; **judged**: `degraded` when change < -{spec.tolerance:g}, `ok` "
        f"otherwise, `not judged` when a full {spec.period} of at least {spec.min_rows} rows after the "
        "champion's data is missing (**why** says which)."
    )


def performance_history(conn: Any, pipeline: str) -> pl.DataFrame:
    return conn.execute(
        "SELECT champion, period_start, period_end, rows, metric, score, expected, change, degraded "
        f"FROM {PERFORMANCE_HISTORY} WHERE pipeline = ? ORDER BY champion, period_start",
        [pipeline],
    ).pl()
