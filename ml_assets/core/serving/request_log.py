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
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ml_assets.core.serving.batch_scores import PROBABILITIES

LOGGED_AT = "_logged_at"
# What a request's scores add to its completed row (`probabilities` for a multiclass model only).
SCORED = ("score", "decision", "version", PROBABILITIES)


def log_dir(root: Path, pipeline: str) -> Path:
    return Path(root) / "request_log" / pipeline


@dataclass
class _Run:
    """Consecutive requests with the same columns (they change only around a swap): their rows, each the
    completed values, the score values, the latency and the time; the types of the run's first request."""

    names: tuple[str, ...]
    schema: pl.Schema
    rows: list[tuple] = field(default_factory=list)


class RequestLog:
    """A buffer of scored rows, flushed to a new Parquet file at each `flush`.

    A request keeps its rows as Python values (microseconds); `flush`, on the poller's thread, builds one
    frame of them. Not the requests' frames stacked: stacking a poll's few hundred one-row frames took ~25 ms
    of the poller's CPU and GIL, which requests arriving meanwhile waited out (the serve bench's p99 was
    5.3-5.8 ms with the log, 3.9-4.5 ms without). At most `max_rows` rows wait between two flushes: beyond
    that, whole requests are dropped and counted, so a stalled flush cannot grow the process without
    bound."""

    def __init__(
        self, folder: Path, sample: float = 1.0, seed: int | None = None, max_rows: int = 100_000
    ) -> None:
        self.folder, self.sample, self.max_rows = Path(folder), sample, max_rows
        self._runs: list[_Run] = []
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
        scores = [scored.get_column(c) for c in SCORED if c in scored.columns]
        names = (*completed.columns, *(c.name for c in scores))
        rows = [
            (*row, *score, latency_ms, now)
            for row, score in zip(
                completed.rows(), zip(*(c.to_list() for c in scores), strict=True), strict=True
            )
        ]
        with self._lock:
            if self._rows + len(rows) > self.max_rows:
                self.dropped += 1
                return
            if not self._runs or self._runs[-1].names != names:
                types = [*completed.schema.items(), *((c.name, c.dtype) for c in scores), *_LOGGED.items()]
                self._runs.append(_Run(names, pl.Schema(types)))
            self._runs[-1].rows.extend(rows)
            self._rows += len(rows)

    def flush(self) -> Path | None:
        """Write what was recorded since the last flush as one file; None when nothing was."""
        with self._lock:
            runs, self._runs, self._rows = self._runs, [], 0
        if not runs:
            return None
        frames = [_frame(run) for run in runs]
        frame = pl.concat(frames, how="vertical" if len(frames) == 1 else "diagonal_relaxed")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files += 1
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}-{self._files}.parquet"
        tmp = self.folder / f".{name}.tmp"
        frame.write_parquet(tmp)
        tmp.replace(self.folder / name)
        return self.folder / name


def _frame(run: _Run) -> pl.DataFrame:
    try:
        return pl.DataFrame(run.rows, schema=run.schema, orient="row")
    except (TypeError, ValueError, pl.exceptions.PolarsError):
        # The same columns with other types within the run (a swap that changed a column's type, which
        # the run's names cannot tell): the values are kept, their types inferred.
        return pl.DataFrame(run.rows, schema=list(run.schema), orient="row", infer_schema_length=None)


_LOGGED = {"_latency_ms": pl.Float64, LOGGED_AT: pl.Datetime("us")}


def read_window(folder: Path, days: int) -> pl.DataFrame | None:
    """The logged rows of the latest `days` days (by log time); None when nothing is logged."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        return None
    # Lazily: only the window's rows are ever read into memory.
    log = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
    latest = log.select(pl.col(LOGGED_AT).max()).collect().item()
    return log.filter(pl.col(LOGGED_AT) >= latest - dt.timedelta(days=days)).collect()
