"""What changed in the validated tables, so that what is built on them can rebuild only that.

Every write of `validated.<source>` appends one row to the change log: the range of event times it
replaced or added (old rows and new rows of the window together), or no range when the whole table was
replaced. A consumer remembers the last change it was built up to (`builds`) together with a
fingerprint of its own definition; a new definition, or a whole-table change, means a full rebuild.

A warehouse opened without the platform's tables (a bare DuckDB connection in a test or a script) has
no log: nothing is recorded and every consumer rebuilds in full, as before the log existed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import duckdb

from ml_assets.core.sql import lit, table_exists
from ml_assets.core.store import MODELLING_BUILDS, VALIDATED_CHANGES, insert


@dataclass(frozen=True)
class Change:
    source: str
    # Event times lo..hi (both included) changed; None: the whole table was replaced.
    lo: dt.datetime | None
    hi: dt.datetime | None


def logging_enabled(conn: duckdb.DuckDBPyConnection) -> bool:
    schema, name = VALIDATED_CHANGES.split(".")
    return table_exists(conn, schema, name)


def latest(conn: duckdb.DuckDBPyConnection) -> int:
    return conn.execute(f"SELECT coalesce(max(seq), 0) FROM {VALIDATED_CHANGES}").fetchone()[0]


def record(
    conn: duckdb.DuckDBPyConnection, source: str, lo: dt.datetime | None, hi: dt.datetime | None
) -> None:
    """Log a write of validated.<source>; the caller owns the transaction (the log and the table agree)."""
    if not logging_enabled(conn):
        return
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    seq = latest(conn) + 1
    # Two writers that read the same head would both take its next number (DuckLake has no key to refuse
    # the second): altering the table in the same transaction makes them conflict, so one retries and
    # numbers its change after the other's (an empty log included, which no row update would cover).
    conn.execute(f"COMMENT ON TABLE {VALIDATED_CHANGES} IS {lit(f'last change: {seq}')}")
    insert(
        conn,
        VALIDATED_CHANGES,
        {"seq": seq, "source": source, "lo": lo, "hi": hi, "recorded_at": now},
    )


def since(conn: duckdb.DuckDBPyConnection, seq: int, sources: list[str]) -> list[Change]:
    rows = conn.execute(
        f"SELECT source, lo, hi FROM {VALIDATED_CHANGES} WHERE seq > ? AND list_contains(?, source) "
        "ORDER BY seq",
        [seq, sources],
    ).fetchall()
    return [Change(*row) for row in rows]


def built_up_to(conn: duckdb.DuckDBPyConnection, consumer: str, definition: str) -> int | None:
    """The last change `consumer` was built up to with this definition; None: it must be built in full."""
    if not logging_enabled(conn):
        return None
    row = conn.execute(
        f"SELECT change_seq FROM {MODELLING_BUILDS} WHERE pipeline = ? AND definition = ?",
        [consumer, definition],
    ).fetchone()
    return row[0] if row else None


def mark_built(conn: duckdb.DuckDBPyConnection, consumer: str, definition: str, seq: int) -> None:
    if not logging_enabled(conn):
        return
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    row = {"pipeline": consumer, "definition": definition, "change_seq": seq, "built_at": now}
    insert(conn, MODELLING_BUILDS, row, replace=True)
