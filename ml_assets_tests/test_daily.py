"""A daily series whose time column is a `date` (no time of day), end to end as a user runs it: the
first run from a seeded landing zone, a second landed batch, a retrain, a rollback and the API; every
asset succeeds (the performance monitor compared a date with a datetime and failed the first run) and
the outputs make sense: the champion learns the signal, periods are scored, batch scores and the API
answer for dates."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import io
import json
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from ml_assets import cli
from ml_assets.api import create_app
from ml_assets.core import registry
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, load_project
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path

FIRST_DAY, LAST_DAY = dt.date(2021, 1, 4), dt.date(2023, 12, 31)
SEEDED_UNTIL, SECOND_UNTIL = dt.date(2023, 3, 31), dt.date(2023, 9, 30)
STATIONS = ("north", "south", "east", "west")

DAILY = f"""
    name: daily
    task: regression
    sources:
      rides:
        landing: true
        replay: {{path: ../rides.csv, initial_until: {SEEDED_UNTIL}}}
        partitions: {{granularity: monthly, start: 2021-01-01, end: 2024-01-01}}
        id: [station, day]
        timestamp: day
        columns:
          day: {{type: date, not_null: true}}
          station: {{type: str, not_null: true}}
          temperature: {{type: float, not_null: true}}
          rides: {{type: float, not_null: true}}
    base: rides
    id: [station, day]
    timestamp: day
    target: {{name: rides}}
    features:
      - {{name: station, type: categorical}}
      - {{name: temperature, type: numeric}}
      - {{name: day, type: datetime, parts: [dayofweek, dayofyear]}}
    split: {{method: time, test_fraction: 0.2, valid_fraction: 0.1}}
    model: {{time_budget_s: 600, max_trials: 2, cv_folds: 2, max_rounds: 200, early_stopping_rounds: 20}}
    monitoring:
      window_days: 60
      performance: {{period: month, min_rows: 30}}
"""


def daily_rides(seed: int = 11) -> pl.DataFrame:
    """Rides per station and day: a station level, a weekend dip, a yearly season and the day's
    temperature, plus noise: a model that learns them beats the mean by far."""
    rng = np.random.default_rng(seed)
    days = pl.date_range(FIRST_DAY, LAST_DAY, "1d", eager=True)
    frame = pl.DataFrame({"day": days}).join(pl.DataFrame({"station": STATIONS}), how="cross")
    n = frame.height
    doy = frame.get_column("day").dt.ordinal_day().to_numpy()
    weekend = frame.get_column("day").dt.weekday().to_numpy() >= 6
    level = (
        frame.get_column("station")
        .replace_strict(dict(zip(STATIONS, (50.0, 80.0, 30.0, 65.0), strict=True)))
        .to_numpy()
    )
    temperature = 12 + 10 * np.sin(2 * np.pi * (doy - 100) / 365) + rng.normal(scale=3, size=n)
    rides = level - 15 * weekend + 0.8 * temperature + rng.normal(scale=3, size=n)
    return frame.with_columns(
        pl.Series("temperature", temperature.round(2)), pl.Series("rides", rides.round(1))
    ).sort("day", "station")


def _cli(daily: tuple[Path, Path], *args: str) -> str:
    """Run `ml-assets <args>` in this process as a user would; its output, or the test fails with it."""
    pipelines, root = daily
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, redirect_stdout(out), redirect_stderr(err):
        env.setenv(PIPELINES_DIR_ENV, str(pipelines))
        env.setenv(DATA_DIR_ENV, str(root))
        env.delenv("DAGSTER_HOME", raising=False)
        code = cli.main(list(args))
    assert code == 0, f"ml-assets {' '.join(args)} exited {code}:\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def daily(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The first run (`ml-assets run daily`): the landing zone seeded up to SEEDED_UNTIL, every asset."""
    tmp = tmp_path_factory.mktemp("daily")
    daily_rides().write_csv(tmp / "rides.csv")
    pipelines = tmp / "pipelines"
    pipelines.mkdir()
    (pipelines / "daily.yaml").write_text(textwrap.dedent(DAILY))
    _cli((pipelines, tmp / "data"), "run", "daily")
    return pipelines, tmp / "data"


def _db(root: Path):
    return connect(warehouse_path(root))


def _champion_manifest(root: Path) -> dict:
    with _db(root) as conn:
        champion = registry.alias_version(conn, "daily", registry.CHAMPION)
        (manifest,) = conn.execute(
            "SELECT manifest FROM registry.model_versions WHERE version = ?", [champion]
        ).fetchone()
    return json.loads(manifest)


def test_the_first_run_of_a_date_typed_series_scores_its_months_and_serves_dates(daily):
    pipelines, root = daily
    with _db(root) as conn:
        kind = conn.execute("SELECT typeof(max(day)), max(day) FROM daily.modelling_table").fetchone()
        periods = conn.execute(
            "SELECT period_start, score FROM monitor.performance_history WHERE pipeline = 'daily'"
        ).fetchall()
        scored = conn.execute("SELECT count(*), max(day) FROM daily.predictions").fetchone()
    assert kind == ("DATE", SEEDED_UNTIL)
    # The performance monitor (which compared a date with a datetime) scored the test months, each with
    # a real RMSE: rides vary by ~20 around their mean, the noise is 3.
    assert periods and all(score is not None and 1 < score < 8 for _, score in periods), periods
    assert all(start.day == 1 for start, _ in periods)
    assert scored[0] > 0 and scored[1] == SEEDED_UNTIL
    manifest = _champion_manifest(root)
    assert manifest["test_metrics"]["r2"] > 0.8, manifest["test_metrics"]
    _serve_a_date(pipelines, root, manifest["version"])


@pytest.mark.slow
def test_a_date_typed_series_takes_a_second_batch_a_retrain_and_a_rollback(daily):
    pipelines, root = daily
    # A second batch lands; the run loads it and the monitor judges the months after the champion's data.
    _cli(daily, "replay", "daily", "--until", str(SECOND_UNTIL))
    _cli(daily, "run", "daily")
    with _db(root) as conn:
        (last_day,) = conn.execute("SELECT max(day) FROM daily.modelling_table").fetchone()
        judged = conn.execute(
            "SELECT count(*) FROM monitor.performance_history WHERE pipeline = 'daily' "
            "AND degraded IS NOT NULL"
        ).fetchone()[0]
        (scored_until,) = conn.execute("SELECT max(day) FROM daily.predictions").fetchone()
    assert last_day == SECOND_UNTIL and scored_until == SECOND_UNTIL
    assert judged >= 1

    _cli(daily, "retrain", "daily")
    with _db(root) as conn:
        versions = registry.versions(conn, "daily").get_column("version").to_list()
        champion = registry.alias_version(conn, "daily", registry.CHAMPION)
    assert len(versions) >= 3
    manifest = _champion_manifest(root)
    assert manifest["test_metrics"]["r2"] > 0.8, manifest["test_metrics"]

    other = next(v for v in versions if v != champion)
    out = _cli(daily, "rollback", "daily", "--to", other)
    rolled, published = out.strip().splitlines()
    assert rolled == f"manual rollback from {champion} to {other}"
    # The API serves the version rolled back to from its own bundle (core.serving.bundle).
    assert published.startswith("published bundle ") and published.split()[2].endswith(f"-{other}")
    _serve_a_date(pipelines, root, other)


def _serve_a_date(pipelines: Path, root: Path, champion: str) -> None:
    app = create_app(load_project(pipelines), functools.partial(connect, warehouse_path(root)), poll=False)
    rows = [
        {"day": "2023-10-07", "station": "north", "temperature": 15.0},  # a Saturday
        {"day": "2023-10-09", "station": "north", "temperature": 15.0},  # a Monday
    ]

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.get("/v1/daily/model"), await client.post("/v1/daily/predict", json=rows)

    model, predict = asyncio.run(calls())
    assert model.status_code == 200 and model.json()["version"] == champion
    assert predict.status_code == 200, predict.text
    saturday, monday = (p["score"] for p in predict.json()["predictions"])
    # The weekend dip (15 rides) is learned.
    assert monday - saturday > 5
