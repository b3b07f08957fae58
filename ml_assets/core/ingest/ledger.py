"""The landing zone's ledger (`ingest.landing_files`): every file seen, loaded or rejected, and why."""

from __future__ import annotations

import datetime as dt

import duckdb
import polars as pl

from ml_assets.core.store import LANDING_FILES, insert_many


def record_files(
    conn: duckdb.DuckDBPyConnection, source: str, rows: list[dict[str, object]], run_id: str
) -> None:
    """Upsert ledger rows (keys: source, sha256; fields: file, rows, first/last_partition, status, reason)."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    insert_many(
        conn,
        LANDING_FILES,
        (
            {
                "source": source,
                "sha256": r["sha256"],
                "file": r["file"],
                "rows": r.get("rows"),
                "first_partition": r.get("first_partition"),
                "last_partition": r.get("last_partition"),
                "status": r["status"],
                "reason": r.get("reason", ""),
                "run_id": run_id,
                "recorded_at": now,
            }
            for r in rows
        ),
        replace=True,
    )


def rejected_sha256(conn: duckdb.DuckDBPyConnection, source: str) -> set[str]:
    rows = conn.execute(
        f"SELECT sha256 FROM {LANDING_FILES} WHERE source = ? AND status = 'rejected'", [source]
    ).fetchall()
    return {r[0] for r in rows}


def ledger(conn: duckdb.DuckDBPyConnection, source: str | None = None) -> pl.DataFrame:
    where = "WHERE source = ?" if source else ""
    return conn.execute(
        f"SELECT * FROM {LANDING_FILES} {where} ORDER BY recorded_at, file", [source] if source else []
    ).pl()
