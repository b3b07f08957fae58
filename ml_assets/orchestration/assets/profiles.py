"""Profile assets: `profile/<source>_profile`, the EDA of each validated source (statistics, shares,
histograms, top values, correlation with the targets built from it, changes since the last profile).
"""

import dagster as dg
import polars as pl

from ml_assets.core.profile import DEFAULT_SAMPLE_ROWS, profile_source
from ml_assets.core.spec import Project
from ml_assets.orchestration.assets.sources import SOURCES_GROUP
from ml_assets.orchestration.figures import figure_metadata, report_metadata
from ml_assets.orchestration.keys import layer_key
from ml_assets.orchestration.metadata import definition_version, md_table, rounded
from ml_assets.orchestration.resources import ArtifactStore, Warehouse


def profile_asset(name: str, project: Project) -> dg.AssetsDefinition:
    readers = [p for p in project.pipelines.values() if name in project.sources_of(p)]

    @dg.asset(
        key=layer_key("profile", name),
        deps=[layer_key("validated", name)],
        group_name=SOURCES_GROUP,
        kinds={"duckdb", "matplotlib", "html"},
        # The profile covers the whole validated table, whichever partitions a run loaded.
        backfill_policy=dg.BackfillPolicy.single_run(),
        owners=project.sources[name].owners,
        code_version=definition_version(project.sources[name]),
        description=f"Profile of validated.{name}: per-column statistics, null and distinct shares, "
        f"histograms and top values, correlation with the targets of {[p.name for p in readers]}, and "
        f"changes since the last profile; on a sample of at most {DEFAULT_SAMPLE_ROWS} rows.",
    )
    def profile(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        with warehouse.get_connection() as conn:
            result = profile_source(conn, name, readers, artifacts.reports / "profiles" / name)
        context.log.info(
            f"profiled {result.columns.height} columns on {result.sampled_rows} of {result.rows} rows"
        )
        changes = "\n".join(f"- {c}" for c in result.changes[:12])
        shown = rounded(
            result.columns.select(
                "column",
                "type",
                "null_share",
                "distinct_share",
                "median",
                pl.col("top_values").str.slice(0, 40),
            ),
            3,
        )
        return dg.MaterializeResult(
            metadata={
                "changes": dg.MetadataValue.md(changes),
                "rows": result.rows,
                "sampled_rows": result.sampled_rows,
                # Numbers per materialization: the UI plots data quality over time.
                "null_share": round(result.null_share, 4),
                **figure_metadata(artifacts, result.plots),
                **report_metadata(artifacts, result.report),
                "columns": md_table(shown, limit=60),
                "target_correlation": dg.MetadataValue.json(result.correlations),
            }
        )

    return profile
