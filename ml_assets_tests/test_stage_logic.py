"""A stage's pure logic, frames in and a frame out, called on three rows: no warehouse, no model files.

The stages keep their reads and writes apart from what they compute (drift.comparable_columns,
performance.score_periods), so the computation is tested here on rows written out in full.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from ml_assets.core import drift, performance
from ml_assets.core.spec import PerformanceSpec
from ml_assets.core.spec.load import load_default_project

DAY_1, DAY_2 = dt.datetime(2024, 1, 2), dt.datetime(2024, 1, 3)


def _daily(expected_rows: int = 1):
    """The shipped flight_delay pipeline, judged per day from one labelled row on."""
    pipeline = load_default_project().pipelines["flight_delay"]
    judged = PerformanceSpec(period="day", min_rows=expected_rows, tolerance=0.05)
    return pipeline.model_copy(
        update={"monitoring": pipeline.monitoring.model_copy(update={"performance": judged})}
    )


def _rows(pipeline, labels: list[int], scores: list[float], times: list[dt.datetime]) -> pl.DataFrame:
    return pl.DataFrame({pipeline.timestamp: times, pipeline.target.name: labels, "p": scores})


def _accuracy(target: str):
    def accuracy(part: pl.DataFrame) -> float:
        return float(((part.get_column("p") > 0.5).cast(pl.Int64) == part.get_column(target)).mean())

    return accuracy


def test_each_period_is_scored_on_its_own_rows_and_a_drop_is_degraded():
    pipeline = _daily()
    times = [DAY_1 + dt.timedelta(hours=10), DAY_1 + dt.timedelta(hours=11), DAY_2 + dt.timedelta(hours=10)]
    # Day 1: one of two right (0.5, against 0.9 expected); day 2: one class only, no ROC-AUC to judge.
    rows = _rows(pipeline, [1, 0, 1], [0.9, 0.7, 0.3], times)

    periods = performance.score_periods(
        pipeline, rows, 0.9, DAY_1 - dt.timedelta(days=1), _accuracy(pipeline.target.name)
    )

    assert periods.select("period_start", "period_end", "rows", "days", "score", "degraded").rows() == [
        (DAY_1, times[1], 2, 1, 0.5, True),
        (DAY_2, times[2], 1, 1, None, None),
    ]
    assert periods.get_column("change").to_list() == [pytest.approx((0.5 - 0.9) / 0.9), None]
    assert periods.get_column("why").to_list() == ["", "no roc_auc: one class only"]


def test_a_period_within_the_champions_own_data_or_with_too_few_rows_is_scored_not_judged():
    pipeline = _daily(expected_rows=3)
    times = [DAY_1 + dt.timedelta(hours=10), DAY_1 + dt.timedelta(hours=11), DAY_2 + dt.timedelta(hours=10)]
    rows = _rows(pipeline, [1, 0, 0], [0.2, 0.7, 0.1], times)
    accuracy = _accuracy(pipeline.target.name)

    # Built from data up to noon of day 1: day 1 began before, so its (bad) score says nothing new.
    within = performance.score_periods(pipeline, rows, 0.9, DAY_1 + dt.timedelta(hours=12), accuracy)
    # Built before day 1: day 1 is judged only with min_rows (3) labelled rows.
    few = performance.score_periods(pipeline, rows, 0.9, DAY_1 - dt.timedelta(days=1), accuracy)

    for periods in (within, few):
        assert periods.get_column("score").to_list() == [0.0, None]
        assert periods.get_column("degraded").to_list() == [None, None]
    assert within.get_column("why")[0] == "within the champion's own data (known when it was promoted)"
    assert few.get_column("why")[0] == "2 rows < min_rows 3"


def test_a_column_with_no_value_on_one_side_is_left_out_of_the_comparison():
    reference = pl.DataFrame({"a": [1.0, 2.0, 3.0], "b": [None, 1.0, None], "c": ["x", "y", "x"]})
    current = pl.DataFrame(
        {"a": [1.0, None, 3.0], "b": [None, None, None], "c": [None, None, None]},
        schema={"a": pl.Float64, "b": pl.Float64, "c": pl.String},
    )

    assert drift.comparable_columns(reference, current, ["a", "b"], ["c"]) == (["a"], [])
    assert drift.comparable_columns(reference, reference, ["a", "b"], ["c"]) == (["a", "b"], ["c"])
    assert drift.comparable_columns(current, reference, ["b"], []) == ([], [])
