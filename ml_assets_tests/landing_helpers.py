"""Driving the real landing sensor in tests: settle landed files, evaluate a tick, and run what it requests
(the intake of new entries, then the load of the checked ones)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import dagster as dg

from ml_assets.orchestration.intake import INTAKE_JOB

# Landed "a while ago": the sensor hands over only files that settled (ingest.ledger.SETTLE_SECONDS). One
# fixed time, so settling again leaves files the sensor has already seen unchanged.
LANDED_AT = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()


def settle(root: Path) -> None:
    for path in (root / "landing").glob("*/*"):
        if path.is_file():
            os.utime(path, (LANDED_AT, LANDED_AT))


def tick(defs: dg.Definitions, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(cursor=cursor, resources=defs.resources) as context:
        return defs.resolve_sensor_def("landing_zone")(context)


def run_intake(defs: dg.Definitions, request: dg.RunRequest) -> None:
    job = defs.resolve_job_def(INTAKE_JOB)
    assert job.execute_in_process(run_config=request.run_config, tags=request.tags).success


def land(defs: dg.Definitions, cursor: str | None) -> tuple[dg.RunRequest | None, str | None]:
    """Ticks until the sensor asks for no further intake: runs each intake it requests, and returns the
    load it then requests (None if nothing checked is waiting) and the cursor."""
    result = tick(defs, cursor)
    while True:
        intakes = [r for r in result.run_requests if r.job_name == INTAKE_JOB]
        loads = [r for r in result.run_requests if r.job_name != INTAKE_JOB]
        if not intakes:
            assert len(loads) <= 1, loads
            return (loads[0] if loads else None), result.cursor
        (request,) = intakes
        run_intake(defs, request)
        result = tick(defs, result.cursor)
