"""Replay: cut a source's recorded history into batches and drop them into its landing zone over time.

This is how real data "arrives" in a demo or a test: `ml-assets replay flight_delay --until 2013-07-31`
writes the next slices (after what was replayed before) as files, optionally with an injected shift, and
the landing sensor ingests them exactly as it would ingest files from an upstream system.

A stationary replay (`--resample-from 2013-01-01..2013-03-17`) fills the new days with days drawn from a
reference period instead: the data keeps the reference's distribution, so monitoring should stay quiet.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from ml_assets.core.errors import ConfigError, SourceError, UsageError
from ml_assets.core.ingest.files import PKG_SCHEME, landing_dir, package_file, read_file
from ml_assets.core.ingest.window import event_time_sql
from ml_assets.core.spec.schema import PipelineSpec, Project, ReplaySpec, SourceSpec
from ml_assets.core.sql import cast_expr, lit, q

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


def _replay_spec(name: str, spec: SourceSpec) -> ReplaySpec:
    if spec.replay is None or spec.timestamp is None:
        raise ConfigError(f"source '{name}': replay needs replay: and timestamp: in its config")
    return spec.replay


def calendar_day(spec: SourceSpec) -> pl.Expr:
    """A row's day for replay: its own calendar day when the file says it (`replay.date_parts`: local
    time for the flights), else the UTC day of its event time. Slicing on it means a day's rows are
    always written together, so no row is written twice or never, whatever mix of replays came before."""
    by_part = {part: column for column, part in spec.replay.date_parts.items()}
    if {"year", "month", "day"} <= set(by_part):
        return pl.date(*(pl.col(by_part[p]).cast(pl.Int32) for p in ("year", "month", "day")))
    return pl.col("_t").dt.date()


@dataclass(frozen=True)
class Resample:
    """Replay each new day as a day drawn from [start, end] with the same weekday (weekly rhythm kept).

    The draw depends only on the day and the seed, so every source of a pipeline draws the same day:
    a flight keeps the weather of the day it came from. A drawn day moves whole, as a block: its rows take
    the new date (timestamps move by whole days, date parts are rewritten), so ids stay unique.
    """

    start: dt.date
    end: dt.date
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> Resample:
        try:
            first, last = (dt.date.fromisoformat(part) for part in text.split(".."))
        except ValueError:
            raise ValueError(
                f"resample-from {text!r}: expected START..END, e.g. 2013-01-01..2013-03-17"
            ) from None
        if (last - first).days < 6:
            raise ValueError(f"resample-from {text!r}: needs at least 7 days, one of each weekday")
        return cls(first, last)

    def day_for(self, day: dt.date) -> dt.date:
        first = self.start + dt.timedelta(days=(day.weekday() - self.start.weekday()) % 7)
        weeks = (self.end - first).days // 7 + 1
        return first + dt.timedelta(weeks=random.Random(f"{self.seed}:{day}").randrange(weeks))

    def apply(self, name: str, spec: SourceSpec, history: pl.DataFrame, days: list[dt.date]) -> pl.DataFrame:
        """Rows for `days`, drawn from the reference period of `history`, with their new event times."""
        parts = _replay_spec(name, spec).date_parts
        missing = sorted(set(parts) - set(history.columns))
        if missing:
            raise SourceError(f"source '{name}': replay.date_parts {missing} are not columns of its history")
        block = calendar_day(spec)
        plan = pl.DataFrame(
            {"_day": days, "_from": [self.day_for(d) for d in days]},
            schema={"_day": pl.Date, "_from": pl.Date},
        )
        moved = (
            history.with_columns(block.alias("_from"))
            .join(plan, on="_from")
            .with_columns((pl.col("_day") - pl.col("_from")).dt.total_days().alias("_delta"))
        )
        days_later = "to_days(CAST(_delta AS INTEGER))"
        moved_by = {
            "date": lambda expr: f"strftime({expr} + {days_later}, '%Y-%m-%d')",
            "datetime": lambda expr: f"strftime({expr} + {days_later}, '%Y-%m-%dT%H:%M:%SZ')",
        }
        if spec.replay.timezone:
            tz = lit(spec.replay.timezone)
            moved_by["datetime"] = lambda expr: (
                f"strftime(timezone('UTC', timezone({tz}, timezone({tz}, CAST({expr} AS TIMESTAMPTZ)) "
                f"+ {days_later})), '%Y-%m-%dT%H:%M:%SZ')"
            )
        shift = {
            c: moved_by[col.type](cast_expr(q(c), col.type))
            for c, col in spec.columns.items()
            if col.type in moved_by and c in history.columns
        }
        shift |= {c: f"CAST(date_part('{part}', _day) AS VARCHAR)" for c, part in parts.items()}
        keep = [c for c in history.columns if c not in ("_t", *shift)]
        with duckdb.connect() as conn:
            conn.execute("SET TimeZone = 'UTC'")
            conn.register("_moved", moved.to_arrow())
            select = ", ".join([*(q(c) for c in keep), *(f"{e} AS {q(c)}" for c, e in shift.items())])
            conn.execute(f"CREATE TEMP TABLE _r AS SELECT {select} FROM _moved")
            out = conn.execute(f"SELECT *, {event_time_sql(spec)} AS _t FROM _r").pl()
        # A day that had 25 hours (daylight saving ends) can meet its neighbour on one id; keep one row.
        return out.select([*history.columns]).unique(
            subset=spec.id or None, keep="first", maintain_order=True
        )


def _history(name: str, spec: SourceSpec, base: Path) -> pl.DataFrame:
    """The source's whole recorded history with each row's event time (as partitioning computes it); a
    relative `replay.path` is read from beside the pipeline file, `base`, as every other path is."""
    path = _replay_spec(name, spec).path
    # base / path is path itself when path is absolute.
    file = package_file(path) if path.startswith(PKG_SCHEME) else base / path
    frames = [f for _, f in read_file(name, file, spec)]
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
    resample: Resample | None = None,
    base: Path = Path(),
) -> list[Path]:
    """Drop the slices after the last replayed day up to `until` (inclusive) into the landing zone;
    `base` is the folder of the source's pipeline file."""
    if spec.replay is None or spec.partitions is None:
        raise SourceError(f"source '{name}': replay needs `landing: true`, `replay:` and `partitions:`")
    start = replayed_until(root, name)
    first = start + dt.timedelta(days=1) if start else spec.partitions.start
    if first > until:
        return []
    folder = landing_dir(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    history = _history(name, spec, base)
    if resample is not None:
        history = resample.apply(
            name, spec, history, [first + dt.timedelta(days=i) for i in range((until - first).days + 1)]
        )
    history = history.with_columns(calendar_day(spec).alias("_day"))
    for shift in shifts:
        if shift.column not in history.columns:
            raise UsageError(f"--shift {shift.column!r}: source '{name}' has no such column")
    columns = [c for c in history.columns if c not in ("_t", "_day", "_source_file", "_source_row")]
    written = []
    for lo, hi in _slices(first, until, batch):
        rows = history.filter(pl.col("_day").is_between(lo, hi)).select(columns)
        if rows.height == 0:
            continue
        for shift in shifts:
            rows = shift.apply(rows)
        suffix = ("_resampled" if resample else "") + ("_shifted" if shifts else "")
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
    resample: Resample | None = None,
) -> dict[str, list[Path]]:
    """Replay every landing source a pipeline uses; a shift without a source applies where the column exists.

    Every shift is checked against the sources before anything is written: a refused shift lands nothing.
    """
    sources = {name: spec for name, spec in project.sources_of(pipeline).items() if spec.replay}
    for name, spec in sources.items():
        # Rows past the time axis would be rejected at landing: refuse before writing, not after.
        end = spec.partitions.end if spec.partitions else None
        if end is not None and until >= end:
            raise UsageError(
                f"--until {until}: beyond the time axis of source '{name}' (partitions end before {end}); "
                f"the last day that can be replayed is {end - dt.timedelta(days=1)}"
            )
    for shift in shifts:
        if shift.source is not None and shift.source not in sources:
            raise UsageError(
                f"--shift on {shift.source!r}: not a replayable source of '{pipeline.name}'; "
                f"replayable: {sorted(sources)}"
            )
        targets = [shift.source] if shift.source else list(sources)
        if not any(shift.column in sources[name].columns for name in targets):
            raise UsageError(
                f"--shift {shift.column!r}: no column of that name in {' or '.join(map(repr, targets))}"
            )
    return {
        name: replay_source(
            root,
            name,
            spec,
            until,
            batch,
            tuple(s for s in shifts if s.source in (None, name) and s.column in spec.columns),
            resample,
            project.source_files[name].parent,
        )
        for name, spec in sources.items()
    }


def seed(project: Project, root: Path) -> dict[str, list[Path]]:
    """Fill empty landing zones with their initial period (what `ml-assets run` starts from)."""
    out = {}
    for name, spec in project.sources.items():
        if spec.replay and spec.replay.initial_until and replayed_until(root, name) is None:
            base = project.source_files[name].parent
            out[name] = replay_source(root, name, spec, spec.replay.initial_until, base=base)
    return out
