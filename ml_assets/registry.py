"""Model registry: every trained model is a version folder of safe files plus a row in DuckDB.

A version folder holds LightGBM's text model, the feature transform (JSON), test predictions (Parquet)
and a manifest (JSON) with the sha256 of each file. Folders are written under a temporary name and
renamed into place, then registered, so a crash never leaves a half-written version behind a registry row.
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
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import ml_assets
from ml_assets.ingest import sha256_file

MODEL_FILE = "model.txt"
TRANSFORM_FILE = "transform.json"
PREDICTIONS_FILE = "test_predictions.parquet"
MANIFEST_FILE = "manifest.json"
ARTIFACTS = (MODEL_FILE, TRANSFORM_FILE, PREDICTIONS_FILE)


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
"""


def register(conn: duckdb.DuckDBPyConnection, version_dir: Path, manifest: dict[str, Any]) -> None:
    conn.execute(SCHEMA)
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
    conn.execute(SCHEMA)
    return conn.execute(
        "SELECT version, created_at, metric, cv_score, test_score, baseline_test_score, path "
        "FROM registry.model_versions WHERE pipeline = ? ORDER BY created_at, version",
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
