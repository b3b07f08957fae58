"""dagster-dask's executor, with its step submission rewritten for two upstream problems.

1. Task keys. dagster-dask names each step's Dask task `<job>.<step>` (dagster issue 21418). Dask treats
   equal keys as one task, so of two concurrent runs of the same job only one executes a step: the other
   is handed the first run's result and its own step never runs. Here a key is `<job>.<run id>.<step>`.
2. Arguments. dagster-dask submits the run, its known state and the job as plain task arguments. Dask
   (2024.10 on) walks tuple arguments to find task references, and Dagster's records are tuples that
   refuse iteration, so every step fails before it starts. Here they travel inside an object that Dask
   does not look into (it only pickles it).

The step itself runs as dagster-dask runs it (its `query_on_dask_worker`: the worker rebuilds the job from
the code location and executes the one step against the run's instance), with dagster-dask's
configuration schema and its resource-requirements tag. Like dagster-dask's, this executor does not retry
steps (retries are disabled upstream): a failed step fails the run, and a rerun picks it up.
test_cluster checks the keys a run's steps ran under and that concurrent runs of one job both execute.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dask.executor import (
    DaskExecutor,
    dask_executor,
    get_dask_resource_requirements,
    query_on_dask_worker,
)
from distributed import Client, as_completed


class StepCall:
    """A step's arguments for dagster-dask's worker function, opaque to Dask's argument parsing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __call__(self, dependencies: list[Any]) -> list[dg.DagsterEvent]:
        return query_on_dask_worker(dependencies, *self.args)


def run_step(call: StepCall, *dependencies: Any) -> list[dg.DagsterEvent]:
    """What a Dask worker runs: the step, after its upstream steps' tasks (`dependencies`) finished."""
    return call(list(dependencies))


def step_key(run: dg.DagsterRun, step: str) -> str:
    return f"{run.job_name}.{run.run_id}.{step}"


class RunScopedDaskExecutor(DaskExecutor):
    """Steps as Dask tasks on an existing scheduler, keyed by run."""

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[dg.DagsterEvent]:
        if self.cluster_type != "existing":
            raise dg.DagsterInvariantViolationError(
                "ml_assets' Dask executor connects to an existing scheduler only (cluster: existing: address)"
            )
        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("Dask execution requires a persistent Dagster instance")
        run = plan_context.dagster_run
        with Client(self.cluster_configuration["address"]) as client:
            futures: dict[str, Any] = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    upstream = [
                        futures[k] for step_input in step.step_inputs for k in step_input.dependency_keys
                    ]
                    call = StepCall(
                        plan_context.reconstructable_job,
                        run,
                        plan_context.run_config,
                        [step.key],
                        plan_context.instance.get_ref(),
                        execution_plan.known_state,
                    )
                    futures[step.key] = client.submit(
                        run_step,
                        call,
                        *upstream,
                        key=step_key(run, step.key),
                        resources=get_dask_resource_requirements(step.tags),
                        pure=False,
                    )
            for _future, events in as_completed(list(futures.values()), with_results=True):
                yield from events


@dg.executor(
    name="dask",
    config_schema=dask_executor.config_schema,
    requirements=dg.multiple_process_executor_requirements(),
)
def run_scoped_dask_executor(init_context: dg.InitExecutorContext) -> RunScopedDaskExecutor:
    """dagster-dask's executor (same configuration) with Dask task keys unique per run."""
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return RunScopedDaskExecutor(cluster_type, cluster_configuration)
