"""Feature transform behaviour on small hand-made frames: fit on train only, encode, save/load, meta columns."""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import polars as pl
import pytest

from ml_assets.core import features
from ml_assets.core.errors import ArtifactError
from ml_assets.core.features import META_COLUMNS, MISSING, FeatureTransform, feature_table
from ml_assets.core.spec import PipelineSpec
from ml_assets.pipelines import flight_features

HOLIDAY_FN = "ml_assets.pipelines.flight_features:days_to_us_holiday"


def make_pipeline(features: list[dict[str, Any]], **overrides: Any) -> PipelineSpec:
    raw: dict[str, Any] = {
        "name": "demo",
        "task": "binary",
        "base": "rows",
        "id": ["row_id"],
        "target": {"name": "label"},
        "features": features,
    }
    return PipelineSpec.model_validate(raw | overrides)


def fit_apply(feature: dict[str, Any], train: pl.DataFrame, frame: pl.DataFrame) -> pl.Series:
    transform = FeatureTransform.fit(make_pipeline([feature]), train)
    out = transform.apply(frame)
    assert out.columns == [feature["name"]]
    return out.get_column(feature["name"])


# --- imputation --------------------------------------------------------------------------------------


def test_median_imputation_uses_training_statistics_only() -> None:
    train_values = [1.0, 2.0, None, 10.0, 7.0, None, 3.0]
    other_values = [None, 100.0, None, 200.0, float("nan")]
    train_median = statistics.median(v for v in train_values if v is not None)
    other_median = statistics.median(v for v in other_values if v is not None and v == v)
    assert train_median != other_median  # the test would not tell the two apart otherwise

    out = fit_apply(
        {"name": "x", "type": "numeric"}, pl.DataFrame({"x": train_values}), pl.DataFrame({"x": other_values})
    )

    expected = [train_median if v is None or v != v else v for v in other_values]
    assert out.dtype == pl.Float64
    assert out.to_list() == expected
    assert out.null_count() == 0


def test_mean_and_zero_imputation_and_none_keeps_nulls() -> None:
    train = pl.DataFrame({"x": [1.0, 2.0, 6.0, None]})
    frame = pl.DataFrame({"x": [None, 5.0]})
    train_mean = statistics.fmean(v for v in train.get_column("x").to_list() if v is not None)

    assert fit_apply({"name": "x", "type": "numeric", "impute": "mean"}, train, frame).to_list() == [
        train_mean,
        5.0,
    ]
    assert fit_apply({"name": "x", "type": "numeric", "impute": "zero"}, train, frame).to_list() == [0.0, 5.0]
    assert fit_apply({"name": "x", "type": "numeric", "impute": "none"}, train, frame).to_list() == [
        None,
        5.0,
    ]


# --- categorical encoding ----------------------------------------------------------------------------


def _kept(values: list[str | None], min_frequency: int, max_categories: int = 50) -> list[str]:
    """Reference vocabulary: frequent categories (null counted as MISSING), most frequent first, sorted."""
    counts = Counter(MISSING if v is None else v for v in values)
    frequent = sorted((c for c in counts.items() if c[1] >= min_frequency), key=lambda c: (-c[1], c[0]))
    return sorted(name for name, _ in frequent[:max_categories])


def test_rare_and_unseen_categories_share_the_other_code_and_null_is_a_category() -> None:
    train_values = ["a"] * 5 + ["b"] * 3 + ["rare"] * 2 + [None] * 4
    kept = _kept(train_values, min_frequency=3)
    assert set(kept) == {"a", "b", MISSING}
    other = len(kept)

    frame = pl.DataFrame({"cat": ["a", "b", "rare", "never_seen", None]})
    out = fit_apply(
        {"name": "cat", "type": "categorical", "min_frequency": 3}, pl.DataFrame({"cat": train_values}), frame
    )

    codes = dict(zip(frame.get_column("cat").to_list(), out.to_list(), strict=True))
    assert codes["rare"] == other
    assert codes["never_seen"] == other
    assert codes[None] == kept.index(MISSING) != other
    assert codes["a"] == kept.index("a")
    assert codes["b"] == kept.index("b")
    # Kept categories get distinct codes below the "other" code.
    assert len({codes["a"], codes["b"], codes[None]}) == 3
    assert out.dtype == pl.Int32


def test_null_is_other_when_missing_was_rare_in_training() -> None:
    train_values = ["a"] * 5 + ["b"] * 5 + [None]
    kept = _kept(train_values, min_frequency=3)
    assert MISSING not in kept

    out = fit_apply(
        {"name": "cat", "type": "categorical", "min_frequency": 3},
        pl.DataFrame({"cat": train_values}),
        pl.DataFrame({"cat": [None, "zzz", "a"]}),
    )

    assert out.to_list() == [len(kept), len(kept), kept.index("a")]


def test_max_categories_keeps_the_most_frequent() -> None:
    counts = {"d": 10, "a": 7, "c": 5, "b": 4, "e": 1}
    train_values = [name for name, n in counts.items() for _ in range(n)]
    kept = sorted(name for name, _ in Counter(train_values).most_common(2))
    assert kept == ["a", "d"]

    transform = FeatureTransform.fit(
        make_pipeline([{"name": "cat", "type": "categorical", "min_frequency": 1, "max_categories": 2}]),
        pl.DataFrame({"cat": train_values}),
    )
    names = sorted(counts)
    out = transform.apply(pl.DataFrame({"cat": names})).get_column("cat").to_list()

    assert transform.features[0]["categories"] == kept
    assert dict(zip(names, out, strict=True)) == {
        name: kept.index(name) if name in kept else len(kept) for name in names
    }


def test_category_codes_do_not_depend_on_row_order() -> None:
    # A tie at the max_categories cut-off ("b" and "c" both 4) must be broken the same way whatever the order.
    values = ["a"] * 6 + ["b"] * 4 + ["c"] * 4 + [None] * 4 + ["z"]
    pipeline = make_pipeline(
        [{"name": "cat", "type": "categorical", "min_frequency": 2, "max_categories": 3}]
    )
    frame = pl.DataFrame({"cat": values})

    reference = FeatureTransform.fit(pipeline, frame).to_json()
    orders = [frame.reverse(), *(frame.sample(fraction=1.0, shuffle=True, seed=s) for s in range(5))]
    assert any(o.get_column("cat").to_list() != values for o in orders)
    for reordered in orders:
        assert FeatureTransform.fit(pipeline, reordered).to_json() == reference


# --- datetime parts ----------------------------------------------------------------------------------


def test_datetime_parts_are_taken_in_the_configured_timezone() -> None:
    utc = dt.datetime(2013, 7, 1, 3, 0)
    local = utc.replace(tzinfo=dt.UTC).astimezone(ZoneInfo("America/New_York"))
    assert (local.month, local.day, local.hour) == (6, 30, 23)

    parts = ["dayofweek", "day", "hour", "month"]
    frame = pl.DataFrame({"ts": [utc]}, schema={"ts": pl.Datetime("us")})
    feature = {"name": "dep", "column": "ts", "type": "datetime", "parts": parts}
    local_out = FeatureTransform.fit(
        make_pipeline([feature | {"timezone": "America/New_York"}]), frame
    ).apply(frame)
    utc_out = FeatureTransform.fit(make_pipeline([feature]), frame).apply(frame)

    assert local_out.columns == [f"dep_{p}" for p in parts]
    # polars weekdays are ISO: Monday = 1 ... Sunday = 7 (30 June 2013 was a Sunday).
    assert local_out.row(0, named=True) == {
        "dep_dayofweek": float(local.isoweekday()),
        "dep_day": 30.0,
        "dep_hour": 23.0,
        "dep_month": 6.0,
    }
    # Without a timezone the stored (UTC) wall clock is used.
    assert utc_out.row(0, named=True) == {
        "dep_dayofweek": float(utc.isoweekday()),
        "dep_day": 1.0,
        "dep_hour": 3.0,
        "dep_month": 7.0,
    }


# --- save / load -------------------------------------------------------------------------------------


def _mixed_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "row_id": list(range(8)),
            "num": [1.5, None, 3.0, 4.0, None, 6.0, 7.5, 2.0],
            "cat": ["x", "y", "x", None, "x", "y", "w", None],
            "flag": [True, False, None, True, True, False, True, None],
            "time_hour": [dt.datetime(2013, 1, 1 + i, 5 * i % 24) for i in range(8)],
        },
        schema_overrides={"time_hour": pl.Datetime("us")},
    )


MIXED_FEATURES = [
    {"name": "num", "type": "numeric"},
    {"name": "cat", "type": "categorical", "min_frequency": 2},
    {"name": "flag", "type": "boolean", "impute": "mean"},
    {"name": "dep", "column": "time_hour", "type": "datetime", "parts": ["month", "dayofweek", "hour"]},
    {"name": "holiday", "type": "numeric", "function": HOLIDAY_FN},
]


def test_save_load_round_trip_applies_identically(tmp_path: Path) -> None:
    frame = _mixed_frame()
    transform = FeatureTransform.fit(make_pipeline(MIXED_FEATURES), frame.head(5))
    sha = transform.save(tmp_path)
    path = tmp_path / f"{sha}.json"
    loaded = FeatureTransform.load(path)

    # Named by its content: the same fit saved again is the same file, and no temporary file is left.
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert transform.save(tmp_path) == sha
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    expected = transform.apply(frame)
    actual = loaded.apply(frame)
    assert actual.equals(expected)
    assert actual.schema == expected.schema
    assert actual.columns == transform.output_columns == loaded.output_columns
    assert loaded.to_json() == transform.to_json()


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_load_rejects_a_wrong_format_version(tmp_path: Path, version: object) -> None:
    transform = FeatureTransform.fit(make_pipeline(MIXED_FEATURES), _mixed_frame())
    path = tmp_path / f"{transform.save(tmp_path)}.json"
    data = json.loads(path.read_text())
    if version is None:
        del data["format_version"]
    else:
        data["format_version"] = version
    path.write_text(json.dumps(data))

    with pytest.raises(ArtifactError, match=r"unsupported feature transform format") as info:
        FeatureTransform.load(path)
    assert str(path) in str(info.value)
    assert repr(version) in str(info.value)


# --- custom function feature -------------------------------------------------------------------------


def test_days_to_us_holiday_function_feature() -> None:
    cases = {
        dt.datetime(2013, 7, 4, 16, 0): 0.0,  # Independence Day, noon in New York
        dt.datetime(2013, 7, 6, 16, 0): 2.0,  # two days after July 4th
        dt.datetime(2013, 12, 24, 16, 0): 1.0,  # Christmas Eve
        dt.datetime(2013, 11, 28, 16, 0): 0.0,  # Thanksgiving 2013: fourth Thursday of November
        dt.datetime(2013, 11, 30, 16, 0): 2.0,  # two days after Thanksgiving
        # 02:00 UTC on 5 July is still 4 July (22:00) in New York: the local date counts.
        dt.datetime(2013, 7, 5, 2, 0): 0.0,
        # 31 December local time is one day before New Year's Day of the next year.
        dt.datetime(2014, 1, 1, 3, 0): 1.0,
    }
    # Thanksgiving really is the fourth Thursday of November 2013 (independent of the code under test).
    thursdays = [d for d in range(1, 31) if dt.date(2013, 11, d).weekday() == 3]
    assert dt.date(2013, 11, thursdays[3]) == dt.date(2013, 11, 28)

    frame = pl.DataFrame(
        {"row_id": list(range(len(cases))), "time_hour": list(cases)},
        schema_overrides={"time_hour": pl.Datetime("us")},
    )
    transform = FeatureTransform.fit(
        make_pipeline([{"name": "days_to_holiday", "type": "numeric", "function": HOLIDAY_FN}]), frame
    )
    out = transform.apply(frame).get_column("days_to_holiday")

    assert dict(zip(cases, out.to_list(), strict=True)) == cases
    assert transform.input_columns == []


def _holiday_reference(frame: pl.DataFrame) -> list[float | None]:
    """Days to the nearest holiday by the obvious route: polars' own time-zone conversion of every
    stamp to a New York date, then the nearest of the holidays around it (None for no stamp)."""
    days = frame.select(
        pl.col("time_hour")
        .dt.replace_time_zone("UTC")
        .dt.convert_time_zone("America/New_York")
        .dt.date()
        .cast(pl.Int32)
    ).to_series()
    epoch = dt.date(1970, 1, 1)
    holidays = sorted((h - epoch).days for y in range(2011, 2017) for h in flight_features.us_holidays(y))
    out: list[float | None] = []
    for day in days.to_list():
        if day is None:
            out.append(None)
            continue
        i = bisect.bisect_left(holidays, day)
        out.append(float(min(abs(day - holidays[j]) for j in (i - 1, i) if 0 <= j < len(holidays))))
    return out


def _nan_as_none(series: pl.Series) -> list[float | None]:
    return [None if v is None or math.isnan(v) else v for v in series.to_list()]


@pytest.mark.parametrize("unit", ["us", "ns", "ms"])
def test_days_to_us_holiday_equals_the_time_zone_conversion_over_two_years(unit: str) -> None:
    # Every hour of 2013 and 2014 (UTC), at its start, a random instant inside it and its last
    # microsecond, the DST switches and New York's midnights either side of them, and nulls: the
    # midnight table must give each stamp the date polars' own conversion gives it.
    rng = random.Random(7)
    stamps: list[dt.datetime | None] = []
    for h in range(24 * 365 * 2 + 24):
        start = dt.datetime(2012, 12, 31, 12) + dt.timedelta(hours=h)
        inside = dt.timedelta(seconds=rng.randrange(3600), microseconds=rng.randrange(10**6))
        stamps += [start, start + inside, start + dt.timedelta(hours=1, microseconds=-1)]
    for switch in (dt.datetime(2013, 3, 10, 7), dt.datetime(2013, 11, 3, 6), dt.datetime(2014, 3, 9, 7)):
        for hours in (-3, -2, -1, 0, 1, 2, 3, 4, 5):  # the local midnights around it (04:00 / 05:00 UTC)
            at = switch + dt.timedelta(hours=hours)
            stamps += [at, at - dt.timedelta(microseconds=1)]
    stamps += [None] * 40
    rng.shuffle(stamps)
    frame = pl.DataFrame({"time_hour": stamps}, schema={"time_hour": pl.Datetime(unit)})

    out = flight_features.days_to_us_holiday(frame)

    assert out.dtype == pl.Float64 and out.len() == frame.height
    assert _nan_as_none(out) == _holiday_reference(frame)
    # An unknown stamp beside known ones is NaN, as it always was (the transform imputes it).
    assert out.is_nan().sum() == 40 and out.null_count() == 0
    # One row at a time (an online request) answers as the whole frame does.
    for i in range(0, frame.height, 97):
        row = frame.slice(i, 1)
        assert _nan_as_none(flight_features.days_to_us_holiday(row)) == _holiday_reference(row)


def test_days_to_us_holiday_without_any_stamp_is_null() -> None:
    frame = pl.DataFrame({"time_hour": [None, None]}, schema={"time_hour": pl.Datetime("us")})

    assert flight_features.days_to_us_holiday(frame).to_list() == [None, None]


# --- feature table -----------------------------------------------------------------------------------


def test_feature_table_puts_meta_columns_first_and_joins_ids() -> None:
    frame = pl.DataFrame(
        {
            "carrier": ["AA", "B6", "AA", "UA"],
            "flight": [1, 22, 333, 4],
            "time_hour": [dt.datetime(2013, 3, d, 8) for d in range(1, 5)],
            "distance": [100.0, None, 300.0, 400.0],
            "_split": ["train", "train", "valid", "test"],
            "late": [True, False, True, False],
        },
        schema_overrides={"time_hour": pl.Datetime("us")},
    )
    pipeline = make_pipeline(
        [
            {"name": "distance", "type": "numeric"},
            {"name": "carrier", "type": "categorical", "min_frequency": 1},
        ],
        id=["carrier", "flight"],
        timestamp="time_hour",
        target={"name": "late"},
    )
    transform = FeatureTransform.fit(pipeline, frame.filter(pl.col("_split") == "train"))

    table = feature_table(pipeline, frame, transform)

    assert tuple(table.columns[:5]) == META_COLUMNS == ("_key", "_ts", "_split", "_group", "_target")
    assert table.columns[5:] == transform.output_columns
    assert table.get_column("_group").to_list() == table.get_column("_key").to_list()  # no group_by: the row
    assert table.height == frame.height
    assert table.get_column("_key").to_list() == [
        f"{c}|{f}" for c, f in zip(frame["carrier"], frame["flight"], strict=True)
    ]
    assert table.get_column("_ts").to_list() == frame.get_column("time_hour").to_list()
    assert table.get_column("_split").to_list() == frame.get_column("_split").to_list()
    assert table.get_column("_target").to_list() == frame.get_column("late").to_list()
    assert table.select(transform.output_columns).equals(transform.apply(frame))


# --- regressions of fixed bugs --------------------------------------------------------------------------------------


def test_function_feature_on_a_null_only_frame_matches_batch_scoring() -> None:
    train = pl.DataFrame(
        {
            "time_hour": [
                dt.datetime(2013, 7, 4, 16),
                dt.datetime(2013, 7, 6, 16),
                dt.datetime(2013, 7, 9, 16),
            ]
        },
        schema={"time_hour": pl.Datetime("us")},
    )
    transform = FeatureTransform.fit(
        make_pipeline([{"name": "days_to_holiday", "type": "numeric", "function": HOLIDAY_FN}]), train
    )
    batch = pl.DataFrame(
        {"time_hour": [dt.datetime(2013, 7, 4, 16), None]}, schema={"time_hour": pl.Datetime("us")}
    )
    batch_value = transform.apply(batch).get_column("days_to_holiday")[1]

    single = transform.apply(batch.tail(1)).get_column("days_to_holiday")[0]

    assert single == batch_value


def test_categorical_input_column_named_n() -> None:
    train = pl.DataFrame({"n": ["a", "a", "b"]})
    transform = FeatureTransform.fit(
        make_pipeline([{"name": "n", "type": "categorical", "min_frequency": 1}]), train
    )
    assert transform.apply(pl.DataFrame({"n": ["b", "a", "c"]})).get_column("n").to_list() == [1, 0, 2]


def test_build_features_in_chunks_and_on_a_capped_fit_sample(tmp_path: Path, monkeypatch) -> None:
    """Applied chunk by chunk, the features table is the one-piece table row for row; with
    `model.max_train_rows` below the training split, the transform is fitted on that many training rows
    (a seeded choice), and a failed build leaves the previous table."""
    n = 2500
    frame = pl.DataFrame(
        {
            "row_id": list(range(n)),
            "x": [float(i % 37) if i % 11 else None for i in range(n)],
            "c": [f"k{i % 7 if i < 1500 else 9}" for i in range(n)],
            "_split": ["train" if i < 2000 else "test" for i in range(n)],
            "label": [i % 3 == 0 for i in range(n)],
        }
    )
    specs = [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical", "min_frequency": 1}]

    def built(pipeline: PipelineSpec, folder: str) -> tuple[pl.DataFrame, features.FeaturesResult]:
        with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS demo")
            conn.register("_frame", frame.to_arrow())
            conn.execute("CREATE OR REPLACE TABLE demo.modelling_table AS SELECT * FROM _frame")
            result = features.build_features(conn, pipeline, tmp_path / folder)
            return conn.execute("SELECT * FROM demo.features").pl(), result

    whole, _ = built(make_pipeline(specs), "a")
    monkeypatch.setattr(features, "APPLY_ROWS", 300)
    chunked, result = built(make_pipeline(specs), "b")
    assert result.rows == n and chunked.sort("_key").equals(whole.sort("_key"))

    capped = make_pipeline(specs, model={"max_train_rows": 1000, "seed": 5})
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        sample = features._fit_rows(conn, capped)
    assert sample.height == 1000 and set(sample.get_column("_split")) == {"train"}
    assert sample.get_column("row_id").n_unique() == 1000
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        assert features._fit_rows(conn, capped).equals(sample)  # the same rows every run
    fitted = FeatureTransform.fit(capped, sample)
    assert built(capped, "c")[0].get_column("_transform").unique().to_list() == [fitted.save(tmp_path / "d")]

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("failed part-way")

    monkeypatch.setattr(features, "feature_table", broken)
    with pytest.raises(RuntimeError):
        built(make_pipeline(specs), "e")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        after = conn.execute("SELECT * FROM demo.features").pl()
        tables = conn.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'demo'").fetchall()
    assert after.height == n and sorted(tables) == [("features",), ("modelling_table",)]
