"""Tuning: LightGBM's parameters found by a seeded random search within a time budget, each trial scored
by k-fold CV on the training split, folded as the split itself was made (see cv_folds).

Also what the search and the model step share: the training split as frames (`TrainingData`), LightGBM's
base parameters and one fit with early stopping (`fit_booster`). train.py drives the model step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold, TimeSeriesSplit

from ml_assets.core.errors import DatasetError
from ml_assets.core.metrics import score
from ml_assets.core.progress import Progress, silent
from ml_assets.core.spec import ParamRange, PipelineSpec

LGB_METRIC = {"roc_auc": "auc", "pr_auc": "average_precision", "rmse": "rmse", "mae": "l1", "r2": "l2"}


@dataclass
class Split:
    X: pd.DataFrame
    y: np.ndarray
    key: np.ndarray
    group: np.ndarray


@dataclass
class TrainingData:
    train: Split
    valid: Split
    test: Split
    features: list[str]
    categorical: list[str]
    classes: list[Any] | None
    time_window: dict[str, str | None]


def base_params(pipeline: PipelineSpec, n_classes: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "verbosity": -1,
        "seed": pipeline.model.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": pipeline.model.num_threads,
    }
    if pipeline.task == "binary":
        params |= {"objective": "binary", "metric": LGB_METRIC.get(pipeline.metric, "binary_logloss")}
    elif pipeline.task == "multiclass":
        params |= {"objective": "multiclass", "num_class": n_classes, "metric": "multi_logloss"}
    else:
        params |= {"objective": "regression", "metric": LGB_METRIC.get(pipeline.metric, "l2")}
    return params | pipeline.model.params


def sample_params(space: dict[str, ParamRange], rng: np.random.Generator) -> dict[str, Any]:
    """A random point of the space (uniform, in log space for log ranges)."""
    out: dict[str, Any] = {}
    for name, r in space.items():
        lo, hi = (math.log(r.low), math.log(r.high)) if r.log else (r.low, r.high)
        u = rng.uniform(lo, hi)
        value = math.exp(u) if r.log else u
        out[name] = int(round(value)) if r.type == "int" else float(value)
    return out


def predict(booster: lgb.Booster, X: pd.DataFrame, num_iteration: int | None = None) -> np.ndarray:
    return booster.predict(X, num_iteration=num_iteration)


class _OverBudget(Exception):
    """Raised from inside LightGBM's boosting loop when the tuning deadline has passed."""


def _stop_at(deadline: float) -> Callable[[Any], None]:
    def callback(env: Any) -> None:
        if time.monotonic() > deadline:
            raise _OverBudget

    return callback


def fit_booster(
    params: dict[str, Any],
    pipeline: PipelineSpec,
    train: tuple[pd.DataFrame, np.ndarray],
    valid: tuple[pd.DataFrame, np.ndarray],
    categorical: list[str],
    deadline: Callable[[Any], None] | None = None,
) -> lgb.Booster:
    dtrain = lgb.Dataset(train[0], train[1], categorical_feature=categorical, free_raw_data=False)
    dvalid = lgb.Dataset(valid[0], valid[1], reference=dtrain, categorical_feature=categorical)
    callbacks = [lgb.early_stopping(pipeline.model.early_stopping_rounds, verbose=False)]
    if deadline is not None:
        callbacks.append(deadline)
    return lgb.train(
        params, dtrain, num_boost_round=pipeline.model.max_rounds, valid_sets=[dvalid], callbacks=callbacks
    )


def cv_folds(pipeline: PipelineSpec, train: Split) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, validation rows) per fold of the training split, folded as the split was made, so CV
    judges a trial on the kind of rows the test split holds: expanding windows in time order for a time
    split (no fold sees its future); whole groups with `group_by` (no entity in both); each class's share
    in every fold with `stratify`; else shuffled k-fold."""
    folds, seed, split = pipeline.model.cv_folds, pipeline.model.seed, pipeline.split
    if split.method == "time":
        return list(TimeSeriesSplit(n_splits=folds).split(train.X))
    if split.group_by:
        groups = len(np.unique(train.group))
        if groups < folds:
            raise DatasetError(
                f"pipeline '{pipeline.name}': the training split holds {groups} group(s) of "
                f"split.group_by {split.group_by}, fewer than model.cv_folds ({folds})"
            )
        return list(GroupKFold(folds, shuffle=True, random_state=seed).split(train.X, groups=train.group))
    if split.stratify and pipeline.task != "regression":
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(train.X, train.y))
    return list(KFold(folds, shuffle=True, random_state=seed).split(train.X))


@dataclass
class Tuning:
    best_params: dict[str, Any]
    best_cv_score: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def tune(
    pipeline: PipelineSpec,
    data: TrainingData,
    time_budget_s: float,
    max_trials: int,
    progress: Progress = silent,
) -> Tuning:
    """Seeded random search within `time_budget_s`: the first trial is LightGBM's defaults (no searched
    parameter); every trial, the first included, is stopped when the deadline passes and recorded as cut
    short (a cut trial's score is not comparable, so it never wins; with no complete trial the defaults
    are used)."""
    X, y = data.train.X, data.train.y
    fold_indices = cv_folds(pipeline, data.train)
    rng = np.random.default_rng(pipeline.model.seed)
    base = base_params(pipeline, len(data.classes) if data.classes else None)
    sign = 1 if pipeline.greater_is_better else -1
    started = time.monotonic()
    deadline = started + time_budget_s
    trials: list[dict[str, Any]] = []
    while len(trials) < max_trials:
        elapsed = time.monotonic() - started
        done = [t for t in trials if not t["cut_short"]]
        # Never start a trial that is expected to overrun the budget.
        if trials and (not done or elapsed + elapsed / len(trials) > time_budget_s):
            break
        sampled = sample_params(pipeline.model.search_space, rng) if trials else {}
        params = base | sampled
        fold_scores, rounds = [], []
        cut_short = False
        try:
            for tr, va in fold_indices:
                booster = fit_booster(
                    params,
                    pipeline,
                    (X.iloc[tr], y[tr]),
                    (X.iloc[va], y[va]),
                    data.categorical,
                    _stop_at(deadline),
                )
                pred = predict(booster, X.iloc[va], booster.best_iteration)
                fold_scores.append(score(pipeline.task, pipeline.metric, y[va], pred))
                rounds.append(booster.best_iteration)
        except _OverBudget:
            cut_short = True
        trials.append(
            {
                "params": sampled,
                "cv_score": float(np.mean(fold_scores)) if fold_scores and not cut_short else None,
                "cv_std": float(np.std(fold_scores)) if fold_scores and not cut_short else None,
                "rounds": rounds,
                "cut_short": cut_short,
                "elapsed_s": round(time.monotonic() - started - elapsed, 3),
            }
        )
        left = max(0.0, time_budget_s - (time.monotonic() - started))
        if cut_short:
            progress(f"trial {len(trials)} of {max_trials} cut short at the deadline ({time_budget_s:.0f} s)")
            break
        best_so_far = max(t["cv_score"] * sign for t in trials if not t["cut_short"]) * sign
        progress(
            f"trial {len(trials)} of {max_trials}: CV {pipeline.metric} {trials[-1]['cv_score']:.4f}, "
            f"best so far {best_so_far:.4f}; {left:.0f} s of the {time_budget_s:.0f} s search budget left"
        )
    complete = [t for t in trials if not t["cut_short"]]
    best = max(complete, key=lambda t: sign * t["cv_score"]) if complete else trials[0]
    return Tuning(base | best["params"], best["cv_score"], trials, time.monotonic() - started)
