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

from ml_assets.core import ingest
from ml_assets.core.hashing import sha256_file
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import TABLE_LAYERS
from ml_assets_tests.conftest import nycflights_file
from ml_assets_tests.test_landing import LANDED_AT, _tick, settle


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

    first = _tick(defs, None)
    (request,) = first.run_requests
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
        assert all(f in row["reason"] for f in fragments), row["reason"]
    # The repeated column was never loaded under polars' silent rename.
    assert not any("duplicated" in c for frame in raw.values() for c in frame.columns)

    # Seen again, by the same sensor or a fresh one reading the ledger: no run, no new or rewritten row.
    again = _tick(defs, first.cursor)
    assert not again.run_requests
    assert not _tick(defs, None).run_requests
    assert _ledger(root).sort("file").equals(ledger.sort("file"))

    # A batch renamed into place once complete is then read like any other.
    (folder / "jan04.csv.tmp").rename(folder / "jan04.csv")
    settle(root)
    (request,) = _tick(defs, again.cursor).run_requests
    assert request.tags["ml_assets/files"] == "jan04.csv"


def test_a_file_still_being_written_is_read_once_it_has_settled(landing, days):
    defs, root, folder = landing
    content = _csv(days[1])
    path = folder / "jan01.csv"
    path.write_bytes(content[: len(content) // 2])  # half a file, cut mid-line, just written

    first = _tick(defs, None)
    assert not first.run_requests and "waiting for jan01.csv to settle" in first.skip_reason.skip_message
    # The writer finishes; its mtime says "long ago" (as a writer with a slow clock would), but the size
    # changed since the last tick: still not read.
    path.write_bytes(content)
    os.utime(path, (LANDED_AT, LANDED_AT))
    second = _tick(defs, first.cursor)
    assert not second.run_requests and "waiting for jan01.csv to settle" in second.skip_reason.skip_message
    assert _ledger(root).is_empty()

    (request,) = _tick(defs, second.cursor).run_requests
    _ingest(defs, request)
    (loaded,) = _raw_by_file(root).values()
    assert loaded.select(days[1].columns).equals(days[1])
    assert _ledger(root).get_column("status").to_list() == ["loaded"]


def test_a_cursor_of_the_first_format_still_works(landing, days):
    defs, root, folder = landing
    for day in (1, 2):
        (folder / f"jan0{day}.csv").write_bytes(_csv(days[day]))
    settle(root)
    old_cursor = json.dumps({"flights": [sha256_file(folder / "jan01.csv")]})  # {source: [sha256, ...]}
    result = _tick(defs, old_cursor)
    (request,) = result.run_requests
    assert request.tags["ml_assets/files"] == "jan02.csv"
    assert not _tick(defs, result.cursor).run_requests
