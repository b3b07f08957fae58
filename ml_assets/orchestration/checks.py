"""Blocking asset checks on the tables the core builds, and the consumer-side guard across runs.

A failed blocking check stops downstream steps only inside its own run. Every check therefore also
records its verdict in the warehouse (core.check_results.record_check), and the assets that read checked
tables refuse to build on data whose latest verdict failed, whichever run produced it.
"""

from collections.abc import Callable

import dagster as dg
import duckdb

from ml_assets.core import check_results, dataset, ingest, validate
from ml_assets.core.check_results import CheckOutcome
from ml_assets.core.serving import skew
from ml_assets.core.spec import PartitionSpec, PipelineSpec, Project, SourceSpec
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.handoff import SettledChampion
from ml_assets.orchestration.keys import layer_key
from ml_assets.orchestration.metadata import as_metadata
from ml_assets.orchestration.partitions import tagged_window
from ml_assets.orchestration.resources import Warehouse

# A rule gets the connection and the checking run's partitions as a condition on _event_time (None: the
# run names none, or the table is not partitioned); rules that judge one table whole ignore it.
Outcome = Callable[[duckdb.DuckDBPyConnection, str | None], CheckOutcome]


def table_check(
    key: dg.AssetKey, name: str, description: str, outcome: Outcome, partitions: PartitionSpec | None = None
) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=key, name=name, description=description, blocking=True)
    def _run(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
        # Checks are not partitioned (partitioned checks are a Dagster preview): the run's tags say which
        # partitions its steps wrote.
        window = tagged_window(context.run.tags, partitions) if partitions else None
        with warehouse.get_connection() as conn:
            result = outcome(conn, ingest.window_condition(window) if window else None)
            check_results.record_check(conn, key.to_user_string(), name, result, context.run.run_id)
        return dg.AssetCheckResult(
            passed=result.passed,
            # A WARN failure shows in the UI but stops nothing, even on a blocking check.
            severity=dg.AssetCheckSeverity.WARN if result.severity == "warn" else dg.AssetCheckSeverity.ERROR,
            description=result.description,
            metadata=as_metadata(result.metadata),
        )

    return _run


def source_checks(name: str, spec: SourceSpec) -> list[dg.AssetChecksDefinition]:
    key = layer_key("validated", name)
    rules: list[tuple[str, str, Outcome]] = [
        (
            "schema_matches_config",
            "Columns and types equal the config.",
            lambda c, _: validate.check_schema(c, name, spec),
        ),
        (
            "row_conservation",
            "raw rows = validated + quarantined rows.",
            lambda c, where: validate.check_row_conservation(c, name, where),
        ),
        (
            "unique_ids",
            f"No two rows share the id {spec.id}; an id in two partitions "
            + (
                "only warns (duplicate_ids: warn)."
                if spec.duplicate_ids == "warn"
                else "blocks (duplicate_ids: block)."
            ),
            lambda c, _: validate.check_unique_ids(c, name, spec),
        ),
        (
            "value_rules_hold",
            "Ranges, allowed values, not-null and patterns hold on every row.",
            lambda c, _: validate.check_rules(c, name, spec),
        ),
        (
            "quarantine_share",
            f"At most max_quarantine_share = {spec.max_quarantine_share:.1%} of rows quarantined: "
            "more means a broken batch, which must not reach training.",
            lambda c, _: validate.check_quarantine_share(c, name, spec),
        ),
    ]
    return [table_check(key, n, d, o, spec.partitions) for n, d, o in rules]


def modelling_checks(pipeline: PipelineSpec) -> list[dg.AssetChecksDefinition]:
    key = dg.AssetKey([pipeline.name, "modelling_table"])
    return [
        table_check(
            key,
            "target_not_null",
            f"Every row has a target '{pipeline.target.name}'.",
            lambda c, _: dataset.check_target_not_null(c, pipeline),
        ),
        table_check(
            key,
            "splits_populated",
            "Train, validation and test splits all have rows.",
            lambda c, _: dataset.check_splits_populated(c, pipeline),
        ),
    ]


def skew_check(pipeline: PipelineSpec, project: Project) -> dg.AssetChecksDefinition:
    """Online and batch scores of the champion the champion asset settled (its value, loaded as the check's
    `champion` input) agree (core.serving.skew.compare_paths), through the online path every API request
    takes, in-process: blocking, so a champion served differently than it batch-scores stops the run's
    predictions and monitors."""
    key = dg.AssetKey([pipeline.name, "champion"])
    sources = project.sources_of(pipeline)

    @dg.asset_check(
        asset=key,
        name="online_matches_batch",
        blocking=True,
        description=f"{pipeline.serving.skew_sample_rows} test rows scored through the online path (request-time "
        "fields as JSON, completed from the API's lookups) and through the batch path give identical "
        "predictions (1e-9).",
    )
    def _run(
        context: dg.AssetCheckExecutionContext, warehouse: Warehouse, champion: SettledChampion
    ) -> dg.AssetCheckResult:
        # The online path serves the settled version too, whatever the alias says by now.
        post = skew.online_path(warehouse.get_connection, pipeline, sources, pinned=champion.version)
        result = user_errors_as_failures(
            lambda: skew.compare_paths(warehouse.get_connection, pipeline, sources, post, champion.version)
        )
        with warehouse.get_connection() as conn:
            check_results.record_check(
                conn, key.to_user_string(), "online_matches_batch", result, context.run.run_id
            )
        return dg.AssetCheckResult(
            passed=result.passed, description=result.description, metadata=as_metadata(result.metadata)
        )

    return _run


def require_passing_checks(conn: duckdb.DuckDBPyConnection, upstream: list[dg.AssetKey]) -> None:
    """Refuse to build on an upstream table whose latest check verdict failed (see the module's doc)."""
    failed = check_results.failed_checks(conn, [k.to_user_string() for k in upstream])
    if failed:
        raise dg.Failure(
            description=f"upstream check(s) failed: {', '.join(failed)}; fix the data and re-materialize "
            "the upstream asset(s) before this one",
            allow_retries=False,
        )
