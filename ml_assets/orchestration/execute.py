"""How `ml-assets run` executes a selection of assets: in this process (local), or as a run whose steps
the deployment's Dask executor sends to the cluster's workers (cluster).

A Dask worker cannot receive a job built in this process: it rebuilds the job by importing the code
location (`definitions.all_assets_job`), with its own environment naming the same deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from ml_assets.core.errors import UsageError
from ml_assets.orchestration.resources import TrainingOverrides

QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def in_process(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: dg.AssetSelection | None,
    tags: Mapping[str, str],
    training: TrainingOverrides,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(defs.assets),
        resources=dict(defs.resources) | {"training": training},
        instance=instance,
        tags=tags,
        selection=selection,
        raise_on_error=False,
        run_config=QUIET_CONSOLE,
    )


def on_cluster(
    instance: dg.DagsterInstance,
    selection: dg.AssetSelection | None,
    tags: Mapping[str, str],
    training: TrainingOverrides,
) -> dg.JobExecutionResult:
    """Run the selection (None: every asset) as one run of the code location's asset job, with its
    executor (the cluster's: steps on Dask workers); `instance` must be persistent (the cluster's
    dagster.yaml), since workers record their steps' events in it."""
    from ml_assets.orchestration import definitions

    if not instance.is_persistent:
        raise UsageError(
            "ML_ASSETS_DEPLOYMENT=cluster needs DAGSTER_HOME: a folder holding the cluster's dagster.yaml "
            "(deploy/cluster/dagster.yaml, see docs/cluster.md)"
        )
    graph = definitions.defs.resolve_asset_graph()
    keys = None if selection is None else sorted(selection.resolve(graph))
    overrides = {k: v for k, v in training.model_dump().items() if v is not None}
    run_config: dict[str, Any] = QUIET_CONSOLE | {"resources": {"training": {"config": overrides}}}
    return dg.execute_job(
        dg.reconstructable(definitions.all_assets_job),
        instance,
        run_config=run_config,
        tags=dict(tags),
        asset_selection=keys,
    )
