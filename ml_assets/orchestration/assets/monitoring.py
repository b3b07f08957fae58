"""Monitoring assets of a pipeline, in lineage order: `<pipeline>/champion` (the rollback check: which
version serves now), then `performance` (its real metric per labelled period) and `drift_report` (its
inputs' and scores' drift, after the run's batch scores). Both monitors judge the version the champion
asset settled, taken as its value (orchestration.handoff), never the alias as it is when they run."""

from pathlib import Path

import dagster as dg
import polars as pl

from ml_assets.core import drift, figures, performance, rollback, tracking
from ml_assets.core.serving import bundle
from ml_assets.core.serving.request_log import log_dir
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.assets.modelling import common, pipeline_key
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.figures import figure_metadata, report_metadata
from ml_assets.orchestration.handoff import SettledChampion, settled_in
from ml_assets.orchestration.metadata import decision_metadata, md_table, shorten
from ml_assets.orchestration.resources import ArtifactStore, Warehouse


def champion_asset(pipeline: PipelineSpec, project: Project) -> dg.AssetsDefinition:
    sources = project.sources_of(pipeline)

    @dg.asset(
        key=pipeline_key(pipeline, "champion"),
        deps=[pipeline_key(pipeline, "modelling_table"), pipeline_key(pipeline, "promotion")],
        kinds={"lightgbm"},
        io_manager_key="handoff",
        **common(pipeline),
        description=f"The serving champion after the rollback check: it is compared with the previous champion "
        f"on the last {pipeline.gate.monitor_days} days of labelled data and rolled back when it trails by "
        f"more than {pipeline.gate.rollback_margin}. Its value, the version it settled, is what the monitors, "
        "batch scores and skew check after it judge. What serves is published as a bundle for the API "
        "(model, transform, lookup tables) when it or the joined tables changed.",
    )
    def champion(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.Output[SettledChampion]:
        decision = user_errors_as_failures(
            lambda: rollback.check_champion(warehouse.get_connection, pipeline, context.run.run_id)
        )
        tracking.sync_champion(pipeline, warehouse.get_connection, context.log.warning)
        published = user_errors_as_failures(
            lambda: bundle.publish(
                warehouse.get_connection, pipeline, sources, artifacts.bundles, context.run.run_id
            )
        )
        with warehouse.get_connection() as conn:
            meta = decision_metadata(decision, conn, pipeline)
        settled = SettledChampion(
            pipeline=pipeline.name, version=decision.champion_after, run_id=context.run.run_id
        )
        # The check's verdict first: the UI lists metadata in the order given.
        return dg.Output(
            settled,
            metadata={
                "rollback_check": decision.reason,
                "settled": settled.version or "(none)",
                **(
                    {
                        "bundle": dg.MetadataValue.path(
                            str(bundle.pipeline_folder(artifacts.bundles, pipeline.name) / published)
                        )
                    }
                    if published
                    else {}
                ),
                **meta,
            },
        )

    return champion


def performance_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=pipeline_key(pipeline, "performance"),
        deps=[pipeline_key(pipeline, "modelling_table")],
        ins=settled_in(pipeline.name),
        kinds={"lightgbm"},
        **common(pipeline),
        description=f"The champion's real {pipeline.metric} per {pipeline.monitoring.performance.period} of "
        "labelled data it never learned from, against its test score (monitor.performance_history, which the "
        "retraining sensor reads).",
    )
    def performance_report(
        context: dg.AssetExecutionContext,
        warehouse: Warehouse,
        artifacts: ArtifactStore,
        champion: SettledChampion,
    ) -> dg.MaterializeResult:
        if not pipeline.timestamp:
            return dg.MaterializeResult(metadata={"status": "no timestamp: no labelled periods to score"})
        run = user_errors_as_failures(
            lambda: performance.run_performance(
                warehouse.get_connection, pipeline, champion.version, context.run.run_id
            )
        )
        if run is None or run.periods.height == 0:
            return dg.MaterializeResult(metadata={"status": "no champion or no labelled rows yet"})
        latest = run.periods.row(-1, named=True)
        shown = performance.readable_periods(run.periods)
        newest = shown.row(0, named=True)
        verdict = newest["judged"] + (f" ({newest['why']})" if newest["why"] else "")
        figure = figures.performance_over_time(
            run.periods,
            run.expected,
            run.metric,
            artifacts.reports / pipeline.name / "performance" / f"{run.champion}.png",
        )
        return dg.MaterializeResult(
            metadata={
                "scored_champion": run.champion,
                # A float per materialization: the UI plots the champion's real metric over time (its
                # constant test score is text, not a flat line).
                f"latest_period_{run.metric}": round(latest["score"], 4)
                if latest["score"] is not None
                else None,
                "degraded_periods": int(run.periods.get_column("degraded").sum()),
                **figure_metadata(artifacts, {"performance": figure}),
                f"champion_test_{run.metric}": f"{run.expected:.4f}",
                # The newest period's verdict inline (the periods table opens in a dialog).
                "latest_period": f"{latest['period_start']:%Y-%m-%d} ({latest['rows']} rows, {latest['days']} "
                f"days): {verdict}",
                # Apart from the table: a markdown value that short renders inline, the table's does not.
                "periods_legend": dg.MetadataValue.md(
                    performance.periods_legend(run.metric, run.expected, pipeline.monitoring.performance)
                ),
                "periods": md_table(shown, limit=26),
            }
        )

    return performance_report


def drift_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    spec = pipeline.monitoring

    @dg.asset(
        key=pipeline_key(pipeline, "drift_report"),
        # After the predictions: a run's drift report compares the scores that run wrote.
        deps=[pipeline_key(pipeline, n) for n in ("modelling_table", "predictions")],
        ins=settled_in(pipeline.name),
        kinds={"evidently"},
        **common(pipeline),
        description=f"Evidently drift of the champion's inputs (and of its scores, once batch scores or logged "
        f"requests exist): its training reference against the last {spec.window_days} days of the "
        f"{spec.current.replace('_', ' ')}, each bounded to {spec.sample_rows} rows. Appends to monitor.drift_runs / "
        "monitor.drift_history, which the retraining sensor reads.",
    )
    def drift_report(
        context: dg.AssetExecutionContext,
        warehouse: Warehouse,
        artifacts: ArtifactStore,
        champion: SettledChampion,
    ) -> dg.MaterializeResult:
        logged = log_dir(Path(artifacts.root), pipeline.name)
        run = user_errors_as_failures(
            lambda: drift.run_drift(
                warehouse.get_connection,
                pipeline,
                champion.version,
                context.run.run_id,
                artifacts.reports,
                logged,
                context.log.info,
            )
        )
        if run is None:
            return dg.MaterializeResult(metadata={"status": "no champion yet: nothing to monitor"})
        with warehouse.get_connection() as conn:
            history = drift.drift_runs(conn, pipeline.name)
        runs = history.sort("computed_at", descending=True).select(
            pl.col("computed_at").dt.strftime("%Y-%m-%d %H:%M"),
            pl.col("window_end").dt.strftime("%Y-%m-%d"),
            pl.col("drift_share").round(3),
            pl.col("drifted").list.join(", ").map_elements(shorten, return_dtype=pl.String),
        )
        return dg.MaterializeResult(
            metadata={
                # Numbers per materialization: the UI plots drift over time.
                "drift_share": round(run.result.drift_share, 4),
                "drifted_count": len(run.result.drifted),
                "dataset_drift": run.result.dataset_drift,
                "drifted_columns": ", ".join(run.result.drifted) or "(none)",
                **figure_metadata(artifacts, {"drift_scores": run.figure}),
                **report_metadata(artifacts, run.report),
                **report_metadata(artifacts, run.evidently_report, "evidently_report"),
                "columns": md_table(drift.drift_table(run.result), limit=40),
                "champion": run.champion,
                "window": f"{run.window_start} to {run.window_end}",
                "rows_current_reference": f"{run.result.current_rows} / {run.result.reference_rows}",
                "drift_runs": md_table(runs, limit=10),
                "drift_run": run.id,
                "current": spec.current,
                **(
                    {
                        "prediction_drift": round(run.prediction.score, 4),
                        "prediction_drifted": run.prediction.drifted,
                    }
                    if run.prediction
                    else {}
                ),
            }
        )

    return drift_report
