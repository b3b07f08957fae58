"""The run coordinator of the project's Dagster instance (dagster.yaml): a run that would materialize
partitioned assets without saying which partitions is refused before it starts.

Inside the run such a launch can only fail at the first partitioned step (partitions.run_window says
why), and Dagster then reports every asset check the run had planned as failed although none ran: a check
planned by a *failed* run resolves to "execution failed". A run canceled before it starts plans the same
checks but resolves them to "skipped", and nothing half-runs. Runs launched in-process
(`dg.materialize`, `dagster asset materialize`) bypass coordinators and still fail in run_window.
"""

from __future__ import annotations

from dagster import DagsterRun
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext

from ml_assets.orchestration.partitions import pick_partitions_message


class PartitionsFirstRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator (what `dagster dev` uses by default) with that one refusal."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        partitioned = [] if run.is_partitioned else self._partitioned_targets(context)
        if not partitioned:
            return super().submit_run(context)
        self._instance.report_run_canceled(run, message=pick_partitions_message(partitioned))
        canceled = self._instance.get_run_by_id(run.run_id)
        assert canceled is not None
        return canceled

    def _partitioned_targets(self, context: SubmitRunContext) -> list[str]:
        """The partitioned assets the run's steps would materialize (a job's launch has no asset
        selection: its execution plan names them)."""
        run = context.dagster_run
        plan = self._instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        graph = context.workspace.asset_graph
        keys = {
            output.properties.asset_key
            for step in plan.steps
            if step.key in plan.step_keys_to_execute
            for output in step.outputs
            if output.properties is not None and output.properties.asset_key is not None
        }
        return sorted(k.to_user_string() for k in keys if graph.has(k) and graph.get(k).partitions_def)
