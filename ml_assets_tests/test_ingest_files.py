"""File batches staged file by file (ingest.Batch): the raw table holds exactly what one frame of every
file would have held, and a broken later file leaves the previous raw table and no staged parts behind."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import polars as pl
import pytest

from ml_assets.core import ingest
from ml_assets.core.ingest import batch as batch_module
from ml_assets.core.spec import SourceSpec

WINDOW = ingest.TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 1, 4))
SPEC = SourceSpec.model_validate(
    {
        "path": "legs.csv",
        "id": ["leg"],
        "timestamp": "time_hour",
        "partitions": {"start": "2013-01-01"},
        "schema_evolution": {"extra_columns": "accept", "missing_columns": "null"},
        "columns": {
            "leg": {"type": "int", "not_null": True},
            "delay": {"type": "float"},
            "note": {"type": "str"},
            "time_hour": {"type": "datetime", "not_null": True},
        },
    }
)


def _day(day: int, legs: range) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "leg": [str(i) for i in legs],
            # "NA" is a null value, "" an empty string, " 7" keeps its blank: values exactly as in the file.
            "delay": [["NA", "", " 7", "1.50"][i % 4] for i in legs],
            "time_hour": [f"2013-01-0{day}T{i % 24:02d}:00:00Z" for i in legs],
        }
    )


def _landed(tmp_path: Path) -> list[Path]:
    """A plain file, a gzipped one with an extra column, and a zip whose member lacks `delay`."""
    plain, gz, archive = tmp_path / "a.csv", tmp_path / "b.csv.gz", tmp_path / "c.zip"
    _day(1, range(0, 60)).write_csv(plain)
    extra = _day(2, range(60, 100)).with_columns(note=pl.lit("x, quoted"), gate=pl.lit("B7"))
    gz.write_bytes(gzip.compress(extra.write_csv().encode()))
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("legs.csv", _day(3, range(100, 130)).drop("delay").write_csv())
    return [plain, gz, archive]


def _one_frame(paths: list[Path]) -> pl.DataFrame:
    """What reading every file into one frame of strings gives (how a batch was read before staging)."""
    frames = []
    for path in paths:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                label, data = f"{path}!legs.csv", z.read("legs.csv")
        else:
            label, data = (
                str(path),
                gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes(),
            )
        frame = pl.read_csv(
            data, infer_schema=False, null_values=SPEC.null_values, row_index_name="_source_row"
        )
        frames.append(frame.with_columns(pl.col("_source_row") + 1, pl.lit(label).alias("_source_file")))
    return pl.concat(frames, how="diagonal_relaxed")


def test_files_staged_one_by_one_load_what_one_frame_of_them_held(conn, tmp_path: Path):
    paths = _landed(tmp_path)
    batch, records = ingest.read_files("legs", SPEC, paths)
    assert [r["rows"] for r in records] == [60, 40, 30] and len(batch.parts) == 3
    assert [r["first_partition"].day for r in records] == [1, 2, 3]
    ingest.load_raw(conn, "legs", SPEC, batch, records, WINDOW)

    expected = _one_frame(paths)
    raw = conn.execute("SELECT * EXCLUDE (_event_time) FROM raw.legs").pl()
    assert raw.columns == [c for c in expected.columns if not c.startswith("_")] + [
        "_source_file",
        "_source_row",
    ]
    order = ["_source_file", "_source_row"]
    assert raw.sort(order).equals(expected.select(raw.columns).cast(raw.schema).sort(order))
    assert raw.get_column("delay").drop_nulls().to_list().count(" 7") == 25  # as written, not trimmed


def test_a_broken_later_file_leaves_raw_untouched_and_no_staged_parts(conn, tmp_path: Path):
    good, *_ = _landed(tmp_path)
    batch, records = ingest.read_files("legs", SPEC, [good])
    ingest.load_raw(conn, "legs", SPEC, batch, records, WINDOW)
    before = conn.execute("SELECT * FROM raw.legs ORDER BY _source_row").fetchall()

    second = tmp_path / "d.csv"
    _day(2, range(200, 210)).write_csv(second)
    broken = tmp_path / "e.csv"
    broken.write_text("leg,delay,time_hour\n1,2,2013-01-02T00:00:00Z,surplus\n")
    staged = set(Path(batch.folder.name).parent.glob("ml-assets-batch-*"))
    with pytest.raises(ingest.RejectedFile, match="e.csv"):
        ingest.read_files("legs", SPEC, [second, broken])

    assert conn.execute("SELECT * FROM raw.legs ORDER BY _source_row").fetchall() == before
    assert set(Path(batch.folder.name).parent.glob("ml-assets-batch-*")) == staged


def test_a_killed_runs_staged_parts_are_removed_by_the_next_batch(tmp_path: Path):
    """A process killed while reading cannot remove its staging folder; the next batch removes the
    folders of processes that no longer exist and keeps those of live ones."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = Path(tempfile.gettempdir())
    orphan = root / f"{batch_module.PREFIX}{dead.pid}-killed"
    (orphan / "part-00000.parquet").parent.mkdir()
    (orphan / "part-00000.parquet").write_bytes(b"PAR1")
    live = tempfile.TemporaryDirectory(prefix=f"{batch_module.PREFIX}{os.getpid()}-")
    try:
        batch = ingest.Batch()
        assert not orphan.exists()
        assert Path(live.name).exists() and Path(batch.folder.name).name.startswith(
            f"{batch_module.PREFIX}{os.getpid()}-"
        )
    finally:
        live.cleanup()
        shutil.rmtree(orphan, ignore_errors=True)
