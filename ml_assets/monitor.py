"""Drift detection with Evidently at bounded cost.

Evidently's DataDriftPreset is slow on large frames (about 80 s for 1M x 20 here), so it never sees
unbounded data: the reference and the current window are each sampled to a bound (default 50k rows),
the current window stratified by day so every day keeps its share. The default drift methods are
distances (normed Wasserstein for numbers, Jensen-Shannon for categories) rather than p-value tests:
a distance estimated from 50k rows is close to the one from 1M rows, whereas a p-value test's verdict
depends on the row count itself (and Evidently switches methods by size unless told which to use).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl

# Evidently's telemetry is off: ml_assets/__init__ sets DO_NOT_TRACK before this import.
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift

from ml_assets import registry
from ml_assets.config import MonitoringSpec, PipelineSpec
from ml_assets.dataset import table_name
from ml_assets.metrics import improvement
from ml_assets.serve import ServableModel
from ml_assets.validate import q

DEFAULT_BOUND = 50_000


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    columns: list[ColumnDrift]
    drift_share: float
    dataset_drift: bool
    reference_rows: int
    current_rows: int

    @property
    def drifted(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]


def bounded_sample(
    frame: pl.DataFrame, bound: int, time_column: str | None = None, seed: int = 0
) -> pl.DataFrame:
    """At most about `bound` rows; with a time column, every day keeps its share of rows."""
    if frame.height <= bound:
        return frame
    if time_column is None:
        return frame.sample(bound, seed=seed)
    fraction = bound / frame.height
    day = pl.col(time_column).dt.truncate("1d")
    rank = pl.int_range(pl.len()).shuffle(seed=seed).over(day)
    return frame.filter(rank < (pl.len().over(day) * fraction).ceil())


def column_drift(snapshot: Any) -> list[ColumnDrift]:
    """Per-column scores and verdicts of an Evidently snapshot with ValueDrift tests."""
    result = snapshot.dict()
    scores = {m["id"]: m["value"] for m in result["metrics"]}
    drift = []
    for test in result["tests"]:
        params: dict[str, Any] = test["metric_config"]["params"]
        if not params["type"].endswith("ValueDrift"):
            continue
        status = test["status"]
        drift.append(
            ColumnDrift(
                column=params["column"],
                method=params["method"],
                threshold=float(params["threshold"]),
                score=float(scores[test["metric_config"]["metric_id"]]),
                drifted=str(getattr(status, "value", status)) == "FAIL",
            )
        )
    return drift


def evidently_dataset(frame: pl.DataFrame, numerical: list[str], categorical: list[str]) -> Dataset:
    # pandas only here, at Evidently's boundary.
    data: pd.DataFrame = frame.select([*numerical, *categorical]).to_pandas()
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    return Dataset.from_pandas(data, data_definition=definition)


def detect_drift(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    numerical: list[str],
    categorical: list[str],
    num_method: str = "wasserstein",
    cat_method: str = "jensenshannon",
    threshold: float = 0.1,
    drift_share: float = 0.5,
    html: Path | None = None,
    column_thresholds: dict[str, float] | None = None,
) -> DriftResult:
    """Per-column drift of `current` against `reference` (both already bounded); `column_thresholds`
    overrides `threshold` for some columns.

    One ValueDrift metric per column: the same metric and test DataDriftPreset uses, without the preset's
    repeated per-column computations and extra widgets (about half the time).
    """
    limit = (column_thresholds or {}).get
    metrics = [ValueDrift(column=c, method=num_method, threshold=limit(c, threshold)) for c in numerical]
    metrics += [ValueDrift(column=c, method=cat_method, threshold=limit(c, threshold)) for c in categorical]
    snapshot = Report(metrics, include_tests=True).run(
        evidently_dataset(current, numerical, categorical),
        evidently_dataset(reference, numerical, categorical),
    )
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
    drift = column_drift(snapshot)
    share = sum(c.drifted for c in drift) / len(drift) if drift else 0.0
    return DriftResult(drift, share, share >= drift_share, reference.height, current.height)


# --- drift of a pipeline's champion, recorded over time -------------------------------------------------

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS monitor;
CREATE TABLE IF NOT EXISTS monitor.drift_runs (
    id VARCHAR PRIMARY KEY,
    pipeline VARCHAR NOT NULL,
    computed_at TIMESTAMP NOT NULL,
    champion VARCHAR NOT NULL,
    window_start TIMESTAMP,
    window_end TIMESTAMP,
    current_rows BIGINT,
    reference_rows BIGINT,
    drift_share DOUBLE,
    dataset_drift BOOLEAN,
    drifted VARCHAR[],
    report VARCHAR
);
CREATE TABLE IF NOT EXISTS monitor.drift_history (
    drift_run VARCHAR NOT NULL,
    pipeline VARCHAR NOT NULL,
    window_end TIMESTAMP,
    column_name VARCHAR NOT NULL,
    method VARCHAR,
    score DOUBLE,
    threshold DOUBLE,
    drifted BOOLEAN
);
"""


def drift_reference(pipeline: PipelineSpec, version_dir: Path) -> pl.DataFrame:
    """The training sample a version was registered with: what its drift is measured against."""
    reference_file = version_dir / registry.REFERENCE_FILE
    if not reference_file.exists():
        raise registry.ArtifactError(
            f"pipeline '{pipeline.name}': champion {version_dir.name} has no drift reference "
            f"({registry.REFERENCE_FILE}; versions registered before drift monitoring lack it): retrain, "
            "or roll back to a version that has one"
        )
    return pl.read_parquet(reference_file)


def watched_features(pipeline: PipelineSpec, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(numerical, categorical) features of a version that drift monitoring watches."""
    spec = pipeline.monitoring
    watched = spec.columns or manifest["features"]
    unknown = sorted((set(watched) | set(spec.column_thresholds)) - set(manifest["features"]))
    if unknown:
        raise ValueError(
            f"pipeline '{pipeline.name}': monitoring columns {unknown} are not features of version "
            f"{manifest['version']}; its features: {manifest['features']}"
        )
    categorical = [c for c in manifest["categorical_features"] if c in watched]
    return [c for c in watched if c not in categorical], categorical


def check_window(
    spec: MonitoringSpec,
    reference: pl.DataFrame,
    current: pl.DataFrame,
    numerical: list[str],
    categorical: list[str],
    html: Path | None = None,
) -> DriftResult:
    """detect_drift with a pipeline's monitoring settings."""
    return detect_drift(
        reference,
        current,
        numerical,
        categorical,
        spec.num_method,
        spec.cat_method,
        spec.threshold,
        spec.drift_share,
        html=html,
        column_thresholds=spec.column_thresholds,
    )


@dataclass(frozen=True)
class DriftRun:
    id: str
    champion: str
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    result: DriftResult
    report: Path


def run_drift(connect: Any, pipeline: PipelineSpec, reports_root: Path) -> DriftRun | None:
    """Compare the champion's training reference with the latest window of the modelling table, as the
    champion sees it (its own saved transform), and append the result to the drift tables. None when
    there is no champion yet."""
    spec = pipeline.monitoring
    with connect() as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if champion is None:
            return None
        version_dir = registry.version_dir(conn, champion)
        ts = q(pipeline.timestamp) if pipeline.timestamp else None
        window = (
            f"{ts} >= (SELECT max({ts}) FROM {table_name(pipeline)}) - INTERVAL {spec.window_days} DAY"
            if ts
            else "_split = 'test'"
        )
        rows = conn.execute(f"SELECT * FROM {table_name(pipeline)} WHERE {window}").pl()
    model = ServableModel.load(version_dir)
    features = model.transform.apply(rows)
    stamps = rows.get_column(pipeline.timestamp).alias("_ts") if pipeline.timestamp else None
    current = bounded_sample(
        features.with_columns(stamps) if stamps is not None else features,
        spec.sample_rows,
        "_ts" if stamps is not None else None,
    )
    reference = drift_reference(pipeline, version_dir)
    numerical, categorical = watched_features(pipeline, model.manifest)
    run_id = uuid.uuid4().hex[:12]
    start = stamps.min() if stamps is not None else None
    end = stamps.max() if stamps is not None else None
    report = reports_root / pipeline.name / "drift" / f"{run_id}.html"
    result = check_window(spec, reference, current, numerical, categorical, html=report)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with connect() as conn:
        conn.execute(SCHEMA)
        conn.execute("BEGIN TRANSACTION")
        conn.execute(
            "INSERT INTO monitor.drift_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                pipeline.name,
                now,
                champion,
                start,
                end,
                result.current_rows,
                result.reference_rows,
                result.drift_share,
                result.dataset_drift,
                result.drifted,
                str(report),
            ],
        )
        conn.executemany(
            "INSERT INTO monitor.drift_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [run_id, pipeline.name, end, c.column, c.method, c.score, c.threshold, c.drifted]
                for c in result.columns
            ],
        )
        conn.execute("COMMIT")
    return DriftRun(run_id, champion, start, end, result, report)


def drift_runs(conn: Any, pipeline: str) -> pl.DataFrame:
    conn.execute(SCHEMA)
    return conn.execute(
        "SELECT id, computed_at, champion, window_start, window_end, drift_share, dataset_drift, drifted "
        "FROM monitor.drift_runs WHERE pipeline = ? ORDER BY computed_at",
        [pipeline],
    ).pl()


# --- the champion's real performance on labelled periods it never saw ---------------------------------

PERFORMANCE_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS monitor;
CREATE TABLE IF NOT EXISTS monitor.performance_history (
    pipeline VARCHAR NOT NULL,
    champion VARCHAR NOT NULL,
    period_start TIMESTAMP NOT NULL,
    period_end TIMESTAMP NOT NULL,
    rows BIGINT NOT NULL,
    metric VARCHAR NOT NULL,
    score DOUBLE,
    expected DOUBLE NOT NULL,
    change DOUBLE,
    degraded BOOLEAN,
    computed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (pipeline, champion, period_start)
);
"""
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
        raise ValueError(f"pipeline '{pipeline.name}': performance monitoring needs a timestamp column")
    ts = q(pipeline.timestamp)
    with connect() as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if champion is None:
            return None
        version_dir = registry.version_dir(conn, champion)
        model = ServableModel.load(version_dir)
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
    with connect() as conn:
        conn.execute(PERFORMANCE_SCHEMA)
        conn.execute("BEGIN TRANSACTION")
        # A period is rescored as more of its labels arrive: its row is replaced, never duplicated.
        conn.execute(
            "DELETE FROM monitor.performance_history WHERE pipeline = ? AND champion = ?",
            [pipeline.name, champion],
        )
        conn.executemany(
            "INSERT INTO monitor.performance_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [
                    pipeline.name,
                    champion,
                    r["period_start"],
                    r["period_end"],
                    r["rows"],
                    metric,
                    r["score"],
                    expected,
                    r["change"],
                    r["degraded"],
                    now,
                ]
                for r in periods.iter_rows(named=True)
            ],
        )
        conn.execute("COMMIT")
    return PerformanceRun(champion, metric, expected, periods)


def performance_history(conn: Any, pipeline: str) -> pl.DataFrame:
    conn.execute(PERFORMANCE_SCHEMA)
    return conn.execute(
        "SELECT champion, period_start, period_end, rows, metric, score, expected, change, degraded "
        "FROM monitor.performance_history WHERE pipeline = ? ORDER BY champion, period_start",
        [pipeline],
    ).pl()


# --- when monitoring turns into retraining -------------------------------------------------------------


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
