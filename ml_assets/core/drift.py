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
import html
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl

# Evidently's telemetry is off: ml_assets/__init__ sets DO_NOT_TRACK before this import.
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift

from ml_assets.core import figures, registry
from ml_assets.core.dataset import bounded_sample, table_name
from ml_assets.core.errors import ArtifactError, ConfigError, DatasetError
from ml_assets.core.progress import Progress, silent
from ml_assets.core.serving.batch_scores import predictions_table
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.serving.request_log import LOGGED_AT, read_window
from ml_assets.core.spec import MonitoringSpec, PipelineSpec
from ml_assets.core.sql import q, table_exists
from ml_assets.core.store import DRIFT_HISTORY, DRIFT_RUNS, Connect, insert, insert_many, transactions

DEFAULT_BOUND = 50_000
PREDICTION = "_prediction"


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


def drift_reference(pipeline: PipelineSpec, version_dir: Path) -> pl.DataFrame:
    """The training sample a version was registered with: what its drift is measured against."""
    reference_file = version_dir / registry.REFERENCE_FILE
    if not reference_file.exists():
        raise ArtifactError(
            f"pipeline '{pipeline.name}': champion {version_dir.name} has no drift reference "
            f"({registry.REFERENCE_FILE}; versions registered before drift monitoring lack it): retrain, "
            "or roll back to a version that has one"
        )
    return pl.read_parquet(reference_file)


def watched_features(pipeline: PipelineSpec, manifest: registry.Manifest) -> tuple[list[str], list[str]]:
    """(numerical, categorical) features of a version that drift monitoring watches."""
    spec = pipeline.monitoring
    watched = spec.columns or manifest.features
    unknown = sorted((set(watched) | set(spec.column_thresholds)) - set(manifest.features))
    if unknown:
        raise ConfigError(
            f"pipeline '{pipeline.name}': monitoring columns {unknown} are not features of version "
            f"{manifest.version}; its features: {manifest.features}"
        )
    categorical = [c for c in manifest.categorical_features if c in watched]
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
    report: Path  # our summary page, drifted columns first (write_summary)
    evidently_report: Path  # Evidently's full report, linked from the summary
    figure: Path  # drift score per column against its threshold
    # Drift of the champion's scores (column `_prediction`), when scores of the window exist.
    prediction: ColumnDrift | None = None


def run_drift(
    connect: Connect,
    pipeline: PipelineSpec,
    champion: str | None,
    run_id: str | None,
    reports_root: Path,
    request_log: Path | None = None,
    progress: Progress = silent,
) -> DriftRun | None:
    """Compare the champion's training reference with the current window, as the champion sees it (its
    own saved transform), and append the result to the drift tables with the `run_id` that judged it.
    `champion` is the version the caller's champion step settled; None: no champion yet, nothing to do.

    The current window is the latest `window_days` of the modelling table, or of the online API's request
    log in `request_log` (`monitoring.current: request_log`). When the champion's scores of the window
    exist (its batch scores, or the log's), their distribution is compared with the champion's scores of
    its reference too: recorded as the column `_prediction`, reported apart from the features' drift share
    (which alone triggers retraining)."""
    spec = pipeline.monitoring
    if champion is None:
        return None
    with connect() as conn:
        version = registry.registered(conn, champion, pipeline.name)
        if spec.current == "request_log":
            rows, time_column = _logged_rows(pipeline, request_log), LOGGED_AT
            scores = rows.filter(pl.col("version") == champion).get_column("score")
        else:
            rows, time_column = _window_rows(conn, pipeline), pipeline.timestamp
            scores = _batch_scores(conn, pipeline, champion, rows)
    model = ServableModel.from_registry(version)
    features = model.transform.apply(rows)
    stamps = rows.get_column(time_column).alias("_ts") if time_column else None
    current = bounded_sample(
        features.with_columns(stamps) if stamps is not None else features,
        spec.sample_rows,
        "_ts" if stamps is not None else None,
    )
    reference = drift_reference(pipeline, version.path)
    numerical, categorical = comparable_columns(
        reference, current, *watched_features(pipeline, model.manifest)
    )
    drift_id = uuid.uuid4().hex[:12]
    start = stamps.min() if stamps is not None else None
    end = stamps.max() if stamps is not None else None
    folder = reports_root / pipeline.name / "drift"
    report, evidently_report = folder / f"{drift_id}.html", folder / f"{drift_id}_evidently.html"
    progress(
        f"Evidently: {len(numerical) + len(categorical)} columns, reference {reference.height} rows vs "
        f"current {current.height} rows (window of {rows.height} rows, bounded to {spec.sample_rows})"
    )
    started = time.monotonic()
    result = check_window(spec, reference, current, numerical, categorical, html=evidently_report)
    progress(
        f"Evidently done in {time.monotonic() - started:.1f} s: {len(result.drifted)} of "
        f"{len(result.columns)} columns drifted"
    )
    prediction = _prediction_drift(spec, model, reference, scores)
    figure = figures.drift_scores(
        [(c.column, c.score, c.threshold, c.drifted) for c in result.columns], folder / f"{drift_id}.png"
    )
    window = f"{start} to {end}" if start is not None else f"{current.height} logged requests"
    write_summary(report, pipeline.name, champion, window, result, prediction, evidently_report, figure)
    _record(connect, pipeline, (drift_id, run_id), champion, (start, end), result, report, prediction)
    return DriftRun(drift_id, champion, start, end, result, report, evidently_report, figure, prediction)


def comparable_columns(
    reference: pl.DataFrame, current: pl.DataFrame, numerical: list[str], categorical: list[str]
) -> tuple[list[str], list[str]]:
    """The watched columns that have a value on both sides, (numerical, categorical)."""
    # A column with no value on one side has no distribution to compare (Evidently refuses it): a short
    # request log can hold no wind gust at all. It is left out of this run's columns.
    empty = {
        c
        for c in numerical + categorical
        for f in (reference, current)
        if f.get_column(c).null_count() == f.height
    }
    return (
        [c for c in numerical if c not in empty],
        [c for c in categorical if c not in empty],
    )


def _record(
    connect: Connect,
    pipeline: PipelineSpec,
    ids: tuple[str, str | None],
    champion: str,
    window: tuple[Any, Any],
    result: DriftResult,
    report: Path,
    prediction: ColumnDrift | None,
) -> None:
    """Append the drift run and every column's verdict to the drift tables, in one transaction; `ids`: the
    drift run's own id and the Dagster run that judged it."""
    (drift_id, run_id), (start, end) = ids, window
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with connect() as conn:
        for attempt in transactions(conn, DRIFT_RUNS):
            with attempt:
                insert(
                    conn,
                    DRIFT_RUNS,
                    {
                        "id": drift_id,
                        "pipeline": pipeline.name,
                        "computed_at": now,
                        "champion": champion,
                        "window_start": start,
                        "window_end": end,
                        "current_rows": result.current_rows,
                        "reference_rows": result.reference_rows,
                        "drift_share": result.drift_share,
                        "dataset_drift": result.dataset_drift,
                        "drifted": result.drifted,
                        "report": str(report),
                        "run_id": run_id,
                    },
                )
                insert_many(
                    conn,
                    DRIFT_HISTORY,
                    (
                        {
                            "drift_run": drift_id,
                            "pipeline": pipeline.name,
                            "window_end": end,
                            "column_name": c.column,
                            "method": c.method,
                            "score": c.score,
                            "threshold": c.threshold,
                            "drifted": c.drifted,
                            "run_id": run_id,
                        }
                        for c in [*result.columns, *([prediction] if prediction else [])]
                    ),
                )


def drift_table(result: DriftResult, prediction: ColumnDrift | None = None) -> pl.DataFrame:
    """One row per watched column (and the scores, `_prediction`), drifted first, then by score."""
    rows = [(c.column, c.method, round(c.score, 4), c.threshold, c.drifted) for c in result.columns]
    if prediction is not None:
        rows.append(
            (
                prediction.column,
                prediction.method,
                round(prediction.score, 4),
                prediction.threshold,
                prediction.drifted,
            )
        )
    frame = pl.DataFrame(rows, schema=["column", "test", "score", "threshold", "drifted"], orient="row")
    return frame.sort(["drifted", "score"], descending=True)


def write_summary(
    path: Path,
    pipeline: str,
    champion: str,
    window: str,
    result: DriftResult,
    prediction: ColumnDrift | None,
    evidently_report: Path,
    figure: Path,
) -> None:
    """The page a user opens first: the verdict and the drifted columns at the top (Evidently's own report
    is some 18,000 px tall with them mid-page), the score chart, then a link to the full report."""
    drifted = ", ".join(result.drifted) or "none"
    verdict = "DATASET DRIFT" if result.dataset_drift else "no dataset drift"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>drift of {pipeline}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:14px}}
td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head><body>
<h1>{html.escape(pipeline)}: {verdict}: {len(result.drifted)} of {len(result.columns)} columns drifted</h1>
<p id="drifted">Drifted: <b>{html.escape(drifted)}</b> (share {result.drift_share:.3f}). Champion
{html.escape(champion)}; window {html.escape(window)}; {result.current_rows} current vs {result.reference_rows}
reference rows.</p>
{figures.html_table(drift_table(result, prediction))}
<p><a href="{evidently_report.name}">Evidently's full report</a> (every column's distributions)</p>
<img alt="drift scores" src="{figure.name}"></body></html>""")


def _window_rows(conn: Any, pipeline: PipelineSpec) -> pl.DataFrame:
    ts = q(pipeline.timestamp) if pipeline.timestamp else None
    window = (
        f"{ts} >= (SELECT max({ts}) FROM {table_name(pipeline)}) - INTERVAL {pipeline.monitoring.window_days} DAY"
        if ts
        else "_split = 'test'"
    )
    # In one order whatever the warehouse's scan order: the bounded sample drawn from it is by position.
    order = ", ".join([*([ts] if ts else []), *(q(c) for c in pipeline.row_id)])
    return conn.execute(f"SELECT * FROM {table_name(pipeline)} WHERE {window} ORDER BY {order}").pl()


def _logged_rows(pipeline: PipelineSpec, folder: Path | None) -> pl.DataFrame:
    rows = read_window(folder, pipeline.monitoring.window_days) if folder is not None else None
    if rows is None or rows.height == 0:
        raise DatasetError(
            f"pipeline '{pipeline.name}': monitoring.current is request_log, but no request is logged in "
            f"{folder}; serve the champion (`ml-assets serve {pipeline.name}`) or set monitoring.current: "
            "modelling_table"
        )
    return rows


def _batch_scores(conn: Any, pipeline: PipelineSpec, champion: str, rows: pl.DataFrame) -> pl.Series | None:
    """The champion's batch scores of the window's rows, when the predictions asset has scored them."""
    if not table_exists(conn, pipeline.name, "predictions") or rows.height == 0:
        return None
    keys = rows.select(pipeline.row_id)
    conn.register("__window_keys", keys.to_arrow())
    try:
        using = ", ".join(q(c) for c in pipeline.row_id)
        return (
            conn.execute(
                f"SELECT score FROM {predictions_table(pipeline)} JOIN __window_keys USING ({using}) "
                f"WHERE version = ? ORDER BY {using}",
                [champion],
            )
            .pl()
            .get_column("score")
        )
    finally:
        conn.unregister("__window_keys")


def _prediction_drift(
    spec: MonitoringSpec, model: ServableModel, reference: pl.DataFrame, scores: pl.Series | None
) -> ColumnDrift | None:
    if scores is None or scores.len() == 0 or model.manifest.task == "multiclass":
        return None
    ours = pl.DataFrame({PREDICTION: model.predict_features(reference)})
    theirs = bounded_sample(pl.DataFrame({PREDICTION: scores}), spec.sample_rows)
    return detect_drift(ours, theirs, [PREDICTION], [], spec.num_method, threshold=spec.threshold).columns[0]


def drift_runs(conn: Any, pipeline: str) -> pl.DataFrame:
    return conn.execute(
        "SELECT id, computed_at, champion, window_start, window_end, drift_share, dataset_drift, drifted "
        f"FROM {DRIFT_RUNS} WHERE pipeline = ? ORDER BY computed_at",
        [pipeline],
    ).pl()
