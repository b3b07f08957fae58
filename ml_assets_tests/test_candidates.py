"""The model step's simpler candidates, its decision threshold and its time budget, on synthetic data in
memory (no Dagster): the JSON baselines reproduce scikit-learn exactly, the threshold follows the metric,
and `time_budget_s` bounds every trial (the first included) and the final fit."""

from __future__ import annotations

import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from ml_assets.core import linear, train, tuning
from ml_assets.core.errors import DatasetError
from ml_assets.core.linear import LinearModel
from ml_assets.core.metrics import choose_threshold, score
from ml_assets.core.spec import PipelineSpec
from ml_assets_tests.helpers import slow_boosting, synthetic_frame, synthetic_spec, synthetic_training_data


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_the_json_baseline_predicts_exactly_what_scikit_learn_fitted(task, monkeypatch):
    X, labels, values = synthetic_frame(800, 1)
    y = labels if task == "binary" else values
    prep = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), ["a", "b"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["c"]),
        ]
    )
    estimator = LogisticRegression(max_iter=1000) if task == "binary" else Ridge(alpha=1.0)
    reference = make_pipeline(prep, estimator).fit(X, y)
    fitted, cut_short = LinearModel.fit_linear(task, X, y, ["c"])
    assert not cut_short
    ours = LinearModel.from_json(fitted.to_json())
    X_new, _, _ = synthetic_frame(300, 2)
    X_new.loc[0, "c"] = 9  # a code never seen in training: all one-hot columns zero, as scikit-learn
    expected = reference.predict_proba(X_new)[:, 1] if task == "binary" else reference.predict(X_new)
    np.testing.assert_allclose(ours.predict(X_new), expected, rtol=1e-6, atol=1e-8)
    # The transform's polars frame (a missing value is a null there) is served without pandas, with the
    # same numbers.
    features = pl.from_pandas(X_new).with_columns(pl.col("b").fill_nan(None))
    assert features.get_column("b").null_count() > 0

    def _no_pandas(*_: object, **__: object) -> None:
        raise AssertionError("a polars frame went through pandas")

    monkeypatch.setattr(pl.DataFrame, "to_pandas", _no_pandas)
    np.testing.assert_allclose(ours.predict(features), ours.predict(X_new), rtol=0, atol=1e-12)


def test_the_constant_floor_predicts_the_training_prior():
    y = np.array([0, 0, 0, 1])
    model = LinearModel.fit_constant("binary", y, 2)
    assert model.predict(pd.DataFrame({"a": [1.0, 2.0]})).tolist() == [0.25, 0.25]
    multi = LinearModel.fit_constant("multiclass", np.array([0, 1, 1, 2]), 3)
    assert multi.predict(pd.DataFrame({"a": [1.0]})).tolist() == [[0.25, 0.5, 0.25]]


def _scores(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(0.3 + 0.25 * (2 * y - 1) + rng.normal(scale=0.2, size=n), 0, 1)
    return y, p


def _labels_metric(metric: str, y: np.ndarray, p: np.ndarray, t: float) -> float:
    return score("binary", metric, y, p, t)


def test_the_threshold_maximises_the_metric_it_is_chosen_for():
    y, p = _scores()
    grid = np.unique(p)
    for metric in ("accuracy", "f1"):
        chosen = choose_threshold(y, p, metric)
        best = max(_labels_metric(metric, y, p, t) for t in grid)
        assert _labels_metric(metric, y, p, chosen) == pytest.approx(best)
    # Accuracy and F1 disagree here (30% positives): the accuracy threshold is the higher one.
    assert choose_threshold(y, p, "accuracy") > choose_threshold(y, p, "f1")


def test_cost_and_recall_thresholds():
    y, p = _scores()
    # Missing a positive costs 10 false alarms: the threshold drops to catch more positives.
    assert choose_threshold(y, p, "cost", 1.0, 10.0) < choose_threshold(y, p, "cost", 1.0, 1.0)
    t = choose_threshold(y, p, "recall", target_recall=0.95)
    assert _labels_metric("recall", y, p, t) >= 0.95
    higher = np.unique(p)[np.unique(p) > t]
    assert _labels_metric("recall", y, p, higher[0]) < 0.95  # the highest threshold that reaches it


def test_the_pipeline_threshold_rule_follows_the_metric():
    y, p = _scores()
    spec = synthetic_spec({"metric": "accuracy"})
    assert train.decision_threshold(spec, y, p) == choose_threshold(y, p, "accuracy")
    assert train.decision_threshold(synthetic_spec({}), y, p) == choose_threshold(y, p, "f1")  # roc_auc: F1
    costly = synthetic_spec({"decision_threshold": {"optimise": "cost", "false_negative_cost": 10}})
    assert train.decision_threshold(costly, y, p) == choose_threshold(y, p, "cost", 1.0, 10.0)


ROUND_S = 0.02
# How far past a deadline a busy machine may run (2 cores shared by many test runs): generous, yet far
# below what the forced-slow fits take when nothing cuts them (5000 rounds of ROUND_S: 100 s).
BUSY_S = 15.0


class _SlowLogisticRegression(LogisticRegression):
    """Each solver call sleeps and reports its iterations used up (never converged), so the linear
    baseline alone would take several budgets."""

    def fit(self, *args, **kwargs):
        time.sleep(ROUND_S * 5)
        fitted = super().fit(*args, **kwargs)
        fitted.n_iter_ = np.array([self.max_iter])
        return fitted


def _slow(monkeypatch, baseline: bool = True) -> None:
    """Every boosting round sleeps, and (`baseline`) every solver chunk of the linear baseline sleeps and
    never converges."""
    slow_boosting(monkeypatch, ROUND_S)
    if baseline:
        monkeypatch.setattr(linear, "LogisticRegression", _SlowLogisticRegression)
        monkeypatch.setattr(linear, "CHUNK_ITER", 1)


@pytest.mark.parametrize("budget", [2.0, pytest.param(30.0, marks=pytest.mark.slow)])
def test_the_time_budget_bounds_the_whole_model_step(monkeypatch, budget):
    """A forced slow baseline and forced slow boosting that early stopping never ends: the baseline
    stops at its share of the budget, recorded as cut short; LightGBM's defaults are fitted
    until the budget's end with the rounds it has (the model), no search is started without time for
    it, and the whole model step ends within the budget (plus a busy machine's delays)."""
    _slow(monkeypatch)
    # 5000 rounds of 20 ms: longer than either budget, and early stopping never ends them.
    spec = synthetic_spec({"max_rounds": 5000, "early_stopping_rounds": 5000, "max_trials": 5, "cv_folds": 2})
    trained = train.train_model(spec, synthetic_training_data(1200), budget, spec.model.max_trials)
    assert trained.candidates["linear"].cut_short and not trained.candidates["constant"].cut_short
    assert trained.baselines_s <= budget * train.BASELINE_SHARE + BUSY_S
    assert trained.final_fit_cut_at is not None and 0 < trained.final_fit_cut_at < 5000
    assert trained.booster.current_iteration() == trained.final_fit_cut_at
    assert trained.tuning.trials == [] and trained.params == trained.tuning.best_params
    assert trained.elapsed_s <= budget + BUSY_S


def test_the_final_fit_leaves_time_to_score_the_splits(monkeypatch):
    """Scoring is forced slow (50 ms per tree for the 600 validation and test rows): the final fit stops
    early enough that scoring both splits with its trees still ends within the budget."""
    _slow(monkeypatch, baseline=False)
    real_predict = lgb.Booster.predict

    def slow_predict(self, X, *args, **kwargs):
        trees = kwargs.get("num_iteration") or (args[0] if args else None) or self.current_iteration()
        time.sleep(0.05 * trees * len(X) / 600)
        return real_predict(self, X, *args, **kwargs)

    monkeypatch.setattr(lgb.Booster, "predict", slow_predict)
    budget = 3.0
    spec = synthetic_spec({"max_rounds": 5000, "early_stopping_rounds": 5000, "max_trials": 5, "cv_folds": 2})
    trained = train.train_model(spec, synthetic_training_data(1200), budget, spec.model.max_trials)
    assert trained.final_fit_cut_at is not None
    assert trained.elapsed_s <= budget + BUSY_S


def test_a_trial_the_budget_cuts_is_recorded_and_never_wins(monkeypatch):
    """The defaults' fit completes (40 slow rounds) but leaves too little time for a whole CV trial of
    ten such fits: the first trial is cut at the search's deadline and recorded as cut short, nothing is
    started after it, and the defaults' model stays. (The search gets the budget minus two such fits:
    with c the fit's time, a search and a cut need 1/12 < c / budget < 1/2, idle or busy.)"""
    _slow(monkeypatch, baseline=False)
    budget = 6.0
    spec = synthetic_spec({"max_rounds": 40, "early_stopping_rounds": 1000, "max_trials": 5, "cv_folds": 10})
    trained = train.train_model(spec, synthetic_training_data(1200), budget, spec.model.max_trials)
    assert trained.final_fit_cut_at is None and 0 < trained.booster.current_iteration() <= 40
    (first,) = trained.tuning.trials
    assert first["cut_short"] is True and first["cv_score"] is None
    assert trained.tuning.best_cv_score is None and trained.params == trained.tuning.best_params
    assert trained.lightgbm_defaults["chosen"] and trained.tuning.trials[0]["params"] == {}
    assert 0 < trained.search_budget_s < budget
    assert trained.tuning.elapsed_s <= trained.search_budget_s + BUSY_S
    assert trained.elapsed_s <= budget + BUSY_S


def test_a_budget_that_never_binds_completes_every_trial():
    spec = synthetic_spec({"max_rounds": 50, "early_stopping_rounds": 10, "max_trials": 3, "cv_folds": 2})
    trained = train.train_model(spec, synthetic_training_data(1200), 600.0, 3)
    assert [t["cut_short"] for t in trained.tuning.trials] == [False, False, False]
    assert trained.params == trained.tuning.best_params  # the best CV parameters are the model's
    assert trained.final_fit_cut_at is None
    assert not any(c.cut_short for c in trained.candidates.values())


def test_lightgbm_defaults_are_the_first_fit_a_candidate_and_never_beaten_on_validation():
    """The first fit is LightGBM's own defaults with early stopping on the validation split, exactly, and
    recorded as the candidate `lightgbm_defaults`; the model is either that fit or a tuned refit that
    scores at least as well on the validation split."""
    spec = synthetic_spec({"max_rounds": 300, "early_stopping_rounds": 20, "max_trials": 4, "cv_folds": 2})
    data = synthetic_training_data(1600)
    trained = train.train_model(spec, data, 600.0, 4)
    assert trained.tuning.trials[0]["params"] == {}  # the first trial searched nothing: the defaults
    defaults = trained.lightgbm_defaults
    plain = tuning.fit_booster(
        tuning.base_params(spec, 2), spec, (data.train.X, data.train.y), (data.valid.X, data.valid.y), ["c"]
    )
    assert defaults["rounds"] == plain.best_iteration
    expected = score(
        "binary", "roc_auc", data.test.y, plain.predict(data.test.X, num_iteration=plain.best_iteration)
    )
    assert defaults["test_metrics"]["roc_auc"] == pytest.approx(expected, abs=1e-12)
    valid = score("binary", "roc_auc", data.valid.y, trained.booster.predict(data.valid.X))
    assert valid >= defaults["valid_score"] - 1e-12
    assert defaults["chosen"] == (trained.params == tuning.base_params(spec, 2))
    if defaults["chosen"]:
        assert trained.test_metrics == defaults["test_metrics"]


def _split_spec(split: dict) -> PipelineSpec:
    return synthetic_spec({"cv_folds": 3}, split=split, timestamp="t")


def _train_split(n: int, groups: int, positive_share: float) -> tuning.Split:
    rng = np.random.default_rng(3)
    y = (rng.random(n) < positive_share).astype(int)
    group = np.array([f"g{i}" for i in rng.integers(0, groups, size=n)], dtype=object)
    keys = np.arange(n).astype(str)
    return tuning.Split(pd.DataFrame({"a": rng.normal(size=n)}), y, keys, group)


def test_cv_folds_keep_every_group_whole_with_group_by():
    split = _train_split(600, 40, 0.5)
    folds = tuning.cv_folds(_split_spec({"method": "random", "group_by": ["customer"]}), split)
    assert len(folds) == 3
    for fit_rows, valid_rows in folds:
        assert not set(split.group[fit_rows]) & set(split.group[valid_rows])
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(600))


def test_cv_folds_keep_each_class_share_with_stratify():
    split = _train_split(3000, 3000, 0.02)
    positives = int(split.y.sum())
    folds = tuning.cv_folds(_split_spec({"method": "random", "stratify": True}), split)
    for _, valid_rows in folds:
        # Stratified: each fold holds a third of the rare class, to one row.
        assert abs(int(split.y[valid_rows].sum()) - positives / 3) <= 1


def test_cv_folds_of_a_time_split_never_validate_on_the_past():
    split = _train_split(600, 600, 0.5)
    for fit_rows, valid_rows in tuning.cv_folds(_split_spec({"method": "time"}), split):
        assert fit_rows.max() < valid_rows.min()


def test_fewer_groups_than_folds_is_a_one_line_error():
    split = _train_split(100, 2, 0.5)
    with pytest.raises(DatasetError, match=r"2 group\(s\) of split.group_by \['customer'\].*cv_folds \(3\)"):
        tuning.cv_folds(_split_spec({"method": "random", "group_by": ["customer"]}), split)


def test_the_linear_baseline_fits_on_a_bounded_seeded_sample_and_predicts_in_chunks(monkeypatch):
    """Beyond LINEAR_MAX_ROWS training rows the baseline fits on a seeded sample of that many (recorded),
    the constant floor still on every row; predicting chunk by chunk gives the one-piece numbers."""
    data, spec = synthetic_training_data(1200), synthetic_spec({"seed": 3})
    whole = train.fit_candidates(spec, data)
    monkeypatch.setattr(train, "LINEAR_MAX_ROWS", 200)
    capped = train.fit_candidates(spec, data)
    assert capped["linear"].train_rows == 200 and whole["linear"].train_rows == 600
    assert capped["constant"].train_rows == 600
    assert capped["constant"].model == whole["constant"].model
    assert capped["linear"].model != whole["linear"].model
    assert train.fit_candidates(spec, data)["linear"].model == capped["linear"].model  # seeded
    model = whole["linear"].model
    expected = model.predict(data.test.X)
    monkeypatch.setattr(linear, "PREDICT_ROWS", 7)
    np.testing.assert_allclose(model.predict(data.test.X), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.predict(pl.from_pandas(data.test.X)), expected, rtol=0, atol=1e-12)
