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


def predictions_schedule(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Score each new partition once its period has ended. Stopped by default: the landing run already
    scores what lands; turn it on where data arrives by other means."""
    return dg.build_schedule_from_partitioned_job(
        job, name=job.name.removesuffix("_job") + "_schedule", default_status=dg.DefaultScheduleStatus.STOPPED
    )
