"""Sensors: files landing become ingestion runs; drift or degraded performance becomes a retraining run.

Custom state (when the last automatic retrain was requested, and which monitoring events were acted on)
lives in the sensor's cursor; the run_key names the event that triggered it, so one drift or degradation
event never launches two retrains.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl

from ml_assets.core import drift, ingest, performance, registry, retrain_policy
from ml_assets.core.ingest.ledger import FolderWatch, checked_rows, detect
from ml_assets.core.serving import batch_scores
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.intake import INTAKE_JOB, intake_run_config
from ml_assets.orchestration.jobs import LANDING_JOB, landing_selection, landing_users
from ml_assets.orchestration.partitions import partition_range_tags, range_tags_for
from ml_assets.orchestration.resources import Warehouse

TRIGGER_TAG = "ml_assets/trigger"
EVENT_TAG = "ml_assets/event"
# Events acted on, newest last: enough to outlive any event still visible in the monitoring tables.
HANDLED_KEPT = 100


def logged_skip(context: dg.SensorEvaluationContext, reason: str) -> str:
    """A tick's skip reason, also in the tick's log: the UI's tick list shows the reason only on hover,
    the log shows it as text (the sensor's page: a tick, then its logs)."""
    context.log.info(f"skipped: {reason}")
    return reason


def retrain_sensor(pipeline: PipelineSpec, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    spec = pipeline.monitoring
    perf = spec.performance

    @dg.sensor(
        name=f"{pipeline.name}_retrain",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Retrain '{pipeline.name}' when {spec.persist_windows} consecutive drift windows exceed "
        f"a drift share of {spec.drift_share}, or when the champion's {pipeline.metric} on labelled data is "
        f"{perf.tolerance:.0%} worse ({'lower' if pipeline.greater_is_better else 'higher'}) than its test score "
        f"for {perf.persist_periods} {perf.period}(s); at most once "
        f"per {spec.cooldown_hours} h.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        state = json.loads(context.cursor) if context.cursor else {}
        last = dt.datetime.fromisoformat(state["last_retrain_at"]) if state.get("last_retrain_at") else None
        handled: list[str] = state.get("handled", [])
        with warehouse.get_connection() as conn:
            champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
            runs = drift.drift_runs(conn, pipeline.name)
            periods = performance.performance_history(conn, pipeline.name)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        decision = retrain_policy.retrain_decision(
            champion, runs, periods, spec, last, now, frozenset(handled)
        )
        if not decision.trigger or decision.event is None or decision.kind is None:
            return dg.SkipReason(logged_skip(context, decision.reason))
        context.log.info(f"retrain requested: {decision.reason}")
        request = dg.RunRequest(
            run_key=f"retrain-{pipeline.name}-{decision.event}",
            tags={
                TRIGGER_TAG: decision.kind,
                EVENT_TAG: decision.event,
                "ml_assets/reason": decision.reason[:250],
            },
        )
        # Every event firing now is answered by this one run: none of them may launch another.
        state = {"last_retrain_at": now.isoformat(), "handled": [*handled, *decision.events][-HANDLED_KEPT:]}
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(state))

    return _sensor


LANDING_TRIGGER = "landing"


def _watches(cursor: str | None, sources: list[str]) -> dict[str, FolderWatch]:
    state = json.loads(cursor) if cursor else {}
    return {name: FolderWatch.from_json(state.get(name)) for name in sources}


def _load_request(project: Project, users: dict[str, list[str]], checked: pl.DataFrame) -> dg.RunRequest:
    """The landing job over the partitions the checked contents touch; the run_key names the contents."""
    sources = sorted(set(checked.get_column("source")))
    tags = {
        TRIGGER_TAG: LANDING_TRIGGER,
        "ml_assets/files": ", ".join(Path(f).name for f in checked.get_column("file"))[:250],
    }
    if any(project.sources[n].partitions for n in sources):
        tags |= range_tags_for(
            project, checked.get_column("first_partition").min(), checked.get_column("last_partition").max()
        )
    batch = hashlib.sha256("".join(sorted(checked.get_column("sha256"))).encode()).hexdigest()[:16]
    selection = landing_selection({n: users[n] for n in sources}, project)
    return dg.RunRequest(
        run_key=f"landing-{batch}", job_name=LANDING_JOB, asset_selection=selection, tags=tags
    )


def _intake_request(new: dict[str, dict[str, list[int] | None]]) -> dg.RunRequest:
    """The intake of newly detected entries; the run_key names them by (name, size, mtime)."""
    stamps = hashlib.sha256(json.dumps(new, sort_keys=True).encode()).hexdigest()[:16]
    files = {name: sorted(entries) for name, entries in new.items()}
    return dg.RunRequest(
        run_key=f"intake-{stamps}",
        job_name=INTAKE_JOB,
        run_config=intake_run_config(files),
        tags={
            TRIGGER_TAG: LANDING_TRIGGER,
            "ml_assets/files": ", ".join(n for names in files.values() for n in names)[:250],
        },
    )


def landing_sensor(
    project: Project, root: Path, job: dg.UnresolvedAssetJobDefinition, intake: dg.JobDefinition
) -> dg.SensorDefinition:
    """New files in the landing zones -> an intake run that checks them -> one ingestion run over the
    partitions they touch.

    A tick opens no file: it compares the folder's names, sizes and modification times with the names the
    ledger holds. A new entry is handed to an intake run (intake.py) once it has settled (ledger.detect);
    the intake hashes, reads and checks it and records it in the ledger (checked, rejected or ignored, with
    the reason). Contents the ledger holds as checked are then loaded by the landing job over the
    partitions they touch. Both run_keys name what they cover, so a tick evaluated twice launches nothing
    twice. The ledger is the memory: the cursor holds only entries not yet in it (ledger.FolderWatch).
    Batches still being written (`.name`, `*.tmp`, `*.part`, `*~`) are left alone until renamed.
    """
    landing = sorted(n for n, s in project.sources.items() if s.landing)
    users = landing_users(project)

    @dg.sensor(
        name="landing_zone",
        jobs=[job, intake],
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Ingest new files dropped into {root / 'landing'}/<source>/ for sources {landing}: "
        "an intake run checks them, then raw -> validated, then the modelling tables, batch scores, drift "
        "reports and champion performance that read them.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult:
        watches = _watches(context.cursor, landing)
        with warehouse.get_connection() as conn:
            known = {name: ingest.ledger_names(conn, name) for name in landing}
            checked = checked_rows(conn, landing)
        found = {name: detect(ingest.landing_dir(root, name), known[name], watches[name]) for name in landing}
        cursor = json.dumps({name: watch.to_json() for name, watch in watches.items()})
        requests = []
        new = {name: d.new for name, d in found.items() if d.new}
        if new:
            requests.append(_intake_request(new))
        if not checked.is_empty():
            requests.append(_load_request(project, users, checked))
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        waiting = [f"waiting for {n} to settle" for d in found.values() for n in d.settling]
        # An idle tick (every 10 s) says so without writing a log.
        reason = logged_skip(context, "; ".join(waiting)) if waiting else "no new files"
        return dg.SensorResult(skip_reason=reason, cursor=cursor)

    return _sensor


def rescore_sensor(
    pipeline: PipelineSpec, job: dg.UnresolvedAssetJobDefinition, partitions: dg.PartitionsDefinition
) -> dg.SensorDefinition:
    """A promotion or rollback re-scores the open partitions: the latest `serving.rescore_partitions` days
    with modelling rows whose batch scores are not all the champion's. The run_key names the champion
    and the range, so one change of champion launches one run; older partitions keep the version that
    scored them (each row names it)."""

    @dg.sensor(
        name=f"{pipeline.name}_rescore",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Re-score the latest {pipeline.serving.rescore_partitions} days of '{pipeline.name}' "
        "with a new champion (after a promotion or rollback).",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        with warehouse.get_connection() as conn:
            champion, days = batch_scores.windows_to_rescore(conn, pipeline)
        if champion is None or not days:
            return dg.SkipReason(
                logged_skip(context, f"champion {champion}: the latest partitions' scores are current")
            )
        keys = sorted(
            {partitions.get_partition_key_for_timestamp(d.replace(tzinfo=dt.UTC).timestamp()) for d in days}
        )
        request = dg.RunRequest(
            run_key=f"rescore-{pipeline.name}-{champion}-{keys[0]}-{keys[-1]}",
            tags=partition_range_tags(keys[0], keys[-1]) | {TRIGGER_TAG: "rescore"},
        )
        return dg.SensorResult(run_requests=[request])

    return _sensor
