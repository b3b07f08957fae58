"""The history feature set online: a request's aggregates computed as of its own as_of from state the
refresh keeps, never by reading the stored feature set by row id (a flight not landed yet has no row).

The state is the build's own: per family and grouping (its keys, and its fallback's), the events the
refresh stored in `<pipeline>.history_events_<family>` as running totals per key and distinct time
(count, exact sums in units of the DECIMAL scale, the conditioned count, and the largest value at that
time). A window of a row is then the totals just before its end minus those just before its start: two
bisections, no scan. The features are finished with the very arithmetic of core/history.py's SQL (its
DECIMAL sums cast to DOUBLE as DuckDB casts them), so online and batch agree bit for bit; the skew check
compares the scores of both paths on the champion's test rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import duckdb
import numpy as np
import polars as pl

from ml_assets.core import history
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.spec.schema import HistoryFamily, duration_minutes
from ml_assets.core.sql import q

MINUTE_US = 60_000_000
# Scales of the build's sums: values are DECIMAL(_, 6), sums of squares DECIMAL(38, 12).
SCALE, SQUARES_SCALE = 6, 12
# Up to this many rows, the features' frame is built row-wise (faster for few rows, slower for many).
FEW_ROWS = 32


def _hugeint_to_double(value: int) -> float:
    """DuckDB's cast of a 128-bit integer to DOUBLE: its two 64-bit halves converted apart."""
    upper, lower = divmod(value, 2**64)
    if upper == -1:
        return -float(2**64 - 1 - lower) - 1.0
    return float(lower) + float(upper) * float(2**64)


def decimal_to_double(unscaled: int, scale: int) -> float:
    """DuckDB's CAST(DECIMAL AS DOUBLE) of a value `unscaled / 10^scale`: one division while the integer
    converts exactly, else integral and fractional parts apart (not always the nearest double)."""
    power = 10**scale
    if abs(unscaled) <= 2**53:
        return float(unscaled) / float(power)
    whole = abs(unscaled) // power * (1 if unscaled >= 0 else -1)
    return _hugeint_to_double(whole) + _hugeint_to_double(unscaled - whole * power) / float(power)


@dataclass(frozen=True)
class _Grouping:
    """One grouping's events as running totals, rows sorted by key then time; `spans` gives each key's
    rows. Sums are exact integers (int64, or Python ints when a total outgrows it)."""

    spans: dict[tuple, tuple[int, int]]
    times: np.ndarray
    totals: dict[str, np.ndarray]
    last: np.ndarray
    lowest: np.ndarray | None
    highest: np.ndarray | None

    def windows(self, key: tuple, bounds: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """The raw aggregates of the events with start <= time < end (as the build's as-of joins), per
        (start, end) of `bounds`: the key's span found once and every bound bisected in one call."""
        span = None if None in key else self.spans.get(key)
        if span is None:
            return [self._empty() | self._extremes(key, start, end) for start, end in bounds]
        lo, hi = span
        edges = (self.times[lo:hi].searchsorted([b for pair in bounds for b in pair]) + lo).tolist()
        found = []
        for k, (start, end) in enumerate(bounds):
            i, j = edges[2 * k], edges[2 * k + 1]
            one = {
                part: (int(running[j - 1]) if j > lo else 0) - (int(running[i - 1]) if i > lo else 0)
                for part, running in self.totals.items()
            }
            one["last"] = float(self.last[j - 1]) if j > lo and self.times[j - 1] >= start else None
            found.append(one | self._extremes(key, start, end))
        return found

    def _empty(self) -> dict[str, Any]:
        return dict.fromkeys(self.totals, 0) | {"last": None}

    def _extremes(self, key: tuple, start: int, end: int) -> dict[str, Any]:
        """min and max (the build's RANGE window: a NULL key is a group of its own there)."""
        if self.lowest is None or self.highest is None:
            return {}
        span = self.spans.get(key)
        if span is None:
            return {"min": None, "max": None}
        lo, hi = span
        times = self.times[lo:hi]
        i, j = lo + int(times.searchsorted(start)), lo + int(times.searchsorted(end))
        if i >= j:
            return {"min": None, "max": None}
        return {"min": float(self.lowest[i:j].min()), "max": float(self.highest[i:j].max())}


def _running(column: pl.Series, starts: np.ndarray) -> np.ndarray:
    """Running totals of a column of integral per-time totals (HUGEINT, read as DECIMAL(38, 0)), restarted
    at each key's first row (`starts`): int64 when no total can outgrow it, else Python ints (exact)."""
    if column.is_empty():
        return column.cast(pl.Int64).to_numpy()
    bound = max(abs(column.min()), abs(column.max())) * column.len()
    values = (
        column.cast(pl.Int64).to_numpy()
        if bound < 2**63
        else np.array([int(v) for v in column.to_list()], dtype=object)
    )
    running = np.cumsum(values)
    # Each row's key's total before its first row, subtracted: the key's own running total.
    before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], 0)
    return running - before


def _grouping(
    conn: duckdb.DuckDBPyConnection, events: str, family: HistoryFamily, keys: Sequence[str]
) -> _Grouping:
    """Per key and distinct time of the family's stored events: running totals of what the build sums.
    DuckDB sums per time (exactly, in units of the DECIMAL scale); the running totals are taken here, one
    cumulative sum, which costs a fraction of DuckDB's window pass on the same rows."""
    cols = "".join(f"{q(k)}, " for k in keys)
    wide = "CAST(_v AS DECIMAL(38, 6))"
    # A value of DECIMAL(18, 6) times 10^6 is an integer that fits BIGINT; DuckDB sums BIGINTs into a
    # HUGEINT, exactly, several times faster than it sums DECIMAL(38, 6).
    parts = {"n": "count(*)", "s": "sum(CAST(_v * 1000000 AS BIGINT))"}
    if "std" in family.functions:
        parts["ss"] = f"sum({wide} * {wide}) * 1000000000000"
    if "share" in family.functions:
        parts["c"] = "sum(CAST(_c * 1000000 AS BIGINT))"
    totals = ", ".join(f"CAST({agg} AS HUGEINT) AS _{p}" for p, agg in parts.items())
    sql = (
        f"SELECT {cols}epoch_us(_t) AS _time, CAST(max(_v) AS DOUBLE) AS _last, CAST(min(_v) AS DOUBLE) AS "
        f"_lowest, {totals} FROM {events} WHERE _v IS NOT NULL GROUP BY {cols}_t ORDER BY {cols}_t"
    )
    frame = conn.execute(sql).pl()
    # Rows are sorted by key, so each key's rows are one span: its first rows found without a Python loop.
    changed = [pl.col(k).ne_missing(pl.col(k).shift(1)) for k in keys]
    firsts = (
        frame.with_row_index("_i")
        .filter(pl.any_horizontal(changed) | (pl.col("_i") == 0) if keys else pl.col("_i") == 0)
        .select("_i", *keys)
    )
    bounds = [*firsts.get_column("_i").to_list(), frame.height]
    named = (
        zip(*(firsts.get_column(k).to_list() for k in keys), strict=True) if keys else [()] * firsts.height
    )
    spans = {key: (bounds[j], bounds[j + 1]) for j, key in enumerate(named)}
    # Per row, the first row of its key.
    starts = np.repeat(np.array(bounds[:-1], dtype=np.int64), np.diff(bounds))
    extremes = {"min", "max"} & set(family.functions)
    return _Grouping(
        spans,
        frame.get_column("_time").to_numpy(),
        {p: _running(frame.get_column(f"_{p}"), starts) for p in parts},
        frame.get_column("_last").to_numpy(),
        frame.get_column("_lowest").to_numpy() if extremes else None,
        frame.get_column("_last").to_numpy() if extremes else None,
    )


@functools.cache
def _prior(prior: float) -> tuple[float, int, int] | None:
    """The shrinkage prior as the build's SQL reads its literal: (as a DOUBLE, unscaled, scale) of the
    DECIMAL literal, or None when it is written in exponent form (then a DOUBLE)."""
    text = str(prior)
    if "e" in text.lower():
        return None
    scale = len(text.partition(".")[2])
    unscaled = int(Decimal(text).scaleb(scale))
    return decimal_to_double(unscaled, scale), unscaled, scale


def _raw(fn: str, a: Mapping[str, Any]) -> Any:
    """core.history._function_value in Python."""
    n = a["n"]
    if fn == "count":
        return n
    if fn == "sum":
        return decimal_to_double(a["s"], SCALE)
    if fn in ("mean", "share"):
        return decimal_to_double(a["s" if fn == "mean" else "c"], SCALE) / n if n else None
    if fn == "std":
        if n <= 1:
            return None
        s = decimal_to_double(a["s"], SCALE)
        return math.sqrt(max(0.0, (decimal_to_double(a["ss"], SQUARES_SCALE) - s * s / n) / (n - 1)))
    return a[fn]


def _feature(family: HistoryFamily, fn: str, own: Mapping[str, Any], parent: Mapping[str, Any] | None) -> Any:
    """core.history._feature_expr in Python: the fallback for a sparse group, the shrinkage to it."""
    value = _raw(fn, own)
    if fn in ("count", "sum"):
        return value
    n = own["n"]
    if parent is not None and family.prior and fn in ("mean", "share"):
        p = _raw(fn, parent)
        literal = _prior(family.prior)
        if p is None:
            value = None
        elif literal is None:
            value = ((value * n) if value is not None else 0) + family.prior * p
            value = value / (float(n) + family.prior)
        else:
            as_double, unscaled, scale = literal
            value = ((value * n) if value is not None else 0) + as_double * p
            value = value / decimal_to_double(n * 10**scale + unscaled, scale)
    if family.min_count > 1 or parent is not None:
        fallback = _raw(fn, parent) if parent is not None else None
        value = fallback if n < family.min_count else value
    return value


class HistoryState:
    """Every family's groupings, loaded from the warehouse at each refresh of the lookups."""

    def __init__(self, pipeline: PipelineSpec, groupings: dict[str, tuple[_Grouping, _Grouping | None]]):
        self.spec = history.spec_of(pipeline)
        self._groupings = groupings
        self._horizon = duration_minutes(self.spec.horizon) * MINUTE_US
        # Per family: its windows' lengths and how far it looks ahead, in microseconds.
        self._spans = {
            name: (
                [duration_minutes(w) * MINUTE_US for w in family.windows],
                duration_minutes(family.ahead) * MINUTE_US if family.ahead else 0,
            )
            for name, family in self.spec.families.items()
        }
        self.schema = {
            name: pl.Int64 if kind == "int" else pl.Float64 for name, kind in self.spec.columns().items()
        }

    @classmethod
    def load(cls, conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> HistoryState:
        groupings = {}
        for name, family in history.spec_of(pipeline).families.items():
            events = history.events_table(pipeline, name)
            own = _grouping(conn, events, family, family.keys)
            parent = _grouping(conn, events, family, family.fallback) if family.fallback is not None else None
            groupings[name] = (own, parent)
        return cls(pipeline, groupings)

    def features(self, rows: Mapping[str, list[Any]], at: list[int | None]) -> pl.DataFrame:
        """The feature set of request rows (`rows`: their base columns; `at`: each row's own time in
        microseconds since the epoch, `history.at` as the build computes it)."""
        out: dict[str, list[Any]] = {name: [] for name in self.schema}
        for name, family in self.spec.families.items():
            own, parent = self._groupings[name]
            spans, ahead = self._spans[name]
            own_keys = list(zip(*(rows[k] for k in family.keys), strict=True)) if family.keys else None
            parent_keys = (
                list(zip(*(rows[k] for k in family.fallback), strict=True)) if family.fallback else None
            )
            for i, when in enumerate(at):
                anchor = None if when is None else when - (0 if family.schedule else self._horizon)
                bounds = [] if anchor is None else [(anchor - span, anchor + ahead) for span in spans]
                mine = _aggregates(own, own_keys[i] if own_keys else (), bounds, len(spans))
                theirs = (
                    _aggregates(parent, parent_keys[i] if parent_keys else (), bounds, len(spans))
                    if parent is not None
                    else [None] * len(spans)
                )
                for window, a, p in zip(family.windows, mine, theirs, strict=True):
                    for fn in family.functions:
                        out[f"{name}_{fn}_{window}"].append(_feature(family, fn, a, p))
        if len(at) <= FEW_ROWS:
            # A request's few rows: one row-wise frame costs a quarter of ~20 one-value columns (measured).
            return pl.DataFrame(list(zip(*out.values(), strict=True)), schema=self.schema, orient="row")
        return pl.DataFrame(out, schema=self.schema)


def _aggregates(
    grouping: _Grouping, key: tuple, bounds: list[tuple[int, int]], windows: int
) -> list[dict[str, Any]]:
    """Per window, the raw aggregates of a row's key (`bounds` empty: the row has no time)."""
    if not bounds:
        return [grouping._empty() | {"min": None, "max": None} for _ in range(windows)]
    return grouping.windows(key, bounds)
