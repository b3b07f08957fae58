"""Schedules: drift checks refresh daily even when no new data triggers them."""

from __future__ import annotations

import dagster as dg

from ml_assets.core.spec import PipelineSpec


def daily_drift_schedule(
    pipeline: PipelineSpec, job: dg.UnresolvedAssetJobDefinition
) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{pipeline.name}_daily_drift",
        job=job,
        cron_schedule="0 6 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Recompute the drift report of '{pipeline.name}' every morning.",
    )
