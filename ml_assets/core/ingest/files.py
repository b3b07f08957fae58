"""File sources: locate a source's files (a path, a glob, package data or the landing zone), read them
with every value as a string, and check each batch against the source's schema-evolution policy and
time axis before anything is written."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import glob
import gzip
import io
import os
import stat
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import duckdb
import polars as pl

from ml_assets.core.errors import ConfigError, RejectedFile, SourceError
from ml_assets.core.hashing import sha256_file
from ml_assets.core.ingest.batch import Batch
from ml_assets.core.ingest.window import event_time_sql
from ml_assets.core.spec.package_data import PKG_SCHEME, package_file
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.sql import LINEAGE, lit, q

# Extensions of data files, matched case-insensitively (`.CSV`, `.Csv.GZ`); `.csv.gz` before `.csv`.
DATA_SUFFIXES = (".csv.gz", ".csv", ".parquet", ".zip")
# A batch still being written: replay (and any careful writer) writes `.<name>.tmp` and renames it into
# place when complete; `.part` and `~` are what downloaders and editors leave behind.
WRITING_SUFFIXES = (".tmp", ".part", "~")
# Ledger keys of entries known by name, not content (sha256 hex never contains ':').
ENTRY_KEY = "path:"
_SPECIAL_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
)


def landing_dir(root: Path, name: str) -> Path:
    return Path(root) / "landing" / name


def data_suffix(path: Path) -> str | None:
    lower = path.name.lower()
    return next((s for s in DATA_SUFFIXES if lower.endswith(s)), None)


def entry_key(path: Path) -> str:
    """Ledger key of a landing entry not known by its content (a directory, an unreadable file, a copy):
    its name, so the entry keeps one row, updated in place, however often it is seen."""
    return f"{ENTRY_KEY}{path.name}"


@dataclass(frozen=True)
class LandingEntry:
    """One entry of a landing folder: a data file (no reason), or ignored with the reason."""

    path: Path
    reason: str = ""


def landing_entries(folder: Path) -> list[LandingEntry]:
    """Every entry of a landing folder, in name order, except batches still being written.

    Naming rule: a name starting with `.` or ending in `.tmp`, `.part` or `~` is a batch still being
    written and is left alone (not listed, not recorded) until renamed. A directory, socket, FIFO or device,
    or a symlink to one, is ignored with its kind; a file whose name does not end in one of DATA_SUFFIXES
    (any case) is ignored as an unsupported extension. Everything else is data, including a file that
    cannot be read (no permission, a dangling symlink): reading it rejects it with the OS error.
    """
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.lower().endswith(WRITING_SUFFIXES):
            continue
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = None
        kind = next((k for test, k in _SPECIAL_KINDS if mode is not None and test(mode)), None)
        if kind:
            via = " (through a symlink)" if path.is_symlink() else ""
            entries.append(LandingEntry(path, f"{kind}{via}, not a data file: only regular files are read"))
        elif data_suffix(path) is None:
            supported = ", ".join(DATA_SUFFIXES)
            entries.append(LandingEntry(path, f"unsupported extension; supported: {supported} (any case)"))
        else:
            entries.append(LandingEntry(path))
    return entries


def resolve_files(name: str, spec: SourceSpec, base_dir: Path, root: Path) -> list[Path]:
    """Files a file source currently consists of, in a stable order (a landing zone may be empty)."""
    if spec.landing:
        # The landing sensor classifies entries with the same function: both read the same files.
        return [e.path for e in landing_entries(landing_dir(root, name)) if not e.reason]
    if spec.path is None:
        raise ConfigError(f"source '{name}': a file source needs path: or landing: true")
    if spec.path.startswith(PKG_SCHEME):
        pattern = str(package_file(spec.path))
    else:
        path = Path(os.path.expandvars(os.path.expanduser(spec.path)))
        pattern = str(path if path.is_absolute() else base_dir / path)
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise SourceError(f"source '{name}': no file matches {spec.path!r} (looked for {pattern})")
    return files


def _binary(data: Path | bytes) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")


def _header(data: Path | bytes) -> list[str]:
    with _binary(data) as raw:
        return next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")), [])


def _not_text(byte: int, line: int, column: int, encoding: str) -> str:
    fix = (
        "save the file as UTF-8, or declare its encoding on the source (e.g. `encoding: latin-1` or `cp1252`)"
        if codecs.lookup(encoding).name == "utf-8"
        else f"save the file as {encoding}, or declare the encoding it has (`encoding:`)"
    )
    return f"line {line}: byte 0x{byte:02x} at column {column} is not valid {encoding} text; {fix}"


def parse_problem(data: Path | bytes) -> str | None:
    """The first line of a (UTF-8) CSV that polars cannot read, and what to do about it: a byte that is
    not UTF-8, or a row with more fields than the header (polars names neither the line nor the fix).
    None when no such line is found."""
    with _binary(data) as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_text(line[exc.start], number, exc.start + 1, "utf-8")
    with _binary(data) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""))
        fields = len(next(reader, []))
        for record in reader:
            if len(record) > fields:
                return (
                    f"line {reader.line_num} has {len(record)} fields, the header has {fields}: quote a value "
                    'that holds a comma ("a,b"), or remove the extra field(s)'
                )
    return None


def _as_utf8(name: str, label: str, data: Path | bytes, encoding: str) -> Path | bytes:
    """What polars reads (UTF-8 only): the data itself, or its text decoded from the source's `encoding`
    (in memory, like a gunzipped file)."""
    if codecs.lookup(encoding).name == "utf-8":
        return data
    raw = data if isinstance(data, bytes) else data.read_bytes()
    try:
        return raw.decode(encoding).encode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = raw.count(b"\n", 0, exc.start) + 1, exc.start - raw.rfind(b"\n", 0, exc.start)
        problem = _not_text(raw[exc.start], line, column, encoding)
        raise SourceError(f"source '{name}': file {label}: {problem}; nothing was loaded") from exc


@dataclass(frozen=True)
class Piece:
    """One readable unit of a data file (the file, or a zip member): its lazy scan, and the UTF-8 bytes
    behind it to name the line of a parser error (None: a Parquet file)."""

    label: str
    scan: pl.LazyFrame
    data: Path | bytes | None = None

    @contextmanager
    def named_rows(self, name: str) -> Iterator[None]:
        """A parser error as the source's one-line error naming the file, the line and what to do."""
        try:
            yield
        except pl.exceptions.ComputeError as exc:
            problem = parse_problem(self.data) if self.data is not None else None
            if problem is None:
                raise
            raise SourceError(f"source '{name}': file {self.label}: {problem}; nothing was loaded") from exc


def _scan_csv(name: str, label: str, data: Path | bytes, spec: SourceSpec, rows: int | None) -> pl.LazyFrame:
    # Polars would load a repeated column name as `<name>_duplicated_0`: a column nobody configured,
    # and an ambiguous source for the configured one.
    repeated = {c: n for c, n in Counter(_header(data)).items() if n > 1}
    if repeated:
        names = ", ".join(f"'{c}' ({n} times)" for c, n in repeated.items())
        raise SourceError(
            f"source '{name}': file {label}: column name(s) {names} repeated in the header (rule: unique "
            "column names); nothing was loaded. Rename or drop the repeated column and land the file again"
        )
    # Everything as strings: typing is validation's job, and a wrong type must become a quarantined
    # row with a reason, not a failed or silently coerced load.
    return pl.scan_csv(
        io.BytesIO(data) if isinstance(data, bytes) else data,
        infer_schema=False,
        null_values=spec.null_values,
        n_rows=rows,
    ).with_row_index("_source_row", offset=1)


def _scan_file(name: str, path: Path, spec: SourceSpec, rows: int | None) -> list[Piece]:
    suffix = data_suffix(path)
    if suffix == ".parquet" or (suffix is None and spec.resolved_format == "parquet"):
        return [
            Piece(
                str(path),
                pl.scan_parquet(path, row_index_name="_source_row", row_index_offset=1, n_rows=rows),
            )
        ]
    batches: list[tuple[str, Path | bytes]] = [(str(path), path)]
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            batches = [(f"{path}!{m}", archive.read(m)) for m in members]
    elif suffix == ".csv.gz":
        batches = [(str(path), gzip.decompress(path.read_bytes()))]
    texts = [(label, _as_utf8(name, label, data, spec.encoding)) for label, data in batches]
    return [Piece(label, _scan_csv(name, label, text, spec, rows), text) for label, text in texts]


@contextmanager
def _reading(name: str, path: Path) -> Iterator[None]:
    """What reading a file can raise, as the source's one-line error naming the file."""
    try:
        yield
    except (
        pl.exceptions.PolarsError,
        OSError,
        EOFError,  # a truncated gzip stream
        zlib.error,
        zipfile.BadZipFile,
        csv.Error,  # a header field beyond csv's size limit: binary data named .csv
        ValueError,
    ) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"source '{name}': cannot read file {path}: {first_line}") from exc


def read_file(
    name: str, path: Path, spec: SourceSpec, rows: int | None = None
) -> list[tuple[str, pl.DataFrame]]:
    """(label, frame) per data file, of its first `rows` rows if given; a zip archive yields one entry per
    member, a `.csv.gz` is gunzipped. A name without a known extension (a `path:` source) is read in the
    source's format."""
    frames = []
    with _reading(name, path):
        for piece in _scan_file(name, path, spec, rows):
            with piece.named_rows(name):
                frames.append((piece.label, piece.scan.collect()))
    return frames


def check_batch(name: str, spec: SourceSpec, label: str, columns: list[str], rows: int) -> dict[str, object]:
    """Apply the source's schema-evolution policy to one batch (its columns and row count); what was
    accepted is returned as a record."""
    if rows == 0:
        raise SourceError(
            f"source '{name}': file {label} has no data rows (empty batch); nothing was "
            "loaded and the previous raw table is unchanged"
        )
    policy = spec.schema_evolution
    present = [c for c in columns if c not in LINEAGE]
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
        "rows": rows,
        "extra_columns": ",".join(extra),
        "missing_columns_null": ",".join(missing),
    }


def _within_partitions(
    name: str, spec: SourceSpec, label: str, first: dt.datetime, last: dt.datetime
) -> None:
    # A row outside the time axis would belong to no partition: it could never be loaded, only lost.
    axis = spec.partitions
    if axis is None:
        return
    start = dt.datetime.combine(axis.start, dt.time())
    end = dt.datetime.combine(axis.end, dt.time()) if axis.end else None
    if first < start or (end is not None and last >= end):
        raise SourceError(
            f"source '{name}': file {label} has '{spec.timestamp}' values from {first} to {last} (UTC), outside the partitions "
            f"{axis.start} to {axis.end or 'open end'} (rule: partitions); widen partitions.start/end"
        )


def content_key(name: str, path: Path) -> str:
    """A data file's ledger key, its sha256; a file that cannot be read is rejected under its name."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise RejectedFile(
            f"source '{name}': cannot read file {path}: {exc.strerror or exc}; nothing was loaded. Make it "
            "a readable regular file, or remove it",
            path,
            entry_key(path),
        ) from exc


def file_facts(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file as the ledger keeps them; None when it cannot be stat'ed."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _stage(name: str, spec: SourceSpec, batch: Batch, path: Path) -> list[dict[str, object]]:
    """Stage every piece of one file into the batch; a checked record per piece."""
    records = []
    with _reading(name, path):
        for piece in _scan_file(name, path, spec, None):
            # Streamed to disk: one file's values are never all in memory, let alone every file's.
            part = batch.next_part()
            with piece.named_rows(name):
                piece.scan.with_columns(pl.lit(piece.label).alias("_source_file")).sink_parquet(part)
            record = check_batch(name, spec, piece.label, *batch.add(part))
            if spec.partitions:
                first, last = file_time_range(name, spec, piece.label, part)
                _within_partitions(name, spec, piece.label, first, last)
                record["first_partition"], record["last_partition"] = first, last
            records.append(record)
    return records


def read_files(
    name: str, spec: SourceSpec, files: list[Path], skip_sha256: set[str] = frozenset()
) -> tuple[Batch | None, list[dict[str, object]]]:
    """Every batch of a file source, checked and staged file by file (batch.Batch); a file whose content
    was already read (same sha256 under another name) or was rejected before is skipped, so re-dropping a
    file never duplicates rows. Each record carries the file's size and mtime_ns as they were before it
    was hashed; a file whose size or mtime changed while it was read is still being written: the read
    fails and nothing of it is loaded (a later run reads it whole).

    `skip_sha256` holds ledger keys: rejected contents, and the `path:<name>` of entries set aside (an
    unreadable file, a copy): such a name is read only for content no other file holds."""
    batch = Batch()
    records: list[dict[str, object]] = []
    seen = set(skip_sha256)
    keyed: list[tuple[Path, str, tuple[int, int] | None]] = []
    for path in files:
        facts = file_facts(path)
        try:
            keyed.append((path, content_key(name, path), facts))
        except RejectedFile as exc:
            if exc.sha256 not in seen:  # unreadable, and not already rejected as such
                raise
    # A content under several names keeps the name the ledger gave it: recorded copies come last (stable).
    keyed.sort(key=lambda entry: entry_key(entry[0]) in seen)
    for path, sha, facts in keyed:
        if sha in seen:
            continue
        seen.add(sha)
        try:
            staged = _stage(name, spec, batch, path)
        except SourceError as exc:
            batch.folder.cleanup()  # now, not whenever the traceback holding the batch is collected
            raise RejectedFile(str(exc), path, sha) from exc
        if file_facts(path) != facts:
            batch.folder.cleanup()
            raise SourceError(
                f"source '{name}': file {path} changed while it was read (still being written); nothing was "
                "loaded. A later run reads it whole once it has settled; a writer that cannot finish in one "
                "go should write .<name>.tmp and rename it when complete"
            )
        size, mtime_ns = facts or (None, None)
        records += [
            {**r, "path": str(path), "sha256": sha, "size": size, "mtime_ns": mtime_ns} for r in staged
        ]
    return (batch if batch.parts else None), records


def file_time_range(name: str, spec: SourceSpec, label: str, part: Path) -> tuple[dt.datetime, dt.datetime]:
    """First and last event time of a staged batch (the partitions a landed file touches)."""
    with duckdb.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(
            f"CREATE VIEW _batch AS SELECT {q(spec.timestamp)}, _source_file FROM read_parquet({lit(str(part))})"
        )
        first, last = conn.execute(
            f"SELECT min(t), max(t) FROM (SELECT {event_time_sql(spec)} t FROM _batch)"
        ).fetchone()
    if first is None:
        raise SourceError(
            f"source '{name}': no row of {label} has a valid "
            f"'{spec.timestamp}' (rule: type); the batch cannot be placed in a partition"
        )
    return first, last
