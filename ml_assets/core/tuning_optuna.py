"""Tuning by Optuna: its TPE sampler proposes each trial, its median pruner stops a trial after a CV fold
whose running mean trails the earlier trials' at that fold. `tune` (tuning.py) drives it exactly as it
drives the random search: same folds, metric, deadline and records (`model.tuning.method: optuna`).

The study lives in memory (no storage, nothing written to disk) and Optuna's logging is kept to warnings:
the model step's own progress lines say what each trial did.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from ml_assets.core.spec import ParamRange, PipelineSpec

# TPE samples at random until this many trials have completed, then models the good and bad trials.
# Optuna's default is 10; a model step's budget often allows fewer trials than that, so the warm-up is a
# quarter of `max_trials` (at least 2, at most Optuna's 10). The pruner judges only once as many trials
# completed: a median of fewer is mostly noise.
MAX_STARTUP_TRIALS = 10


def startup_trials(max_trials: int) -> int:
    return min(MAX_STARTUP_TRIALS, max(2, max_trials // 4))


def _suggest(trial: optuna.Trial, name: str, r: ParamRange) -> int | float:
    if r.type == "int":
        # The integers inside the range, as the random search rounds into it.
        return trial.suggest_int(name, math.ceil(r.low), math.floor(r.high), log=r.log)
    return trial.suggest_float(name, r.low, r.high, log=r.log)


class OptunaSearch:
    """A seeded TPE study over `model.search_space`, pruned on CV folds by a median pruner."""

    method = "optuna"

    def __init__(self, pipeline: PipelineSpec, max_trials: int) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        startup = startup_trials(max_trials)
        self._space = pipeline.model.search_space
        self._study = optuna.create_study(
            direction="maximize" if pipeline.greater_is_better else "minimize",
            sampler=optuna.samplers.TPESampler(seed=pipeline.model.seed, n_startup_trials=startup),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0),
        )
        self._trial: optuna.Trial | None = None

    def propose(self) -> dict[str, Any]:
        self._trial = self._study.ask()
        return {name: _suggest(self._trial, name, r) for name, r in self._space.items()}

    def keep_going(self, fold: int, running_mean: float) -> bool:
        assert self._trial is not None
        self._trial.report(running_mean, fold)
        return not self._trial.should_prune()

    def settle(self, record: dict[str, Any]) -> None:
        if record["pruned"]:
            self._study.tell(self._trial, state=optuna.trial.TrialState.PRUNED)
        elif record["cv_score"] is None:
            # Cut short by the deadline: not a judgement of its parameters.
            self._study.tell(self._trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(self._trial, record["cv_score"])
        self._trial = None
