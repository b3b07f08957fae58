"""Modelling assets of a pipeline: `<pipeline>/modelling_table` (validated sources joined, derived
columns, target, split), `<pipeline>/history` (its point-in-time history feature set, with the guard) and
`<pipeline>/features` (the config's transform, fitted on train only)."""

from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg

from ml_assets.core import dataset, history, history_guard
from ml_assets.core.features import build_features
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.core.sql import q
from ml_assets.orchestration.checks import require_passing_checks, table_check
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.keys import layer_key
from ml_assets.orchestration.metadata import definition_version, table_metadata
from ml_assets.orchestration.resources import ArtifactStore, Warehouse

T = TypeVar("T")


def pipeline_key(pipeline: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([pipeline.name, name])


def common(pipeline: PipelineSpec) -> dict[str, Any]:
    """What every asset of a pipeline's group shares."""
    return {
        "group_name": pipeline.name,
        "tags": {"pipeline": pipeline.name, "task": pipeline.task},
        "owners": pipeline.owners,
        "code_version": definition_version(pipeline),
        # Unpartitioned, but the CLI runs a partition range over a selection only if every asset in it
        # declares single-run backfills (`dagster asset materialize --select '*' --partition-range ...`).
        "backfill_policy": dg.BackfillPolicy.single_run(),
    }


def modelling_table_asset(pipeline: PipelineSpec, project: Project) -> dg.AssetsDefinition:
    sources = project.sources_of(pipeline)
    upstream = [
        layer_key("validated", s) for s in sorted({pipeline.base, *(j.source for j in pipeline.joins)})
    ]
    if pipeline.history is not None:
        upstream.append(pipeline_key(pipeline, "history"))

    @dg.asset(
        key=pipeline_key(pipeline, "modelling_table"),
        deps=upstream,
        kinds={"duckdb"},
        **common(pipeline),
        description=f"Rows of '{pipeline.base}' joined with {[j.source for j in pipeline.joins]}, derived "
        f"columns, the target '{pipeline.target.name}' and the time split (_split).",
    )
    def modelling_table(warehouse: Warehouse) -> dg.MaterializeResult:
        result, meta = _built(
            warehouse,
            upstream,
            lambda c: dataset.build_modelling_table(c, pipeline, sources),
            dataset.table_name(pipeline),
        )
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

    return modelling_table


def features_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    table_key = pipeline_key(pipeline, "modelling_table")

    @dg.asset(
        key=pipeline_key(pipeline, "features"),
        deps=[table_key],
        kinds={"polars", "duckdb"},
        **common(pipeline),
        description="Features declared in the config, fitted on the training split only; the fitted "
        "transform is saved as JSON (named by its sha256) for batch and online scoring.",
    )
    def features(warehouse: Warehouse, artifacts: ArtifactStore) -> dg.MaterializeResult:
        folder = artifacts.transforms(pipeline.name)
        with warehouse.get_connection() as conn:
            require_passing_checks(conn, [table_key])
            result = user_errors_as_failures(lambda: build_features(conn, pipeline, folder))
            meta = table_metadata(conn, f"{q(pipeline.name)}.features")
        return dg.MaterializeResult(
            metadata={
                **meta,
                "transform": dg.MetadataValue.path(str(folder / f"{result.transform_sha256}.json")),
                "transform_sha256": result.transform_sha256,
                "features": dg.MetadataValue.json(result.columns),
                "categorical_vocabulary_sizes": dg.MetadataValue.json(result.vocabulary_sizes),
            }
        )

    return features


def history_asset(pipeline: PipelineSpec, project: Project) -> dg.AssetsDefinition:
    sources = project.sources_of(pipeline)
    upstream = [layer_key("validated", s) for s in history.used_sources(pipeline)]
    spec = history.spec_of(pipeline)

    @dg.asset(
        key=pipeline_key(pipeline, "history"),
        deps=upstream,
        kinds={"duckdb"},
        **common(pipeline),
        description=f"Point-in-time history features of every '{pipeline.base}' row as of {spec.horizon} "
        f"before its own time: families {sorted(spec.families)} (the pipeline file's history block), "
        "refreshed from the validated tables' change log.",
    )
    def history_features(warehouse: Warehouse) -> dg.MaterializeResult:
        result, meta = _built(
            warehouse,
            upstream,
            lambda c: history.build_history(c, pipeline, sources),
            history.table_name(pipeline),
        )
        return dg.MaterializeResult(
            metadata={
                **meta,
                "recomputed_rows": result.recomputed,
                "full_rebuild": result.full_rebuild,
                "coverage_per_window": dg.MetadataValue.json(result.coverage),
                "fallback_share": dg.MetadataValue.json(result.fallback_share),
                "latest_known_at": dg.MetadataValue.json(result.latest_known),
            }
        )

    return history_features


def history_guard_check(pipeline: PipelineSpec, project: Project) -> dg.AssetChecksDefinition:
    sources = project.sources_of(pipeline)
    return table_check(
        pipeline_key(pipeline, "history"),
        "point_in_time",
        "A random sample of rows recomputed from scratch, from only the source rows known before each "
        "row's as_of (one plain filter per row), equals the stored features.",
        lambda c, _: history_guard.check_point_in_time(c, pipeline, sources),
    )


def _built(
    warehouse: Warehouse, upstream: list[dg.AssetKey], build: Callable[[Any], T], table: str
) -> tuple[T, dict[str, Any]]:
    """A table built once its upstream's blocking checks passed (a user error fails the step with its
    message), and the table's metadata."""
    with warehouse.get_connection() as conn:
        require_passing_checks(conn, upstream)
        result = user_errors_as_failures(lambda: build(conn))
        return result, table_metadata(conn, table)
