"""Time windows of a source: which rows a partition (start..end) or an incremental read (after the
watermark) covers, and each row's event time on the source's timestamp column."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ml_assets.core.errors import ConfigError
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.sql import EVENT_TIME, cast_expr, q


@dataclass(frozen=True)
class TimeWindow:
    """Rows wanted, on the source's timestamp column (naive UTC): start <= ts < end, and ts > after.

    A partition's run sets start/end; an unpartitioned incremental source sets after (its watermark).
    None leaves that side open.
    """

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    after: dt.datetime | None = None


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
    if ts is None:
        raise ConfigError("partitions and incremental reads need the source's timestamp column")
    parsed = cast_expr(q(ts), "datetime" if spec.columns[ts].type == "datetime" else "date")
    return f"coalesce(CAST({parsed} AS TIMESTAMP), min(CAST({parsed} AS TIMESTAMP)) OVER (PARTITION BY _source_file))"
