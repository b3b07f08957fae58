"""Whatever lands in a landing folder, through the real landing sensor and raw asset: compressed and
upper-case data files load, every other entry is ignored or rejected once with its reason (never a
crash), and a file still being written waits until it has settled."""

from __future__ import annotations

import gzip
import json
import os
import socket
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from ml_assets.core import ingest
from ml_assets.core.hashing import sha256_file
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import TABLE_LAYERS
from ml_assets_tests.conftest import nycflights_file
from ml_assets_tests.landing_helpers import LANDED_AT, land, run_intake, settle, tick


@pytest.fixture(scope="module")
def days() -> dict[int, pl.DataFrame]:
    """Real flights of January 1-4 (New York days), one day per landed file, as strings (missing values
    null, as the source's null_values read them)."""
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False, null_values=["", "NA"])
    january = flights.filter((pl.col("month") == "1") & pl.col("day").is_in(["1", "2", "3", "4"]))
    return {day: january.filter(pl.col("day") == str(day)) for day in (1, 2, 3, 4)}


@pytest.fixture
def landing(tmp_path: Path) -> tuple[dg.Definitions, Path, Path]:
    root = tmp_path / "data"
    folder = ingest.landing_dir(root, "flights")
    folder.mkdir(parents=True)
    return build_definitions(default_pipelines_dir(), root), root, folder


def _csv(frame: pl.DataFrame) -> bytes:
    return frame.write_csv().encode()


def _ingest(defs: dg.Definitions, request: dg.RunRequest) -> None:
    layers = [k for k in request.asset_selection if k.path[0] in TABLE_LAYERS]
    assert dg.materialize(
        list(defs.assets), selection=layers, tags=request.tags, resources=defs.resources
    ).success


def _raw_by_file(root: Path) -> dict[str, pl.DataFrame]:
    with connect(warehouse_path(root)) as conn:
        raw = conn.execute("SELECT * FROM raw.flights ORDER BY _source_file, _source_row").pl()
    return {str(key[0]): frame for key, frame in raw.group_by("_source_file", maintain_order=True)}


def _ledger(root: Path) -> pl.DataFrame:
    with connect(warehouse_path(root)) as conn:
        return ingest.ledger(conn, "flights")


def test_every_entry_is_loaded_rejected_or_ignored_once_and_nothing_crashes_the_sensor(
    landing, days, monkeypatch
):
    defs, root, folder = landing
    loaded = {
        folder / "jan01.csv.gz": gzip.compress(_csv(days[1])),
        folder / "JAN02.CSV": _csv(days[2]),
        folder / "Jan03.Csv.GZ": gzip.compress(_csv(days[3])),
    }
    for path, content in loaded.items():
        path.write_bytes(content)
    repeated = days[4].with_columns(pl.col("carrier").alias("carrier_again")).write_csv()
    (folder / "twice_carrier.csv").write_text(repeated.replace("carrier_again", "carrier", 1))
    (folder / "garbage.csv.gz").write_bytes(b"this is not gzip at all\n" * 10)
    (folder / "empty.csv").write_bytes(b"")
    (folder / "ghost.csv").symlink_to(folder / "no_such_file.csv")  # unreadable, even for root
    (folder / "notes.txt").write_text("batch 7 arrives late\n")
    (folder / "x.csv").mkdir()
    (folder / "x.csv" / "inside.csv").write_bytes(_csv(days[4]))  # never read: only the folder's own files
    os.mkfifo(folder / "pipe.csv")  # opening it would block the sensor forever
    monkeypatch.chdir(folder)  # a unix socket's path is limited to ~108 bytes: bind by relative name
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.csv")
    # Batches still being written, by the naming rule: left alone, not recorded.
    (folder / ".upload.csv").write_bytes(_csv(days[4]))
    (folder / "jan04.csv.tmp").write_bytes(_csv(days[4]))
    (folder / "jan04.csv.part").write_bytes(_csv(days[4]))
    # chmod 000 stops reads only for a non-root user; as root, ghost.csv is the unreadable file.
    if os.geteuid() != 0:
        (folder / "locked.csv").write_bytes(_csv(days[4]))
        (folder / "locked.csv").chmod(0)
    settle(root)

    # The raw asset reads exactly the entries the sensor treats as data files.
    spec = load_project(default_pipelines_dir()).sources["flights"]
    data = {p.name for p in ingest.resolve_files("flights", spec, Path(), root)}
    assert data == {p.name for p in loaded} | {
        "twice_carrier.csv",
        "garbage.csv.gz",
        "empty.csv",
        "ghost.csv",
    } | ({"locked.csv"} if os.geteuid() != 0 else set())

    request, cursor = land(defs, None)
    assert request is not None
    assert set(request.tags["ml_assets/files"].split(", ")) == {p.name for p in loaded}
    _ingest(defs, request)

    # Compressed and upper-case files are loaded unchanged: values as strings, rows numbered from 1.
    raw = _raw_by_file(root)
    assert set(raw) == {str(p) for p in loaded}
    for path, day in zip(loaded, (1, 2, 3), strict=True):
        frame = raw[str(path)]
        assert frame.select(days[day].columns).equals(days[day]), path
        assert frame.get_column("_source_row").to_list() == list(range(1, days[day].height + 1))

    ledger = _ledger(root)
    visible = sorted(
        str(p) for p in folder.iterdir() if not p.name.startswith(".") and p.suffix not in {".tmp", ".part"}
    )
    assert sorted(ledger.get_column("file")) == visible  # every entry exactly once, nothing being written
    by_name = {Path(r["file"]).name: r for r in ledger.iter_rows(named=True)}
    for path in loaded:
        assert by_name[path.name]["status"] == "loaded"
        assert by_name[path.name]["sha256"] == sha256_file(path)
    ignored = {
        "x.csv": "a directory",
        "sock.csv": "a socket",
        "pipe.csv": "a FIFO",
        "notes.txt": "unsupported extension; supported: .csv.gz, .csv, .parquet, .zip",
    }
    for name, reason in ignored.items():
        assert by_name[name]["status"] == "ignored" and reason in by_name[name]["reason"], by_name[name]
        assert by_name[name]["sha256"] == f"path:{name}"
    rejected = {
        "twice_carrier.csv": ["'carrier' (2 times)", "rule: unique column names"],
        "garbage.csv.gz": ["Not a gzipped file"],
        "empty.csv": ["empty CSV"],
        "ghost.csv": ["No such file or directory"],
        **({"locked.csv": ["Permission denied"]} if os.geteuid() != 0 else {}),
    }
    for name, fragments in rejected.items():
        row = by_name[name]
        assert row["status"] == "rejected" and str(folder / name) in row["reason"], row
        missing = [f for f in fragments if f not in row["reason"]]
        assert not missing, row["reason"]
    # The repeated column was never loaded under polars' silent rename.
    assert not any("duplicated" in c for frame in raw.values() for c in frame.columns)

    # Seen again, by the same sensor or a fresh one reading the ledger: no run, no new or rewritten row.
    assert not tick(defs, cursor).run_requests
    assert not tick(defs, None).run_requests
    assert _ledger(root).sort("file").equals(ledger.sort("file"))

    # A batch renamed into place once complete is then read like any other.
    (folder / "jan04.csv.tmp").rename(folder / "jan04.csv")
    settle(root)
    request, _ = land(defs, cursor)
    assert request is not None and request.tags["ml_assets/files"] == "jan04.csv"


def test_a_file_still_being_written_is_read_once_it_has_settled(landing, days):
    defs, root, folder = landing
    content = _csv(days[1])
    path = folder / "jan01.csv"
    path.write_bytes(content[: len(content) // 2])  # half a file, cut mid-line, just written

    first = tick(defs, None)
    assert not first.run_requests and "waiting for jan01.csv to settle" in first.skip_reason.skip_message
    # The writer finishes; its mtime says "long ago" (as a writer with a slow clock would), but the size
    # changed since the last tick: still not read.
    path.write_bytes(content)
    os.utime(path, (LANDED_AT, LANDED_AT))
    second = tick(defs, first.cursor)
    assert not second.run_requests and "waiting for jan01.csv to settle" in second.skip_reason.skip_message
    assert _ledger(root).is_empty()

    request, _ = land(defs, second.cursor)
    assert request is not None
    _ingest(defs, request)
    (loaded,) = _raw_by_file(root).values()
    assert loaded.select(days[1].columns).equals(days[1])
    assert _ledger(root).get_column("status").to_list() == ["loaded"]


def test_a_cursor_of_an_earlier_format_defers_to_the_ledger(landing, days):
    """Cursors of earlier releases held content hashes ({source: [sha256]}, then {keys, files}): now the
    ledger answers what they did, so whatever they say, nothing handled is handed over twice."""
    defs, root, folder = landing
    (folder / "jan01.csv").write_bytes(_csv(days[1]))
    settle(root)
    request, _ = land(defs, None)
    assert request is not None
    _ingest(defs, request)
    (folder / "jan02.csv").write_bytes(_csv(days[2]))
    settle(root)
    for old in ({"flights": []}, {"flights": {"keys": {}, "files": {}}}):
        (intake,) = tick(defs, json.dumps(old)).run_requests
        assert intake.tags["ml_assets/files"] == "jan02.csv"


def test_a_tick_opens_no_landed_file(landing, days, monkeypatch):
    """Detection is by name, size and modification time: a huge file and a file nobody may open are
    handed over like any other, and no file under the landing zone is opened during the tick."""
    defs, root, folder = landing
    huge = folder / "huge.csv"
    with open(huge, "wb") as sparse:
        sparse.truncate(64 * 2**30)  # 64 GiB of holes: reading it would take minutes
    (folder / "jan01.csv").write_bytes(_csv(days[1]))
    settle(root)
    landing_zone = str(root / "landing")
    real_open, opened = open, []

    def watched_open(file, *args, **kwargs):
        if str(file).startswith(landing_zone):
            opened.append(str(file))
            raise PermissionError(f"the tick opened {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watched_open)
    monkeypatch.setattr("io.open", watched_open)
    (intake,) = tick(defs, None).run_requests
    monkeypatch.undo()
    assert opened == []
    assert set(intake.tags["ml_assets/files"].split(", ")) == {"huge.csv", "jan01.csv"}
    assert intake.run_config == {
        "ops": {"landing_intake": {"config": {"files": {"flights": ["huge.csv", "jan01.csv"]}}}}
    }


def test_the_cursor_holds_only_entries_not_yet_in_the_ledger(landing):
    """The ledger is the memory: after many entries are recorded, the cursor is as small as before any
    landed; while their intake is pending it names only those."""
    defs, root, folder = landing
    empty = tick(defs, None).cursor
    for i in range(300):
        (folder / f"note_{i:03d}.txt").write_text("not data\n")  # ignored by the intake, with the reason
    pending = tick(defs, empty)
    (intake,) = pending.run_requests
    assert len(json.loads(pending.cursor)["flights"]["requested"]) == 300
    assert not tick(defs, pending.cursor).run_requests  # pending: not requested again
    run_intake(defs, intake)
    after = tick(defs, pending.cursor)
    assert not after.run_requests and after.cursor == empty
    assert _ledger(root).get_column("status").to_list() == ["ignored"] * 300


def _quarantine(root: Path) -> dict[tuple[str, int], tuple[str, str, str]]:
    with connect(warehouse_path(root)) as conn:
        rows = conn.execute(
            "SELECT _source_file, _source_row, _rule, _column, _reasons FROM quarantine.flights"
        )
        return {(file, row): (rule, column, reasons) for file, row, rule, column, reasons in rows.fetchall()}


def test_nan_is_missing_and_infinity_is_quarantined_with_its_column_file_and_row(landing, days):
    defs, root, folder = landing
    path = folder / "jan01.csv"
    day = days[1].with_row_index("i", offset=1)
    day.with_columns(
        pl.when(pl.col("i") == 1).then(pl.lit("NaN")).otherwise(pl.col("arr_delay")).alias("arr_delay"),
        pl.when(pl.col("i") == 2).then(pl.lit("inf")).otherwise(pl.col("dep_delay")).alias("dep_delay"),
        pl.when(pl.col("i") == 3).then(pl.lit("-inf")).otherwise(pl.col("distance")).alias("distance"),
    ).drop("i").write_csv(path)
    settle(root)
    request, _ = land(defs, None)
    assert request is not None
    _ingest(defs, request)
    assert _ledger(root).get_column("status").to_list() == ["loaded"]
    quarantined = _quarantine(root)
    assert set(quarantined) == {(str(path), 2), (str(path), 3)}  # the NaN row is valid, its delay missing
    rule, column, reasons = quarantined[(str(path), 2)]
    assert (rule, column) == ("finite", "dep_delay") and "dep_delay: inf is not a finite number" in reasons
    rule, column, reasons = quarantined[(str(path), 3)]
    assert (rule, column) == ("min", "distance") and "distance: -inf is below min 1" in reasons
    with connect(warehouse_path(root)) as conn:
        first = conn.execute(
            "SELECT arr_delay FROM validated.flights WHERE flight = ? AND carrier = ? AND origin = ?",
            [int(days[1]["flight"][0]), days[1]["carrier"][0], days[1]["origin"][0]],
        ).fetchall()
    assert first == [(None,)]


def test_a_parser_error_names_the_file_the_line_and_the_fix(landing, days):
    defs, root, folder = landing
    lines = _csv(days[1].head(20)).splitlines(keepends=True)
    lines[4] = lines[4].rstrip(b"\n") + b",surplus\n"  # line 5: one field more than the header
    (folder / "jan01.csv").write_bytes(b"".join(lines))
    text = days[2].head(20).with_columns(pl.lit("Montr\u00e9al").alias("tailnum")).write_csv()
    (folder / "jan02.csv").write_bytes(text.encode("latin-1"))  # line 2 holds 0xe9: not UTF-8
    (folder / "jan03.csv").write_bytes(_csv(days[3]))
    settle(root)
    request, _ = land(defs, None)
    assert request is not None and request.tags["ml_assets/files"] == "jan03.csv"
    _ingest(defs, request)
    reasons = {Path(r["file"]).name: (r["status"], r["reason"]) for r in _ledger(root).iter_rows(named=True)}
    status, reason = reasons["jan01.csv"]
    assert status == "rejected" and str(folder / "jan01.csv") in reason
    assert f"line 5 has {len(days[1].columns) + 1} fields, the header has {len(days[1].columns)}" in reason
    status, reason = reasons["jan02.csv"]
    assert status == "rejected" and str(folder / "jan02.csv") in reason
    assert "line 2: byte 0xe9" in reason and "save the file as UTF-8" in reason and "encoding:" in reason


def test_a_source_that_declares_its_encoding_loads_a_latin1_file(tmp_path, days):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    for path in default_pipelines_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if "flights" in raw.get("sources", {}):
            raw["sources"]["flights"]["encoding"] = "latin-1"
        (pipelines / path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "data"
    folder = ingest.landing_dir(root, "flights")
    folder.mkdir(parents=True)
    defs = build_definitions(pipelines, root)
    day = days[1].with_columns(pl.lit("Montr\u00e9al").alias("tailnum"))
    (folder / "jan01.csv").write_bytes(day.write_csv().encode("latin-1"))
    settle(root)
    request, _ = land(defs, None)
    assert request is not None
    _ingest(defs, request)
    with connect(warehouse_path(root)) as conn:
        names = conn.execute("SELECT DISTINCT tailnum FROM validated.flights").fetchall()
    assert names == [("Montr\u00e9al",)] and _quarantine(root) == {}


def test_a_slow_writer_file_changed_after_it_was_loaded_is_loaded_again_whole(landing, days):
    defs, root, folder = landing
    path = folder / "jan01.csv"
    day = days[1]
    half = day.height // 2
    path.write_bytes(_csv(day.head(half)))  # half the rows; the writer pauses past the settle time
    settle(root)
    request, cursor = land(defs, None)
    assert request is not None
    _ingest(defs, request)
    assert _raw_by_file(root)[str(path)].height == half
    with path.open("ab") as out:  # the rest appended, without a header
        out.write(day.slice(half).write_csv(include_header=False).encode())
    os.utime(path, (LANDED_AT + 60, LANDED_AT + 60))  # settled, a minute after the first half

    # The ledger recorded the first half's size and mtime: the tick sees the file changed, and hands it over.
    again, cursor = land(defs, cursor)
    assert again is not None and again.tags["ml_assets/files"] == "jan01.csv"
    _ingest(defs, again)

    # Every row once: the file's first rows were replaced, not duplicated, and none of the rest was lost.
    (loaded,) = _raw_by_file(root).values()
    assert loaded.select(day.columns).equals(day)
    assert loaded.get_column("_source_row").to_list() == list(range(1, day.height + 1))
    with connect(warehouse_path(root)) as conn:
        valid, quarantined = conn.execute(
            "SELECT (SELECT count(*) FROM validated.flights), (SELECT count(*) FROM quarantine.flights)"
        ).fetchone()
    assert valid + quarantined == day.height
    rows = {r["status"]: r for r in _ledger(root).iter_rows(named=True)}
    assert set(rows) == {"loaded", "replaced"}
    assert rows["loaded"]["sha256"] == sha256_file(path) and rows["loaded"]["rows"] == day.height
    assert (rows["loaded"]["size"], rows["loaded"]["mtime_ns"]) == (
        path.stat().st_size,
        path.stat().st_mtime_ns,
    )
    assert rows["replaced"]["rows"] == half and "changed after it was loaded" in rows["replaced"]["reason"]
    assert "loaded again whole" in rows["replaced"]["reason"]
    assert land(defs, None)[0] is None  # a fresh sensor reading the ledger: nothing left to load
