"""The landing zone's ledger (`ingest.landing_files`): every entry of a landing folder, loaded, rejected or
ignored, and why; and the scan the landing sensor runs over a folder on each tick to get there.

Rows are keyed by (source, sha256): a data file by its content, so a re-dropped or renamed copy is the same
row; an entry with no content to hash (a directory, a socket, an unreadable file) or whose content another
entry already holds (a copy) by `path:<name>` (files.entry_key), so it keeps one row however often it is
seen. A data file's row also keeps its size and mtime_ns when it was read. A file loaded under a name
that held other content before changed after it was loaded: the run read it again whole (replacing its
rows, never adding to them) and the earlier content's row becomes `replaced`, with the reason. Batches still being written (files.landing_entries' naming rule) get no row: each upload would leave
one for a name that exists for seconds, and replay keeps its own state file there.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl

from ml_assets.core.errors import RejectedFile
from ml_assets.core.ingest.files import (
    ENTRY_KEY,
    content_key,
    entry_key,
    file_facts,
    landing_entries,
    read_files,
)
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.store import LANDING_FILES, insert_many

# A data file modified less than this long ago may still be growing (a copy in progress, a writer that
# does not rename): the sensor reads it on a later tick. Writers flush far more often than this, and it
# stays well under the sensor's 10 s interval, so a finished file waits one or two ticks at most.
SETTLE_SECONDS = 5.0
# The reason a file's earlier content gets (status `replaced`) once the file was loaded again whole.
CHANGED = "changed after it was loaded"


def record_files(
    conn: duckdb.DuckDBPyConnection, source: str, rows: list[dict[str, object]], run_id: str
) -> None:
    """Upsert ledger rows (keys: source, sha256; fields: file, size, mtime_ns, rows, first/last_partition,
    status, reason). A loaded file whose name held other content marks that content `replaced`.

    A row keyed by content replaces its entry's `path:<name>` row: the file was unreadable, or a
    directory, before it became this content."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    superseded = [
        entry_key(Path(str(r.get("path", r["file"]))))
        for r in rows
        if not str(r["sha256"]).startswith(ENTRY_KEY)
    ]
    if superseded:
        conn.execute(
            f"DELETE FROM {LANDING_FILES} WHERE source = ? AND list_contains(?, sha256)", [source, superseded]
        )
    _replace_earlier(conn, source, [r for r in rows if r["status"] == "loaded"], run_id, now)
    insert_many(
        conn,
        LANDING_FILES,
        (
            {
                "source": source,
                "sha256": r["sha256"],
                "file": r["file"],
                "size": r.get("size"),
                "mtime_ns": r.get("mtime_ns"),
                "rows": r.get("rows"),
                "first_partition": r.get("first_partition"),
                "last_partition": r.get("last_partition"),
                "status": r["status"],
                "reason": r.get("reason", ""),
                "run_id": run_id,
                "recorded_at": now,
            }
            for r in rows
        ),
        replace=True,
    )


def _replace_earlier(
    conn: duckdb.DuckDBPyConnection,
    source: str,
    loaded: list[dict[str, object]],
    run_id: str,
    now: dt.datetime,
) -> None:
    """A file loaded under a name that held other content before changed after it was loaded: the run
    read it again whole and replaced its rows, and the earlier content's row says so."""
    for r in loaded:
        conn.execute(
            f"UPDATE {LANDING_FILES} SET status = 'replaced', reason = ?, recorded_at = ? "
            "WHERE source = ? AND file = ? AND status = 'loaded' AND sha256 <> ?",
            [
                f"{CHANGED} (now {r.get('size')} bytes, sha256 {str(r['sha256'])[:12]}...): loaded again whole "
                f"by run {run_id or '(unknown)'}, its rows replaced",
                now,
                source,
                r["file"],
                r["sha256"],
            ],
        )


def changed_after_load(conn: duckdb.DuckDBPyConnection, source: str, files: list[Path]) -> list[str]:
    """'<file>: <what changed>' for each file whose size or modification time differs from what the ledger
    kept when it was loaded: a run reads it again whole (its new content is not in the ledger)."""
    kept = conn.execute(
        f"SELECT file, size, mtime_ns FROM {LANDING_FILES} WHERE source = ? AND status = 'loaded' "
        "AND size IS NOT NULL",
        [source],
    ).fetchall()
    facts = {file: (size, mtime_ns) for file, size, mtime_ns in kept}
    changed = []
    for path in files:
        before, now = facts.get(str(path)), file_facts(path)
        if before and now and before != now:
            changed.append(
                f"{path}: {before[0]} -> {now[0]} bytes, modified {dt.datetime.fromtimestamp(now[1] / 1e9, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
            )
    return changed


def rejected_sha256(conn: duckdb.DuckDBPyConnection, source: str) -> set[str]:
    """Keys a raw run sets aside (files.read_files' skip_sha256): rejected contents and ignored entries."""
    rows = conn.execute(
        f"SELECT sha256 FROM {LANDING_FILES} WHERE source = ? AND status IN ('rejected', 'ignored')", [source]
    ).fetchall()
    return {r[0] for r in rows}


def loaded_outside(
    conn: duckdb.DuckDBPyConnection, source: str, start: dt.datetime, end: dt.datetime
) -> set[str]:
    """Contents already loaded whose rows all lie outside [start, end): a partition's run need not read
    them again (a year of landed days would otherwise be re-read for each new day)."""
    rows = conn.execute(
        f"SELECT sha256 FROM {LANDING_FILES} WHERE source = ? AND status = 'loaded' "
        "AND (first_partition >= ? OR last_partition < ?)",
        [source, end, start],
    ).fetchall()
    return {r[0] for r in rows}


def ledger(conn: duckdb.DuckDBPyConnection, source: str | None = None) -> pl.DataFrame:
    where = "WHERE source = ?" if source else ""
    return conn.execute(
        f"SELECT * FROM {LANDING_FILES} {where} ORDER BY recorded_at, file", [source] if source else []
    ).pl()


def _entry_name(file: str) -> str:
    # The ledger names a zip member `<archive>!<member>` (the member may have folders): the entry is the archive.
    return Path(re.split(r"(?i)(?<=\.zip)!", file, maxsplit=1)[0]).name


@dataclass
class FolderState:
    """What the landing sensor remembers of one source's folder between ticks (its cursor, as JSON).

    `keys`: every ledger key handled, to the name of the entry it came from (None in a cursor written before
    names were kept). `files`: each data file's [size, mtime_ns, sha256] when last seen, sha256 None while
    it settles; an unchanged file is not hashed again.
    """

    keys: dict[str, str | None] = field(default_factory=dict)
    files: dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: list[str] | dict) -> FolderState:
        if isinstance(value, list):  # the cursor's first format: the content hashes handled
            return cls(dict.fromkeys(value))
        return cls(dict(value["keys"]), dict(value["files"]))

    def to_json(self) -> dict:
        return {"keys": self.keys, "files": self.files}


def folder_states(conn: duckdb.DuckDBPyConnection, sources: list[str]) -> dict[str, FolderState]:
    """A fresh sensor's memory, from the ledger: nothing loaded, rejected or ignored is handled twice."""
    states = {name: FolderState() for name in sources}
    for source, key, file in conn.execute(f"SELECT source, sha256, file FROM {LANDING_FILES}").fetchall():
        if source in states:
            states[source].keys[key] = _entry_name(file)
    return states


@dataclass
class FolderScan:
    accepted: list[dict[str, object]]  # batch records of new data files that read and checked cleanly
    rows: list[dict[str, object]]  # ledger rows to record now: newly rejected or ignored entries
    settling: list[str]  # data files modified too recently to be read yet


def scan_folder(name: str, spec: SourceSpec, folder: Path, state: FolderState) -> FolderScan:
    """One sensor tick over a source's landing folder; `state` is updated for the next tick.

    A data file is read once stable: modified at least SETTLE_SECONDS ago, and with the size and mtime the
    previous tick saw, if it saw the file (that test holds even when the writer's clock is not ours, as on
    a network share). New content is read as the raw asset would read it, so an unusable file is rejected
    before a run touches a table. Every other entry gets one ledger row, written once.
    """
    scan = FolderScan([], [], [])
    now = time.time()
    files: dict[str, list] = {}

    def record(path: Path, key: str, status: str, reason: str) -> None:
        if key not in state.keys:
            state.keys[key] = path.name
            scan.rows.append({"file": str(path), "sha256": key, "status": status, "reason": reason})

    for entry in landing_entries(folder):
        path = entry.path
        if entry.reason:
            record(path, entry_key(path), "ignored", entry.reason)
            continue
        try:
            info = path.stat()
            stamp: list | None = [info.st_size, info.st_mtime_ns]
        except OSError:
            stamp = None  # a dangling symlink: content_key says why
        seen = state.files.get(path.name)
        if stamp and seen and seen[:2] == stamp and seen[2]:
            files[path.name] = seen
            continue
        if stamp and (now - stamp[1] / 1e9 < SETTLE_SECONDS or (seen and seen[:2] != stamp)):
            files[path.name] = [*stamp, None]
            scan.settling.append(path.name)
            continue
        try:
            sha = content_key(name, path)
        except RejectedFile as exc:
            record(path, exc.sha256, "rejected", str(exc))
            continue
        if stamp:
            files[path.name] = [*stamp, sha]
        if sha in state.keys:
            holder = state.keys[sha]
            if holder not in (None, path.name):
                record(
                    path,
                    entry_key(path),
                    "ignored",
                    f"same content (sha256 {sha[:12]}...) as {holder}, already in the ledger: a content is "
                    "ingested once, whatever its name",
                )
            continue
        state.keys[sha] = path.name
        try:
            scan.accepted += read_files(name, spec, [path])[1]
        except RejectedFile as exc:
            scan.rows.append(exc.ledger_row())
    state.files = files
    return scan
