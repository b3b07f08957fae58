"""Fault injection on real runs: kill -9 of `ml-assets run` inside each stage, a full disk while a model
version is written, a warehouse locked by another process, and sensor ticks that raise.

After each fault the warehouse opens, every source's raw rows are its validated plus quarantined rows,
no version folder is half-written under its final name, every alias points at a registered, hash-intact
version, the champion is the one from before the fault, and running again succeeds. Faults are placed by
hooks on the stage's own functions (a killed process is parked inside the stage until the test kills
it), never by timing."""

from __future__ import annotations

import errno
import functools
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import pytest
import yaml

from ml_assets import cli
from ml_assets.core import drift, ingest, registry, rollback
from ml_assets.core import promotion as gate
from ml_assets.core.errors import StoreError
from ml_assets.core.ingest.ledger import FolderWatch
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, default_pipelines_dir, load_project
from ml_assets.core.store import (
    DATA_DIR_ENV,
    DECISION_LOG,
    LOCK_WAIT_ENV,
    MODEL_VERSIONS,
    connect,
    warehouse_path,
)
from ml_assets.orchestration.assets.sources import SOURCES_GROUP
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.intake import INTAKE_JOB
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, release, write_pipelines
from ml_assets_tests.helpers import assert_registry_consistent, copy_warehouse, insert_drift_runs
from ml_assets_tests.landing_helpers import run_intake

PIPELINE = "flight_delay"
REPO = Path(__file__).resolve().parents[1]
# Generous on purpose: a loaded 2-core machine can take minutes for one run; no assertion is on time.
DEADLINE_S = 900
PARKED = "FAULT-INJECTED"
WAITING = "WAITING-FOR-LOCK"
# By module: the ingest package re-exports a function named `ledger`, which `import ... as` would resolve to.
INGEST_RAW = importlib.import_module("ml_assets.core.ingest.raw")
INGEST_LEDGER = importlib.import_module("ml_assets.core.ingest.ledger")
GATE = [dg.AssetKey([PIPELINE, a]) for a in ("model", "evaluation", "promotion")]
SOURCE_TABLES = dg.AssetSelection.groups(SOURCES_GROUP)

# A child process runs one function of this module: the fault hooks below are plain, linted code.
CHILD = "import sys; from ml_assets_tests import test_faults as t; sys.exit(getattr(t, sys.argv[1])(*sys.argv[2:]))"

# Opens the warehouse read-write (DuckDB: one writing process per file) until its stdin is closed.
# --- the faults ----------------------------------------------------------------------------------------

Setattr = Callable[[Any, str, Any], None]
OnFault = Callable[[str], None]


def _after(setattr_: Setattr, owner: Any, name: str, when: Callable[..., bool], on_fault: OnFault) -> None:
    """Call `on_fault` right after `owner.name` returns, on the calls where `when(*args)` holds."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if when(*args):
            on_fault(name)
        return out

    setattr_(owner, name, hooked)


def _half_written_predictions(setattr_: Setattr, on_fault: OnFault) -> None:
    """Inside registry.write_version: the model file is written, then half the test predictions."""
    write_bytes = Path.write_bytes

    def hooked(self: Path, data: bytes) -> int:
        if self.name == registry.PREDICTIONS_FILE and self.parent.name.startswith(".tmp-"):
            write_bytes(self, data[: len(data) // 2])
            on_fault(str(self))
        return write_bytes(self, data)

    setattr_(Path, "write_bytes", hooked)


def _promoted_then(setattr_: Setattr, on_fault: OnFault) -> None:
    """The gate says promote; inside record_decision's transaction the champion alias has moved and the
    log row saying so is inserted, not yet committed."""

    def promoting(_conn: Any, table: str, row: dict[str, Any], *_: Any) -> bool:
        return table == DECISION_LOG and row["champion_after"] != row["champion_before"]

    setattr_(gate, "decide", lambda *_, **__: gate.Verdict(True, "forced by the fault-injection test"))
    _after(setattr_, registry, "insert", promoting, on_fault)


FAULTS: dict[str, Callable[[Setattr, OnFault], None]] = {
    # load_raw's transaction: raw.flights' rows replaced by the new batch, not yet committed.
    "ingestion": lambda s, f: _after(
        s, INGEST_RAW, "replace_rows", lambda _c, table, *_: "flights" in table, f
    ),
    # The model step: LightGBM trained, its version folder half-written under its temporary name.
    "model_write": _half_written_predictions,
    # register's transaction: the version's row inserted, the challenger alias not yet moved.
    "registration": lambda s, f: _after(
        s, registry, "insert", lambda _c, table, *_: table == MODEL_VERSIONS, f
    ),
    "promotion": _promoted_then,
}


def _park(where: str) -> None:
    # The test reads the marker and kills this process while it sits here, inside the stage.
    print(f"{PARKED} {where}", flush=True)
    threading.Event().wait()


def run_parked_inside(moment: str) -> int:
    """Child process: `ml-assets run` that stops inside `moment` until killed."""
    FAULTS[moment](setattr, _park)
    return cli.main(["run"])


def _disk_full(where: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)


def materialize_sources_noting_the_wait(pipelines: str, root: str) -> int:
    """Child process: materialize the source tables, saying so the first time the lock is found taken
    (the test releases the lock only once this run is waiting for it)."""
    open_db, noted = duckdb.connect, threading.Event()

    def noting(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        try:
            return open_db(*args, **kwargs)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower() and not noted.is_set():
                noted.set()
                print(WAITING, flush=True)
            raise

    duckdb.connect = noting
    result = materialize_all(Path(pipelines), Path(root), raise_on_error=False, selection=SOURCE_TABLES)
    return 0 if result.success else 1


# --- the state that must survive any fault -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    rows: dict[str, tuple[int, int, int]]  # source -> raw, validated, quarantined
    versions: tuple[str, ...]
    champion: str
    challenger: str | None
    decisions: int


def _consistent(pipelines: Path, root: Path) -> Snapshot:
    """Check every invariant a fault must not break; returns the state to compare across the fault."""
    rows = {}
    with connect(warehouse_path(root)) as conn:
        for name in load_project(pipelines).sources:
            rows[name] = conn.execute(
                f"SELECT (SELECT count(*) FROM raw.{name}), (SELECT count(*) FROM validated.{name}), "
                f"(SELECT count(*) FROM quarantine.{name})"
            ).fetchone()
            raw, valid, bad = rows[name]
            assert raw == valid + bad > 0, (
                f"source '{name}': raw {raw} != validated {valid} + quarantined {bad}"
            )
        versions = [
            v
            for (v,) in conn.execute(
                f"SELECT version FROM {MODEL_VERSIONS} ORDER BY created_at, version"
            ).fetchall()
        ]
        challenger = registry.alias_version(conn, PIPELINE, registry.CHALLENGER)
        decisions = registry.decisions(conn, PIPELINE).height
    champion = assert_registry_consistent(root)
    # Under a final name a folder is complete: its manifest is there and every file matches its sha256.
    for folder in (root / "models" / PIPELINE).iterdir():
        if not folder.name.startswith(".tmp-"):
            registry.read_manifest(folder)
    return Snapshot(rows, tuple(versions), champion, challenger, decisions)


def _half_written(root: Path) -> list[Path]:
    return list((root / "models" / PIPELINE).glob(".tmp-*"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, sample_sources: Path) -> Path:
    """One good run of flight_delay on the sample, its LightGBM version made champion by the operator (on
    this sample the first promotion may pick a baseline instead): the state every fault starts from."""
    base = tmp_path_factory.mktemp("faults")
    project = base / "project"
    shutil.copytree(sample_sources, project / "sources")
    pipelines = write_pipelines(project / "pipelines", project / "sources", FAST_MODEL)
    (pipelines / "flight_arr_delay.yaml").unlink()  # one pipeline exercises every stage
    # The first promotion may make a baseline champion, and the operator then puts the model in its
    # place: the rollback check would move it back on its own, in the middle of the decisions counted.
    flagship = pipelines / f"{PIPELINE}.yaml"
    raw = yaml.safe_load(flagship.read_text())
    raw["gate"]["rollback_margin"] = 1.0
    flagship.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = project / "data"
    result = materialize_all(pipelines, root)
    assert result.success
    db = functools.partial(connect, warehouse_path(root))
    with db() as conn:
        version = registry.version_of_run(conn, PIPELINE, result.run_id)
    spec = load_project(pipelines)
    rollback.rollback(db, spec.pipelines[PIPELINE], spec.sources_of(spec.pipelines[PIPELINE]), to=version)
    shutil.copytree(project, base / "pristine")
    return project


@pytest.fixture
def project(pristine: Path) -> tuple[Path, Path]:
    """(pipelines dir, data dir) in the pristine state, restored in place: the registry holds absolute paths."""
    shutil.rmtree(pristine)
    shutil.copytree(pristine.parent / "pristine", pristine)
    return pristine / "pipelines", pristine / "data"


def _env(pipelines: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    return env | {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines), LOCK_WAIT_ENV: str(DEADLINE_S)}


def _kill_inside(moment: str, pipelines: Path, root: Path) -> None:
    """Start `ml-assets run` with the fault hook of `moment`, and kill -9 it once it is parked there."""
    log = root.parent / f"{moment}.stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, "run_parked_inside", moment],
            cwd=REPO,
            env=_env(pipelines, root),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    watchdog = threading.Timer(DEADLINE_S, proc.kill)
    watchdog.start()
    try:
        out = []
        for line in iter(proc.stdout.readline, ""):
            out.append(line)
            if line.startswith(PARKED):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
    assert out and out[-1].startswith(PARKED), (
        f"the run never reached '{moment}':\n{''.join(out)}\n{log.read_text()[-5000:]}"
    )
    assert proc.returncode == -signal.SIGKILL


def _run_cli(pipelines: Path, root: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ml_assets.cli", "run"],
        cwd=REPO,
        env=_env(pipelines, root),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """Per failed step, its error's message with those of its causes (Dagster wraps an unexpected error)."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure:
            error, parts = event.step_failure_data.error, []
            while error is not None:
                parts.append(error.message)
                error = error.cause
            messages.append("".join(parts))
    return messages


# --- kill -9 ------------------------------------------------------------------------------------------


def test_kill_9_inside_each_stage_of_a_cli_run_keeps_tables_registry_and_champion_consistent(project):
    """One chain on one data directory: each killed run must first get through the stage the previous
    one died in (it reruns it), and a last plain run must succeed."""
    pipelines, root = project
    before = _consistent(pipelines, root)
    champion = before.champion
    # A changed batch, so a half-applied replacement of raw.flights would show in its row count.
    flights = pipelines.parent / "sources" / "flights.csv"
    changed = pl.read_csv(flights, infer_schema=False).filter(pl.int_range(pl.len()) % 10 != 0)
    changed.write_csv(flights)
    assert changed.height != before.rows["flights"][0]

    _kill_inside("ingestion", pipelines, root)
    assert _consistent(pipelines, root) == before  # the killed replacement left nothing behind

    _kill_inside("model_write", pipelines, root)
    after = _consistent(pipelines, root)
    assert after.rows["flights"][0] == changed.height  # this run re-ingested what the last one could not
    assert (after.versions, after.champion, after.challenger, after.decisions) == (
        before.versions,
        champion,
        before.challenger,
        before.decisions,
    )
    assert len(_half_written(root)) == 1  # the dead writer's folder, under its temporary name only

    _kill_inside("registration", pipelines, root)
    after = _consistent(pipelines, root)
    assert not _half_written(root)  # the next writer removed the dead one's temporary folder
    assert (after.versions, after.champion, after.challenger, after.decisions) == (
        before.versions,
        champion,
        before.challenger,
        before.decisions,
    )

    _kill_inside("promotion", pipelines, root)
    after = _consistent(pipelines, root)
    (trained,) = set(after.versions) - set(before.versions)  # registered; the kill came after
    assert after.challenger == trained
    assert after.champion == champion  # the forced promotion never committed: alias and log unmoved
    assert after.decisions == before.decisions

    out = _run_cli(pipelines, root)
    assert "SUCCESS" in out
    final = _consistent(pipelines, root)
    assert not _half_written(root)
    assert len(final.versions) == len(after.versions) + 1
    assert final.decisions == before.decisions + 1  # the rerun's gate logged its verdict
    with connect(warehouse_path(root)) as conn:
        last = registry.decisions(conn, PIPELINE).row(-1, named=True)
    assert last["challenger"] == final.challenger == final.versions[-1]
    assert last["champion_before"] == champion


# --- disk full ----------------------------------------------------------------------------------------


def test_disk_full_while_a_version_is_written_fails_the_model_and_leaves_no_trace(project, monkeypatch):
    pipelines, root = project
    before = _consistent(pipelines, root)
    folders = sorted((root / "models" / PIPELINE).iterdir())
    FAULTS["model_write"](monkeypatch.setattr, _disk_full)
    result = materialize_all(pipelines, root, raise_on_error=False, selection=GATE)
    assert not result.success
    (message,) = _failure_messages(result)
    assert (
        f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}" in message
        and registry.PREDICTIONS_FILE in message
    )
    assert not result.get_asset_materialization_events()
    assert _consistent(pipelines, root) == before
    assert sorted((root / "models" / PIPELINE).iterdir()) == folders  # no folder, temporary or final

    monkeypatch.undo()  # space freed: the next run registers and judges a version as usual
    assert materialize_all(pipelines, root, selection=GATE).success
    after = _consistent(pipelines, root)
    assert len(after.versions) == len(before.versions) + 1
    assert after.decisions == before.decisions + 1


# --- the warehouse locked by another process ----------------------------------------------------------


def test_a_locked_warehouse_fails_fast_with_a_short_wait_and_is_waited_for_with_a_long_one(
    project, hold, monkeypatch
):
    pipelines, root = project
    before = _consistent(pipelines, root)
    holder = hold(warehouse_path(root))

    monkeypatch.setenv(LOCK_WAIT_ENV, "1")
    result = materialize_all(pipelines, root, raise_on_error=False, selection=SOURCE_TABLES)
    assert not result.success
    messages = _failure_messages(result)
    assert messages  # every step that opened the warehouse says which file and which setting
    for message in messages:
        assert str(warehouse_path(root)) in message and LOCK_WAIT_ENV in message, message
    assert holder.poll() is None  # failed while the file was still held, not after

    # Meanwhile another run (waiting up to DEADLINE_S) starts, finds the lock taken, and waits.
    waiter = subprocess.Popen(
        [sys.executable, "-c", CHILD, "materialize_sources_noting_the_wait", str(pipelines), str(root)],
        cwd=REPO,
        env=_env(pipelines, root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        watchdog = threading.Timer(DEADLINE_S, waiter.kill)
        watchdog.start()
        seen = []
        for line in iter(waiter.stdout.readline, ""):
            seen.append(line)
            if line.strip() == WAITING:
                break
        assert seen and seen[-1].strip() == WAITING, "".join(seen)
        release(holder)
        rest, _ = waiter.communicate(timeout=DEADLINE_S)
        watchdog.cancel()
        assert waiter.returncode == 0, "".join(seen) + rest
    finally:
        waiter.kill()
        waiter.wait(timeout=60)
    assert _consistent(pipelines, root) == before  # the same batch reloaded: same rows, nothing lost


# --- sensor ticks that raise --------------------------------------------------------------------------


def _tick(sensor: dg.SensorDefinition, resources: dict[str, Any], cursor: str | None) -> Any:
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        return sensor.evaluate_tick(context)


def _failing_tick(
    sensor: dg.SensorDefinition, resources: dict[str, Any], cursor: str, match: tuple[str, ...]
) -> None:
    """The tick raises, and the cursor Dagster would keep is still the one it started from."""
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        with pytest.raises(Exception) as excinfo:
            sensor.evaluate_tick(context)
        assert context.cursor == cursor
    chain, exc = [], excinfo.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    assert any(all(m in link for m in match) for link in chain), chain


def _inject(
    fault: str, root: Path, hold, monkeypatch, target: tuple[Any, str]
) -> tuple[tuple[str, ...], Callable[[], None]]:
    """Set up `fault`; returns fragments of the error the tick must raise, and how to end the fault."""
    if fault == "locked":
        holder = hold(warehouse_path(root))
        monkeypatch.setenv(LOCK_WAIT_ENV, "1")
        return (StoreError.__name__, str(warehouse_path(root)), LOCK_WAIT_ENV), lambda: (
            release(holder),
            monkeypatch.undo(),
        )

    def broken(*_: Any, **__: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(*target, broken)
    return (OSError.__name__, os.strerror(errno.EIO)), monkeypatch.undo


@pytest.fixture
def landing_project(tmp_path: Path, sample_sources: Path) -> tuple[dg.Definitions, Path]:
    """The shipped flight_delay (landing-zone sources) with January landed, plus a broken flights file."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    raw = yaml.safe_load((default_pipelines_dir() / f"{PIPELINE}.yaml").read_text())
    raw["model"] |= FAST_MODEL
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "data"
    for name in ("flights", "weather"):
        january = pl.read_csv(sample_sources / f"{name}.csv", infer_schema=False).filter(
            pl.col("month") == "1"
        )
        folder = ingest.landing_dir(root, name)
        folder.mkdir(parents=True)
        january.write_csv(folder / f"{name}_2013-01.csv")
        if name == "flights":
            january.head(50).drop("distance").write_csv(folder / "flights_broken.csv")
        for path in folder.iterdir():  # landed an hour ago: settled, handed over on the sensor's next tick
            os.utime(path, (time.time() - 3600,) * 2)
    with connect(warehouse_path(root)):  # an existing warehouse, as after `ml-assets run`
        pass
    return build_definitions(pipelines, root), root


def _ledger(root: Path) -> pl.DataFrame:
    with connect(warehouse_path(root)) as conn:
        return ingest.ledger(conn)


@pytest.mark.parametrize("fault", ["locked", "read_error"])
def test_a_failed_landing_tick_keeps_its_cursor_and_the_next_tick_ingests_each_file_once(
    landing_project, fault, hold, monkeypatch
):
    defs, root = landing_project
    sensor = defs.resolve_sensor_def("landing_zone")
    cursor = json.dumps({n: FolderWatch().to_json() for n in ("flights", "weather")})  # has seen nothing yet
    # Locked: the tick cannot read the ledger's names. Read error: listing a landing folder fails.
    match, end_fault = _inject(fault, root, hold, monkeypatch, (INGEST_LEDGER, "landing_entries"))
    _failing_tick(sensor, defs.resources, cursor, match)
    end_fault()
    assert _ledger(root).height == 0  # the failed tick recorded nothing

    healthy = _tick(sensor, defs.resources, cursor)
    (intake,) = healthy.run_requests
    assert intake.run_key.startswith("intake-") and intake.job_name == INTAKE_JOB
    assert intake.tags["ml_assets/files"] == "flights_2013-01.csv, flights_broken.csv, weather_2013-01.csv"
    # With the cursor the healthy tick returned, nothing is requested twice while the intake is pending.
    again = _tick(sensor, defs.resources, healthy.cursor)
    assert not again.run_requests and again.skip_message == "no new files"
    # Had Dagster kept the old cursor, the same entries get the same run_key: launched once.
    (repeat,) = _tick(sensor, defs.resources, cursor).run_requests
    assert repeat.run_key == intake.run_key

    run_intake(defs, intake)
    assert sorted(_ledger(root).select("file", "status").rows()) == [
        (str(ingest.landing_dir(root, "flights") / "flights_2013-01.csv"), "checked"),
        (str(ingest.landing_dir(root, "flights") / "flights_broken.csv"), "rejected"),
        (str(ingest.landing_dir(root, "weather") / "weather_2013-01.csv"), "checked"),
    ]
    (load,) = _tick(sensor, defs.resources, again.cursor).run_requests
    assert load.run_key.startswith("landing-") and load.tags["ml_assets/files"] == (
        "flights_2013-01.csv, weather_2013-01.csv"
    )


@pytest.mark.parametrize("fault", ["locked", "read_error"])
def test_a_failed_retrain_tick_keeps_its_cursor_and_the_next_tick_retrains_once(
    sample_project, gated_sample, fault, hold, monkeypatch
):
    pipelines, root = sample_project
    copy_warehouse(gated_sample[0], root)  # a champion the gate chose
    insert_drift_runs(root, PIPELINE, [(1, True), (2, True)])  # two drifted windows: one retrain event
    defs = build_definitions(pipelines, root)
    sensor = defs.resolve_sensor_def(f"{PIPELINE}_retrain")
    cursor = json.dumps({"last_retrain_at": None, "handled": []})
    match, end_fault = _inject(fault, root, hold, monkeypatch, (drift, "drift_runs"))
    _failing_tick(sensor, defs.resources, cursor, match)
    end_fault()

    healthy = _tick(sensor, defs.resources, cursor)
    (request,) = healthy.run_requests
    assert request.run_key == f"retrain-{PIPELINE}-drift:r1"
    assert _tick(sensor, defs.resources, healthy.cursor).skip_message == "already retrained for drift:r1"
    (repeat,) = _tick(sensor, defs.resources, cursor).run_requests
    assert repeat.run_key == request.run_key
