"""What the UI shows about a materialization: tables as markdown, table schemas and row counts, and the
promotion/rollback decisions with the registry's versions and log."""

from __future__ import annotations

from typing import Any

import dagster as dg
import duckdb
import polars as pl

from ml_assets.core import registry
from ml_assets.core.promotion import Decision
from ml_assets.core.spec import PipelineSpec


def md_table(frame: pl.DataFrame, limit: int = 10) -> dg.MetadataValue:
    head = frame.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in head.iter_rows()]
    return dg.MetadataValue.md("\n".join(lines))


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


def decision_metadata(
    decision: Decision, conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec
) -> dict[str, Any]:
    history = registry.versions(conn, pipeline.name)
    champion = history.filter(pl.col("status").str.contains(registry.CHAMPION))
    meta: dict[str, Any] = {
        "action": decision.action,
        "champion": decision.champion_after or "(none)",
        "model_versions": md_table(history.sort("created_at", descending=True).drop("path"), limit=20),
        "decision_log": md_table(
            registry.decisions(conn, pipeline.name).sort("decided_at", descending=True), limit=20
        ),
        "details": dg.MetadataValue.json(decision.details),
    }
    if champion.height:
        # A float per materialization: the UI plots the champion's test metric across versions.
        meta[f"champion_test_{pipeline.metric}"] = float(champion.get_column("test_score")[0])
    return meta
