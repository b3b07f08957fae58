"""Ablation: what each history feature family adds to the model. The model's own parameters refitted (early
stopping on the validation split, as the model was) without one family's features at a time, and without
the whole history feature set, each scored on the test split in the pipeline's metric.

The fits run inside the model step's time budget: train.py reserves time for them before the search; no
fit starts after the deadline and a fit running at it is stopped (those families are recorded as not
measured), so the step never runs over its budget for the report's sake.
"""

from __future__ import annotations

import time
from typing import Any

from ml_assets.core.metrics import score
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.tuning import OverBudget, TrainingData, fit_booster, predict, stop_at

# Not a family name: names are identifiers, never with a space.
ALL_HISTORY = "all families"


def family_features(pipeline: PipelineSpec, features: list[str]) -> dict[str, list[str]]:
    """Model input columns fed by each history family (only families the model uses), and by all of them
    when there are several (`all families`); {} for a pipeline without history features."""
    if pipeline.history is None:
        return {}
    # History columns are numbers: each feeds the model as one input of the feature's own name.
    by_column = {
        f"{name}_{function}_{window}": name
        for name, family in pipeline.history.families.items()
        for window in family.windows
        for function in family.functions
    }
    found: dict[str, list[str]] = {}
    for feature in pipeline.features:
        family = by_column.get(feature.column or feature.name)
        if family is not None and feature.name in features:
            found.setdefault(family, []).append(feature.name)
    if len(found) > 1:
        # First: when the budget allows only some refits, the feature set as a whole is measured.
        return {ALL_HISTORY: [c for columns in found.values() for c in columns]} | found
    return found


def fits(pipeline: PipelineSpec, features: list[str]) -> int:
    """How many refits the ablation of this pipeline's model takes."""
    return len(family_features(pipeline, features))


def ablate(
    pipeline: PipelineSpec,
    data: TrainingData,
    params: dict[str, Any],
    model_metric: float,
    deadline: float,
) -> dict[str, Any] | None:
    """The test metric of the model's parameters refitted without each family (and without all history),
    next to the model's own (`model_metric`); None when the pipeline has no history features."""
    groups = family_features(pipeline, data.features)
    if not groups:
        return None
    rows, not_measured = [], []
    for family, dropped in groups.items():
        metric = _without(pipeline, data, params, dropped, deadline) if time.monotonic() < deadline else None
        if metric is None:
            not_measured.append(family)
            continue
        rows.append(
            {"without": family, "features": dropped, "test": metric, "difference": model_metric - metric}
        )
    return {"metric": pipeline.metric, "model": model_metric, "families": rows, "not_measured": not_measured}


def _without(
    pipeline: PipelineSpec, data: TrainingData, params: dict[str, Any], dropped: list[str], deadline: float
) -> float | None:
    left_out = set(dropped)
    keep = [c for c in data.features if c not in left_out]
    categorical = [c for c in data.categorical if c in keep]
    try:
        booster = fit_booster(
            params,
            pipeline,
            (data.train.X[keep], data.train.y),
            (data.valid.X[keep], data.valid.y),
            categorical,
            stop_at(deadline),
        )
    except OverBudget:
        return None
    pred = predict(booster, data.test.X[keep], booster.best_iteration or None)
    return float(score(pipeline.task, pipeline.metric, data.test.y, pred))
