"""Pipeline specs -> Dagster assets, grouped by stage: `sources` (raw, validated, quarantine), `modelling`
(modelling table, features), `training` (model, evaluation, promotion), `monitoring` (champion,
performance, drift) and `serving` (batch predictions). Each asset calls one function of the core and turns its result into metadata.

Asset keys mirror where things live: `raw/<source>_raw`, `validated/<source>_validated`,
`quarantine/<source>_quarantine` are the DuckDB tables raw.<source>, validated.<source>,
quarantine.<source> shared by every pipeline that uses the source, `profile/<source>_profile` their EDA
(orchestration.keys builds them);
`<pipeline>/<asset>` belong to one pipeline's group.
"""

from __future__ import annotations

import warnings
from typing import Any

import dagster as dg

from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.assets.modelling import (
    features_asset,
    history_asset,
    history_guard_check,
    modelling_table_asset,
)
from ml_assets.orchestration.assets.monitoring import champion_asset, drift_asset, performance_asset
from ml_assets.orchestration.assets.profiles import profile_asset
from ml_assets.orchestration.assets.serving import predictions_asset
from ml_assets.orchestration.assets.sources import raw_asset, validated_asset
from ml_assets.orchestration.assets.training import evaluation_asset, model_asset, promotion_asset
from ml_assets.orchestration.checks import modelling_checks, skew_check, source_checks

# The assets of every pipeline's group, in lineage order (keys: <pipeline>/<name>).
PIPELINE_ASSETS = (
    "history",
    "modelling_table",
    "features",
    "model",
    "evaluation",
    "promotion",
    "champion",
    "performance",
    "predictions",
    "drift_report",
)
# What a landed batch refreshes in each pipeline that reads it (training stays with the retrain sensor).
LANDING_REFRESH = ("history", "modelling_table", "champion", "performance", "drift_report", "predictions")


def pipeline_assets(pipeline: PipelineSpec, project: Project) -> list[Any]:
    history = (
        [history_asset(pipeline, project), history_guard_check(pipeline, project)] if pipeline.history else []
    )
    return [
        *history,
        modelling_table_asset(pipeline, project),
        features_asset(pipeline),
        model_asset(pipeline),
        evaluation_asset(pipeline),
        promotion_asset(pipeline),
        champion_asset(pipeline, project),
        performance_asset(pipeline),
        drift_asset(pipeline),
        predictions_asset(pipeline, project),
        *modelling_checks(pipeline),
        skew_check(pipeline, project),
    ]


def build_assets(project: Project) -> list[Any]:
    out: list[Any] = []
    # Single-run backfills (one run per partition range) are a beta parameter in Dagster 1.13, used on
    # purpose; its warning is silenced here only, where the assets are built.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)
        for name, spec in project.sources.items():
            base_dir = project.source_files[name].parent
            out += [raw_asset(name, spec, base_dir), validated_asset(name, spec), *source_checks(name, spec)]
            out.append(profile_asset(name, project))
        for pipeline in project.pipelines.values():
            out += pipeline_assets(pipeline, project)
    return out
