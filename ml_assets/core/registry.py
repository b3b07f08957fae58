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
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError

import ml_assets
from ml_assets.core.errors import ArtifactError
from ml_assets.core.hashing import sha256_file
from ml_assets.core.store import ALIASES, DECISION_LOG, MODEL_VERSIONS, insert, transactions

MODEL_FILE = "model.txt"
TRANSFORM_FILE = "transform.json"
PREDICTIONS_FILE = "test_predictions.parquet"
SAMPLE_FILE = "sample_rows.parquet"
REFERENCE_FILE = "reference_features.parquet"
MANIFEST_FILE = "manifest.json"
# A version whose model is a simple candidate (linear, constant) holds it as JSON instead of model.txt.
MODEL_JSON_FILE = "model.json"
CHAMPION, CHALLENGER = "champion", "challenger"


def candidate_file(kind: str) -> str:
    """The file of a LightGBM version holding a simpler candidate trained beside it (linear, constant)."""
    return f"candidate_{kind}.json"


# Version 1: manifests written before the model existed (no `schema_version` key), read as they are.
MANIFEST_SCHEMA_VERSION = 2


class CrossValidation(BaseModel):
    """The tuning of a version: its best CV score (None when the budget cut the first trial short, or for
    an untuned baseline), folds and trials; the timings beside them are kept as they were written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    score: float | None
    folds: int
    trials: list[dict[str, Any]]
    trials_cut_short: int = 0
    model_step_s: float | None = None
    # How the model was fitted: {"engine": "lightgbm"} in the step's process, or "lightgbm.dask" with its
    # workers and rounds trained (core/dask_fit.py); None for versions from before it was recorded.
    final_fit: dict[str, Any] | None = None


class Candidate(BaseModel):
    """A simpler model trained beside a LightGBM version (its JSON is one of the version's files)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    decision_threshold: float
    test_metrics: dict[str, float | None]
    cut_short: bool = False
    train_rows: int | None = None
    # LightGBM's defaults (`lightgbm_defaults`): its rounds and validation score, and whether it is the
    # version's model itself (the tuned parameters did not beat it on validation).
    rounds: int | None = None
    valid_score: float | None = None
    chosen: bool = False


class Manifest(BaseModel):
    """A version's manifest.json: what it was trained on and for, how it scored, and the sha256 of each of
    its files. Read only through `read_manifest`, which validates it against this model; every later
    field has a default, so the manifests of older versions keep loading."""

    # Keys an older ml_assets wrote and this one no longer reads are ignored, not refused: the file is
    # never rewritten (its sha256 is registered), only read.
    model_config = ConfigDict(frozen=True, extra="ignore")

    # What this code writes; parse_manifest reads a file without the key as version 1.
    schema_version: int = MANIFEST_SCHEMA_VERSION
    version: str
    pipeline: str
    task: Literal["binary", "multiclass", "regression"]
    created_at: str
    metric: str
    greater_is_better: bool
    params: dict[str, Any]
    best_iteration: int | None
    features: list[str]
    categorical_features: list[str]
    input_columns: list[str]
    id_columns: list[str]
    target: str
    classes: list[Any] | None = None
    decision_threshold: float = 0.5
    rows: dict[str, int]
    train_rows_available: int | None = None
    max_train_rows: int | None = None
    train_window: dict[str, str | None]
    test_start: str | None = None
    data_end: str | None = None
    data_fingerprint: str
    code_version: str
    cv: CrossValidation
    # lightgbm, linear or constant (versions from before candidates existed are LightGBM).
    model_kind: Literal["lightgbm", "linear", "constant"] = "lightgbm"
    test_metrics: dict[str, float | None]
    # The model's parameters refitted without each history feature family (core/ablation.py).
    ablation: dict[str, Any] | None = None
    baseline: str
    baseline_test_metrics: dict[str, float | None]
    baseline_threshold: float | None = None
    # The simpler models judged beside this one at a first promotion (candidate_file).
    candidates: dict[str, Candidate] = {}
    # A baseline registered as it became the first champion names the trained version it came from.
    derived_from: str | None = None
    # Artifact name -> sha256, added by write_version.
    files: dict[str, str] = {}


def parse_manifest(content: str | bytes, source: str | Path) -> Manifest:
    """A manifest's JSON (a file's, or the registry's copy) validated into a Manifest: the one place a
    manifest is read. One without `schema_version` is from before the model (version 1)."""
    try:
        raw = json.loads(content)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        found = raw.setdefault("schema_version", 1)
        if isinstance(found, int) and found > MANIFEST_SCHEMA_VERSION:
            raise ArtifactError(
                f"{source}: manifest schema version {found} was written by a newer ml_assets (this one reads "
                f"up to {MANIFEST_SCHEMA_VERSION}); upgrade ml_assets to load this version"
            )
        return Manifest.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise ArtifactError(
            f"{source}: not a model manifest this ml_assets can read ({_first_problem(exc)}); restore the "
            "file or train a new version"
        ) from exc


def _first_problem(exc: ValueError | ValidationError) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"field {'.'.join(map(str, error['loc']))}: {error['msg']}"
    return str(exc)


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


def write_version(
    root: Path, pipeline: str, version: str, files: dict[str, bytes | Path], manifest: Manifest
) -> Path:
    """Write a version folder atomically; returns its final path. `files` maps artifact names to content."""
    final = root / pipeline / version
    remove_orphans(root / pipeline)
    tmp = root / pipeline / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content)
        hashes = {name: sha256_file(tmp / name) for name in files}
        content = manifest.model_copy(update={"files": hashes}).model_dump(mode="json")
        (tmp / MANIFEST_FILE).write_text(json.dumps(content, indent=2, sort_keys=True))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_orphans(folder: Path) -> None:
    """Delete half-written version folders left by writers that died (a kill -9 mid-write)."""
    for tmp in folder.glob(".tmp-*"):
        pid = int(tmp.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by another user
            pass


def read_manifest(version_dir: Path, verify: bool = True, manifest_sha256: str | None = None) -> Manifest:
    """A version's manifest; `verify` checks every artifact against the sha256 the manifest lists, and
    `manifest_sha256` (what the registry recorded, see `registered`) checks the manifest itself first:
    the artifact hashes guard the files, only the registry guards the manifest holding them (and the
    decision threshold, features and classes the model is served with)."""
    path = Path(version_dir) / MANIFEST_FILE
    if not path.exists():
        raise ArtifactError(f"{version_dir}: no {MANIFEST_FILE}; not a model version folder")
    content = path.read_bytes()
    if manifest_sha256 is not None:
        _refuse_modified(path, hashlib.sha256(content).hexdigest(), manifest_sha256, "the registry's")
    manifest = parse_manifest(content, path)
    if verify:
        for name, expected in manifest.files.items():
            file = Path(version_dir) / name
            if not file.exists():
                raise ArtifactError(f"{file}: artifact is missing")
            _refuse_modified(file, sha256_file(file), expected, "the manifest's")
    return manifest


def _refuse_modified(file: Path, actual: str, expected: str, recorded_by: str) -> None:
    if actual != expected:
        raise ArtifactError(
            f"{file}: sha256 {actual[:12]}… does not match {recorded_by} {expected[:12]}…; "
            "the file was modified after training and will not be loaded; restore it or train a new version"
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _set_alias(conn: duckdb.DuckDBPyConnection, pipeline: str, alias: str, version: str) -> None:
    insert(
        conn,
        ALIASES,
        {"pipeline": pipeline, "alias": alias, "version": version, "updated_at": _now()},
        replace=True,
    )


def alias_version(conn: duckdb.DuckDBPyConnection, pipeline: str, alias: str) -> str | None:
    row = conn.execute(
        f"SELECT version FROM {ALIASES} WHERE pipeline = ? AND alias = ?", [pipeline, alias]
    ).fetchone()
    return row[0] if row else None


@dataclass(frozen=True)
class Registered:
    """A registered version of a pipeline: its folder and the sha256 its manifest had when registered.

    Load it with `ServableModel.from_registry`, or its manifest alone with `read_manifest(path,
    manifest_sha256=...)`.
    `manifest_sha256` is None for versions registered before the registry recorded it (schema version 4):
    those keep loading, with the artifacts checked against their manifest's hashes as before, but an edit
    of the manifest itself goes unnoticed.
    """

    version: str
    pipeline: str
    path: Path
    manifest_sha256: str | None


def registered(conn: duckdb.DuckDBPyConnection, version: str, pipeline: str) -> Registered:
    """A registered version, only if it is one of `pipeline`'s own: a pipeline never loads, judges,
    monitors or serves another pipeline's model."""
    row = conn.execute(
        f"SELECT pipeline, path, manifest_sha256 FROM {MODEL_VERSIONS} WHERE version = ?", [version]
    ).fetchone()
    if row is None:
        raise ArtifactError(
            f"model version '{version}' is not registered; `ml-assets versions {pipeline}` lists the "
            f"versions of pipeline '{pipeline}'"
        )
    owner, path, manifest_sha256 = row
    if owner != pipeline:
        raise ArtifactError(
            f"model version '{version}' belongs to pipeline '{owner}', not '{pipeline}'; "
            f"`ml-assets versions {pipeline}` lists its own versions"
        )
    return Registered(version, owner, Path(path), manifest_sha256)


def version_dir(conn: duckdb.DuckDBPyConnection, version: str, pipeline: str | None = None) -> Path:
    """The folder of a registered version; with `pipeline`, only if the version is one of its own. To load
    the version, use `registered`, which also gives the manifest's registered hash."""
    if pipeline is not None:
        return registered(conn, version, pipeline).path
    row = conn.execute(f"SELECT path FROM {MODEL_VERSIONS} WHERE version = ?", [version]).fetchone()
    if row is None:
        raise ArtifactError(f"model version '{version}' is not registered")
    return Path(row[0])


def version_of_run(conn: duckdb.DuckDBPyConnection, pipeline: str, run_id: str) -> str | None:
    """The version a run trained: what the later stages of that same run must judge, whatever other runs
    registered meanwhile."""
    row = conn.execute(
        f"SELECT version FROM {MODEL_VERSIONS} WHERE pipeline = ? AND run_id = ? "
        "ORDER BY created_at DESC, version DESC LIMIT 1",
        [pipeline, run_id],
    ).fetchone()
    return row[0] if row else None


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
    for attempt in transactions(conn, ALIASES):
        with attempt:
            before = alias_version(conn, pipeline, CHAMPION)
            if new_champion is not None:
                version_dir(conn, new_champion, pipeline)  # never point the alias at another pipeline's model
                _set_alias(conn, pipeline, CHAMPION, new_champion)
            insert(
                conn,
                DECISION_LOG,
                {
                    "decided_at": _now(),
                    "pipeline": pipeline,
                    "action": action,
                    "challenger": challenger,
                    "champion_before": before,
                    "champion_after": new_champion or before,
                    "reason": reason,
                    "details": json.dumps(details or {}, default=str),
                    "run_id": run_id,
                },
            )


def previous_champion(conn: duckdb.DuckDBPyConnection, pipeline: str) -> str | None:
    """The champion before the latest change of champion (what a rollback returns to)."""
    row = conn.execute(
        f"SELECT champion_before FROM {DECISION_LOG} WHERE pipeline = ? AND champion_before IS NOT NULL "
        "AND champion_after IS DISTINCT FROM champion_before ORDER BY decided_at DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    return row[0] if row else None


def decisions(conn: duckdb.DuckDBPyConnection, pipeline: str) -> pl.DataFrame:
    return conn.execute(
        "SELECT decided_at, action, challenger, champion_before, champion_after, reason "
        f"FROM {DECISION_LOG} WHERE pipeline = ? ORDER BY decided_at",
        [pipeline],
    ).pl()


def register(
    conn: duckdb.DuckDBPyConnection,
    version_dir: Path,
    run_id: str | None = None,
    challenger: bool = True,
) -> Manifest:
    """Register a version folder (stamped with the run that trained it) and, unless `challenger` is
    False (a baseline registered as it becomes champion), make it the challenger, atomically; returns
    its manifest. The manifest's sha256 is recorded from the very bytes registered,
    so every later load can refuse a manifest edited since."""
    manifest_bytes = (Path(version_dir) / MANIFEST_FILE).read_bytes()
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    # The artifacts are checked against the manifest now, and the manifest against this hash ever after.
    manifest = read_manifest(version_dir, manifest_sha256=manifest_sha256)
    for attempt in transactions(conn, MODEL_VERSIONS):
        with attempt:
            insert(
                conn,
                MODEL_VERSIONS,
                {
                    "version": manifest.version,
                    "pipeline": manifest.pipeline,
                    "created_at": manifest.created_at,
                    "task": manifest.task,
                    "metric": manifest.metric,
                    "cv_score": manifest.cv.score,
                    "test_score": manifest.test_metrics[manifest.metric],
                    "baseline_test_score": manifest.baseline_test_metrics[manifest.metric],
                    "train_start": manifest.train_window["start"],
                    "train_end": manifest.train_window["end"],
                    "data_fingerprint": manifest.data_fingerprint,
                    "code_version": manifest.code_version,
                    "model_sha256": manifest.files.get(MODEL_FILE) or manifest.files[MODEL_JSON_FILE],
                    "path": str(version_dir),
                    # The registered bytes as they are: what `manifest_sha256` hashes.
                    "manifest": manifest_bytes.decode(),
                    "manifest_sha256": manifest_sha256,
                    "run_id": run_id,
                },
            )
            if challenger:
                _set_alias(conn, manifest.pipeline, CHALLENGER, manifest.version)
    return manifest


def versions(conn: duckdb.DuckDBPyConnection, pipeline: str) -> pl.DataFrame:
    """Every version of a pipeline with what it is now: `champion`; else what ended its time as champion
    (`previous champion` when replaced by a promotion, `rolled back`), else `refused` when the gate said
    no, else `registered`; `+challenger` on the latest registered."""
    return conn.execute(
        f"""
        SELECT v.version, v.created_at,
               coalesce(nullif(concat_ws('+',
                   CASE WHEN a.champion THEN 'champion'
                        ELSE coalesce(r.status, CASE WHEN d.action = 'refuse' THEN 'refused' END) END,
                   CASE WHEN a.challenger THEN 'challenger' END), ''), 'registered') AS status,
               v.metric, v.cv_score, v.test_score, v.baseline_test_score, v.path
        FROM {MODEL_VERSIONS} v
        LEFT JOIN (SELECT version, bool_or(alias = '{CHAMPION}') AS champion,
                          bool_or(alias = '{CHALLENGER}') AS challenger
                   FROM {ALIASES} WHERE pipeline = $1 GROUP BY version) a USING (version)
        LEFT JOIN (SELECT champion_before AS version,
                          arg_max(CASE WHEN action LIKE '%rollback' THEN 'rolled back'
                                       ELSE 'previous champion' END, decided_at) AS status
                   FROM {DECISION_LOG} WHERE pipeline = $1 AND champion_before IS NOT NULL
                     AND champion_after IS DISTINCT FROM champion_before GROUP BY 1) r USING (version)
        LEFT JOIN (SELECT challenger AS version, arg_max(action, decided_at) AS action
                   FROM {DECISION_LOG} WHERE pipeline = $1 GROUP BY 1) d USING (version)
        WHERE v.pipeline = $1 ORDER BY v.created_at, v.version
        """,
        [pipeline],
    ).pl()


def latest_version(conn: duckdb.DuckDBPyConnection, pipeline: str) -> str:
    """The latest trained version; a baseline registered as it became the first champion is derived from
    a trained version (`derived_from` in its manifest), not trained itself, and is left out."""
    row = conn.execute(
        f"SELECT version FROM {MODEL_VERSIONS} WHERE pipeline = ? "
        "AND json_extract_string(manifest, '$.derived_from') IS NULL "
        "ORDER BY created_at DESC, version DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    if row is None:
        raise ArtifactError(
            f"pipeline '{pipeline}': no model version is registered yet; materialize its model"
        )
    return row[0]
