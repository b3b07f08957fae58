"""Definitions built from a pipelines directory and a data directory: every pipeline turned into assets,
checks, jobs, sensors and schedules, with resources. Importing this builds nothing, so the CLI can load a
project itself and report a broken pipeline file as one line (definitions.py builds `defs` on import).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg

from ml_assets.core.spec.load import load_project
from ml_assets.core.spec.schema import Project
from ml_assets.orchestration import deployments, jobs
from ml_assets.orchestration.assets import build_assets
from ml_assets.orchestration.assets.serving import predictions_partitions
from ml_assets.orchestration.deployments import Deployment
from ml_assets.orchestration.intake import intake_job
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
    """The local deployment's resources over a data directory."""
    return deployments.local(root).resources()


@functools.cache
def current_deployment() -> tuple[Deployment, dict[str, dg.ConfigurableResource]]:
    """The deployment ML_ASSETS_DEPLOYMENT names, with one set of its resources per process: the pipeline
    files and every component of a code location share them (Dagster merges definitions only if their
    resources are the same objects)."""
    deployment = deployments.current()
    return deployment, deployment.resources()


def build_definitions(pipelines: Path, root: Path | Deployment) -> dg.Definitions:
    """Definitions over the pipelines of a directory, with the resources and executor of a deployment (a
    data directory: the local deployment over it)."""
    deployment = root if isinstance(root, Deployment) else deployments.local(root)
    project = project_definitions(load_project(pipelines), deployment, deployment.resources())
    return dg.Definitions.merge(project, run_job_definitions())


def run_job_definitions() -> dg.Definitions:
    """The job `ml-assets run` launches over every asset of the code location: once per code location, so
    not part of a component's definitions (Dagster refuses a job name twice, even for the same object)."""
    return dg.Definitions(jobs=[jobs.run_job()])


def project_definitions(
    project: Project, deployment: Deployment, resources: dict[str, dg.ConfigurableResource]
) -> dg.Definitions:
    """The assets, checks, jobs, sensors and schedules of a loaded project, with the deployment's executor
    and these resources."""
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
        sensors.append(landing_sensor(project, deployment.root, landing, intake))
    return dg.Definitions(
        assets=build_assets(project),
        jobs=all_jobs,
        sensors=sensors,
        schedules=schedules,
        resources=resources,
        executor=deployment.executor,
    )
