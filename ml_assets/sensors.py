"""Sensors: drift that persists becomes a retraining run (train -> evaluate -> promotion gate).

Custom state (when the last drift-triggered retrain was requested) lives in the sensor's cursor; the
run_key names the drift result that triggered it, so one drift event never launches two retrains.
"""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg

from ml_assets import monitor
from ml_assets.config import PipelineSpec
from ml_assets.resources import Warehouse

TRIGGER_TAG = "ml_assets/trigger"
DRIFT_RUN_TAG = "ml_assets/drift_run"


def drift_retrain_sensor(pipeline: PipelineSpec, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    spec = pipeline.monitoring

    @dg.sensor(
        name=f"{pipeline.name}_drift_retrain",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Retrain '{pipeline.name}' when {spec.persist_windows} consecutive drift windows exceed "
        f"a drift share of {spec.drift_share}, at most once per {spec.cooldown_hours} h.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        state = json.loads(context.cursor) if context.cursor else {}
        last = dt.datetime.fromisoformat(state["last_retrain_at"]) if state.get("last_retrain_at") else None
        with warehouse.get_connection() as conn:
            runs = monitor.drift_runs(conn, pipeline.name)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        decision = monitor.retrain_decision(runs, spec, last, now)
        if not decision.trigger:
            return dg.SkipReason(decision.reason)
        request = dg.RunRequest(
            run_key=f"drift-{pipeline.name}-{decision.drift_run}",
            tags={
                TRIGGER_TAG: "drift",
                DRIFT_RUN_TAG: decision.drift_run,
                "ml_assets/reason": decision.reason[:250],
            },
        )
        cursor = json.dumps({"last_retrain_at": now.isoformat(), "drift_run": decision.drift_run})
        return dg.SensorResult(run_requests=[request], cursor=cursor)

    return _sensor
