"""The search methods behind `model.tuning.method`: Optuna's TPE with pruning on CV folds and the random
search, driven by the same loop (same folds, metric, deadline and trial records)."""

from __future__ import annotations

import pytest

from ml_assets.core import tuning
from ml_assets_tests.helpers import slow_boosting, synthetic_spec, synthetic_training_data

# How far past a deadline a busy machine may run: generous, far below an uncut search of slow fits.
BUSY_S = 15.0


def _without_timings(trials: list[dict]) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "elapsed_s"} for t in trials]


def test_optuna_search_is_deterministic_for_a_seed_and_trial_count():
    spec = synthetic_spec({"max_rounds": 60, "early_stopping_rounds": 10, "cv_folds": 3})
    data = synthetic_training_data(1600)
    first = tuning.tune(spec, data, 600.0, 8, method="optuna")
    again = tuning.tune(spec, data, 600.0, 8, method="optuna")
    assert first.method == "optuna" and len(first.trials) == 8
    assert _without_timings(first.trials) == _without_timings(again.trials)
    assert first.best_params == again.best_params and first.best_cv_score == again.best_cv_score
    # Another seed searches other points: the seed is what fixes them.
    reseeded = synthetic_spec({"max_rounds": 60, "early_stopping_rounds": 10, "cv_folds": 3, "seed": 7})
    other = tuning.tune(reseeded, data, 600.0, 8, method="optuna")
    assert [t["params"] for t in other.trials[1:]] != [t["params"] for t in first.trials[1:]]


def test_optuna_prunes_trials_that_trail_after_a_fold_and_random_search_never_does():
    """A space where leaves need more rows than a fold trains on for a large share of its points: such a
    trial predicts a constant (ROC-AUC 0.5) from its first fold, far behind the median, and is pruned."""
    model = {
        "max_rounds": 60,
        "early_stopping_rounds": 10,
        "cv_folds": 3,
        "search_space": {"min_child_samples": {"low": 5, "high": 5000, "log": True, "type": "int"}},
    }
    spec = synthetic_spec(model)
    data = synthetic_training_data(2400)
    searched = tuning.tune(spec, data, 600.0, 16, method="optuna")
    pruned = [t for t in searched.trials if t["pruned"]]
    assert pruned, searched.trials
    for trial in pruned:
        # Stopped before its last fold, scoreless, so it can never be the best.
        assert 0 < len(trial["rounds"]) < 3 and trial["cv_score"] is None and not trial["cut_short"]
    complete = [t for t in searched.trials if t["cv_score"] is not None]
    assert searched.best_cv_score == max(t["cv_score"] for t in complete)
    assert not searched.trials[0]["pruned"] and searched.trials[0]["params"] == {}  # the defaults
    random = tuning.tune(spec, data, 600.0, 16, method="random")
    assert random.method == "random" and not any(t["pruned"] for t in random.trials)


@pytest.mark.parametrize("method", ["optuna", "random"])
def test_the_search_deadline_is_honoured(monkeypatch, method):
    """Boosting rounds forced slow (20 ms) and early stopping never ending them: 2000 rounds a fit, far
    longer than the budget. The search stops at its deadline, the trial it cut is recorded as cut short
    and nothing starts after it."""
    slow_boosting(monkeypatch, 0.02)
    spec = synthetic_spec({"max_rounds": 2000, "early_stopping_rounds": 2000, "cv_folds": 2})
    budget = 3.0
    searched = tuning.tune(spec, synthetic_training_data(1200), budget, 10, method=method)
    assert searched.trials and searched.trials[-1]["cut_short"]
    assert sum(t["cut_short"] for t in searched.trials) == 1
    assert searched.elapsed_s <= budget + BUSY_S


def test_the_pipeline_file_chooses_the_method():
    data = synthetic_training_data(1200)
    for method in ("optuna", "random"):
        spec = synthetic_spec({"max_rounds": 30, "cv_folds": 2, "tuning": {"method": method}})
        assert tuning.tune(spec, data, 600.0, 2).method == method
