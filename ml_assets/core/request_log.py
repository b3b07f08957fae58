"""The online API's request log: every scored row of a (sampled) request, as the API completed it (request
fields, joined and derived columns), with its score, decision, version, latency and time.

Rows are buffered in memory and written by the API's poller as one new Parquet file per flush under
`<data>/request_log/<pipeline>/`: files rotate by time, are written under a temporary name and renamed
(a reader never sees half a file), and nothing touches the warehouse, so the log never blocks a pipeline.
The drift asset reads the latest window of it as its current data (`monitoring.current: request_log`).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
from pathlib import Path

import polars as pl

LOGGED_AT = "_logged_at"


def log_dir(root: Path, pipeline: str) -> Path:
    return Path(root) / "request_log" / pipeline


class RequestLog:
    """A buffer of scored rows, flushed to a new Parquet file at each `flush`."""

    def __init__(self, folder: Path, sample: float = 1.0, seed: int | None = None) -> None:
        self.folder, self.sample = Path(folder), sample
        self._rows: list[pl.DataFrame] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._files = 0

    def record(self, completed: pl.DataFrame, scored: pl.DataFrame, latency_ms: float) -> None:
        """Keep a request's rows (a `sample` share of requests, each whole)."""
        if self.sample < 1.0 and self._random.random() >= self.sample:
            return
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        frame = pl.concat(
            [completed, scored.select("score", "decision", "version")], how="horizontal"
        ).with_columns(pl.lit(latency_ms).alias("_latency_ms"), pl.lit(now).alias(LOGGED_AT))
        with self._lock:
            self._rows.append(frame)

    def flush(self) -> Path | None:
        """Write what was recorded since the last flush as one file; None when nothing was."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files += 1
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}-{self._files}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pl.concat(rows, how="diagonal_relaxed").write_parquet(tmp)
        tmp.replace(self.folder / name)
        return self.folder / name


def read_window(folder: Path, days: int) -> pl.DataFrame | None:
    """The logged rows of the latest `days` days (by log time); None when nothing is logged."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        return None
    # Lazily: only the window's rows are ever read into memory.
    log = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
    latest = log.select(pl.col(LOGGED_AT).max()).collect().item()
    return log.filter(pl.col(LOGGED_AT) >= latest - dt.timedelta(days=days)).collect()
