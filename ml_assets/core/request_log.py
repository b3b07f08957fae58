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
import time
from pathlib import Path

import numpy as np
import polars as pl

from ml_assets.core.score import PROBABILITIES

LOGGED_AT = "_logged_at"
# What a request's scores add to its completed row (`probabilities` for a multiclass model only).
SCORED = ("score", "decision", "version", PROBABILITIES)


def log_dir(root: Path, pipeline: str) -> Path:
    return Path(root) / "request_log" / pipeline


class RequestLog:
    """A buffer of scored rows, flushed to a new Parquet file at each `flush`.

    A request only appends references to its frames (no polars work on the request path); `flush`, on
    the poller's thread, stacks them. At most `max_rows` rows wait between two flushes: beyond that, whole
    requests are dropped and counted, so a stalled flush cannot grow the process without bound."""

    def __init__(
        self, folder: Path, sample: float = 1.0, seed: int | None = None, max_rows: int = 100_000
    ) -> None:
        self.folder, self.sample, self.max_rows = Path(folder), sample, max_rows
        self._requests: list[tuple[pl.DataFrame, pl.DataFrame, float, dt.datetime]] = []
        self._rows = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._files = 0

    def record(self, completed: pl.DataFrame, scored: pl.DataFrame, latency_ms: float) -> None:
        """Keep a request's rows (a `sample` share of requests, each whole)."""
        if self.sample < 1.0 and self._random.random() >= self.sample:
            return
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        with self._lock:
            if self._rows + completed.height > self.max_rows:
                self.dropped += 1
                return
            self._requests.append((completed, scored, latency_ms, now))
            self._rows += completed.height

    def flush(self) -> Path | None:
        """Write what was recorded since the last flush as one file; None when nothing was."""
        with self._lock:
            requests, self._requests, self._rows = self._requests, [], 0
        if not requests:
            return None
        completed, scored, latency, logged = zip(*requests, strict=True)
        scores = _stack(list(scored))
        # Each request's latency and time, repeated for each of its rows.
        each = np.repeat(np.arange(len(requests)), [c.height for c in completed])
        frame = pl.concat(
            [
                _stack(list(completed)),
                scores.select(c for c in SCORED if c in scores.columns),
                pl.DataFrame({"_latency_ms": latency, LOGGED_AT: logged})[each],
            ],
            how="horizontal",
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files += 1
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}-{self._files}.parquet"
        tmp = self.folder / f".{name}.tmp"
        frame.write_parquet(tmp)
        tmp.replace(self.folder / name)
        return self.folder / name


# Requests' frames stacked this many at a time, the GIL given up in between: stacking a poll's few hundred
# one-row frames at once held it for 2-5 ms, which a request arriving meanwhile waited out (the flush runs
# on the poller's thread beside the event loop's).
STACK_CHUNK = 50


def _stack(frames: list[pl.DataFrame]) -> pl.DataFrame:
    parts = []
    for i in range(0, len(frames), STACK_CHUNK):
        parts.append(_concat(frames[i : i + STACK_CHUNK]))
        time.sleep(0)
    return _concat(parts)


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    # Requests served by one model and lookups share a schema and are stacked as they are (comparing their
    # schemas first would cost more than that); only around a swap do columns need aligning, several times
    # slower.
    try:
        return pl.concat(frames, how="vertical")
    except (pl.exceptions.SchemaError, pl.exceptions.ShapeError):
        return pl.concat(frames, how="diagonal_relaxed")


def read_window(folder: Path, days: int) -> pl.DataFrame | None:
    """The logged rows of the latest `days` days (by log time); None when nothing is logged."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        return None
    # Lazily: only the window's rows are ever read into memory.
    log = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
    latest = log.select(pl.col(LOGGED_AT).max()).collect().item()
    return log.filter(pl.col(LOGGED_AT) >= latest - dt.timedelta(days=days)).collect()
