"""Where everything lives: the data directory, the DuckDB warehouse, and every table the product owns.

Tables a *pipeline* defines (raw/validated/quarantine per source, the modelling and feature tables)
follow its config and are written by their stage. The tables the *platform* owns (registry, monitoring,
the landing ledger) are declared here only, with a schema version and forward migrations: a connection
brings an older data directory up to date in place, once, and refuses one written by a newer ml_assets
with a message saying what to do.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb

from ml_assets.core.errors import StoreError
from ml_assets.core.sql import lit, q, table_exists

# What every stage that opens its own connections takes: a callable giving a connection for one `with`
# block (`connect` bound to a data directory, the CLI's, or a Dagster resource's `get_connection`).
Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]

DATA_DIR_ENV = "ML_ASSETS_DATA_DIR"
# Where the tables live: unset, `<data dir>/warehouse.duckdb`; else a DuckDB file path or a DuckLake
# catalog (`ducklake:postgres:dbname=... host=...`), whose Parquet files go under the shared root.
WAREHOUSE_ENV = "ML_ASSETS_WAREHOUSE"
SHARED_ROOT_ENV = "ML_ASSETS_SHARED_ROOT"
# local (default) or cluster: orchestration/deployments.py picks resources and executor by it.
DEPLOYMENT_ENV = "ML_ASSETS_DEPLOYMENT"
DUCKLAKE_PREFIX = "ducklake:"
# The attached catalog's name: unqualified `registry.model_versions` resolves into it after USE.
LAKE_ALIAS = "warehouse"
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
# The key of each platform table that is written by key (an upsert replaces the row with the same key).
# A local file enforces it as a PRIMARY KEY; DuckLake has no key constraints, so `upsert` MERGEs on it.
KEYS: dict[str, tuple[str, ...]] = {
    MODEL_VERSIONS: ("version",),
    ALIASES: ("pipeline", "alias"),
    DRIFT_RUNS: ("id",),
    PERFORMANCE_HISTORY: ("pipeline", "champion", "period_start"),
    LANDING_FILES: ("source", "sha256"),
    CHECK_RESULTS: ("asset", "check_name"),
    VALIDATED_CHANGES: ("seq",),
    MODELLING_BUILDS: ("pipeline",),
    SCHEMA_VERSION: ("version",),
}

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


def add_score_run_ids(conn: duckdb.DuckDBPyConnection) -> None:
    """Add `run_id` to every pipeline's batch scores (`<pipeline>.predictions`, owned by
    core.serving.batch_scores: one table per pipeline, so found by shape here rather than declared). Rows
    scored before keep NULL."""
    schemas = conn.execute(
        "SELECT table_schema FROM information_schema.columns WHERE table_catalog = current_database() "
        "AND table_name = 'predictions' GROUP BY table_schema "
        "HAVING bool_or(column_name = 'scored_at') AND NOT bool_or(column_name = 'run_id')"
    ).fetchall()
    for (schema,) in schemas:
        conn.execute(f"ALTER TABLE {q(schema)}.predictions ADD COLUMN run_id VARCHAR")


Migration = str | Callable[[duckdb.DuckDBPyConnection], None]
# Forward migrations, in order: MIGRATIONS[n - 1] brings a data directory from version n - 1 to n (SQL, or
# a function where the tables to change are found in the warehouse).
MIGRATIONS: tuple[tuple[str, Migration], ...] = (
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
    (
        "the landing ledger keeps each file's size and modification time when it was read, so a file that "
        "changes after it was loaded is seen without hashing it (and loaded again whole)",
        f"""ALTER TABLE {LANDING_FILES} ADD COLUMN IF NOT EXISTS size BIGINT;
        ALTER TABLE {LANDING_FILES} ADD COLUMN IF NOT EXISTS mtime_ns BIGINT""",
    ),
    (
        "monitor rows (drift runs and columns, performance periods) record the run that judged them",
        f"""ALTER TABLE {DRIFT_RUNS} ADD COLUMN IF NOT EXISTS run_id VARCHAR;
        ALTER TABLE {DRIFT_HISTORY} ADD COLUMN IF NOT EXISTS run_id VARCHAR;
        ALTER TABLE {PERFORMANCE_HISTORY} ADD COLUMN IF NOT EXISTS run_id VARCHAR""",
    ),
    ("every pipeline's batch scores record the run that scored them", add_score_run_ids),
)
LATEST = len(MIGRATIONS)


def data_root() -> Path:
    """Where the deployment keeps data, model files and reports: the shared root in a cluster, else the
    data directory. Read without Dagster, so the CLI's light commands stay light."""
    if os.environ.get(DEPLOYMENT_ENV, "").strip() != "cluster":
        return data_dir()
    shared = os.environ.get(SHARED_ROOT_ENV, "").strip()
    if not shared:
        raise StoreError(f"{DEPLOYMENT_ENV}=cluster needs {SHARED_ROOT_ENV}: a folder every machine mounts")
    return Path(shared).resolve()


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def warehouse_path(root: Path) -> Path:
    return root / "warehouse.duckdb"


def warehouse(root: Path) -> str:
    """The warehouse setting: $ML_ASSETS_WAREHOUSE (a DuckDB file or a `ducklake:` catalog), else the file
    in the data directory."""
    return os.environ.get(WAREHOUSE_ENV) or str(warehouse_path(root))


def is_lake(database: str | Path) -> bool:
    return str(database).startswith(DUCKLAKE_PREFIX)


def lake_data_path(data_path: str | None = None) -> str:
    """Where a DuckLake warehouse keeps its Parquet files: given, else `<shared root>/warehouse/`."""
    if not data_path:
        root = os.environ.get(SHARED_ROOT_ENV)
        if not root:
            raise StoreError(
                f"a DuckLake warehouse needs a folder every worker sees for its data files: set {SHARED_ROOT_ENV} "
                "(a shared mount) or the Warehouse resource's data_path"
            )
        data_path = str(Path(root) / "warehouse")
    return data_path.rstrip("/") + "/"


def schema_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The data directory's schema version: 0 for an empty warehouse, 1 for one from before versioning."""
    if table_exists(conn, "meta", "schema_version"):
        return conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION}").fetchone()[0]
    return (
        1
        if table_exists(conn, "registry", "model_versions") or table_exists(conn, "ingest", "landing_files")
        else 0
    )


def _on_lake(conn: duckdb.DuckDBPyConnection) -> bool:
    row = conn.execute(
        "SELECT type FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return bool(row) and row[0] == "ducklake"


def _without_keys(ddl: str) -> str:
    """The DDL as DuckLake accepts it: no PRIMARY KEY (it has no key constraints; `KEYS` keeps them)."""
    return re.sub(r",\s*PRIMARY KEY\s*\([^)]*\)|\s+PRIMARY KEY\b", "", ddl)


def migrate(conn: duckdb.DuckDBPyConnection, database: str | Path = "") -> int:
    """Bring the platform's tables to the latest schema, in one transaction; returns the version found.

    Retried as a whole when another process migrated the same warehouse at the same time (DuckLake)."""
    found = schema_version(conn)
    if found == LATEST:
        return found
    lake = _on_lake(conn)
    for attempt in transactions(conn, SCHEMA_VERSION):
        with attempt:
            versioned = table_exists(conn, "meta", "schema_version")
            found = schema_version(conn)
            if found > LATEST:
                raise StoreError(
                    f"{_redacted(database) or 'the warehouse'}: written by a newer ml_assets (schema version "
                    f"{found}; this one knows up to {LATEST}). Upgrade ml_assets, or point {DATA_DIR_ENV} at "
                    "another data directory"
                )
            conn.execute("CREATE SCHEMA IF NOT EXISTS meta")
            ddl = (
                f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION} "
                "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
            )
            conn.execute(_without_keys(ddl) if lake else ddl)
            # A directory from before versioning gets the baseline too: CREATE IF NOT EXISTS adds what it lacks.
            for version in range(found + 1 if versioned else 1, LATEST + 1):
                description, step = MIGRATIONS[version - 1]
                if callable(step):
                    step(conn)
                else:
                    conn.execute(_without_keys(step) if lake else step)
                row = {"version": version, "description": description, "applied_at": _now()}
                insert(conn, SCHEMA_VERSION, row)
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
    """Insert rows by column name; `replace`: an upsert, each row replacing the one with its key (`KEYS`).

    The upsert is a MERGE on the key on both backends (DuckLake has no key for INSERT OR REPLACE to find);
    outside a transaction a write conflict with another process is retried here."""
    rows = list(rows)
    if not rows:
        return
    columns = list(rows[0])
    values = [[r[c] for c in columns] for r in rows]
    if not replace:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        _retrying(table, lambda: conn.executemany(sql, values))
        return
    key = KEYS[table]
    source = ", ".join(f"? AS {c}" for c in columns)
    update = ", ".join(f"{c} = s.{c}" for c in columns if c not in key)
    sql = (
        f"MERGE INTO {table} t USING (SELECT {source}) s ON {' AND '.join(f't.{k} = s.{k}' for k in key)} "
        f"{f'WHEN MATCHED THEN UPDATE SET {update} ' if update else ''}"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) VALUES ({', '.join(f's.{c}' for c in columns)})"
    )
    # One row a statement: a later row with the same key wins, as INSERT OR REPLACE did.
    _retrying(table, lambda: [conn.execute(sql, v) for v in values])


def is_write_conflict(exc: BaseException) -> bool:
    """Another writer committed a change to the same table first (DuckLake's optimistic concurrency)."""
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


def _waits(what: str, reason: str) -> Iterator[None]:
    """Sleeps with jittered exponential backoff until the wait budget is spent, then a StoreError."""
    deadline = time.monotonic() + lock_wait_s()
    delay = 0.05
    while time.monotonic() <= deadline:
        # Jitter keeps two waiting processes from retrying in lock-step.
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
        yield
    raise StoreError(
        f"{what}: {reason} for over {lock_wait_s():.0f} s; wait for it to finish, or raise {LOCK_WAIT_ENV}"
    )


_CONFLICT = "another process kept writing the same table (write conflict)"


def _retrying(table: str, write: Any) -> None:
    """Run one autocommitted write, again while it conflicts with another process's commit."""
    waits = _waits(table, _CONFLICT)
    while True:
        try:
            write()
            return
        except duckdb.TransactionException as exc:
            if not is_write_conflict(exc):
                raise
            try:
                next(waits)
            except StoreError as timeout:
                raise timeout from exc


class Attempt:
    """One try of a transaction: commits on success; a write conflict (at any statement or the commit)
    is rolled back and swallowed so that `transactions` runs the body again on a fresh snapshot."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self.conflict: BaseException | None = None

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        self.conn.execute("BEGIN TRANSACTION")
        return self.conn

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            try:
                self.conn.execute("COMMIT")
                return False
            except duckdb.TransactionException as failed:
                if not is_write_conflict(failed):
                    raise
                exc = failed
        _rollback(self.conn)
        if is_write_conflict(exc):
            self.conflict = exc
            return True
        return False


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    # A commit that failed has already ended its transaction; there is nothing left to roll back.
    with suppress(duckdb.TransactionException):
        conn.execute("ROLLBACK")


def transactions(conn: duckdb.DuckDBPyConnection, table: str) -> Iterator[Attempt]:
    """Attempts of one transaction writing `table` (named in the error once the wait is spent):

        for attempt in transactions(conn, table):
            with attempt:
                ...  # all of it runs again after a write conflict, reading the other writer's rows

    The body must only touch the warehouse: it may run more than once."""
    waits = _waits(table, _CONFLICT)
    while True:
        attempt = Attempt(conn)
        yield attempt
        if attempt.conflict is None:
            return
        try:
            next(waits)
        except StoreError as timeout:
            raise timeout from attempt.conflict


def cursor(conn: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Another connection to the same database (to stream a read while `conn` writes), resolving table
    names as `conn` does: a plain cursor starts in DuckDB's default database, not in an attached lake."""
    (database,) = conn.execute("SELECT current_database()").fetchone()
    other = conn.cursor()
    other.execute(f"USE {q(database)}")
    return other


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


def _open_file(database: str | Path) -> duckdb.DuckDBPyConnection:
    """DuckDB allows one writing process per file: wait while another holds its lock."""
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    waits = _waits(str(database), "another process has held the warehouse's lock")
    while True:
        try:
            return duckdb.connect(str(database), read_only=False)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            try:
                next(waits)
            except StoreError as timeout:
                raise timeout from exc


def _redacted(database: str | Path) -> str:
    return re.sub(r"(password=)\S+", r"\1***", str(database))


def _extension(package: str, name: str) -> str:
    """The extension file a `duckdb-extension-*` package ships for this duckdb (DuckDB cannot INSTALL one
    without the network; LOAD by path needs none)."""
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError:
        folder = None
    path = Path(str(folder)) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if folder is None or not path.is_file():
        raise StoreError(
            f"a DuckLake warehouse needs DuckDB's {name} extension for duckdb {duckdb.__version__}: "
            f"pip install '{package.replace('_', '-')}=={duckdb.__version__}' (constraints.txt pins both)"
        )
    return str(path)


# One attached DuckDB instance per catalog and process, handed out as cursors: loading the two extensions
# (a signature check over ~80 MB) and attaching cost ~2 s, a cursor nothing. Each cursor has its own
# transactions and temp tables; every transaction reads the catalog's latest snapshot.
_LAKES: dict[tuple[str, str], duckdb.DuckDBPyConnection] = {}
_LAKES_LOCK = threading.Lock()


class _CatalogInitRace(Exception):
    """Creating a new DuckLake catalog's tables collided with another process creating them."""


def _attached_lake(database: str, data_path: str) -> duckdb.DuckDBPyConnection:
    """The lake attached in a connection of its own. The first processes to attach an empty catalog
    database all create its tables; all but one fail on PostgreSQL's unique names (two workers' first
    steps of a fresh cluster do), and attach again once the winner's tables are there."""
    waits = _waits(_redacted(database), "another process kept initializing the DuckLake catalog")
    while True:
        try:
            return _attach_once(database, data_path)
        except _CatalogInitRace as race:
            try:
                next(waits)
            except StoreError as timeout:
                raise timeout from race


def _attach_once(database: str, data_path: str) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        if database.startswith(f"{DUCKLAKE_PREFIX}postgres:"):
            conn.execute(f"LOAD {lit(_extension('duckdb_extension_postgres_scanner', 'postgres_scanner'))}")
        conn.execute(f"LOAD {lit(_extension('duckdb_extension_ducklake', 'ducklake'))}")
        try:
            conn.execute(f"ATTACH {lit(database)} AS {LAKE_ALIAS} (DATA_PATH {lit(data_path)})")
        except duckdb.Error as exc:
            first_line = _redacted(str(exc).splitlines()[0])
            if "Failed to initialize DuckLake" in first_line and any(
                clash in first_line for clash in ("duplicate key", "already exists")
            ):
                raise _CatalogInitRace(first_line) from None
            raise StoreError(
                f"{_redacted(database)}: cannot attach the DuckLake catalog ({first_line}); "
                f"check the catalog database is up and {WAREHOUSE_ENV} names it"
            ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _open_lake(database: str, data_path: str | None) -> duckdb.DuckDBPyConnection:
    """A connection to the DuckLake catalog, made the default database so that `registry.x` and every
    pipeline table name resolve into it."""
    key = (database, lake_data_path(data_path))
    with _LAKES_LOCK:
        if key not in _LAKES:
            _LAKES[key] = _attached_lake(*key)
        conn = _LAKES[key].cursor()
    conn.execute(f"USE {LAKE_ALIAS}")
    return conn


@contextmanager
def connect(database: str | Path, data_path: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection with the platform's tables up to date.

    `database` is a DuckDB file (one writing process at a time: opening waits for its lock) or a
    `ducklake:` catalog with its data under `data_path` (many writers: conflicting writes are retried,
    see `transactions`). Connections are opened per step and closed promptly (also on error).
    """
    conn = _open_lake(str(database), data_path) if is_lake(database) else _open_file(database)
    try:
        # Timestamps are stored as naive UTC; a fixed session zone makes casts independent of the host.
        conn.execute("SET TimeZone = 'UTC'")
        # Inside a transaction DuckDB has no row estimate for the tables it wrote there, and an ASOF join
        # on such a small-looking left side becomes a nested loop: the history feature set's incremental
        # update (one transaction) took minutes instead of seconds on half a year of flights. A threshold
        # of 0 keeps the sort-based ASOF join whatever the estimate.
        conn.execute("SET asof_loop_join_threshold = 0")
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
