"""A checked batch staged on disk: one Parquet part per file read, so that no step holds every file's
values in memory at once. DuckDB reads the parts back, streaming, with the union of their columns."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ml_assets.core.sql import LINEAGE, lit, q

PREFIX = "ml-assets-batch-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def staging_folder() -> tempfile.TemporaryDirectory:
    """A new folder for a batch's parts, named after this process. A run killed while reading (kill -9, an
    out-of-memory kill) cannot remove its folder, which may hold gigabytes: the next batch of any process
    removes the folders of processes that no longer exist."""
    for stale in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = stale.name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-")


@dataclass
class Batch:
    parts: list[Path] = field(default_factory=list)
    rows: int = 0
    # Union of the parts' columns in first-seen order (files of one source may differ: schema evolution).
    columns: list[str] = field(default_factory=list)
    # Removed with the batch (or at exit): a batch never outlives the run that read it.
    folder: tempfile.TemporaryDirectory = field(default_factory=staging_folder)

    def next_part(self) -> Path:
        return Path(self.folder.name) / f"part-{len(self.parts):05d}.parquet"

    def add(self, part: Path) -> tuple[list[str], int]:
        """Record a written part; its (columns, rows), read from the Parquet footer."""
        columns = list(pl.read_parquet_schema(part))
        rows = pl.scan_parquet(part).select(pl.len()).collect().item()
        self.parts.append(part)
        self.rows += rows
        self.columns += [c for c in columns if c not in self.columns]
        return columns, rows

    def sql(self) -> str:
        """The rows of every part as one relation, source columns first, then the lineage columns."""
        ordered = [c for c in self.columns if c not in LINEAGE] + list(LINEAGE)
        files = ", ".join(lit(str(p)) for p in self.parts)
        return f"SELECT {', '.join(q(c) for c in ordered)} FROM read_parquet([{files}], union_by_name = true)"


def batch_of(frame: pl.DataFrame) -> Batch:
    """A frame read in one piece (a database or HTTP page set) as a batch."""
    batch = Batch()
    part = batch.next_part()
    frame.write_parquet(part)
    batch.add(part)
    return batch
