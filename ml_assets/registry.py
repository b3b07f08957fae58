"""Model registry: every trained model is a version folder of safe files plus a row in DuckDB.

A version folder holds LightGBM's text model, the feature transform (JSON), test predictions and a
sample of input rows with their training-time predictions (Parquet), and a manifest (JSON) with the
sha256 of each file. Folders are written under a temporary name and renamed into place, then registered,
so a crash never leaves a half-written version behind a registry row.

Aliases (`champion` serves, `challenger` is the latest candidate) live in `registry.aliases`; every move
of `champion`, and every refusal to move it, is a row in `registry.decision_log`. A move and its log row
are one DuckDB transaction: a crash leaves either both or neither.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import ml_assets
from ml_assets.ingest import sha256_file

MODEL_FILE = "model.txt"
TRANSFORM_FILE = "transform.json"
PREDICTIONS_FILE = "test_predictions.parquet"
SAMPLE_FILE = "sample_rows.parquet"
REFERENCE_FILE = "reference_features.parquet"
MANIFEST_FILE = "manifest.json"
CHAMPION, CHALLENGER = "champion", "challenger"


class ArtifactError(RuntimeError):
    """A model version's files are missing or do not match the hashes recorded at training time."""


def new_version_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    # Sortable by time; the random suffix keeps two versions trained in the same second apart.
    return now.strftime("v%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return f"ml_assets {ml_assets.__version__} ({sha})"


def frame_fingerprint(frame: pl.DataFrame) -> str:
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression="uncompressed")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_version(
    root: Path, pipeline: str, version: str, files: dict[str, bytes | Path], manifest: dict[str, Any]
) -> Path:
    """Write a version folder atomically; returns its final path. `files` maps artifact names to content."""
    final = root / pipeline / version
    _remove_orphans(root / pipeline)
    tmp = root / pipeline / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content)
        manifest = manifest | {"files": {name: sha256_file(tmp / name) for name in files}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_orphans(folder: Path) -> None:
    """Delete half-written version folders left by writers that died (a kill -9 mid-write)."""
    for tmp in folder.glob(".tmp-*"):
        pid = int(tmp.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by another user
            pass


def read_manifest(version_dir: Path, verify: bool = True) -> dict[str, Any]:
    path = Path(version_dir) / MANIFEST_FILE
    if not path.exists():
        raise ArtifactError(f"{version_dir}: no {MANIFEST_FILE}; not a model version folder")
    manifest = json.loads(path.read_text())
    if verify:
        for name, expected in manifest["files"].items():
            file = Path(version_dir) / name
            if not file.exists():
                raise ArtifactError(f"{file}: artifact is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise ArtifactError(
                    f"{file}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…; "
                    "the artifact was modified after training and will not be loaded"
                )
    return manifest


SCHEMA = """
CREATE SCHEMA IF NOT EXISTS registry;
CREATE TABLE IF NOT EXISTS registry.model_versions (
    version VARCHAR PRIMARY KEY,
    pipeline VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    task VARCHAR,
    metric VARCHAR,
    cv_score DOUBLE,
    test_score DOUBLE,
    baseline_test_score DOUBLE,
    train_start VARCHAR,
    train_end VARCHAR,
    data_fingerprint VARCHAR,
    code_version VARCHAR,
    model_sha256 VARCHAR,
    path VARCHAR NOT NULL,
    manifest JSON
);
CREATE TABLE IF NOT EXISTS registry.aliases (
    pipeline VARCHAR NOT NULL,
    alias VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (pipeline, alias)
);
CREATE TABLE IF NOT EXISTS registry.decision_log (
    decided_at TIMESTAMP NOT NULL,
    pipeline VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    challenger VARCHAR,
    champion_before VARCHAR,
    champion_after VARCHAR,
    reason VARCHAR NOT NULL,
    details JSON,
    run_id VARCHAR
);
"""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _set_alias(conn: duckdb.DuckDBPyConnection, pipeline: str, alias: str, version: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO registry.aliases VALUES (?, ?, ?, ?)", [pipeline, alias, version, _now()]
    )


@contextmanager
def _transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    conn.execute(SCHEMA)
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def alias_version(conn: duckdb.DuckDBPyConnection, pipeline: str, alias: str) -> str | None:
    conn.execute(SCHEMA)
    row = conn.execute(
        "SELECT version FROM registry.aliases WHERE pipeline = ? AND alias = ?", [pipeline, alias]
    ).fetchone()
    return row[0] if row else None


def version_dir(conn: duckdb.DuckDBPyConnection, version: str) -> Path:
    conn.execute(SCHEMA)
    row = conn.execute("SELECT path FROM registry.model_versions WHERE version = ?", [version]).fetchone()
    if row is None:
        raise ArtifactError(f"model version '{version}' is not registered")
    return Path(row[0])


def record_decision(
    conn: duckdb.DuckDBPyConnection,
    pipeline: str,
    action: str,
    reason: str,
    challenger: str | None = None,
    new_champion: str | None = None,
    details: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> None:
    """Log a decision and, when `new_champion` is given, move the champion alias, in one transaction."""
    with _transaction(conn):
        before = alias_version(conn, pipeline, CHAMPION)
        if new_champion is not None:
            version_dir(conn, new_champion)  # refuse to point the alias at an unregistered version
            _set_alias(conn, pipeline, CHAMPION, new_champion)
        conn.execute(
            "INSERT INTO registry.decision_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                _now(),
                pipeline,
                action,
                challenger,
                before,
                new_champion or before,
                reason,
                json.dumps(details or {}, default=str),
                run_id,
            ],
        )


def previous_champion(conn: duckdb.DuckDBPyConnection, pipeline: str) -> str | None:
    """The champion before the latest change of champion (what a rollback returns to)."""
    conn.execute(SCHEMA)
    row = conn.execute(
        "SELECT champion_before FROM registry.decision_log WHERE pipeline = ? AND champion_before IS NOT NULL "
        "AND champion_after IS DISTINCT FROM champion_before ORDER BY decided_at DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    return row[0] if row else None


def decisions(conn: duckdb.DuckDBPyConnection, pipeline: str) -> pl.DataFrame:
    conn.execute(SCHEMA)
    return conn.execute(
        "SELECT decided_at, action, challenger, champion_before, champion_after, reason "
        "FROM registry.decision_log WHERE pipeline = ? ORDER BY decided_at",
        [pipeline],
    ).pl()


def register(conn: duckdb.DuckDBPyConnection, version_dir: Path, manifest: dict[str, Any]) -> None:
    """Register a version and make it the challenger, in one transaction."""
    with _transaction(conn):
        _insert_version(conn, version_dir, manifest)
        _set_alias(conn, manifest["pipeline"], CHALLENGER, manifest["version"])


def _insert_version(conn: duckdb.DuckDBPyConnection, version_dir: Path, manifest: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO registry.model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            manifest["version"],
            manifest["pipeline"],
            manifest["created_at"],
            manifest["task"],
            manifest["metric"],
            manifest["cv"]["score"],
            manifest["test_metrics"][manifest["metric"]],
            manifest["baseline_test_metrics"][manifest["metric"]],
            manifest["train_window"]["start"],
            manifest["train_window"]["end"],
            manifest["data_fingerprint"],
            manifest["code_version"],
            manifest["files"][MODEL_FILE],
            str(version_dir),
            json.dumps(manifest, default=str),
        ],
    )


def versions(conn: duckdb.DuckDBPyConnection, pipeline: str) -> pl.DataFrame:
    """Every version of a pipeline with its status: an alias it holds, else the last decision about it."""
    conn.execute(SCHEMA)
    return conn.execute(
        """
        SELECT v.version, v.created_at,
               coalesce(a.alias, d.action, 'registered') AS status,
               v.metric, v.cv_score, v.test_score, v.baseline_test_score, v.path
        FROM registry.model_versions v
        LEFT JOIN (SELECT version, string_agg(alias, '+' ORDER BY alias) AS alias FROM registry.aliases
                   WHERE pipeline = $1 GROUP BY version) a USING (version)
        LEFT JOIN (SELECT challenger AS version, arg_max(action, decided_at) AS action
                   FROM registry.decision_log WHERE pipeline = $1 GROUP BY 1) d USING (version)
        WHERE v.pipeline = $1 ORDER BY v.created_at, v.version
        """,
        [pipeline],
    ).pl()


def latest_version_dir(conn: duckdb.DuckDBPyConnection, pipeline: str) -> Path:
    conn.execute(SCHEMA)
    row = conn.execute(
        "SELECT path FROM registry.model_versions WHERE pipeline = ? "
        "ORDER BY created_at DESC, version DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    if row is None:
        raise ArtifactError(
            f"pipeline '{pipeline}': no model version is registered yet; materialize its model"
        )
    return Path(row[0])
