"""Reading the platform's tables in the store tests (the file and the DuckLake warehouse alike)."""

from __future__ import annotations

import re

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


# Differ between two runs by design (times, run and version ids, file paths, the commit order of writes
# that ran at once: `seq` numbers validated tables' changes as they commit) or follow from one that does.
PER_RUN = {
    "recorded_at", "created_at", "updated_at", "decided_at", "computed_at", "checked_at", "applied_at",
    "built_at", "run_id", "version", "path", "manifest", "manifest_sha256", "champion", "challenger",
    "champion_before", "champion_after", "details", "id", "drift_run", "report", "_source_file", "scored_at",
    "description", "seq",
}  # fmt: skip
# A version id (registry.new_version_id) inside a text, such as a gate decision's reason.
VERSION_ID = re.compile(r"v\d{8}T\d{6}-[0-9a-f]{6}")


def _without_ids(value: object) -> object:
    return VERSION_ID.sub("<version>", value) if isinstance(value, str) else value


def table_contents(database: str, data_path: str | None = None) -> dict[str, list[tuple]]:
    """Every table's rows (sorted, without the per-run columns, version ids in texts masked), by
    schema-qualified name: what two runs of the same pipeline on the same data must agree on, whichever
    backend holds the tables."""
    out = {}
    with store.connect(database, data_path) as conn:
        names = conn.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
        for schema, name in names:
            table = f'{schema}."{name}"'
            kept = [c for (c, *_) in conn.execute(f"DESCRIBE {table}").fetchall() if c not in PER_RUN]
            cols = ", ".join(f'"{c}"' for c in kept) or "count(*)"  # only per-run columns: their count
            rows = [
                tuple(map(_without_ids, r)) for r in conn.execute(f"SELECT {cols} FROM {table}").fetchall()
            ]
            out[f"{schema}.{name}"] = sorted(rows, key=repr)
    return out


def differing(ours: dict[str, list[tuple]], theirs: dict[str, list[tuple]]) -> dict[str, str]:
    """Tables whose contents differ, each with its first differing row on both sides (for the message)."""
    out = {}
    for table in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(table), theirs.get(table)
        if a != b:
            first = next(((x, y) for x, y in zip(a or [], b or [], strict=False) if x != y), None)
            out[table] = f"{len(a or [])} vs {len(b or [])} rows; first difference {first}"
    return out
