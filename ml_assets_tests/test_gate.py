"""The promotion gate's statistics on synthetic predictions whose quality is known by construction."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ml_assets.core.metrics import improvement
from ml_assets.core.promotion import decide, paired_bootstrap
from ml_assets.core.spec import GateSpec

GATE = GateSpec(margin=0.0, confidence=0.95, bootstrap_samples=100, min_slice_rows=200)
SEEDS = range(25)


def _labels_and_signal(seed: int, n: int = 3000) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    y = (signal + rng.normal(size=n) > 0.8).astype(int)
    return rng, y, signal


def _probability(score: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-score))


def test_improvement_is_signed_by_metric_direction():
    assert improvement("roc_auc", 0.70, 0.68) == pytest.approx(0.02)
    assert improvement("log_loss", 0.50, 0.52) == pytest.approx(0.02)
    assert improvement("rmse", 36.0, 35.0) == pytest.approx(-1.0)


def test_identical_models_are_never_promoted():
    _, y, signal = _labels_and_signal(0)
    p = _probability(signal)
    verdict = decide("binary", "roc_auc", GATE, y, p, p.copy(), {})
    assert not verdict.promote
    assert verdict.details["bootstrap"]["improvement"] == 0
    assert "needs at least" in verdict.reason


@pytest.mark.parametrize("seed", SEEDS)
def test_a_worse_challenger_is_always_refused(seed):
    rng, y, signal = _labels_and_signal(seed)
    champion = _probability(signal + rng.normal(scale=0.5, size=len(y)))
    challenger = _probability(signal + rng.normal(scale=1.5, size=len(y)))  # strictly noisier
    verdict = decide("binary", "roc_auc", GATE, y, champion, challenger, {})
    assert not verdict.promote
    assert verdict.details["bootstrap"]["ci_high"] < 0


@pytest.mark.parametrize("seed", SEEDS)
def test_a_clearly_better_challenger_is_always_promoted(seed):
    rng, y, signal = _labels_and_signal(seed)
    champion = _probability(signal + rng.normal(scale=1.5, size=len(y)))
    challenger = _probability(signal + rng.normal(scale=0.5, size=len(y)))
    verdict = decide("binary", "roc_auc", GATE, y, champion, challenger, {})
    assert verdict.promote, verdict.reason
    assert verdict.details["bootstrap"]["ci_low"] > 0


def test_bootstrap_interval_covers_the_point_estimate_and_narrows_with_data():
    widths = []
    for n in (500, 8000):
        rng = np.random.default_rng(1)
        signal = rng.normal(size=n)
        y = (signal + rng.normal(size=n) > 0).astype(int)
        old, new = signal + rng.normal(scale=1.2, size=n), signal + rng.normal(scale=1.0, size=n)
        boot = paired_bootstrap("binary", "roc_auc", y, old, new, samples=200, confidence=0.95)
        assert boot["ci_low"] <= boot["improvement"] <= boot["ci_high"]
        widths.append(boot["ci_high"] - boot["ci_low"])
    assert widths[1] < widths[0] / 2


def test_a_margin_larger_than_the_gain_refuses():
    rng, y, signal = _labels_and_signal(3)
    champion = _probability(signal + rng.normal(scale=1.0, size=len(y)))
    challenger = _probability(signal + rng.normal(scale=0.7, size=len(y)))
    assert decide("binary", "roc_auc", GATE, y, champion, challenger, {}).promote
    strict = GATE.model_copy(update={"margin": 0.5})
    verdict = decide("binary", "roc_auc", strict, y, champion, challenger, {})
    assert not verdict.promote and "needs at least +0.50000" in verdict.reason


def test_a_regressing_guarded_metric_refuses_even_with_better_ranking():
    rng, y, signal = _labels_and_signal(4)
    champion = _probability(signal + rng.normal(scale=1.0, size=len(y)))
    # Better ranking, but probabilities pushed to the extremes: log loss gets much worse.
    challenger = _probability(4 * (signal + rng.normal(scale=0.6, size=len(y))))
    gate = GATE.model_copy(update={"guarded_metrics": {"log_loss": 0.01}})
    verdict = decide("binary", "roc_auc", gate, y, champion, challenger, {})
    assert verdict.details["bootstrap"]["ci_low"] > 0
    assert not verdict.promote and "guarded metric log_loss regresses" in verdict.reason


def _two_slices(seed: int, small_slice: Callable[[np.random.Generator, np.ndarray], np.ndarray]):
    """A champion, and a challenger clearly better on the large slice (3/4 of rows) and given by
    `small_slice(rng, champion_scores)` on the small one."""
    rng, y, signal = _labels_and_signal(seed, n=4000)
    group = np.where(np.arange(len(y)) % 4 == 0, "small", "large")
    champion = _probability(signal + rng.normal(scale=1.0, size=len(y)))
    challenger = champion.copy()
    large = group == "large"
    challenger[large] = _probability(signal[large] + rng.normal(scale=0.4, size=large.sum()))
    challenger[~large] = small_slice(rng, champion[~large])
    return y, group, champion, challenger


def test_a_regressing_slice_refuses_and_is_named():
    y, group, champion, challenger = _two_slices(5, lambda rng, old: rng.uniform(size=len(old)))  # useless
    gate = GATE.model_copy(update={"slices": ["group"]})
    verdict = decide("binary", "roc_auc", gate, y, champion, challenger, {"group": group})
    assert not verdict.promote
    assert "slice group=small" in verdict.reason and "group=large" not in verdict.reason


def test_regression_metrics_use_their_direction():
    rng = np.random.default_rng(6)
    y = rng.normal(size=3000) * 10
    champion = y + rng.normal(scale=8, size=len(y))
    challenger = y + rng.normal(scale=4, size=len(y))
    assert decide("regression", "rmse", GATE, y, champion, challenger, {}).promote
    assert not decide("regression", "rmse", GATE, y, challenger, champion, {}).promote


def test_rank_based_auc_equals_scikit_learn_including_ties():
    from sklearn.metrics import roc_auc_score

    from ml_assets.core.metrics import roc_auc

    rng = np.random.default_rng(9)
    for n in (50, 2000):
        y = (rng.random(n) < 0.3).astype(int)
        p = np.round(rng.random(n) + 0.2 * y, 1)  # coarse values: many ties
        assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_a_slice_that_is_worse_only_by_noise_does_not_block():
    # On the small slice the challenger differs from the champion by a hair: any change there is noise.
    y, group, champion, challenger = _two_slices(
        8, lambda rng, old: old + rng.normal(scale=1e-3, size=len(old))
    )
    gate = GATE.model_copy(update={"slices": ["group"], "slice_tolerance": 0.0})
    verdict = decide("binary", "roc_auc", gate, y, champion, challenger, {"group": group})
    assert verdict.promote, verdict.reason
    assert "small" in verdict.details["slices"]["group"]
