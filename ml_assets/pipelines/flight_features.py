"""Custom features for the flight pipelines (named from YAML by dotted path: the config's escape hatch).

A custom feature is a function of a polars frame of modelling-table rows returning one value per row.
It must be row-wise (no statistics across rows), so batch and online scoring give the same answer.
"""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import polars as pl


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    """n-th given weekday (0=Monday) of a month; n=-1 for the last one."""
    if n > 0:
        first = dt.date(year, month, 1)
        return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))
    last = dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def us_holidays(year: int) -> list[dt.date]:
    """US federal holidays with the busiest travel around them."""
    return [
        dt.date(year, 1, 1),
        _nth_weekday(year, 1, 0, 3),
        _nth_weekday(year, 2, 0, 3),
        _nth_weekday(year, 5, 0, -1),
        dt.date(year, 7, 4),
        _nth_weekday(year, 9, 0, 1),
        _nth_weekday(year, 10, 0, 2),
        dt.date(year, 11, 11),
        _nth_weekday(year, 11, 3, 4),
        dt.date(year, 12, 25),
    ]


@functools.lru_cache(maxsize=64)
def _holiday_days(years: frozenset[int]) -> np.ndarray:
    """Days since 1970 of the holidays of `years` and the years either side, sorted. Remembered: an
    online request of one flight would otherwise rebuild them on every call."""
    return np.array(
        sorted(
            (h - dt.date(1970, 1, 1)).days for y in years for yy in (y - 1, y, y + 1) for h in us_holidays(yy)
        )
    )


def days_to_us_holiday(frame: pl.DataFrame) -> pl.Series:
    """Days from the scheduled departure date (New York time) to the nearest US holiday, either side."""
    # One polars query, the rest in numpy: a chain of Series operations costs polars' per-call overhead
    # each time, which is most of this function on the one row of an online request.
    days = frame.select(
        pl.col("time_hour")
        .dt.replace_time_zone("UTC")
        .dt.convert_time_zone("America/New_York")
        .dt.date()
        .cast(pl.Int32)
    ).to_series()
    known = days.drop_nulls().to_numpy().astype("datetime64[D]")
    years = frozenset((known.astype("datetime64[Y]").astype(np.int64) + 1970).tolist())
    if not years:  # no timestamps at all (e.g. one online request without one): no answer, not a crash
        return pl.Series("days_to_holiday", [None] * frame.height, dtype=pl.Float64)
    days = days.to_numpy()
    holidays = _holiday_days(years)
    after = np.clip(np.searchsorted(holidays, days), 0, len(holidays) - 1)
    before = np.clip(after - 1, 0, len(holidays) - 1)
    nearest = np.minimum(np.abs(holidays[after] - days), np.abs(days - holidays[before]))
    return pl.Series("days_to_holiday", nearest, dtype=pl.Float64)
