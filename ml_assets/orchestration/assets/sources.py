"""Source assets: `raw/<source>_raw` (loaded unchanged) and `validated/<source>_validated` +
`quarantine/<source>_quarantine` (keys: orchestration.keys).

They are DuckDB tables shared by every pipeline that uses the source; partitioned sources replace exactly
the rows of the partitions a run covers.
"""

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from ml_assets.core import ingest, validate
from ml_assets.core.ingest import TimeWindow
from ml_assets.core.spec import SourceSpec
from ml_assets.core.sql import q
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.keys import layer_key, source_keys
from ml_assets.orchestration.metadata import definition_version, md_table, once_per_range, table_metadata
from ml_assets.orchestration.partitions import partitions_def, run_window
from ml_assets.orchestration.resources import ArtifactStore, Warehouse

SOURCES_GROUP = "sources"


def _partitioning(spec: SourceSpec) -> dict[str, Any]:
    # Single-run backfills: a range of partitions is one run (also what the CLI's --partition-range needs).
    return {
        "partitions_def": partitions_def(spec.partitions) if spec.partitions else None,
        "backfill_policy": dg.BackfillPolicy.single_run(),
    }


def _ownership(spec: SourceSpec) -> dict[str, Any]:
    return {"owners": spec.owners, "code_version": definition_version(spec)}


def read_batch(
    name: str, spec: SourceSpec, base_dir: Path, root: Path, warehouse: Warehouse, window: TimeWindow | None
) -> tuple[ingest.Batch | None, list[dict[str, Any]], TimeWindow | None]:
    """Read what a raw materialization loads, before taking the warehouse's write lock."""
    with warehouse.get_connection() as conn:
        skip = ingest.rejected_sha256(conn, name) if spec.landing else set()
        if spec.landing and window is not None and window.start and window.end:
            skip |= ingest.loaded_outside(conn, name, window.start, window.end)
        if spec.kind != "files" and window is None:
            window = TimeWindow(after=ingest.watermark(conn, name))
    if spec.kind != "files":
        batch, records = ingest.read_remote(name, spec, window)
        return batch, records, window
    files = ingest.resolve_files(name, spec, base_dir, root)
    try:
        batch, records = ingest.read_files(name, spec, files, skip)
    except ingest.RejectedFile as exc:
        if spec.landing:
            with warehouse.get_connection() as conn:
                ingest.record_files(conn, name, [exc.ledger_row()], "")
        raise
    return batch, records, window


def _rate(batch: ingest.Batch | None, started: float) -> str:
    rows, seconds = (batch.rows if batch is not None else 0), time.monotonic() - started
    return f"{rows} rows in {seconds:.1f} s ({rows / seconds if seconds > 0 else 0:,.0f} rows/s)"


def _describe(name: str, spec: SourceSpec) -> str:
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
    return (
        f"Source '{name}' from {origin}, loaded unchanged into DuckDB (raw.{name}), every value as in the "
        f"source, plus _source_file/_source_row. {how} {spec.description}"
    )


def raw_asset(name: str, spec: SourceSpec, base_dir: Path) -> dg.AssetsDefinition:
    @dg.asset(
        key=layer_key("raw", name),
        group_name=SOURCES_GROUP,
        kinds={"duckdb", spec.resolved_format if spec.kind == "files" else spec.kind},
        description=_describe(name, spec),
        **_partitioning(spec),
        **_ownership(spec),
    )
    def raw(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        window = run_window(context) if spec.partitions else None
        if spec.landing:
            with warehouse.get_connection() as conn:
                files = ingest.resolve_files(name, spec, base_dir, Path(artifacts.root))
                for change in ingest.changed_after_load(conn, name, files):
                    context.log.info(f"changed after it was loaded, read again whole: {change}")
        started = time.monotonic()
        batch, records, window = user_errors_as_failures(
            lambda: read_batch(name, spec, base_dir, Path(artifacts.root), warehouse, window)
        )
        context.log.info(f"read {_rate(batch, started)} from {len(records)} file(s)/page(s)")
        started = time.monotonic()
        with warehouse.get_connection() as conn:
            result = user_errors_as_failures(
                lambda: ingest.load_raw(conn, name, spec, batch, records, window)
            )
            if spec.landing:
                ingest.record_files(
                    conn, name, [r | {"status": "loaded"} for r in records], context.run.run_id
                )
            meta = table_metadata(conn, f"raw.{q(name)}")
        context.log.info(f"loaded {_rate(batch, started)} into raw.{name}")
        files = pl.DataFrame(result.files).drop("path", strict=False) if result.files else pl.DataFrame()
        return dg.MaterializeResult(
            metadata=once_per_range(
                context,
                {
                    **meta,
                    "rows_loaded": result.rows,
                    "window": str(window) if window else "whole source",
                    "files": md_table(files, limit=50),
                    "sha256": ",".join(str(f.get("sha256", "")) for f in result.files),
                    "ingested_at": result.ingested_at,
                },
            )
        )

    return raw


def validated_asset(name: str, spec: SourceSpec) -> dg.AssetsDefinition:
    raw_key, valid_key, quarantine_key = source_keys(name)

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                key,
                deps=[raw_key],
                group_name=SOURCES_GROUP,
                kinds={"duckdb"},
                description=text,
                **_ownership(spec),
            )
            for key, text in (
                (valid_key, f"Source '{name}' typed and checked against its config rules."),
                (quarantine_key, f"Rows of '{name}' rejected by validation, with rule, column and reasons."),
            )
        ],
        name=f"validate_{name}",
        **_partitioning(spec),
    )
    def validated(context: dg.AssetExecutionContext, warehouse: Warehouse) -> Iterable[dg.MaterializeResult]:
        where = ingest.window_condition(run_window(context)) if spec.partitions else None
        with warehouse.get_connection() as conn:
            result = user_errors_as_failures(lambda: validate.validate_source(conn, name, spec, where))
            valid_meta = table_metadata(conn, f"validated.{q(name)}")
            quarantine_meta = table_metadata(conn, f"quarantine.{q(name)}")
        share = result.quarantined_rows / result.raw_rows if result.raw_rows else 0.0
        if result.quarantine_limit_hit:
            context.log.warning(result.quarantine.description)
        yield dg.MaterializeResult(
            asset_key=valid_key,
            metadata=once_per_range(
                context,
                {
                    **valid_meta,
                    "raw_rows": result.raw_rows,
                    "quarantined_rows": result.quarantined_rows,
                    "quarantine_share": round(share, 6),  # six digits: a limit of 0.1% is still readable
                    "quarantine_limit_hit": result.quarantine_limit_hit,
                    "quarantine_limit": result.quarantine.description,
                    "tz_offsets_normalised": dg.MetadataValue.json(result.tz_offsets_normalised),
                    # The schema validated against: written, or inferred and stored beside the pipeline file.
                    "schema": dg.MetadataValue.json({c: s.type for c, s in spec.columns.items()}),
                },
                valid_key,
            ),
        )
        by_rule = pl.DataFrame(
            result.by_rule, schema={"rule": pl.String, "column": pl.String, "rows": pl.Int64}
        )
        yield dg.MaterializeResult(
            asset_key=quarantine_key,
            metadata=once_per_range(
                context,
                {
                    **quarantine_meta,
                    "by_rule": md_table(by_rule),
                    "examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in result.examples) or "none"),
                },
                quarantine_key,
            ),
        )

    return validated
