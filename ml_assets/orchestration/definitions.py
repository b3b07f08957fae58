"""The code location: every pipeline file of the pipelines directory turned into assets, checks, jobs,
sensors and schedules, with the resources and executor of the deployment ML_ASSETS_DEPLOYMENT names
(orchestration/deployments.py: `local` by default, or `cluster`).

`dagster dev` (via workspace.yaml), `dagster definitions validate`, the daemon's runs and, in a cluster,
every Dask worker load `defs` from here. Paths come from the environment: ML_ASSETS_PIPELINES_DIR (default:
the pipelines shipped in the package) and the deployment's data root (local: ML_ASSETS_DATA_DIR, default
./data; cluster: ML_ASSETS_SHARED_ROOT).
"""

from __future__ import annotations

import dagster as dg

from ml_assets.core.spec.load import pipelines_dir
from ml_assets.orchestration import deployments, jobs
from ml_assets.orchestration.build import build_definitions, resources

__all__ = ["all_assets_job", "build_definitions", "defs", "resources"]

defs = build_definitions(pipelines_dir(), deployments.current())


def all_assets_job() -> dg.JobDefinition:
    """Every asset as one job: what `ml-assets run` executes on a cluster, a selection of it per launch.
    A module-level function, so that each Dask worker can rebuild the job by importing this module."""
    return defs.resolve_job_def(jobs.RUN_JOB)
