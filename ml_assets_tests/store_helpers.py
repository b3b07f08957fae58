"""Reading the platform's tables in the store tests (the file and the DuckLake warehouse alike)."""

from __future__ import annotations

import duckdb

from ml_assets.core import store

PLATFORM_TABLES = {
    "registry.model_versions",
    "registry.aliases",
    "registry.decision_log",
    "monitor.drift_runs",
    "monitor.drift_history",
    "monitor.performance_history",
    "monitor.check_results",
    "ingest.landing_files",
}


def tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        f"{schema}.{name}"
        for schema, name in conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
    }


def columns(conn: duckdb.DuckDBPyConnection, qualified: str) -> list[str]:
    schema, name = qualified.split(".")
    return [
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
            "ORDER BY ordinal_position",
            [schema, name],
        ).fetchall()
    ]


def version_rows(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(
        f"SELECT version, description, applied_at FROM {store.SCHEMA_VERSION} ORDER BY version"
    ).fetchall()
