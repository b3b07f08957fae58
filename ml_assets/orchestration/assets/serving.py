"""Serving assets of a pipeline: `<pipeline>/predictions`, the champion's batch scores, partitioned like the
project's time axis; each partition's rows replace its previous scores (core.serving.batch_scores), and its Parquet file
under `<data>/predictions/<pipeline>/` is rewritten."""

from pathlib import Path

import dagster as dg
import duckdb

from ml_assets.core.ingest import TimeWindow
from ml_assets.core.serving import batch_scores
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.assets.modelling import common, pipeline_key
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.handoff import SettledChampion, settled_in
from ml_assets.orchestration.metadata import once_per_range, round_floats
from ml_assets.orchestration.partitions import partitions_def, run_window
from ml_assets.orchestration.resources import ArtifactStore, Warehouse


def predictions_partitions(
    pipeline: PipelineSpec, project: Project
) -> dg.TimeWindowPartitionsDefinition | None:
    return partitions_def(project.time_axis) if project.time_axis and pipeline.timestamp else None


def predictions_asset(pipeline: PipelineSpec, project: Project) -> dg.AssetsDefinition:
    partitions = predictions_partitions(pipeline, project)

    @dg.asset(
        key=pipeline_key(pipeline, "predictions"),
        deps=[pipeline_key(pipeline, "modelling_table")],
        ins=settled_in(pipeline.name),
        kinds={"lightgbm", "duckdb"},
        partitions_def=partitions,
        **common(pipeline),
        description=f"The champion's scores of the modelling table's rows, one per {pipeline.row_id}: score, "
        f"decision at the champion's threshold, and the version and run that scored it "
        f"({pipeline.name}.predictions). "
        "Re-scoring a partition replaces its rows; a promotion or rollback re-scores the latest "
        f"{pipeline.serving.rescore_partitions} days (the {pipeline.name}_rescore sensor).",
    )
    def predictions(
        context: dg.AssetExecutionContext,
        warehouse: Warehouse,
        artifacts: ArtifactStore,
        champion: SettledChampion,
    ) -> dg.MaterializeResult:
        window = run_window(context) if partitions is not None else None
        version = champion.version
        if version is None:
            # Not an error: the landing runs before the first model is trained refresh this asset too.
            context.log.warning(f"{pipeline.name}: no champion yet, nothing scored")
            return dg.MaterializeResult(metadata={"status": "skipped: no champion yet", "rows": 0})
        with warehouse.get_connection() as conn:
            run = user_errors_as_failures(
                lambda: batch_scores.score_window(conn, pipeline, window, version, context.run.run_id)
            )
            files = _export(context, conn, pipeline, partitions, Path(artifacts.root))
        if run.rebuilt:
            context.log.warning(run.rebuilt)
            # The other partitions' files hold the old columns, as the table's dropped rows did.
            for stale in set(files[0].parent.glob("*.parquet")) - set(files):
                stale.unlink()
        return dg.MaterializeResult(
            metadata=once_per_range(
                context,
                {
                    "table": batch_scores.predictions_table(pipeline),
                    "parquet": dg.MetadataValue.path(str(files[0].parent)),
                    "parquet_files": len(files),
                    "dagster/row_count": run.rows,
                    "rows": run.rows,
                    "rows_replaced": run.replaced,
                    "version": run.version,
                    "window": f"{window.start} to {window.end}" if window else "all rows",
                    "score_summary": dg.MetadataValue.json(round_floats(run.summary, 4)),
                    "score_mean": float(run.summary["mean"]) if run.summary["mean"] is not None else 0.0,
                    **({"table_rebuilt": run.rebuilt} if run.rebuilt else {}),
                },
            )
        )

    return predictions


def _export(
    context: dg.AssetExecutionContext,
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    partitions: dg.TimeWindowPartitionsDefinition | None,
    root: Path,
) -> list[Path]:
    """One Parquet file per partition of the run (one file for an unpartitioned pipeline)."""
    if partitions is None:
        return [batch_scores.export_parquet(conn, pipeline, root, None, None)]
    files = []
    for key in context.partition_keys:
        tw = partitions.time_window_for_partition_key(key)
        window = TimeWindow(start=tw.start.replace(tzinfo=None), end=tw.end.replace(tzinfo=None))
        files.append(batch_scores.export_parquet(conn, pipeline, root, key, window))
    return files
