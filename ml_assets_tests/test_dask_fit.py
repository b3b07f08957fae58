"""The distributed fit's stand-in for early stopping (LightGBM's Dask interface has none): every round is
trained, and the best iteration is found afterwards from the validation split. It must be the round
LightGBM's own early stopping keeps on the same data, for each task's stopping metric."""

from __future__ import annotations

import lightgbm as lgb
import pytest

from ml_assets.core.dask_fit import best_iteration
from ml_assets.core.tuning import base_params, fit_booster
from ml_assets_tests.helpers import synthetic_frame, synthetic_spec, synthetic_training_data


@pytest.mark.parametrize(
    ("task", "metric"), [("binary", "roc_auc"), ("binary", "f1"), ("regression", "rmse")]
)
def test_the_best_iteration_is_where_lightgbm_early_stopping_stops(task: str, metric: str) -> None:
    pipeline = synthetic_spec({"max_rounds": 300, "early_stopping_rounds": 10, "metric": metric}, task)
    data = synthetic_training_data(3000)
    if task == "regression":
        _, _, values = synthetic_frame(3000, 7)
        data.train.y, data.valid.y = values[:1500], values[1500:2250]
    # A high learning rate overfits these few rows early: early stopping has something to find.
    params = base_params(pipeline, None) | {"learning_rate": 0.3, "num_leaves": 63, "num_threads": 1}
    train, valid = (data.train.X, data.train.y), (data.valid.X, data.valid.y)
    stopped = fit_booster(params, pipeline, train, valid, data.categorical)
    every_round = lgb.train(
        params,
        lgb.Dataset(*train, categorical_feature=data.categorical),
        num_boost_round=pipeline.model.max_rounds,
    )
    assert 1 < stopped.best_iteration < pipeline.model.max_rounds
    assert best_iteration(every_round, pipeline, params, data.valid) == stopped.best_iteration
