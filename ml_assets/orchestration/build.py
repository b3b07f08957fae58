"""Definitions built from a pipelines directory and a data directory: every pipeline turned into assets,
checks, jobs, sensors and schedules, with resources. Importing this builds nothing, so the CLI can load a
project itself and report a broken pipeline file as one line (definitions.py builds `defs` on import).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ml_assets.core.report_server import reports_url
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import warehouse
from ml_assets.orchestration import jobs
from ml_assets.orchestration.assets import build_assets
from ml_assets.orchestration.assets.serving import predictions_partitions
from ml_assets.orchestration.handoff import HandOffStore
from ml_assets.orchestration.intake import intake_job
from ml_assets.orchestration.resources import (
    PAUSE_SOCKET_ENV,
    ArtifactStore,
    RunPause,
    TrainingOverrides,
    Warehouse,
)
from ml_assets.orchestration.schedules import daily_drift_schedule, predictions_schedule
from ml_assets.orchestration.sensors import landing_sensor, rescore_sensor, retrain_sensor

# A run over a range of partitions otherwise records, when it is created, one "planned" event per
# partition for every asset of the run: 18 assets x 366 days = 6,588 event-log writes (16 s of a 97 s
# full-year run, bench/RESULTS.md) before any step starts. With this, one event per asset names the
# range. Dagster's trade-off: a run that fails does not mark each of its partitions failed; the run
# and its steps still show failed. Read when a run is created, so it must be set in every process
# that creates runs: those importing this module (the CLI, in-process runs) and, via the Makefile, the
# webserver and daemon of `make dev`. Undocumented in Dagster and with no public equivalent: a test
# (test_public_dagster) fails when Dagster stops honouring it (docs/design.md, "The planned-events switch").
PLANNED_EVENTS_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"
os.environ.setdefault(PLANNED_EVENTS_ENV, "1")


def resources(root: Path) -> dict[str, dg.ConfigurableResource]:
    return {
        "warehouse": Warehouse(database=warehouse(root)),
        "artifacts": ArtifactStore(root=str(root), reports_url=reports_url()),
        "training": TrainingOverrides(),
        "handoff": HandOffStore(root=str(root / "handoff")),
        "pause": RunPause(socket=os.environ.get(PAUSE_SOCKET_ENV, "")),
    }


def build_definitions(pipelines: Path, root: Path) -> dg.Definitions:
    project = load_project(pipelines)
    all_jobs: list[dg.UnresolvedAssetJobDefinition | dg.JobDefinition] = []
    sensors, schedules = [], []
    for pipeline in project.pipelines.values():
        retrain, drift = jobs.retrain_job(pipeline), jobs.drift_job(pipeline)
        all_jobs += [jobs.pipeline_job(pipeline), retrain, drift]
        sensors.append(retrain_sensor(pipeline, retrain))
        schedules.append(daily_drift_schedule(pipeline, drift))
        partitions = predictions_partitions(pipeline, project)
        if partitions is not None:
            scoring = jobs.predictions_job(pipeline)
            all_jobs.append(scoring)
            sensors.append(rescore_sensor(pipeline, scoring, partitions))
            schedules.append(predictions_schedule(scoring))
    landing = jobs.landing_job(project)
    if landing is not None:
        intake = intake_job(project)
        all_jobs += [landing, intake]
        sensors.append(landing_sensor(project, root, landing, intake))
    return dg.Definitions(
        assets=build_assets(project),
        jobs=all_jobs,
        sensors=sensors,
        schedules=schedules,
        resources=resources(root),
        # One process per run: steps are short compared with a fresh process each (~1.5 s), and DuckDB
        # has one writer per file anyway. Training uses LightGBM's own threads.
        executor=dg.in_process_executor,
    )
