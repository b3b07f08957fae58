"""The final fit on a Dask cluster, with LightGBM's own Dask interface (`lightgbm.dask`), for training
splits too large to fit in one process's time.

The training rows are spread over the cluster's workers (every k-th row to each: each worker's share
looks like the whole, which matters because data-parallel LightGBM finds each feature's bins on one
worker's rows), each worker trains on its share with one thread per Dask thread (LightGBM's Dask
interface sets `num_threads` to the worker's threads: start workers with `--nthreads 1` per core, never
more threads per fit than cores), and the workers' histograms are merged over LightGBM's own sockets.
The result is an ordinary Booster: the same text model file, registry, gate and serving.

Two differences from the local fit, both because LightGBM's Dask interface has no early stopping
(lightgbm issues 3712, 6351: one worker stopping leaves the others waiting on its sockets):
- every round up to `model.max_rounds` is trained, and the best iteration is then found as early stopping
  would have found it, from the validation split's score after each round (computed here, once per round,
  from each tree's raw contribution), so the saved model holds the same number of rounds as a local one
  would;
- the time budget does not cut a distributed fit short. Instead the fit has a timeout: a worker lost
  mid-fit, or one that never joins, fails the step instead of leaving it waiting.

Called from inside a Dask task (the cluster's model step), the step leaves its worker thread while it
waits (`secede`), so that worker also trains its share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from ml_assets.core.errors import MlAssetsError
from ml_assets.core.metrics import score
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.tuning import Split, TrainingData

# LightGBM's early-stopping metric (base_params' `metric`) as ours, and whether greater is better.
EARLY_STOPPING_METRIC = {
    "auc": ("roc_auc", True),
    "average_precision": ("pr_auc", True),
    "binary_logloss": ("log_loss", False),
    "multi_logloss": ("log_loss", False),
    "rmse": ("rmse", False),
    "l2": ("rmse", False),
    "l1": ("mae", False),
}
# Parameters LightGBM's Dask interface sets itself (and warns about when given).
SET_BY_DASK = ("num_threads", "num_machines", "num_class")


class DistributedFitError(MlAssetsError):
    """A distributed fit did not finish: it timed out, or a worker was lost."""


@dataclass(frozen=True)
class DaskFit:
    """Fit on the Dask scheduler at `scheduler` when the training split has at least `min_rows` rows;
    give up after `timeout_s` seconds."""

    scheduler: str
    min_rows: int
    timeout_s: float

    def applies(self, rows: int) -> bool:
        return rows >= self.min_rows

    def fit(
        self, params: dict[str, Any], pipeline: PipelineSpec, data: TrainingData
    ) -> tuple[lgb.Booster, dict[str, Any]]:
        """The booster (its best iteration set) and what the manifest records of the fit."""
        outcome: dict[str, Any] = {}

        def fit_in_thread() -> None:
            try:
                outcome["result"] = self._fit(params, pipeline, data)
            except BaseException as exc:  # handed to the step's thread below
                outcome["error"] = exc

        # In a thread of its own, so that a fit stuck on a lost worker's socket cannot hold the step past
        # the timeout (the thread is a daemon: it dies with the process).
        thread = threading.Thread(target=fit_in_thread, name="lightgbm.dask fit", daemon=True)
        with _worker_thread_left():
            thread.start()
            thread.join(self.timeout_s)
        if thread.is_alive():
            raise DistributedFitError(
                f"pipeline '{pipeline.name}': the distributed LightGBM fit did not finish within "
                f"{self.timeout_s:.0f} s (a lost or busy worker?); raise ML_ASSETS_DASK_FIT_TIMEOUT_S if it "
                "needs longer"
            )
        if "error" in outcome:
            raise DistributedFitError(
                f"pipeline '{pipeline.name}': the distributed LightGBM fit failed: {outcome['error']}"
            ) from outcome["error"]
        return outcome["result"]

    def _fit(
        self, params: dict[str, Any], pipeline: PipelineSpec, data: TrainingData
    ) -> tuple[lgb.Booster, dict[str, Any]]:
        from lightgbm.dask import DaskLGBMClassifier, DaskLGBMRegressor

        estimator = DaskLGBMRegressor if pipeline.task == "regression" else DaskLGBMClassifier
        settings = {k: v for k, v in params.items() if k not in SET_BY_DASK}
        # LightGBM's own socket timeout, in minutes: its workers give up on each other too.
        settings["time_out"] = max(1, math.ceil(self.timeout_s / 60))
        from distributed import Client

        # Current for this thread only (parts of LightGBM's Dask interface ask for the current client).
        with Client(self.scheduler, set_as_default=False) as client, client.as_current():
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            X, y = _spread(client, data.train, workers)
            model = estimator(client=client, n_estimators=pipeline.model.max_rounds, **settings)
            model.fit(X, y, categorical_feature=data.categorical or "auto")
            booster = model.booster_
        best = best_iteration(booster, pipeline, params, data.valid)
        booster.best_iteration = best
        return booster, {
            "engine": "lightgbm.dask",
            "workers": len(workers),
            "rounds_trained": booster.current_iteration(),
        }


@contextmanager
def _worker_thread_left() -> Iterator[None]:
    """Called from a Dask task (the cluster's model step): leave the worker's thread while the fit runs,
    so that this worker can run its own share of the fit too, and take a thread again afterwards."""
    from distributed import get_worker, rejoin, secede

    try:
        get_worker()
    except ValueError:  # not on a Dask worker
        yield
        return
    secede()
    try:
        yield
    finally:
        rejoin()


def _spread(client: Any, train: Split, workers: list[str]) -> tuple[Any, Any]:
    """The training split as Dask collections with every k-th row on the k-th worker."""
    import dask.dataframe as dd

    k = len(workers)
    X_parts, y_parts = [], []
    for i, worker in enumerate(workers):
        rows = np.arange(i, len(train.y), k)
        X_parts.append(client.scatter(train.X.iloc[rows], workers=[worker], hash=False))
        y_parts.append(client.scatter(pd.Series(train.y[rows], name="y"), workers=[worker], hash=False))
    X = dd.from_delayed(X_parts, meta=train.X.iloc[:0], verify_meta=False)
    y = dd.from_delayed(y_parts, meta=pd.Series(train.y[:0], name="y"), verify_meta=False)
    return X, y


def _link(objective: str, raw: np.ndarray) -> np.ndarray:
    """Predictions from raw scores, as LightGBM's objectives that base_params sets turn them."""
    if objective == "binary":
        return 1.0 / (1.0 + np.exp(-raw))
    if objective in ("multiclass", "softmax"):
        e = np.exp(raw - raw.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return raw


def best_iteration(booster: lgb.Booster, pipeline: PipelineSpec, params: dict[str, Any], valid: Split) -> int:
    """The round early stopping would have kept: the best validation score (LightGBM's early-stopping
    metric, as ours), scanning until `early_stopping_rounds` rounds bring no improvement."""
    metric, greater = EARLY_STOPPING_METRIC.get(
        str(params.get("metric")), (pipeline.metric, pipeline.greater_is_better)
    )
    sign = 1.0 if greater else -1.0
    objective = str(params.get("objective", "regression"))
    raw: np.ndarray | float = 0.0
    best, best_round = -math.inf, 1
    for i in range(booster.current_iteration()):
        raw = raw + booster.predict(valid.X, start_iteration=i, num_iteration=1, raw_score=True)
        value = sign * score(pipeline.task, metric, valid.y, _link(objective, np.asarray(raw)))
        if value > best:
            best, best_round = value, i + 1
        elif i + 1 - best_round >= pipeline.model.early_stopping_rounds:
            break
    return best_round
