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

from ml_assets.core import drift, ingest, performance, registry, retrain_policy
from ml_assets.core.ingest.ledger import FolderState, folder_states, scan_folder
from ml_assets.core.serving import batch_scores
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.orchestration.jobs import landing_selection, landing_users
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


def landing_sensor(project: Project, root: Path, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """New or changed files in the landing zones -> one ingestion run over the partitions they touch.

    A file is known by its content (sha256), so a re-dropped or renamed copy ingests nothing (the copy is
    recorded as ignored); the run_key names the batch, so a tick evaluated twice launches one run. A file is
    read once it has settled (ledger.scan_folder). Every entry ends in the ledger once: a file that cannot
    be read or checked as rejected with the reason (never loaded), anything else (a directory, a socket, an
    unsupported extension) as ignored with the reason; batches still being written (`.name`, `*.tmp`,
    `*.part`, `*~`) are left alone until renamed. The cursor holds ledger.FolderState per source; a cursor
    of the first format ({source: [sha256, ...]}) is still read.
    """
    landing = {n: s for n, s in project.sources.items() if s.landing}
    users = landing_users(project)

    @dg.sensor(
        name="landing_zone",
        job=job,
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Ingest new files dropped into {root / 'landing'}/<source>/ for sources {sorted(landing)}: "
        "raw -> validated, then the modelling tables, batch scores, drift reports and champion performance that "
        "read them.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        if context.cursor:
            states = {n: FolderState.from_json(v) for n, v in json.loads(context.cursor).items()}
        else:
            # A fresh sensor (first start, reset cursor) must not re-ingest what `ml-assets run` or an
            # earlier sensor already loaded, rejected or ignored: the ledger knows.
            with warehouse.get_connection() as conn:
                states = folder_states(conn, list(landing))
        scans = {
            name: scan_folder(
                name, spec, ingest.landing_dir(root, name), states.setdefault(name, FolderState())
            )
            for name, spec in landing.items()
        }
        cursor = json.dumps({n: state.to_json() for n, state in states.items()})
        recorded = [row for scan in scans.values() for row in scan.rows]
        if recorded:
            with warehouse.get_connection() as conn:
                for name, scan in scans.items():
                    ingest.record_files(conn, name, scan.rows, "sensor:landing_zone")
        for row in recorded:  # a rejection's reason names the file
            if row["status"] == "rejected":
                context.log.warning(str(row["reason"]))
            else:
                context.log.info(f"ignored {row['file']}: {row['reason']}")
        accepted = {name: scan.accepted for name, scan in scans.items() if scan.accepted}
        if not accepted:
            done = [f"{row['status']} {Path(str(row['file'])).name}" for row in recorded]
            waiting = [f"waiting for {n} to settle" for scan in scans.values() for n in scan.settling]
            # An idle tick (every 10 s) says so without writing a log.
            reason = logged_skip(context, "; ".join(done + waiting)) if done or waiting else "no new files"
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        records = [r for rows in accepted.values() for r in rows]
        tags = {
            TRIGGER_TAG: LANDING_TRIGGER,
            "ml_assets/files": ", ".join(Path(str(r["path"])).name for r in records)[:250],
        }
        if any(landing[n].partitions for n in accepted):
            tags |= range_tags_for(
                project,
                min(r["first_partition"] for r in records),
                max(r["last_partition"] for r in records),
            )
        selection = landing_selection({n: users[n] for n in accepted}, project)
        batch = hashlib.sha256("".join(sorted(str(r["sha256"]) for r in records)).encode()).hexdigest()[:16]
        request = dg.RunRequest(run_key=f"landing-{batch}", asset_selection=selection, tags=tags)
        return dg.SensorResult(run_requests=[request], cursor=cursor)

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
