"""Jobs: one per pipeline (everything it needs), its retrain, drift and predictions jobs (what the sensors
and the schedules launch), and the landing job (what a landed batch refreshes)."""

from __future__ import annotations

import dagster as dg

from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.assets import LANDING_REFRESH
from ml_assets.orchestration.keys import layer_key, source_keys

LANDING_JOB = "landing_ingest_job"
RUN_JOB = "ml_assets_run_job"


def pipeline_selection(*names: str) -> dg.AssetSelection:
    """Every asset of these pipelines and the sources they read (`ml-assets run <pipeline>...`)."""
    return dg.AssetSelection.groups(*names).upstream().required_multi_asset_neighbors()


def retrain_selection(name: str) -> dg.AssetSelection:
    """A pipeline from its modelling table on, over the validated tables as they are.

    Without the batch scores: they are partitioned and a retrain covers no partition; the rescore sensor
    re-scores the latest partitions once the retrain has moved the champion."""
    return dg.AssetSelection.assets(
        dg.AssetKey([name, "modelling_table"])
    ).downstream() - dg.AssetSelection.assets(dg.AssetKey([name, "predictions"]))


def pipeline_job(pipeline: PipelineSpec) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        f"{pipeline.name}_job",
        selection=pipeline_selection(pipeline.name),
        description=f"Everything pipeline '{pipeline.name}' needs, from raw sources to its monitors.",
    )


def run_job() -> dg.UnresolvedAssetJobDefinition:
    """Every asset: what `ml-assets run` launches on a cluster, a selection of it at a time (the
    implicit asset job cannot be rebuilt by name on a Dask worker)."""
    return dg.define_asset_job(
        RUN_JOB, selection=dg.AssetSelection.all(), description="Every asset (ml-assets run on a cluster)."
    )


def retrain_job(pipeline: PipelineSpec) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        f"{pipeline.name}_retrain_job",
        selection=retrain_selection(pipeline.name),
        description=f"Rebuild '{pipeline.name}' from the validated tables: features, model, evaluation, "
        "promotion gate, monitors (batch scores follow through the rescore sensor).",
    )


def settled_and(pipeline: PipelineSpec, name: str) -> dg.AssetSelection:
    """An asset after the champion with the champion asset itself: the run settles the champion (rollback
    check) and the asset judges that version, not one settled by an earlier run before a manual rollback."""
    return dg.AssetSelection.assets(
        dg.AssetKey([pipeline.name, "champion"]), dg.AssetKey([pipeline.name, name])
    )


def drift_job(pipeline: PipelineSpec) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        f"{pipeline.name}_drift_job",
        selection=settled_and(pipeline, "drift_report"),
        description=f"Settle '{pipeline.name}'s champion and recompute its drift report.",
    )


def predictions_job(pipeline: PipelineSpec) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        f"{pipeline.name}_predictions_job",
        selection=settled_and(pipeline, "predictions"),
        description=f"Settle '{pipeline.name}'s champion and score partitions with it (what the rescore sensor "
        "and the predictions schedule launch).",
    )


def landing_users(project: Project) -> dict[str, list[str]]:
    """Landing source -> the pipelines that read it."""
    return {
        name: [p for p, spec in project.pipelines.items() if name in project.sources_of(spec)]
        for name, source in project.sources.items()
        if source.landing
    }


def landing_selection(users: dict[str, list[str]], project: Project) -> list[dg.AssetKey]:
    """What landed files of these sources refresh: their source tables and profiles (what changed is news
    after a landing), then each reader's history feature set (if it has one) and monitors."""
    keys = [key for name in users for key in (*source_keys(name), layer_key("profile", name))]
    keys += [
        dg.AssetKey([p, a])
        for readers in users.values()
        for p in readers
        for a in LANDING_REFRESH
        if a != "history" or project.pipelines[p].history is not None
    ]
    return sorted(set(keys))


def landing_job(project: Project) -> dg.UnresolvedAssetJobDefinition | None:
    users = landing_users(project)
    if not users:
        return None
    return dg.define_asset_job(
        LANDING_JOB,
        selection=dg.AssetSelection.assets(*landing_selection(users, project)),
        description="Ingest landed files (the partitions they touch) and re-profile their sources, then refresh "
        "the modelling tables, champion checks, batch scores, performance and drift reports that read them. "
        "Launched by the landing_zone sensor.",
    )
