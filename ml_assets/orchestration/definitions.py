"""The code location: every pipeline file of the pipelines directory turned into assets, checks, jobs,
sensors and schedules, with the resources and executor of the deployment ML_ASSETS_DEPLOYMENT names
(orchestration/deployments.py: `local` by default, or `cluster`), and every component in the defs folder
ml_assets/defs/ (empty as shipped; `dg scaffold defs` adds to it, this repository being a dg project).

`dagster dev` (via workspace.yaml), `dg dev`, `dg check defs`, `dagster definitions validate`, the daemon's
runs and, in a cluster, every Dask worker load `defs` from here. Paths come from the environment: ML_ASSETS_PIPELINES_DIR (default:
the pipelines shipped in the package) and the deployment's data root (local: ML_ASSETS_DATA_DIR, default
./data; cluster: ML_ASSETS_SHARED_ROOT).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from ml_assets.core.spec.load import load_project, pipelines_dir
from ml_assets.orchestration import jobs
from ml_assets.orchestration.build import (
    build_definitions,
    current_deployment,
    project_definitions,
    resources,
    run_job_definitions,
)

__all__ = ["all_assets_job", "build_definitions", "defs", "resources"]

REPOSITORY = Path(__file__).resolve().parents[2]


def defs_folder_components() -> dg.Definitions:
    """The components of ml_assets/defs/ in a checkout of this repository (a dg project). An installed
    package has no project around it; one looked for above site-packages could be another project."""
    if not (REPOSITORY / "pyproject.toml").exists():
        return dg.Definitions()
    return dg.load_from_defs_folder(path_within_project=REPOSITORY)


# The components share the pipeline files' resource objects (build.current_deployment): Dagster merges
# definitions only if their resources are the same objects.
defs = dg.Definitions.merge(
    project_definitions(load_project(pipelines_dir()), *current_deployment()),
    run_job_definitions(),
    defs_folder_components(),
)


def all_assets_job() -> dg.JobDefinition:
    """Every asset as one job: what `ml-assets run` executes on a cluster, a selection of it per launch.
    A module-level function, so that each Dask worker can rebuild the job by importing this module."""
    return defs.resolve_job_def(jobs.RUN_JOB)
