"""Dagster resources: the DuckDB warehouse and the artifact store, with paths from the environment."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource

DATA_DIR_ENV = "ML_ASSETS_DATA_DIR"
PIPELINES_DIR_ENV = "ML_ASSETS_PIPELINES_DIR"


LOCK_WAIT_S = 120.0


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def warehouse_path(root: Path) -> Path:
    return root / "warehouse.duckdb"


@contextmanager
def connect(database: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection, retried while another process holds the file lock.

    DuckDB allows one writing process per file, so connections are opened per step and closed promptly
    (also on error, which dagster-duckdb's own get_connection does not do) instead of held for a run.
    """
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + LOCK_WAIT_S
    delay = 0.05
    while True:
        try:
            conn = duckdb.connect(str(database), read_only=False)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            # Jitter keeps two waiting processes from retrying in lock-step.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
    try:
        # Timestamps are stored as naive UTC; a fixed session zone makes casts independent of the host.
        conn.execute("SET TimeZone = 'UTC'")
        yield conn
    finally:
        conn.close()


class Warehouse(DuckDBResource):
    """The project's DuckDB file: raw, validated, quarantine, feature and registry tables."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with connect(self.database) as conn:
            yield conn


class ArtifactStore(ConfigurableResource):
    """Root folder for files: model versions, feature transforms and reports."""

    root: str

    def path(self, *parts: str) -> Path:
        out = Path(self.root).joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out


def table_exists(conn: duckdb.DuckDBPyConnection, schema: str, name: str) -> bool:
    return bool(
        conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema, name],
        ).fetchone()[0]
    )


def replace_rows(conn: duckdb.DuckDBPyConnection, table: str, source: str, where: str | None) -> None:
    """Replace the rows of `table` matching `where` (None: append) by the rows of relation `source`.

    Columns are matched by name; a column the batch brings that the table lacks is added (schema
    evolution), one the batch lacks stays null. The caller owns the transaction.
    """
    schema, name = (part.strip('"') for part in table.split(".", 1))
    if not table_exists(conn, schema, name):
        conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {source}")
        return
    have = {r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()}
    for column, ctype, *_ in conn.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        if column not in have:
            conn.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {ctype}')
    if where is not None:
        conn.execute(f"DELETE FROM {table} WHERE {where}")
    conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}")
