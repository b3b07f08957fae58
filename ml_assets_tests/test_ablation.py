"""The ablation of history feature families: the model's parameters refitted without each family, on data
where one family carries the signal and another is noise; bounded by the model step's deadline."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from ml_assets.core import ablation
from ml_assets.core.spec.load import load_project
from ml_assets.core.tuning import Split, TrainingData, base_params
from ml_assets_tests.conftest import write_pipelines

SIGNAL = ["route_mean_7d", "route_share_7d"]
NOISE = ["tail_last_12h"]
PLAIN = ["distance"]


@pytest.fixture(scope="module")
def flagship(tmp_path_factory):
    return load_project(write_pipelines(tmp_path_factory.mktemp("pipelines"), None)).pipelines["flight_delay"]


def _split(rng: np.random.Generator, rows: int) -> Split:
    X = pd.DataFrame({c: rng.normal(size=rows) for c in SIGNAL + NOISE + PLAIN})
    logit = 2.0 * X["route_mean_7d"] + 1.5 * X["route_share_7d"]
    y = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(int).to_numpy()
    return Split(X, y, np.arange(rows), np.zeros(rows))


def _data() -> TrainingData:
    rng = np.random.default_rng(7)
    splits = [_split(rng, n) for n in (3000, 800, 1500)]
    return TrainingData(*splits, SIGNAL + NOISE + PLAIN, [], [0, 1], {"start": None, "end": None})


def test_families_map_to_the_model_inputs_their_columns_feed(flagship):
    found = ablation.family_features(flagship, SIGNAL + NOISE + PLAIN)
    assert found == {"route": SIGNAL, "tail": NOISE, "all families": SIGNAL + NOISE}
    assert ablation.fits(flagship, SIGNAL + NOISE + PLAIN) == 3
    no_history = flagship.model_copy(update={"history": None})
    assert ablation.family_features(no_history, SIGNAL + NOISE + PLAIN) == {}


def test_dropping_the_family_that_carries_the_signal_costs_the_most(flagship):
    data = _data()
    params = base_params(flagship, 2)
    result = ablation.ablate(flagship, data, params, 0.80, time.monotonic() + 300)
    assert result is not None and result["not_measured"] == []
    by_family = {r["without"]: r for r in result["families"]}
    assert set(by_family) == {"route", "tail", "all families"}
    # Without the signal the refit ranks about at random; without the noise it keeps its skill.
    assert by_family["route"]["test"] < 0.6 and by_family["all families"]["test"] < 0.6
    assert by_family["tail"]["test"] > 0.75
    assert by_family["route"]["difference"] == pytest.approx(0.80 - by_family["route"]["test"])
    assert by_family["route"]["features"] == SIGNAL


def test_no_refit_starts_after_the_deadline(flagship):
    result = ablation.ablate(flagship, _data(), base_params(flagship, 2), 0.8, time.monotonic() - 1)
    assert result["families"] == [] and result["not_measured"] == ["all families", "route", "tail"]
