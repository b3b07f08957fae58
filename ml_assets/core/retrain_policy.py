"""When monitoring turns into retraining: persistent drift or sustained degradation of the current
champion, once per event, and not within the cooldown of the last automatic retrain. Pure decisions on
the monitoring tables' rows, so the sensor that acts on them stays thin and they are tested directly."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import polars as pl

from ml_assets.core.spec import MonitoringSpec


@dataclass(frozen=True)
class RetrainDecision:
    trigger: bool
    reason: str
    kind: str | None = None
    event: str | None = None
    events: tuple[str, ...] = ()


def drift_trigger(runs: pl.DataFrame, spec: MonitoringSpec) -> RetrainDecision:
    """Drift when the champion's latest `persist_windows` distinct windows all drifted.

    `runs` are the current champion's drift_runs rows in time order; the latest run of each window counts.
    """
    if runs.height == 0:
        return RetrainDecision(False, "no drift results for the champion yet")
    latest = runs.group_by("window_end", maintain_order=True).last().tail(spec.persist_windows)
    last_run = latest.row(-1, named=True)
    if latest.height < spec.persist_windows or not latest.get_column("dataset_drift").all():
        return RetrainDecision(
            False,
            f"drift in {int(latest.get_column('dataset_drift').sum())} of the last {latest.height} window(s); "
            f"{spec.persist_windows} consecutive needed",
        )
    drifted = ", ".join(last_run["drifted"] or [])
    return RetrainDecision(
        True,
        f"drift in the last {spec.persist_windows} windows (latest: share {last_run['drift_share']:.2f}; "
        f"{drifted})",
        "drift",
        f"drift:{last_run['id']}",
    )


def performance_trigger(periods: pl.DataFrame, spec: MonitoringSpec) -> RetrainDecision:
    """Degradation when the champion's latest `persist_periods` judged periods all fell below its test
    score by more than the tolerance. `periods` are the current champion's rows in time order."""
    perf = spec.performance
    judged = periods.filter(pl.col("degraded").is_not_null()).tail(perf.persist_periods)
    if judged.height < perf.persist_periods or not judged.get_column("degraded").all():
        degraded = int(judged.get_column("degraded").sum()) if judged.height else 0
        return RetrainDecision(
            False,
            f"performance degraded in {degraded} of the last {judged.height} labelled period(s); "
            f"{perf.persist_periods} consecutive needed",
        )
    last = judged.row(-1, named=True)
    return RetrainDecision(
        True,
        f"{last['metric']} {last['score']:.4f} on the {perf.period} of {last['period_start']:%Y-%m-%d} "
        f"({last['rows']} labelled rows) is {-last['change']:.1%} worse than the champion's test score "
        f"{last['expected']:.4f}, for {perf.persist_periods} {perf.period}(s) in a row "
        f"(tolerance {perf.tolerance:.0%})",
        "performance",
        f"performance:{last['champion']}:{last['period_start']:%Y-%m-%d}",
    )


def retrain_decision(
    champion: str | None,
    runs: pl.DataFrame,
    periods: pl.DataFrame,
    spec: MonitoringSpec,
    last_retrain_at: dt.datetime | None,
    now: dt.datetime,
    handled: frozenset[str] = frozenset(),
) -> RetrainDecision:
    """Retrain when the champion's inputs drift persistently or its labelled performance degrades, unless
    the cooldown since the last automatic retrain has not passed or this event was already acted on."""
    if champion is None:
        return RetrainDecision(False, "no champion yet: nothing to monitor")
    decisions = [
        drift_trigger(runs.filter(pl.col("champion") == champion), spec),
        performance_trigger(periods.filter(pl.col("champion") == champion), spec),
    ]
    firing = [d for d in decisions if d.trigger]
    if not firing:
        return RetrainDecision(False, "; ".join(d.reason for d in decisions))
    fresh = [d for d in firing if d.event not in handled]
    if not fresh:
        return RetrainDecision(False, f"already retrained for {', '.join(d.event or '' for d in firing)}")
    if last_retrain_at is not None and now - last_retrain_at < dt.timedelta(hours=spec.cooldown_hours):
        return RetrainDecision(
            False,
            f"{fresh[0].reason}, but the last retrain was at {last_retrain_at:%Y-%m-%d %H:%M}; "
            f"cooldown {spec.cooldown_hours} h",
            fresh[0].kind,
            fresh[0].event,
        )
    return RetrainDecision(
        True,
        "; ".join(d.reason for d in fresh),
        fresh[0].kind,
        fresh[0].event,
        tuple(d.event for d in fresh if d.event),
    )
