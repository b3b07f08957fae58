"""Tuning: LightGBM's parameters found by a seeded search within a time budget, each trial scored by k-fold
CV on the training split, folded as the split itself was made (see cv_folds). The search method
(`model.tuning.method`) only proposes points and may prune a trial after a fold: a random search here,
Optuna's TPE in tuning_optuna.py; one loop (`tune`) owns folds, metric, deadline and records for both.

Also what the search and the model step share: the training split as frames (`TrainingData`), LightGBM's
base parameters and one fit with early stopping (`fit_booster`). train.py drives the model step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

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


class OverBudget(Exception):
    """Raised from inside LightGBM's boosting loop when the tuning deadline has passed."""


def stop_at(deadline: float) -> Callable[[Any], None]:
    def callback(env: Any) -> None:
        if time.monotonic() > deadline:
            raise OverBudget

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
    method: str = "random"


class Searcher(Protocol):
    """What a search method decides: each trial's parameters, and whether a trial goes on after a fold.
    The loop in `tune` owns the rest (folds, metric, deadline, records), the same for every method."""

    method: str

    def propose(self) -> dict[str, Any]:
        """The next trial's searched parameters."""
        ...

    def keep_going(self, fold: int, running_mean: float) -> bool:
        """After each fold but the last, with the mean of the fold scores so far; False prunes."""
        ...

    def settle(self, record: dict[str, Any]) -> None:
        """The trial's record, once it completed, was pruned or was cut short."""
        ...


class RandomSearch:
    """Uniform random points of the search space, from a generator seeded by the pipeline; never prunes."""

    method = "random"

    def __init__(self, pipeline: PipelineSpec) -> None:
        self._space = pipeline.model.search_space
        self._rng = np.random.default_rng(pipeline.model.seed)

    def propose(self) -> dict[str, Any]:
        return sample_params(self._space, self._rng)

    def keep_going(self, fold: int, running_mean: float) -> bool:
        return True

    def settle(self, record: dict[str, Any]) -> None:
        pass


def searcher_for(pipeline: PipelineSpec, max_trials: int, method: str | None = None) -> Searcher:
    """The pipeline's `model.tuning.method` (or `method`, to compare them); `max_trials` sets Optuna's
    warm-up."""
    if (method or pipeline.model.tuning.method) == "optuna":
        # Imported here, so a pipeline tuned by random search never loads it (about 1 s alone, mostly
        # SciPy; 40 ms once LightGBM and scikit-learn are loaded: measured under load, 2026-12-07).
        from ml_assets.core.tuning_optuna import OptunaSearch

        return OptunaSearch(pipeline, max_trials)
    return RandomSearch(pipeline)


def _cv_trial(
    pipeline: PipelineSpec,
    data: TrainingData,
    params: dict[str, Any],
    fold_indices: list[tuple[np.ndarray, np.ndarray]],
    deadline: float,
    searcher: Searcher | None,
) -> dict[str, Any]:
    """One trial's CV: a fit per fold, stopped at the deadline (cut short), or after a fold when the
    searcher prunes it (`searcher` None: never pruned). Only a trial that ran every fold has a score."""
    X, y = data.train.X, data.train.y
    fold_scores, rounds = [], []
    cut_short = pruned = False
    try:
        for i, (tr, va) in enumerate(fold_indices):
            booster = fit_booster(
                params,
                pipeline,
                (X.iloc[tr], y[tr]),
                (X.iloc[va], y[va]),
                data.categorical,
                stop_at(deadline),
            )
            pred = predict(booster, X.iloc[va], booster.best_iteration)
            fold_scores.append(score(pipeline.task, pipeline.metric, y[va], pred))
            rounds.append(booster.best_iteration)
            last = i == len(fold_indices) - 1
            if not last and searcher and not searcher.keep_going(i, float(np.mean(fold_scores))):
                pruned = True
                break
    except OverBudget:
        cut_short = True
    complete = bool(fold_scores) and not cut_short and not pruned
    return {
        "cv_score": float(np.mean(fold_scores)) if complete else None,
        "cv_std": float(np.std(fold_scores)) if complete else None,
        "rounds": rounds,
        "cut_short": cut_short,
        "pruned": pruned,
    }


def tune(
    pipeline: PipelineSpec,
    data: TrainingData,
    time_budget_s: float,
    max_trials: int,
    progress: Progress = silent,
    method: str | None = None,
) -> Tuning:
    """A seeded search within `time_budget_s` by the pipeline's `model.tuning.method` (or `method`): the
    first trial is LightGBM's defaults (no searched parameter); every trial, the first included, is
    stopped when the deadline passes and recorded as cut short, and the searcher may prune one after a
    fold (a cut or pruned trial's score is not comparable, so it never wins; with no complete trial the
    defaults are used)."""
    fold_indices = cv_folds(pipeline, data.train)
    searcher = searcher_for(pipeline, max_trials, method)
    base = base_params(pipeline, len(data.classes) if data.classes else None)
    sign = 1 if pipeline.greater_is_better else -1
    started = time.monotonic()
    deadline = started + time_budget_s
    trials: list[dict[str, Any]] = []
    while len(trials) < max_trials:
        elapsed = time.monotonic() - started
        # Never start a trial that is expected to overrun the budget.
        if trials and elapsed + elapsed / len(trials) > time_budget_s:
            break
        # The defaults are judged as they are, never pruned, and not told to the searcher (they are
        # not a point of its space).
        sampled = searcher.propose() if trials else {}
        record = {"params": sampled} | _cv_trial(
            pipeline, data, base | sampled, fold_indices, deadline, searcher if trials else None
        )
        record["elapsed_s"] = round(time.monotonic() - started - elapsed, 3)
        if trials:
            searcher.settle(record)
        trials.append(record)
        if record["cut_short"]:
            progress(f"trial {len(trials)} of {max_trials} cut short at the deadline ({time_budget_s:.0f} s)")
            break
        _report(progress, pipeline, trials, max_trials, time_budget_s, time.monotonic() - started)
    complete = [t for t in trials if t["cv_score"] is not None]
    best = max(complete, key=lambda t: sign * t["cv_score"]) if complete else trials[0]
    return Tuning(
        base | best["params"], best["cv_score"], trials, time.monotonic() - started, searcher.method
    )


def _report(
    progress: Progress,
    pipeline: PipelineSpec,
    trials: list[dict],
    max_trials: int,
    budget: float,
    spent: float,
) -> None:
    sign = 1 if pipeline.greater_is_better else -1
    best = max(sign * t["cv_score"] for t in trials if t["cv_score"] is not None) * sign
    last = trials[-1]
    outcome = (
        f"pruned after {len(last['rounds'])} fold(s)"
        if last["pruned"]
        else f"CV {pipeline.metric} {last['cv_score']:.4f}"
    )
    progress(
        f"trial {len(trials)} of {max_trials}: {outcome}, best so far {best:.4f}; "
        f"{max(0.0, budget - spent):.0f} s of the {budget:.0f} s search budget left"
    )
