"""The code location: every pipeline file of the pipelines directory turned into assets, with resources.

`dagster dev` (via workspace.yaml) and `dagster definitions validate` load `defs` from here. Paths come
from the environment: ML_ASSETS_DATA_DIR (default ./data) and ML_ASSETS_PIPELINES_DIR (default: the
pipelines shipped in the package).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ml_assets.config import default_pipelines_dir, load_project
from ml_assets.factory import LANDING_REFRESH, build_assets
from ml_assets.resources import PIPELINES_DIR_ENV, ArtifactStore, Warehouse, data_dir, warehouse_path
from ml_assets.schedules import daily_drift_schedule
from ml_assets.sensors import landing_sensor, retrain_sensor


def build_definitions(pipelines_dir: Path, root: Path) -> dg.Definitions:
    project = load_project(pipelines_dir)
    sensors, schedules, automation_jobs = [], [], []
    for name, pipeline in project.pipelines.items():
        retrain = dg.define_asset_job(
            f"{name}_retrain_job",
            selection=dg.AssetSelection.assets(dg.AssetKey([name, "modelling_table"])).downstream(),
            description=f"Rebuild '{name}' from the validated tables: features, model, evaluation, promotion gate.",
        )
        drift = dg.define_asset_job(
            f"{name}_drift_job",
            selection=dg.AssetSelection.assets(dg.AssetKey([name, "drift_report"])),
            description=f"Recompute the drift report of '{name}'s champion.",
        )
        automation_jobs += [retrain, drift]
        sensors.append(retrain_sensor(pipeline, retrain))
        schedules.append(daily_drift_schedule(pipeline, drift))
    landing = [n for n, spec in project.sources.items() if spec.landing]
    if landing:
        users = [p for p, spec in project.pipelines.items() if set(landing) & set(project.sources_of(spec))]
        ingest_job = dg.define_asset_job(
            "landing_ingest_job",
            selection=dg.AssetSelection.assets(
                *(dg.AssetKey([layer, n]) for n in landing for layer in ("raw", "validated", "quarantine")),
                *(dg.AssetKey([p, a]) for p in users for a in LANDING_REFRESH),
            ),
            description="Ingest landed files (the partitions they touch), then refresh the modelling tables, "
            "drift reports and champion performance that read them. Launched by the landing_zone sensor.",
        )
        automation_jobs.append(ingest_job)
        sensors.append(landing_sensor(project, root, ingest_job))
    jobs = [
        dg.define_asset_job(
            f"{name}_job",
            selection=dg.AssetSelection.groups(name).upstream().required_multi_asset_neighbors(),
            description=f"Everything pipeline '{name}' needs, from raw sources to its evaluation.",
        )
        for name in project.pipelines
    ]
    return dg.Definitions(
        assets=build_assets(project),
        jobs=jobs + automation_jobs,
        sensors=sensors,
        schedules=schedules,
        resources={
            "warehouse": Warehouse(database=str(warehouse_path(root))),
            "artifacts": ArtifactStore(root=str(root)),
        },
        # One process per run: steps are short compared with a fresh process each (~1.5 s), and DuckDB
        # has one writer per file anyway. Training uses all cores through LightGBM's own threads.
        executor=dg.in_process_executor,
    )


defs = build_definitions(Path(os.environ.get(PIPELINES_DIR_ENV) or default_pipelines_dir()), data_dir())
