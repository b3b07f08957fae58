"""The landing zone's ledger (`ingest.landing_files`): every entry of a landing folder, checked, loaded,
rejected or ignored, and why; what the landing sensor detects on each tick (names, sizes and modification
times, never contents); and the intake a run does for what it detected (hash, read, check).

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
# does not rename): the sensor hands it over on a later tick. Writers flush far more often than this, and it
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


Stamp = tuple[int, int]


def ledger_names(conn: duckdb.DuckDBPyConnection, source: str) -> dict[str, Stamp | None]:
    """Names of the landing entries the ledger holds a row for (loaded, checked, rejected or ignored),
    each with the (size, mtime_ns) its latest loaded or checked content had when it was read: an entry
    whose stamp differs now changed after it was read, and is handed over again (None: no stamp kept)."""
    rows = conn.execute(
        f"SELECT file, size, mtime_ns, status IN ('loaded', 'checked') AND size IS NOT NULL AS stamped "
        f"FROM {LANDING_FILES} WHERE source = ? ORDER BY recorded_at",
        [source],
    ).fetchall()
    known: dict[str, Stamp | None] = {}
    for file, size, mtime_ns, stamped in rows:
        name = _entry_name(file)
        if stamped and "!" not in file:
            known[name] = (int(size), int(mtime_ns))
        else:
            known.setdefault(name, None)
    return known


def unchanged(known: dict[str, Stamp | None], name: str, stamp: list[int] | tuple[int, int] | None) -> bool:
    """The ledger holds the entry as it is now (or keeps no stamp of it to tell otherwise)."""
    if name not in known:
        return False
    recorded = known[name]
    return recorded is None or stamp is None or tuple(stamp) == recorded


def checked_rows(conn: duckdb.DuckDBPyConnection, sources: list[str]) -> pl.DataFrame:
    """Contents the intake read and checked that no run has loaded yet: what the next load covers."""
    return conn.execute(
        f"SELECT source, sha256, file, first_partition, last_partition FROM {LANDING_FILES} "
        "WHERE status = 'checked' AND list_contains(?, source) ORDER BY source, file",
        [sources],
    ).pl()


@dataclass
class FolderWatch:
    """What the landing sensor remembers of one source's folder between ticks (its cursor, as JSON): only
    entries not in the ledger yet, so it stays as small as the files in flight (the ledger is the memory).

    `settling`: name -> [size, mtime_ns] of a data file last seen too fresh to hand over.
    `requested`: name -> [size, mtime_ns] of an entry handed to an intake run, until the ledger has it.
    """

    settling: dict[str, list[int]] = field(default_factory=dict)
    requested: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: object) -> FolderWatch:
        # Cursors of earlier formats held content hashes: the ledger now answers what they did.
        if not isinstance(value, dict) or "settling" not in value:
            return cls()
        return cls(dict(value["settling"]), dict(value["requested"]))

    def to_json(self) -> dict:
        return {"settling": self.settling, "requested": self.requested}


@dataclass
class Detection:
    new: dict[str, list[int]]  # name -> [size, mtime_ns] (None for an entry that cannot be stat'ed)
    settling: list[str]  # data files modified too recently to hand over yet


def detect(folder: Path, known: dict[str, Stamp | None], watch: FolderWatch) -> Detection:
    """One sensor tick over a landing folder, from names, sizes and modification times only: no file is
    opened. `known` are the names the ledger holds (ledger_names); one whose size or mtime differs from
    what the ledger recorded is detected again; `watch` is updated for the next tick.

    A data file is handed over once stable: modified at least SETTLE_SECONDS ago, and with the size and
    mtime the previous tick saw, if it saw the file (that test holds even when the writer's clock is not
    ours, as on a network share). Other entries (a directory, an unsupported extension) are handed over at
    once: the intake run records why they are ignored.
    """
    found = Detection({}, [])
    settling: dict[str, list[int]] = {}
    requested: dict[str, list[int]] = {}
    now = time.time()
    for entry in landing_entries(folder):
        name = entry.path.name
        try:
            info = entry.path.stat()
            stamp: list[int] | None = [info.st_size, info.st_mtime_ns]
        except OSError:
            stamp = None  # a dangling symlink: the intake run says why it cannot be read
        if unchanged(known, name, stamp):
            continue
        if name in watch.requested and watch.requested[name] == stamp:
            requested[name] = watch.requested[name]  # its intake run has not recorded it yet
            continue
        seen = watch.settling.get(name)
        fresh = stamp is not None and not entry.reason and now - stamp[1] / 1e9 < SETTLE_SECONDS
        if stamp is not None and not entry.reason and (fresh or (seen is not None and seen != stamp)):
            settling[name] = stamp
            found.settling.append(name)
            continue
        found.new[name] = stamp
        requested[name] = stamp
    watch.settling, watch.requested = settling, requested
    return found


def _checked(path: Path, records: list[dict[str, object]]) -> dict[str, object]:
    """One ledger row for a checked content (a zip's members are one content)."""
    firsts = [r["first_partition"] for r in records if r.get("first_partition") is not None]
    lasts = [r["last_partition"] for r in records if r.get("last_partition") is not None]
    return {
        "file": str(path),
        "sha256": records[0]["sha256"],
        "rows": sum(int(r["rows"]) for r in records),  # type: ignore[call-overload]
        "first_partition": min(firsts) if firsts else None,
        "last_partition": max(lasts) if lasts else None,
        "size": records[0].get("size"),
        "mtime_ns": records[0].get("mtime_ns"),
        "status": "checked",
        "reason": "",
    }


def content_holders(conn: duckdb.DuckDBPyConnection, source: str) -> dict[str, str]:
    """Ledger key -> the name of the entry holding it (a content is ingested once, under its first name)."""
    rows = conn.execute(f"SELECT sha256, file FROM {LANDING_FILES} WHERE source = ?", [source]).fetchall()
    return {key: _entry_name(file) for key, file in rows}


def intake(
    name: str,
    spec: SourceSpec,
    folder: Path,
    names: set[str],
    holders: dict[str, str],
    known: dict[str, Stamp | None],
) -> list[dict[str, object]]:
    """Hash, read and check these entries of a landing folder, as the raw asset would read them, so an
    unusable file is rejected before a load touches a table; returns the ledger rows to record: checked
    (with the partitions it touches), rejected or ignored with the reason. `holders` is content_holders:
    an entry the ledger already holds as it is now (`known`: ledger_names) is skipped, so a repeated or
    overlapping intake records nothing twice, while one that changed after it was read is read again."""
    holders = dict(holders)
    rows: list[dict[str, object]] = []
    for entry in landing_entries(folder):
        path = entry.path
        if path.name not in names or unchanged(known, path.name, file_facts(path)):
            continue
        if entry.reason:
            rows.append(
                {"file": str(path), "sha256": entry_key(path), "status": "ignored", "reason": entry.reason}
            )
            continue
        try:
            sha = content_key(name, path)
            if sha in holders:
                reason = (
                    f"same content (sha256 {sha[:12]}...) as {holders[sha]}, already in the ledger: a content "
                    "is ingested once, whatever its name"
                )
                rows.append(
                    {"file": str(path), "sha256": entry_key(path), "status": "ignored", "reason": reason}
                )
                continue
            holders[sha] = path.name
            batch, records = read_files(name, spec, [path])
            if batch is not None:
                batch.folder.cleanup()  # checked only: the load reads the file again, inside its window
            rows.append(_checked(path, records))
        except RejectedFile as exc:
            rows.append(exc.ledger_row())
    return rows
