"""Replay: cut a source's recorded history into batches and drop them into its landing zone over time.

This is how real data "arrives" in a demo or a test: `ml-assets replay flight_delay --until 2013-07-31`
writes the next slices (after what was replayed before) as files, optionally with an injected shift, and
the landing sensor ingests them exactly as it would ingest files from an upstream system.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from ml_assets.config import PipelineSpec, Project, SourceSpec
from ml_assets.ingest import (
    PKG_SCHEME,
    SourceError,
    event_time_sql,
    landing_dir,
    package_file,
    read_file,
)

STATE_FILE = ".replayed_until"
SHIFT = re.compile(
    r"^(?:(?P<source>[a-z_][a-z0-9_]*)\.)?(?P<column>[a-z_][a-z0-9_]*)"
    r"(?:=(?P<op>[+*-])(?P<value>[0-9.]+)|:(?P<old>[^-]+)->(?P<new>.+))$"
)


@dataclass(frozen=True)
class Shift:
    """`[source.]column=+30`, `column=*1.5`, `column=-5` (numeric) or `[source.]column:AA->UA` (values)."""

    column: str
    source: str | None = None
    op: str | None = None
    value: float | None = None
    old: str | None = None
    new: str | None = None

    @classmethod
    def parse(cls, text: str) -> Shift:
        m = SHIFT.match(text.strip())
        if not m:
            raise ValueError(
                f"shift {text!r}: expected [source.]column=+N, =-N, =*N or [source.]column:OLD->NEW"
            )
        value = float(m["value"]) if m["value"] else None
        return cls(m["column"], m["source"], m["op"], value, m["old"], m["new"])

    def apply(self, frame: pl.DataFrame) -> pl.DataFrame:
        col = pl.col(self.column)
        if self.old is not None:
            return frame.with_columns(
                pl.when(col == self.old).then(pl.lit(self.new)).otherwise(col).alias(self.column)
            )
        number = col.cast(pl.Float64, strict=False)
        shifted = {"+": number + self.value, "-": number - self.value, "*": number * self.value}[self.op]
        integral = frame.get_column(self.column).drop_nulls().str.contains(r"^-?\d+$").all()
        if integral and float(self.value).is_integer() and self.op != "*":
            shifted = shifted.cast(pl.Int64)
        return frame.with_columns(shifted.cast(pl.String).alias(self.column))


def _history(name: str, spec: SourceSpec) -> pl.DataFrame:
    """The source's whole recorded history with each row's event time (as partitioning computes it)."""
    assert spec.replay is not None
    path = spec.replay.path
    frames = [
        f for _, f in read_file(name, package_file(path) if path.startswith(PKG_SCHEME) else Path(path), spec)
    ]
    frame = pl.concat(frames, how="diagonal_relaxed").with_columns(pl.lit(path).alias("_source_file"))
    with duckdb.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.register("_h", frame.to_arrow())
        return conn.execute(f"SELECT *, {event_time_sql(spec)} AS _t FROM _h").pl()


def _slices(first: dt.date, last: dt.date, batch: str) -> list[tuple[dt.date, dt.date]]:
    """[start, end] day ranges covering first..last, cut at month/week/day boundaries."""
    out, start = [], first
    while start <= last:
        if batch == "day":
            end = start
        elif batch == "week":
            end = start + dt.timedelta(days=6 - start.weekday())
        else:
            next_month = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
            end = next_month - dt.timedelta(days=1)
        out.append((start, min(end, last)))
        start = end + dt.timedelta(days=1)
    return out


def replayed_until(root: Path, name: str) -> dt.date | None:
    state = landing_dir(root, name) / STATE_FILE
    return dt.date.fromisoformat(json.loads(state.read_text())["until"]) if state.exists() else None


def replay_source(
    root: Path,
    name: str,
    spec: SourceSpec,
    until: dt.date,
    batch: str = "month",
    shifts: tuple[Shift, ...] = (),
) -> list[Path]:
    """Drop the slices after the last replayed day up to `until` (inclusive) into the landing zone."""
    if spec.replay is None or spec.partitions is None:
        raise SourceError(f"source '{name}': replay needs `landing: true`, `replay:` and `partitions:`")
    start = replayed_until(root, name)
    first = start + dt.timedelta(days=1) if start else spec.partitions.start
    if first > until:
        return []
    folder = landing_dir(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    history = _history(name, spec)
    for shift in shifts:
        if shift.column not in history.columns:
            raise ValueError(f"shift {shift.column!r}: source '{name}' has no such column")
    columns = [c for c in history.columns if c not in ("_t", "_source_file", "_source_row")]
    written = []
    for lo, hi in _slices(first, until, batch):
        rows = history.filter(
            (pl.col("_t") >= dt.datetime.combine(lo, dt.time()))
            & (pl.col("_t") < dt.datetime.combine(hi + dt.timedelta(days=1), dt.time()))
        ).select(columns)
        if rows.height == 0:
            continue
        for shift in shifts:
            rows = shift.apply(rows)
        suffix = "_shifted" if shifts else ""
        path = folder / f"{name}_{lo}_{hi}{suffix}.csv"
        # Written under a dot-name and renamed into place: the sensor never sees half a file.
        tmp = folder / f".{path.name}.tmp"
        rows.write_csv(tmp)
        tmp.replace(path)
        written.append(path)
    (folder / STATE_FILE).write_text(json.dumps({"until": str(until)}))
    return written


def replay(
    project: Project,
    root: Path,
    pipeline: PipelineSpec,
    until: dt.date,
    batch: str = "month",
    shifts: tuple[Shift, ...] = (),
) -> dict[str, list[Path]]:
    """Replay every landing source a pipeline uses; a shift without a source applies where the column exists."""
    out = {}
    for name, spec in project.sources_of(pipeline).items():
        if not spec.replay:
            continue
        mine = tuple(s for s in shifts if s.source in (None, name) and (s.source or s.column in spec.columns))
        out[name] = replay_source(root, name, spec, until, batch, mine)
    unknown = [s for s in shifts if s.source and s.source not in out]
    if unknown:
        raise ValueError(f"shift on {unknown[0].source!r}: not a replayable source of '{pipeline.name}'")
    return out


def seed(project: Project, root: Path) -> dict[str, list[Path]]:
    """Fill empty landing zones with their initial period (what `ml-assets run` starts from)."""
    out = {}
    for name, spec in project.sources.items():
        if spec.replay and spec.replay.initial_until and replayed_until(root, name) is None:
            out[name] = replay_source(root, name, spec, spec.replay.initial_until)
    return out
