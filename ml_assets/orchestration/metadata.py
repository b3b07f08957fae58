"""What the UI shows about a materialization: tables as markdown, table schemas and row counts, and the
promotion/rollback decisions with the registry's versions and log."""

from __future__ import annotations

import hashlib
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from pydantic import BaseModel

import ml_assets
from ml_assets.core import registry
from ml_assets.core.promotion import Decision
from ml_assets.core.spec import PipelineSpec


def definition_version(spec: BaseModel) -> str:
    """Dagster's code_version of an asset: the package version and a hash of the config that defines it,
    so the UI marks an asset stale when its pipeline or source file changes (not on every commit). Who
    owns an asset changes nothing it computes, so owners are left out."""
    ownerless = {"owners": True, "sources": {"__all__": {"owners"}}}  # a pipeline's own sources too
    digest = hashlib.sha256(spec.model_dump_json(exclude=ownerless).encode()).hexdigest()[:12]
    return f"{ml_assets.__version__}-{digest}"


def once_per_range(
    context: dg.AssetExecutionContext, metadata: dict[str, Any], asset_key: dg.AssetKey | None = None
) -> dict[str, Any]:
    """The metadata of a run over a range of partitions goes on the range's last partition, which the
    asset's page shows as its latest materialization; every other partition of the range says where it is.

    Dagster records one materialization per partition, each with the metadata returned: a full daily reload
    of 1M flights is ~7,700 events, and their metadata was most of the event log's cost (bench/RESULTS.md,
    "Scale"). The numbers are the whole range's (a table's row count after the run), not a partition's, so
    repeating them on every day would only look like per-day figures."""
    keys = context.partition_keys if context.assets_def.partitions_def else []
    if len(keys) <= 1:
        return metadata
    context.add_asset_metadata(metadata, asset_key=asset_key, partition_key=keys[-1])
    return {"run_range": f"{keys[0]} to {keys[-1]}: this run's metadata is on partition {keys[-1]}"}


def md_table(frame: pl.DataFrame, limit: int = 10) -> dg.MetadataValue:
    head = frame.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in head.iter_rows()]
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: Any) -> str:
    # A pipe or a newline inside a cell would end the row (a gate's reason may hold either).
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def as_metadata(values: dict[str, Any]) -> dict[str, Any]:
    """Plain values as they are; dicts and lists as JSON."""
    return {k: dg.MetadataValue.json(v) if isinstance(v, dict | list) else v for k, v in values.items()}


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


def rounded(frame: pl.DataFrame, digits: int = 4) -> pl.DataFrame:
    """Floats to what matters: four digits tell a 0.69 ROC-AUC from a 0.70 one."""
    return frame.with_columns(pl.col(pl.Float32, pl.Float64).round(digits))


def round_floats(value: Any, digits: int = 5) -> Any:
    """Floats inside nested dicts and lists rounded (a decision's details)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_floats(v, digits) for v in value]
    return value


def versions_table(history: pl.DataFrame, limit: int = 20) -> dg.MetadataValue:
    """Newest first, the columns that fit a page: what each version is now and its scores."""
    shown = history.sort("created_at", descending=True).select(
        "version", "status", "test_score", "baseline_test_score"
    )
    return md_table(rounded(shown), limit=limit)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def decisions_table(log: pl.DataFrame, limit: int = 20) -> dg.MetadataValue:
    """Newest first, reasons shortened (the full text is in registry.decision_log and `ml-assets
    versions`), minutes not microseconds."""
    shown = log.sort("decided_at", descending=True).select(
        pl.col("decided_at").dt.strftime("%Y-%m-%d %H:%M"),
        "action",
        "challenger",
        pl.col("reason").map_elements(shorten, return_dtype=pl.String),
    )
    return md_table(shown, limit=limit)


def is_champion(status: pl.Expr) -> pl.Expr:
    return status.str.split("+").list.contains(registry.CHAMPION)


def decision_metadata(
    decision: Decision, conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec
) -> dict[str, Any]:
    history = registry.versions(conn, pipeline.name)
    champion = history.filter(is_champion(pl.col("status")))
    meta: dict[str, Any] = {
        "action": decision.action,
        "champion": decision.champion_after or "(none)",
    }
    if champion.height:
        # A float per materialization: the UI plots the champion's test metric across versions.
        meta[f"champion_test_{pipeline.metric}"] = round(float(champion.get_column("test_score")[0]), 4)
    return meta | {
        "model_versions": versions_table(history),
        "decision_log": decisions_table(registry.decisions(conn, pipeline.name)),
        "details": dg.MetadataValue.json(round_floats(decision.details)),
    }
