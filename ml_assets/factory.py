"""Config -> Dagster assets and checks. Thin on purpose: each asset calls one function of the modules
below (ingest, validate, dataset, features, train, evaluate, gate, monitor) and turns its result into
metadata.

Asset keys mirror where things live: `raw/<source>`, `validated/<source>`, `quarantine/<source>` are
DuckDB tables shared by every pipeline that uses the source; `<pipeline>/modelling_table`, `features`,
`model`, `evaluation`, `promotion`, `performance` and `drift_report` belong to one pipeline's group.
"""

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from pydantic import Field

from ml_assets import dataset, gate, ingest, monitor, registry, validate
from ml_assets.config import PartitionSpec, PipelineSpec, Project, SourceSpec
from ml_assets.evaluate import evaluate_version, markdown_summary
from ml_assets.features import build_features
from ml_assets.registry import latest_version_dir, versions
from ml_assets.resources import ArtifactStore, Warehouse
from ml_assets.train import train_and_register
from ml_assets.validate import CheckOutcome, q

# Single-run backfills (one run per partition range) are a beta parameter in Dagster 1.13; used on purpose.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)

SOURCES_GROUP = "sources"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
# The assets of every pipeline's group, in lineage order (keys: <pipeline>/<name>).
PIPELINE_ASSETS = (
    "modelling_table",
    "features",
    "model",
    "evaluation",
    "promotion",
    "performance",
    "drift_report",
)
# What a landed batch refreshes in each pipeline that reads it (training stays with the retrain sensor).
LANDING_REFRESH = ("modelling_table", "drift_report", "performance")
USER_ERRORS = (
    ingest.SourceError,
    validate.ValidationFailure,
    dataset.DatasetError,
    registry.ArtifactError,
    ValueError,
)


def md_table(frame: pl.DataFrame, limit: int = 10) -> dg.MetadataValue:
    head = frame.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in head.iter_rows()]
    return dg.MetadataValue.md("\n".join(lines))


def table_metadata(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, Any]:
    schema, name = (part.strip('"') for part in table.split(".", 1))
    columns = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
        "ORDER BY ordinal_position",
        [schema, name],
    ).fetchall()
    return {
        "table": table,
        "dagster/row_count": conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0],
        "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, t) for c, t in columns]),
        "preview": md_table(conn.execute(f"SELECT * FROM {table} LIMIT 5").pl()),
    }


def _user_errors_as_failures(fn: Callable[[], Any]) -> Any:
    """Show a user's data or config problem as a clean Dagster failure, not a stack trace."""
    try:
        return fn()
    except USER_ERRORS as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc


def require_passing_checks(context: dg.AssetExecutionContext, check_keys: list[dg.AssetCheckKey]) -> None:
    """Refuse to build on data whose latest blocking check failed.

    A failed blocking check stops downstream steps only inside its own run; a later run that selects just
    this asset would otherwise read the rejected upstream table, so the consumer checks too.
    """
    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    failed = sorted(
        f"{key.asset_key.to_user_string()}:{key.name}"
        for key, record in latest.items()
        if record.status.value == "FAILED"
    )
    if failed:
        raise dg.Failure(
            description=f"upstream check(s) failed: {', '.join(failed)}; fix the data and re-materialize "
            "the upstream asset(s) before this one",
            allow_retries=False,
        )


def _check(
    key: dg.AssetKey,
    name: str,
    description: str,
    outcome: Callable[[duckdb.DuckDBPyConnection], CheckOutcome],
) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=key, name=name, description=description, blocking=True)
    def _run(warehouse: Warehouse) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            result = outcome(conn)
        return dg.AssetCheckResult(
            passed=result.passed,
            description=result.description,
            metadata={
                k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v
                for k, v in result.metadata.items()
            },
        )

    return _run


def partitions_def(spec: PartitionSpec) -> dg.TimeWindowPartitionsDefinition:
    cls = {
        "daily": dg.DailyPartitionsDefinition,
        "weekly": dg.WeeklyPartitionsDefinition,
        "monthly": dg.MonthlyPartitionsDefinition,
    }[spec.granularity]
    # Weeks begin on the start date's weekday (Dagster's default is Sunday).
    offset = {"day_offset": spec.start.isoweekday() % 7} if spec.granularity == "weekly" else {}
    return cls(start_date=str(spec.start), end_date=str(spec.end) if spec.end else None, **offset)


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover partitions first..last (partitioned assets run once, as a range)."""
    return {RANGE_START: first, RANGE_END: last}


def all_partitions_tags(project: Project) -> dict[str, str]:
    """Range tags covering every partition of the project's time axis (none when nothing is partitioned)."""
    if project.time_axis is None:
        return {}
    pdef = partitions_def(project.time_axis)
    return partition_range_tags(pdef.get_first_partition_key(), pdef.get_last_partition_key())


def _window(context: dg.AssetExecutionContext) -> ingest.TimeWindow:
    # One run may cover a range of partitions (single-run backfill): the window spans all of them.
    tw = context.partition_time_window
    return ingest.TimeWindow(start=tw.start.replace(tzinfo=None), end=tw.end.replace(tzinfo=None))


def read_batch(
    name: str,
    spec: SourceSpec,
    base_dir: Path,
    root: Path,
    warehouse: Warehouse,
    window: ingest.TimeWindow | None,
) -> tuple[pl.DataFrame | None, list[dict[str, Any]], ingest.TimeWindow | None]:
    """Read what a raw materialization loads, before taking the warehouse's write lock."""
    with warehouse.get_connection() as conn:
        skip = ingest.rejected_sha256(conn, name) if spec.landing else set()
        if spec.kind != "files" and window is None:
            window = ingest.TimeWindow(after=ingest.watermark(conn, name))
    if spec.kind == "files":
        files = ingest.resolve_files(name, spec, base_dir, root)
        try:
            frame, records = ingest.read_files(name, spec, files, skip)
        except ingest.RejectedFile as exc:
            if spec.landing:
                with warehouse.get_connection() as conn:
                    ingest.record_files(conn, name, [exc.ledger_row()], "")
            raise
        return frame, records, window
    frame, records = ingest.read_remote(name, spec, window)
    return frame, records, window


def source_assets(name: str, spec: SourceSpec, base_dir: Path) -> list[Any]:
    raw_key, valid_key, quarantine_key = (
        dg.AssetKey([layer, name]) for layer in ("raw", "validated", "quarantine")
    )
    partitions = partitions_def(spec.partitions) if spec.partitions else None
    # Single-run backfills: a range of partitions is one run (also what the CLI's --partition-range needs).
    partitioning = {"partitions_def": partitions, "backfill_policy": dg.BackfillPolicy.single_run()}
    origin = {
        "files": "landing zone <data>/landing/" + name if spec.landing else f"file(s) {spec.path}",
        "database": f"database (${spec.database.url_env if spec.database else ''})",
        "http": f"HTTP API {spec.http.url if spec.http else ''}",
    }[spec.kind]
    how = (
        f"Each {spec.partitions.granularity} partition replaces exactly its rows."
        if spec.partitions
        else "Each run appends rows newer than the loaded ones (watermark)."
        if spec.kind != "files"
        else "Each run replaces the table."
    )

    @dg.asset(
        key=raw_key,
        group_name=SOURCES_GROUP,
        kinds={"duckdb", spec.resolved_format if spec.kind == "files" else spec.kind},
        description=f"Source '{name}' from {origin}, loaded unchanged into DuckDB (raw.{name}), every value as "
        f"in the source, plus _source_file/_source_row. {how} {spec.description}",
        **partitioning,
    )
    def raw(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        window = _window(context) if partitions else None
        frame, records, window = _user_errors_as_failures(
            lambda: read_batch(name, spec, base_dir, Path(artifacts.root), warehouse, window)
        )
        with warehouse.get_connection() as conn:
            result = _user_errors_as_failures(
                lambda: ingest.load_raw(conn, name, spec, frame, records, window)
            )
            if spec.landing:
                ingest.record_files(conn, name, [r | {"status": "loaded"} for r in records], context.run_id)
            meta = table_metadata(conn, f"raw.{q(name)}")
        files = pl.DataFrame(result.files).drop("path", strict=False) if result.files else pl.DataFrame()
        return dg.MaterializeResult(
            metadata={
                **meta,
                "rows_loaded": result.rows,
                "window": str(window) if window else "whole source",
                "files": md_table(files, limit=50),
                "sha256": ",".join(str(f.get("sha256", "")) for f in result.files),
                "ingested_at": result.ingested_at,
            }
        )

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(key, deps=[raw_key], group_name=SOURCES_GROUP, kinds={"duckdb"}, description=text)
            for key, text in (
                (valid_key, f"Source '{name}' typed and checked against its config rules."),
                (quarantine_key, f"Rows of '{name}' rejected by validation, with rule, column and reasons."),
            )
        ],
        name=f"validate_{name}",
        **partitioning,
    )
    def validated(context: dg.AssetExecutionContext, warehouse: Warehouse) -> Iterable[dg.MaterializeResult]:
        where = ingest.window_condition(_window(context)) if partitions else None
        with warehouse.get_connection() as conn:
            result = _user_errors_as_failures(lambda: validate.validate_source(conn, name, spec, where))
            valid_meta = table_metadata(conn, f"validated.{q(name)}")
            quarantine_meta = table_metadata(conn, f"quarantine.{q(name)}")
        share = result.quarantined_rows / result.raw_rows if result.raw_rows else 0.0
        yield dg.MaterializeResult(
            asset_key=valid_key,
            metadata={
                **valid_meta,
                "raw_rows": result.raw_rows,
                "quarantined_rows": result.quarantined_rows,
                "quarantine_share": share,
            },
        )
        yield dg.MaterializeResult(
            asset_key=quarantine_key,
            metadata={
                **quarantine_meta,
                "by_rule": md_table(
                    pl.DataFrame(
                        result.by_rule, schema={"rule": pl.String, "column": pl.String, "rows": pl.Int64}
                    )
                ),
                "examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in result.examples) or "none"),
            },
        )

    checks = [
        _check(
            valid_key,
            "schema_matches_config",
            "Columns and types equal the config.",
            lambda c: validate.check_schema(c, name, spec),
        ),
        _check(
            valid_key,
            "row_conservation",
            "raw rows = validated + quarantined rows.",
            lambda c: validate.check_row_conservation(c, name),
        ),
        _check(
            valid_key,
            "unique_ids",
            f"No two rows share the id {spec.id}.",
            lambda c: validate.check_unique_ids(c, name, spec),
        ),
        _check(
            valid_key,
            "value_rules_hold",
            "Ranges, allowed values, not-null and patterns hold on every row.",
            lambda c: validate.check_rules(c, name, spec),
        ),
        _check(
            valid_key,
            "quarantine_share",
            f"At most {spec.max_quarantine_share:.1%} of rows quarantined: "
            "more means a broken batch, which must not reach training.",
            lambda c: validate.check_quarantine_share(c, name, spec),
        ),
    ]
    return [raw, validated, *checks]


class TrainConfig(dg.Config):
    time_budget_s: float | None = Field(None, description="Override the pipeline's model.time_budget_s")
    max_trials: int | None = Field(None, description="Override the pipeline's model.max_trials")


def pipeline_assets(
    pipeline: PipelineSpec, project: Project, source_checks: list[dg.AssetCheckKey]
) -> list[Any]:
    p = pipeline.name
    sources = project.sources_of(pipeline)
    table_key, features_key, model_key, eval_key, gate_key, perf_key, drift_key = (
        dg.AssetKey([p, n]) for n in PIPELINE_ASSETS
    )
    source_keys = [
        dg.AssetKey(["validated", s]) for s in {pipeline.base, *(j.source for j in pipeline.joins)}
    ]
    common = {
        "group_name": p,
        "tags": {"pipeline": p, "task": pipeline.task},
        # Unpartitioned, but the CLI runs a partition range over a selection only if every asset in it
        # declares single-run backfills (`dagster asset materialize --select '*' --partition-range ...`).
        "backfill_policy": dg.BackfillPolicy.single_run(),
    }

    @dg.asset(
        key=table_key,
        deps=source_keys,
        kinds={"duckdb"},
        **common,
        description=f"Rows of '{pipeline.base}' joined with {[j.source for j in pipeline.joins]}, derived "
        f"columns, the target '{pipeline.target.name}' and the time split (_split).",
    )
    def modelling_table(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        require_passing_checks(context, [k for k in source_checks if k.asset_key in source_keys])
        with warehouse.get_connection() as conn:
            result = _user_errors_as_failures(lambda: dataset.build_modelling_table(conn, pipeline, sources))
            meta = table_metadata(conn, dataset.table_name(pipeline))
        return dg.MaterializeResult(
            metadata={
                **meta,
                "base_rows": result.base_rows,
                "dropped_missing_target": result.dropped_missing_target,
                "outside_training_window": result.outside_window,
                "missing_target_reason": pipeline.target.missing_reason or "(not given)",
                "split_rows": dg.MetadataValue.json(result.split_rows),
            }
        )

    @dg.asset(
        key=features_key,
        deps=[table_key],
        kinds={"polars", "duckdb"},
        **common,
        description="Features declared in the config, fitted on the training split only; the fitted "
        "transform is saved as JSON for batch and online scoring.",
    )
    def features(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        require_passing_checks(context, [k for c in checks for k in c.check_keys])
        path = artifacts.path("features", p, "transform.json")
        with warehouse.get_connection() as conn:
            result = _user_errors_as_failures(lambda: build_features(conn, pipeline, path))
            meta = table_metadata(conn, f"{q(p)}.features")
        return dg.MaterializeResult(
            metadata={
                **meta,
                "transform": dg.MetadataValue.path(str(path)),
                "transform_sha256": result.transform_sha256,
                "features": dg.MetadataValue.json(result.columns),
                "categorical_vocabulary_sizes": dg.MetadataValue.json(result.vocabulary_sizes),
            }
        )

    @dg.asset(
        key=model_key,
        deps=[features_key],
        kinds={"lightgbm", "scikit-learn"},
        **common,
        description=f"LightGBM tuned by {'time-series' if pipeline.split.method == 'time' else 'k-fold'} "
        f"CV on {pipeline.metric} within a time budget, and a linear baseline; registered "
        "as a new model version (text model + JSON manifest).",
    )
    def model(config: TrainConfig, warehouse: Warehouse, artifacts: ArtifactStore) -> dg.MaterializeResult:
        version_dir, manifest = _user_errors_as_failures(
            lambda: train_and_register(
                warehouse.get_connection,
                pipeline,
                artifacts.path("features", p, "transform.json"),
                Path(artifacts.root) / "models",
                config.time_budget_s,
                config.max_trials,
            )
        )
        metric = manifest["metric"]
        return dg.MaterializeResult(
            metadata={
                "version": manifest["version"],
                "path": dg.MetadataValue.path(str(version_dir)),
                f"cv_{metric}": manifest["cv"]["score"],
                f"test_{metric}": manifest["test_metrics"][metric],
                f"baseline_test_{metric}": manifest["baseline_test_metrics"][metric],
                "trials": len(manifest["cv"]["trials"]),
                "best_iteration": manifest["best_iteration"],
                "params": dg.MetadataValue.json(manifest["params"]),
                "train_window": dg.MetadataValue.json(manifest["train_window"]),
                "data_fingerprint": manifest["data_fingerprint"],
                "code_version": manifest["code_version"],
            }
        )

    @dg.asset(
        key=eval_key,
        deps=[model_key],
        kinds={"html", "matplotlib"},
        **common,
        description="Test metrics of the latest model version next to the baseline, plots and an HTML report.",
    )
    def evaluation(warehouse: Warehouse, artifacts: ArtifactStore) -> dg.MaterializeResult:
        with warehouse.get_connection() as conn:
            version_dir = _user_errors_as_failures(lambda: latest_version_dir(conn, p))
            history = versions(conn, p)
        ev = evaluate_version(version_dir, Path(artifacts.root) / "reports")
        headline = {f"model_{m}": float(v) for m, v in ev.model.items()}
        headline |= {f"baseline_{m}": float(v) for m, v in ev.baseline.items()}
        return dg.MaterializeResult(
            metadata={
                **headline,
                "version": ev.version,
                "beats_baseline": ev.beats_baseline,
                "report": dg.MetadataValue.path(str(ev.report_path)),
                "summary": dg.MetadataValue.md(markdown_summary(ev, p)),
                "plots": dg.MetadataValue.json({k: str(v) for k, v in ev.plots.items()}),
                "model_versions": md_table(history.sort("created_at", descending=True), limit=20),
            }
        )

    def decision_metadata(decision: gate.Decision, conn: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        history = versions(conn, p)
        champion = history.filter(pl.col("status").str.contains(registry.CHAMPION))
        meta: dict[str, Any] = {
            "action": decision.action,
            "champion": decision.champion_after or "(none)",
            "model_versions": md_table(history.sort("created_at", descending=True).drop("path"), limit=20),
            "decision_log": md_table(
                registry.decisions(conn, p).sort("decided_at", descending=True), limit=20
            ),
            "details": dg.MetadataValue.json(decision.details),
        }
        if champion.height:
            # A float per materialization: the UI plots the champion's test metric across versions.
            meta[f"champion_test_{pipeline.metric}"] = float(champion.get_column("test_score")[0])
        return meta

    @dg.asset(
        key=gate_key,
        deps=[model_key, eval_key],
        kinds={"lightgbm"},
        **common,
        description="Promotion gate: the challenger replaces the champion only if its primary metric is "
        "significantly better (paired bootstrap) on the latest holdout, no guarded metric or slice regresses, "
        "and it reproduces its predictions in a fresh process. The verdict is logged either way.",
    )
    def promotion(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        # What launched this run (e.g. the drift result behind a sensor's retrain) goes into the log.
        trigger = {k: v for k, v in context.run.tags.items() if k.startswith("ml_assets/")}
        decision = _user_errors_as_failures(
            lambda: gate.promote_or_refuse(warehouse.get_connection, pipeline, context.run_id, trigger)
        )
        with warehouse.get_connection() as conn:
            meta = decision_metadata(decision, conn)
        verdict = {"promote": "PROMOTED", "promote_first": "PROMOTED (first champion)", "refuse": "REFUSED"}
        summary = (
            f"### {verdict.get(decision.action, decision.action.upper())}: challenger {decision.challenger}\n\n"
            f"{decision.reason}\n\nChampion now: `{decision.champion_after}` (was `{decision.champion_before}`)"
        )
        return dg.MaterializeResult(metadata={**meta, "verdict": dg.MetadataValue.md(summary)})

    @dg.asset(
        key=perf_key,
        deps=[table_key, gate_key],
        kinds={"lightgbm"},
        **common,
        description=f"The champion's real {pipeline.metric} per {pipeline.monitoring.performance.period} of "
        "labelled data it never learned from, against its test score (monitor.performance_history, which the "
        "retraining sensor reads). First, the champion is compared with the previous champion on the last "
        f"{pipeline.gate.monitor_days} days and rolled back when it trails by more than "
        f"{pipeline.gate.rollback_margin}.",
    )
    def performance(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        decision = _user_errors_as_failures(
            lambda: gate.check_champion(warehouse.get_connection, pipeline, context.run_id)
        )
        with warehouse.get_connection() as conn:
            meta = decision_metadata(decision, conn) | {"rollback_check": decision.reason}
        if not pipeline.timestamp:
            return dg.MaterializeResult(
                metadata={**meta, "status": "no timestamp: no labelled periods to score"}
            )
        run = _user_errors_as_failures(lambda: monitor.run_performance(warehouse.get_connection, pipeline))
        if run is None or run.periods.height == 0:
            return dg.MaterializeResult(metadata={**meta, "status": "no champion or no labelled rows yet"})
        latest = run.periods.row(-1, named=True)
        shown = run.periods.sort("period_start", descending=True).with_columns(
            pl.col("score", "change").round(4)
        )
        return dg.MaterializeResult(
            metadata={
                **meta,
                "scored_champion": run.champion,
                # A float per materialization: the UI plots the champion's real metric over time.
                f"latest_period_{run.metric}": latest["score"],
                f"champion_expected_{run.metric}": run.expected,
                "latest_period": f"{latest['period_start']:%Y-%m-%d} ({latest['rows']} rows)",
                "degraded_periods": int(run.periods.get_column("degraded").sum()),
                "periods": md_table(shown, limit=26),
            }
        )

    @dg.asset(
        key=drift_key,
        deps=[table_key, gate_key],
        kinds={"evidently"},
        **common,
        description=f"Evidently drift of the champion's inputs: its training reference against the last "
        f"{pipeline.monitoring.window_days} days, each bounded to {pipeline.monitoring.sample_rows} rows. "
        "Appends to monitor.drift_runs / monitor.drift_history, which the retraining sensor reads.",
    )
    def drift_report(warehouse: Warehouse, artifacts: ArtifactStore) -> dg.MaterializeResult:
        run = _user_errors_as_failures(
            lambda: monitor.run_drift(warehouse.get_connection, pipeline, Path(artifacts.root) / "reports")
        )
        if run is None:
            return dg.MaterializeResult(metadata={"status": "no champion yet: nothing to monitor"})
        with warehouse.get_connection() as conn:
            history = monitor.drift_runs(conn, p)
        columns = pl.DataFrame(
            [(c.column, c.method, round(c.score, 4), c.threshold, c.drifted) for c in run.result.columns],
            schema=["column", "method", "score", "threshold", "drifted"],
            orient="row",
        ).sort("score", descending=True)
        return dg.MaterializeResult(
            metadata={
                "drift_share": run.result.drift_share,
                "dataset_drift": run.result.dataset_drift,
                "drifted_columns": dg.MetadataValue.json(run.result.drifted),
                "columns": md_table(columns, limit=40),
                "report": dg.MetadataValue.path(str(run.report)),
                "champion": run.champion,
                "window": f"{run.window_start} to {run.window_end}",
                "rows_current_reference": f"{run.result.current_rows} / {run.result.reference_rows}",
                "drift_runs": md_table(history.sort("computed_at", descending=True), limit=10),
                "drift_run": run.id,
            }
        )

    checks = [
        _check(
            table_key,
            "target_not_null",
            f"Every row has a target '{pipeline.target.name}'.",
            lambda c: dataset.check_target_not_null(c, pipeline),
        ),
        _check(
            table_key,
            "splits_populated",
            "Train, validation and test splits all have rows.",
            lambda c: dataset.check_splits_populated(c, pipeline),
        ),
    ]
    return [modelling_table, features, model, evaluation, promotion, performance, drift_report, *checks]


def build_assets(project: Project) -> list[Any]:
    out: list[Any] = []
    for name, spec in project.sources.items():
        out += source_assets(name, spec, project.source_files[name].parent)
    source_checks = [k for d in out if isinstance(d, dg.AssetChecksDefinition) for k in d.check_keys]
    for pipeline in project.pipelines.values():
        out += pipeline_assets(pipeline, project, source_checks)
    return out
