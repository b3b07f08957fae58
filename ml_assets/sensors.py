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

from ml_assets import ingest, monitor, registry
from ml_assets.config import PipelineSpec, Project
from ml_assets.factory import LANDING_REFRESH, partition_range_tags, partitions_def
from ml_assets.resources import Warehouse

TRIGGER_TAG = "ml_assets/trigger"
EVENT_TAG = "ml_assets/event"
# Events acted on, newest last: enough to outlive any event still visible in the monitoring tables.
HANDLED_KEPT = 100


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
        f"{perf.tolerance:.0%} below its test score for {perf.persist_periods} {perf.period}(s); at most once "
        f"per {spec.cooldown_hours} h.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        state = json.loads(context.cursor) if context.cursor else {}
        last = dt.datetime.fromisoformat(state["last_retrain_at"]) if state.get("last_retrain_at") else None
        handled: list[str] = state.get("handled", [])
        with warehouse.get_connection() as conn:
            champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
            runs = monitor.drift_runs(conn, pipeline.name)
            periods = monitor.performance_history(conn, pipeline.name)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        decision = monitor.retrain_decision(champion, runs, periods, spec, last, now, frozenset(handled))
        if not decision.trigger:
            return dg.SkipReason(decision.reason)
        assert decision.event is not None and decision.kind is not None
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

    A file is known by its content (sha256), so a re-dropped or renamed copy ingests nothing; the cursor
    holds the hashes already handled and the run_key names the batch, so a tick evaluated twice launches
    one run. A file that cannot be read is recorded as rejected (with the reason) and never loaded.
    """
    landing = {n: s for n, s in project.sources.items() if s.landing}
    users = {
        n: [p for p, spec in project.pipelines.items() if n in project.sources_of(spec)] for n in landing
    }
    pdef = partitions_def(project.time_axis) if any(s.partitions for s in landing.values()) else None

    @dg.sensor(
        name="landing_zone",
        job=job,
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Ingest new files dropped into {root / 'landing'}/<source>/ for sources {sorted(landing)}: "
        "raw -> validated, then the modelling tables, drift reports and champion performance that read them.",
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: Warehouse) -> dg.SensorResult | dg.SkipReason:
        if context.cursor:
            seen: dict[str, list[str]] = json.loads(context.cursor)
        else:
            # A fresh sensor (first start, reset cursor) must not re-ingest what `ml-assets run` or an
            # earlier sensor already loaded or rejected: the ledger knows.
            with warehouse.get_connection() as conn:
                known = ingest.ledger(conn)
            seen = {
                n: sorted(known.filter(pl.col("source") == n).get_column("sha256").to_list()) for n in landing
            }
        accepted: dict[str, list[dict]] = {}
        rejected: dict[str, list[dict]] = {}
        for name, spec in landing.items():
            known = set(seen.get(name, []))
            for path in ingest.resolve_files(name, spec, Path(), root):
                sha = ingest.sha256_file(path)
                if sha in known:
                    continue
                known.add(sha)
                try:
                    _, records = ingest.read_files(name, spec, [path])
                    accepted.setdefault(name, []).extend(records)
                except ingest.RejectedFile as exc:
                    context.log.warning(str(exc))
                    rejected.setdefault(name, []).append(exc.ledger_row())
            seen[name] = sorted(known)
        if rejected:
            with warehouse.get_connection() as conn:
                for name, rows in rejected.items():
                    ingest.record_files(conn, name, rows, "sensor:landing_zone")
        if not accepted:
            reason = f"rejected {sum(map(len, rejected.values()))} file(s)" if rejected else "no new files"
            return dg.SensorResult(skip_reason=reason, cursor=json.dumps(seen))
        records = [r for rows in accepted.values() for r in rows]
        tags = {
            TRIGGER_TAG: LANDING_TRIGGER,
            "ml_assets/files": ", ".join(Path(str(r["path"])).name for r in records)[:250],
        }
        if pdef is not None:
            first = min(r["first_partition"] for r in records)
            last = max(r["last_partition"] for r in records)
            tags |= partition_range_tags(
                pdef.get_partition_key_for_timestamp(first.replace(tzinfo=dt.UTC).timestamp()),
                pdef.get_partition_key_for_timestamp(last.replace(tzinfo=dt.UTC).timestamp()),
            )
        selection = [
            dg.AssetKey([layer, n]) for n in accepted for layer in ("raw", "validated", "quarantine")
        ]
        selection += [dg.AssetKey([p, a]) for n in accepted for p in users[n] for a in LANDING_REFRESH]
        batch = hashlib.sha256("".join(sorted(str(r["sha256"]) for r in records)).encode()).hexdigest()[:16]
        request = dg.RunRequest(run_key=f"landing-{batch}", asset_selection=sorted(set(selection)), tags=tags)
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(seen))

    return _sensor
