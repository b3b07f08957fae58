"""Loading a batch into `raw.<source>` unchanged (values as in the source, plus `_source_file` and
`_source_row`), atomically: a whole table, exactly a partition's rows, or an append past the watermark.

A table is replaced only after every file was read: a broken file leaves the previous raw table untouched.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import duckdb
import polars as pl

from ml_assets.core.ingest import database, http
from ml_assets.core.ingest.batch import Batch, batch_of
from ml_assets.core.ingest.files import check_batch
from ml_assets.core.ingest.window import TimeWindow, event_time_sql, window_condition
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.sql import EVENT_TIME, LINEAGE, drop_unpartitioned, q, replace_rows, table_exists
from ml_assets.core.store import transactions


@dataclass(frozen=True)
class IngestResult:
    rows: int
    files: list[dict[str, object]]
    columns: list[str]
    ingested_at: str


def read_remote(name: str, spec: SourceSpec, window: TimeWindow) -> tuple[Batch | None, list[dict]]:
    """Rows of a database or HTTP source inside the window, as strings (like a CSV file)."""
    reader = database.read_database if spec.database else http.read_http
    frame, label = reader(name, spec, window)
    if frame.height == 0:
        return None, []
    record = check_batch(name, spec, label, frame.columns, frame.height)
    return batch_of(frame.with_columns(pl.lit(label).alias("_source_file"))), [record]


def watermark(conn: duckdb.DuckDBPyConnection, name: str) -> dt.datetime | None:
    """Latest event time already loaded: an incremental source reads only what is newer."""
    if not table_exists(conn, "raw", name):
        return None
    return conn.execute(f"SELECT max({EVENT_TIME}) FROM raw.{q(name)}").fetchone()[0]


def load_raw(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    spec: SourceSpec,
    batch: Batch | None,
    records: list[dict[str, object]],
    window: TimeWindow | None,
) -> IngestResult:
    """Write a batch into raw.<name>, atomically.

    Without a window (an unpartitioned file source) the table is replaced. With one, exactly the window's
    rows are replaced (a partition) or, for a watermark, appended: re-running never duplicates rows and
    never touches other partitions.
    """
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    table = f"raw.{q(name)}"
    conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
    if batch is None:
        if window is None or window.after is not None:
            return IngestResult(0, records, [], now)
        # An empty window still replaces what the window held (the batch now has no rows there).
        batch = batch_of(
            pl.DataFrame(
                {"_source_file": [], "_source_row": []},
                schema={"_source_file": pl.String, "_source_row": pl.Int64},
            )
        )
    conn.execute(f"CREATE OR REPLACE TEMP VIEW _incoming AS {batch.sql()}")
    if window is None:
        select = "SELECT * FROM _incoming"
    elif spec.timestamp in batch.columns:
        select = (
            f"SELECT * FROM (SELECT *, {event_time_sql(spec)} AS {EVENT_TIME} FROM _incoming) "
            f"WHERE {window_condition(window)}"
        )
    else:
        select = f"SELECT *, CAST(NULL AS TIMESTAMP) AS {EVENT_TIME} FROM _incoming WHERE false"
    try:
        # DuckDB streams the staged parts, bounded by its memory_limit (it can spill; Python cannot).
        if window is None:
            conn.execute(f"CREATE OR REPLACE TABLE {table} AS {select}")
            rows = batch.rows
        else:
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __batch AS {select}")
            rows = conn.execute("SELECT count(*) FROM __batch").fetchone()[0]
            for attempt in transactions(conn, table):
                with attempt:
                    drop_unpartitioned(conn, "raw", name)
                    replace_rows(
                        conn, table, "__batch", None if window.after is not None else window_condition(window)
                    )
    finally:
        conn.execute("DROP TABLE IF EXISTS __batch")
        conn.execute("DROP VIEW IF EXISTS _incoming")
    return IngestResult(
        rows=rows,
        files=records,
        columns=[c for c in batch.columns if c not in LINEAGE],
        ingested_at=now,
    )
