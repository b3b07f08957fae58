"""Custom features for the flight pipelines (named from YAML by dotted path: the config's escape hatch).

A custom feature is a function of a polars frame of modelling-table rows returning one value per row.
It must be row-wise (no statistics across rows), so batch and online scoring give the same answer.
"""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import polars as pl

NEW_YORK = "America/New_York"


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


def _holiday_days(years: frozenset[int]) -> np.ndarray:
    """Days since 1970 of the holidays of `years` and the years either side, sorted."""
    return np.array(
        sorted(
            (h - dt.date(1970, 1, 1)).days for y in years for yy in (y - 1, y, y + 1) for h in us_holidays(yy)
        )
    )


@functools.lru_cache(maxsize=64)
def _local_days(first: int, last: int, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """New York's midnights from 1 January of the year before `first` to 1 January two years after
    `last`, as naive UTC ticks of `unit`, and the days from each of those dates to the nearest holiday.
    Remembered: a time-zone conversion per call was most of this feature's cost on an online request."""
    dates = pl.date_range(dt.date(first - 1, 1, 1), dt.date(last + 2, 1, 1), "1d", closed="left", eager=True)
    midnights = (
        dates.cast(pl.Datetime(unit))
        .dt.replace_time_zone(NEW_YORK)
        .dt.convert_time_zone("UTC")
        .dt.replace_time_zone(None)
        .to_physical()
        .to_numpy()
    )
    days = dates.cast(pl.Int32).to_numpy()
    holidays = _holiday_days(frozenset(range(first - 1, last + 2)))
    after = np.clip(np.searchsorted(holidays, days), 0, len(holidays) - 1)
    before = np.clip(after - 1, 0, len(holidays) - 1)
    nearest = np.minimum(np.abs(holidays[after] - days), np.abs(days - holidays[before]))
    return midnights, nearest.astype(np.float64)


def days_to_us_holiday(frame: pl.DataFrame) -> pl.Series:
    """Days from the scheduled departure date (New York time) to the nearest US holiday, either side."""
    stamps = frame.get_column("time_hour")
    if stamps.dtype.time_zone:  # type: ignore[union-attr]
        stamps = stamps.dt.replace_time_zone(None)  # its wall time is taken as UTC, as a naive stamp's
    unit = stamps.dtype.time_unit  # type: ignore[union-attr]
    # numpy's view of the column, not to_physical: a polars Series operation is a query of its own, most
    # of this function's cost on one row. A null is NaT there.
    instants = stamps.to_numpy()
    missing = np.isnat(instants) if stamps.has_nulls() else None
    ticks = instants.view(np.int64)
    known = ticks if missing is None else ticks[~missing]
    if not len(known):  # no timestamps at all (e.g. one online request without one): no answer, not a crash
        return pl.Series("days_to_holiday", [None] * frame.height, dtype=pl.Float64)
    # A date is the number of New York midnights at or before the instant: numpy on the raw ticks, the
    # time-zone rules applied once per range of years (polars' own conversion, in _local_days).
    bounds = np.array([known.min(), known.max()]).astype(f"datetime64[{unit}]").astype("datetime64[Y]")
    first, last = (int(y) + 1970 for y in bounds.astype(np.int64))
    midnights, nearest = _local_days(first, last, unit)
    values = nearest[np.searchsorted(midnights, ticks, side="right") - 1]
    if missing is not None:
        values[missing] = np.nan  # as the unknown dates always were: NaN beside known ones
    return pl.Series("days_to_holiday", values, dtype=pl.Float64)
