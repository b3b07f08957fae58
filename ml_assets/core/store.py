"""Where everything lives: the data directory, the DuckDB warehouse, and every table the product owns.

Tables a *pipeline* defines (raw/validated/quarantine per source, the modelling and feature tables)
follow its config and are written by their stage. The tables the *platform* owns (registry, monitoring,
the landing ledger) are declared here only, with a schema version and forward migrations: a connection
brings an older data directory up to date in place, once, and refuses one written by a newer ml_assets
with a message saying what to do.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import duckdb

from ml_assets.core.errors import StoreError
from ml_assets.core.sql import lit, table_exists

# What every stage that opens its own connections takes: a callable giving a connection for one `with`
# block (`connect` bound to a data directory, the CLI's, or a Dagster resource's `get_connection`).
Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]

DATA_DIR_ENV = "ML_ASSETS_DATA_DIR"
LOCK_WAIT_ENV = "ML_ASSETS_LOCK_WAIT_S"
DUCKDB_MEMORY_ENV = "ML_ASSETS_DUCKDB_MEMORY"
# DuckDB's own default is 80% of the machine's RAM per connection, which lets a big join or sort take the
# memory the Python side needs; with a bound it spills to `<warehouse>.tmp/` instead (bench/scale.py).
DEFAULT_DUCKDB_MEMORY = "2GB"
# A step of another run may hold the file for a while on a busy machine; waiting is cheap, failing is not.
DEFAULT_LOCK_WAIT_S = 600.0

MODEL_VERSIONS = "registry.model_versions"
ALIASES = "registry.aliases"
DECISION_LOG = "registry.decision_log"
DRIFT_RUNS = "monitor.drift_runs"
DRIFT_HISTORY = "monitor.drift_history"
PERFORMANCE_HISTORY = "monitor.performance_history"
LANDING_FILES = "ingest.landing_files"
CHECK_RESULTS = "monitor.check_results"
VALIDATED_CHANGES = "ingest.validated_changes"
MODELLING_BUILDS = "ingest.modelling_builds"
SCHEMA_VERSION = "meta.schema_version"

# Version 1 is the layout ml_assets had before this module existed (each stage created its own tables),
# so a data directory from then is recognised as version 1 and migrated forward like any other.
_V1 = f"""
CREATE SCHEMA IF NOT EXISTS registry;
CREATE SCHEMA IF NOT EXISTS monitor;
CREATE SCHEMA IF NOT EXISTS ingest;
CREATE TABLE IF NOT EXISTS {MODEL_VERSIONS} (
    version VARCHAR PRIMARY KEY,
    pipeline VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    task VARCHAR,
    metric VARCHAR,
    cv_score DOUBLE,
    test_score DOUBLE,
    baseline_test_score DOUBLE,
    train_start VARCHAR,
    train_end VARCHAR,
    data_fingerprint VARCHAR,
    code_version VARCHAR,
    model_sha256 VARCHAR,
    path VARCHAR NOT NULL,
    manifest JSON
);
CREATE TABLE IF NOT EXISTS {ALIASES} (
    pipeline VARCHAR NOT NULL,
    alias VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (pipeline, alias)
);
CREATE TABLE IF NOT EXISTS {DECISION_LOG} (
    decided_at TIMESTAMP NOT NULL,
    pipeline VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    challenger VARCHAR,
    champion_before VARCHAR,
    champion_after VARCHAR,
    reason VARCHAR NOT NULL,
    details JSON,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS {DRIFT_RUNS} (
    id VARCHAR PRIMARY KEY,
    pipeline VARCHAR NOT NULL,
    computed_at TIMESTAMP NOT NULL,
    champion VARCHAR NOT NULL,
    window_start TIMESTAMP,
    window_end TIMESTAMP,
    current_rows BIGINT,
    reference_rows BIGINT,
    drift_share DOUBLE,
    dataset_drift BOOLEAN,
    drifted VARCHAR[],
    report VARCHAR
);
CREATE TABLE IF NOT EXISTS {DRIFT_HISTORY} (
    drift_run VARCHAR NOT NULL,
    pipeline VARCHAR NOT NULL,
    window_end TIMESTAMP,
    column_name VARCHAR NOT NULL,
    method VARCHAR,
    score DOUBLE,
    threshold DOUBLE,
    drifted BOOLEAN
);
CREATE TABLE IF NOT EXISTS {PERFORMANCE_HISTORY} (
    pipeline VARCHAR NOT NULL,
    champion VARCHAR NOT NULL,
    period_start TIMESTAMP NOT NULL,
    period_end TIMESTAMP NOT NULL,
    rows BIGINT NOT NULL,
    metric VARCHAR NOT NULL,
    score DOUBLE,
    expected DOUBLE NOT NULL,
    change DOUBLE,
    degraded BOOLEAN,
    computed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (pipeline, champion, period_start)
);
CREATE TABLE IF NOT EXISTS {LANDING_FILES} (
    source VARCHAR, sha256 VARCHAR, file VARCHAR, rows BIGINT, first_partition TIMESTAMP,
    last_partition TIMESTAMP, status VARCHAR, reason VARCHAR, run_id VARCHAR, recorded_at TIMESTAMP,
    PRIMARY KEY (source, sha256)
);
"""

# Forward migrations, in order: MIGRATIONS[n - 1] brings a data directory from version n - 1 to n.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("the registry, monitoring and landing-ledger tables", _V1),
    (
        "model versions record the run that trained them (stages hand off by run, not by 'latest')",
        f"ALTER TABLE {MODEL_VERSIONS} ADD COLUMN IF NOT EXISTS run_id VARCHAR",
    ),
    (
        "the latest verdict of every data check, which consumers in later runs refuse to build on",
        f"""CREATE TABLE IF NOT EXISTS {CHECK_RESULTS} (
            asset VARCHAR NOT NULL, check_name VARCHAR NOT NULL, passed BOOLEAN NOT NULL,
            description VARCHAR, run_id VARCHAR, checked_at TIMESTAMP NOT NULL,
            PRIMARY KEY (asset, check_name))""",
    ),
    (
        "model versions record the sha256 of their manifest, which every load checks (versions registered "
        "before stay NULL: hashing their manifest now would bless whatever it says today)",
        f"ALTER TABLE {MODEL_VERSIONS} ADD COLUMN IF NOT EXISTS manifest_sha256 VARCHAR",
    ),
    (
        "every write of a validated table records the event-time range it changed, and every modelling "
        "table the change it was built up to, so a new partition rebuilds only the rows it affects",
        f"""CREATE SCHEMA IF NOT EXISTS ingest;
        CREATE TABLE IF NOT EXISTS {VALIDATED_CHANGES} (
            seq BIGINT PRIMARY KEY, source VARCHAR NOT NULL, lo TIMESTAMP, hi TIMESTAMP,
            recorded_at TIMESTAMP NOT NULL);
        CREATE TABLE IF NOT EXISTS {MODELLING_BUILDS} (
            pipeline VARCHAR PRIMARY KEY, definition VARCHAR NOT NULL, change_seq BIGINT NOT NULL,
            built_at TIMESTAMP NOT NULL)""",
    ),
    (
        "data-check verdicts follow the source keys that now name their layer (validated/flights became "
        "validated/flights_validated): a failed verdict under the old key would no longer block anything",
        f"""UPDATE {CHECK_RESULTS}
            SET asset = regexp_replace(asset, '^(raw|validated|quarantine)/(.+)$', '\\1/\\2_\\1')
            WHERE regexp_matches(asset, '^(raw|validated|quarantine)/[^/]+$')
                AND NOT ends_with(asset, '_' || split_part(asset, '/', 1))""",
    ),
)
LATEST = len(MIGRATIONS)


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def warehouse_path(root: Path) -> Path:
    return root / "warehouse.duckdb"


def schema_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The data directory's schema version: 0 for an empty warehouse, 1 for one from before versioning."""
    if table_exists(conn, "meta", "schema_version"):
        return conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION}").fetchone()[0]
    return (
        1
        if table_exists(conn, "registry", "model_versions") or table_exists(conn, "ingest", "landing_files")
        else 0
    )


def migrate(conn: duckdb.DuckDBPyConnection, database: str | Path = "") -> int:
    """Bring the platform's tables to the latest schema, in one transaction; returns the version found."""
    versioned = table_exists(conn, "meta", "schema_version")
    found = schema_version(conn)
    if found > LATEST:
        raise StoreError(
            f"{database or 'the warehouse'}: written by a newer ml_assets (schema version {found}; this one "
            f"knows up to {LATEST}). Upgrade ml_assets, or point {DATA_DIR_ENV} at another data directory"
        )
    if found == LATEST:
        return found
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("CREATE SCHEMA IF NOT EXISTS meta")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION} "
            "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
        )
        # A directory from before versioning gets the baseline too: CREATE IF NOT EXISTS adds what it lacks.
        for version in range(found + 1 if versioned else 1, LATEST + 1):
            description, ddl = MIGRATIONS[version - 1]
            conn.execute(ddl)
            insert(
                conn, SCHEMA_VERSION, {"version": version, "description": description, "applied_at": _now()}
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def insert(
    conn: duckdb.DuckDBPyConnection, table: str, row: Mapping[str, Any], replace: bool = False
) -> None:
    """Insert one row by column name (never by position, so a migration that adds a column is safe)."""
    insert_many(conn, table, [row], replace)


def insert_many(
    conn: duckdb.DuckDBPyConnection, table: str, rows: Iterable[Mapping[str, Any]], replace: bool = False
) -> None:
    rows = list(rows)
    if not rows:
        return
    columns = list(rows[0])
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    conn.executemany(
        f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        [[r[c] for c in columns] for r in rows],
    )


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def change_marker(database: str | Path) -> tuple:
    """Changes whenever a write to the warehouse commits, read without opening it: DuckDB appends every
    commit to `<file>.wal` and folds the log into the file at a checkpoint, and a reader touches neither.
    Cheap enough to poll (a connection costs ~15 ms and takes the file lock from the pipelines)."""
    marker = []
    for path in (Path(database), Path(f"{database}.wal")):
        try:
            stat = path.stat()
            marker.append((stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            marker.append(None)
    return tuple(marker)


def lock_wait_s() -> float:
    return float(os.environ.get(LOCK_WAIT_ENV) or DEFAULT_LOCK_WAIT_S)


@contextmanager
def connect(database: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection with the platform's tables up to date, retried while another
    process holds the file lock.

    DuckDB allows one writing process per file, so connections are opened per step and closed promptly
    (also on error) instead of held for a run.
    """
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_wait_s()
    delay = 0.05
    while True:
        try:
            conn = duckdb.connect(str(database), read_only=False)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{database}: another process has held the warehouse's lock for over {lock_wait_s():.0f} s "
                    f"({exc}); wait for it to finish, or raise {LOCK_WAIT_ENV}"
                ) from exc
            # Jitter keeps two waiting processes from retrying in lock-step.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
    try:
        # Timestamps are stored as naive UTC; a fixed session zone makes casts independent of the host.
        conn.execute("SET TimeZone = 'UTC'")
        memory = os.environ.get(DUCKDB_MEMORY_ENV, DEFAULT_DUCKDB_MEMORY)
        try:
            conn.execute(f"SET memory_limit = {lit(memory)}")
        except duckdb.Error as exc:
            raise StoreError(
                f"{DUCKDB_MEMORY_ENV}={memory!r} is not a memory size DuckDB accepts (e.g. 2GB, 512MB): {exc}"
            ) from exc
        migrate(conn, database)
        yield conn
    finally:
        conn.close()
