"""Serving bundles: everything an API needs to serve a pipeline's champion, published as files on the
shared root, so that an API on another host never opens the warehouse.

    <bundle root>/<pipeline>/<bundle id>/   immutable once renamed into place
        bundle.json                         the manifest: version, contract, sha256 of every file below
        model/manifest.json                 the version's manifest, as registered
        model/model.txt | model/model.json  LightGBM's text model, or the linear/constant model's JSON
        model/transform.json                the fitted feature transform
        lookups/<source>.parquet            the validated tables the pipeline joins
        warm/<n>.parquet                    the base source's distinct inputs of each derived expression
    <bundle root>/<pipeline>/CURRENT        the id of the bundle that serves (replaced by a rename)

A bundle is written under a temporary name and renamed into place, then CURRENT is replaced by a
rename: a reader never sees half a bundle or half a pointer. `publish` is called where a champion is
settled (the champion step, a manual rollback) and writes a new bundle only when the champion, the
joined tables or the pipeline file's joins, derived columns and source columns changed. `load` verifies every file against the manifest and refuses, naming the file, a
bundle published for another pipeline file. No pickle: text, JSON and Parquet only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import lightgbm as lgb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from ml_assets.core import history, registry
from ml_assets.core.errors import ArtifactError
from ml_assets.core.features import FeatureTransform
from ml_assets.core.hashing import sha256_file
from ml_assets.core.serving.history_state import HistoryState
from ml_assets.core.serving.loader import ServableModel, load_predictor
from ml_assets.core.serving.lookups import Lookups, lookup_fingerprint, lookup_tables
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.sql import q
from ml_assets.core.store import DEPLOYMENT_ENV, Connect, data_root

# Where the API reads bundles (and the pipelines publish them) when it is not `<data root>/bundles`.
BUNDLES_ENV = "ML_ASSETS_BUNDLES"
BUNDLES_DIR = "bundles"
MANIFEST = "bundle.json"
POINTER = "CURRENT"
MODEL_DIR, LOOKUPS_DIR, WARM_DIR, HISTORY_DIR = "model", "lookups", "warm", "history"
SCHEMA_VERSION = 1
# Bundles kept per pipeline besides the current one: an API that read the pointer a moment ago still
# finds its bundle, and a rollback by hand has the recent ones at hand.
KEEP = 5


def bundle_root(data_root: Path) -> Path:
    """Where bundles are published: $ML_ASSETS_BUNDLES, else `<data root>/bundles`."""
    return Path(os.environ.get(BUNDLES_ENV) or Path(data_root) / BUNDLES_DIR).resolve()


def served_from() -> Path | None:
    """The bundle root the API serves from: $ML_ASSETS_BUNDLES, else the shared root's under the `cluster`
    deployment; None under `local` (the API reads the warehouse, as `make serve` always has)."""
    if os.environ.get(BUNDLES_ENV):
        return Path(os.environ[BUNDLES_ENV]).resolve()
    if os.environ.get(DEPLOYMENT_ENV, "").strip() == "cluster":
        return bundle_root(data_root())
    return None


class BundleManifest(BaseModel):
    """What a bundle holds and what it was published for (the feature contract)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int
    pipeline: str
    version: str
    published_at: str
    run_id: str | None
    # The contract: the request's fields, the model's features, and the sha256 of the SQL that completes
    # a request (joins, derived columns and the sources' columns and types, all in one text).
    request_fields: dict[str, dict[str, Any]]
    features: list[str]
    completion_sql_sha256: str
    # What the publisher's pipeline file said about completing a request: a bundle is published again
    # when it changes, even if the champion and the joined tables did not.
    spec_sha256: str
    lookup_fingerprint: list[list[Any]]
    files: dict[str, str]


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its id, its manifest, the model and the lookups, ready to serve."""

    id: str
    manifest: BundleManifest
    model: ServableModel
    lookups: Lookups


def pipeline_folder(root: Path, pipeline: str) -> Path:
    return Path(root) / pipeline


def current(root: Path, pipeline: str) -> str | None:
    """The id CURRENT names (None before the first bundle): a read of a few bytes, cheap to poll."""
    try:
        return (pipeline_folder(root, pipeline) / POINTER).read_text().strip() or None
    except FileNotFoundError:
        return None


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _contract(lookups: Lookups, model: ServableModel) -> dict[str, Any]:
    return {
        "request_fields": {n: {"type": s.type, "required": s.not_null} for n, s in lookups.fields.items()},
        "features": list(model.manifest.features),
        "completion_sql_sha256": _sha256_text(lookups.completion_sql),
    }


def _spec_sha256(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> str:
    read = [pipeline.base, *sorted({j.source for j in pipeline.joins})]
    spec = {
        "base": pipeline.base,
        "joins": [j.model_dump(mode="json") for j in pipeline.joins],
        "derived": pipeline.derived,
        "columns": {n: {c: v.model_dump(mode="json") for c, v in sources[n].columns.items()} for n in read},
    }
    return _sha256_text(json.dumps(spec, sort_keys=True, default=str))


def _json_fingerprint(fingerprint: tuple) -> list[list[Any]]:
    # Through JSON and back: what the manifest will hold, so that the comparison is of equal types.
    return json.loads(json.dumps([list(part) for part in fingerprint]))


def publish(
    connect: Connect,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    root: Path,
    run_id: str | None = None,
) -> str | None:
    """Publish the champion as it serves now (and point CURRENT at it); returns the bundle id, None when
    the pipeline has no champion. An unchanged champion over unchanged joined tables keeps its bundle."""
    folder = pipeline_folder(root, pipeline.name)
    with connect() as conn:
        version = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if version is None:
            return None
        found = registry.registered(conn, version, pipeline.name)
        fingerprint = _json_fingerprint(lookup_fingerprint(conn, pipeline))
        spec_sha256 = _spec_sha256(pipeline, sources)
        published = _current_manifest(root, pipeline.name)
        if published is not None and (
            published.version,
            published.lookup_fingerprint,
            published.spec_sha256,
        ) == (version, fingerprint, spec_sha256):
            return current(root, pipeline.name)
        tables = lookup_tables(conn, pipeline)
        events = _history_events(conn, pipeline)
        state = HistoryState.load(conn, pipeline) if pipeline.history is not None else None
        lookups = Lookups(pipeline, sources, tables, tuple(map(tuple, fingerprint)), state)
        warm = lookups.warm_inputs(conn)
    # Loaded as the registry checks it: a bundle is born from a version whose files are intact.
    model = ServableModel.from_registry(found)
    at = dt.datetime.now(dt.UTC)
    bundle_id = f"{at:%Y%m%dT%H%M%S%fZ}-{version}"
    registry.remove_orphans(folder)
    tmp = folder / f".tmp-{bundle_id}-{os.getpid()}"
    try:
        _write_files(tmp, found.path, model, tables, warm, events)
        manifest = BundleManifest(
            schema_version=SCHEMA_VERSION,
            pipeline=pipeline.name,
            version=version,
            published_at=at.isoformat(),
            run_id=run_id,
            spec_sha256=spec_sha256,
            lookup_fingerprint=fingerprint,
            files={
                p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
            },
            **_contract(lookups, model),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True))
        os.replace(tmp, folder / bundle_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point(root, pipeline.name, bundle_id)
    _prune(folder, bundle_id)
    return bundle_id


def _write_files(
    tmp: Path,
    version_dir: Path,
    model: ServableModel,
    tables: dict[str, Any],
    warm: list[pl.DataFrame],
    events: dict[str, pa.Table],
) -> None:
    for sub in (MODEL_DIR, LOOKUPS_DIR, WARM_DIR, HISTORY_DIR):
        (tmp / sub).mkdir(parents=True)
    model_file = registry.MODEL_FILE if model.kind == "lightgbm" else registry.MODEL_JSON_FILE
    for name in (registry.MANIFEST_FILE, registry.TRANSFORM_FILE, model_file):
        shutil.copyfile(version_dir / name, tmp / MODEL_DIR / name)
    for name, table in tables.items():
        pq.write_table(table, tmp / LOOKUPS_DIR / f"{name}.parquet")
    for i, frame in enumerate(warm):
        frame.write_parquet(tmp / WARM_DIR / f"{i}.parquet")
    for family, table in events.items():
        pq.write_table(table, tmp / HISTORY_DIR / f"{family}.parquet")


def _history_events(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> dict[str, pa.Table]:
    """The stored events of each history family (none without a history block): the online state is
    made from them, so a bundle carries them."""
    if pipeline.history is None:
        return {}
    return {
        f: conn.execute(f"SELECT * FROM {history.events_table(pipeline, f)}").fetch_arrow_table()
        for f in pipeline.history.families
    }


def _bundled_state(folder: Path, pipeline: PipelineSpec) -> HistoryState | None:
    """The history state from the bundle's events, by the state's own loader over an in-memory DuckDB."""
    if pipeline.history is None:
        return None
    with duckdb.connect(":memory:") as mem:
        mem.execute(f"CREATE SCHEMA {q(pipeline.name)}")
        for f in pipeline.history.families:
            path = str(folder / HISTORY_DIR / f"{f}.parquet")
            mem.execute(
                f"CREATE TABLE {history.events_table(pipeline, f)} AS SELECT * FROM read_parquet(?)", [path]
            )
        return HistoryState.load(mem, pipeline)


def point(root: Path, pipeline: str, bundle_id: str) -> None:
    """Point CURRENT at a published bundle, by a rename: a reader sees the old id or the new one."""
    folder = pipeline_folder(root, pipeline)
    if not (folder / bundle_id / MANIFEST).is_file():
        raise ArtifactError(f"{folder / bundle_id}: not a published bundle (no {MANIFEST})")
    tmp = folder / f".{POINTER}.{bundle_id}.{os.getpid()}.tmp"  # unique: publishers may race
    tmp.write_text(bundle_id + "\n")
    tmp.replace(folder / POINTER)


def _prune(folder: Path, keep: str) -> None:
    """Delete all but the newest KEEP bundles (ids sort by their publication time) and the current one."""
    bundles = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in bundles[:-KEEP]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _current_manifest(root: Path, pipeline: str) -> BundleManifest | None:
    bundle_id = current(root, pipeline)
    if bundle_id is None:
        return None
    try:
        return read_manifest(pipeline_folder(root, pipeline) / bundle_id)
    except ArtifactError:
        return None  # a broken bundle is replaced by the next publication


def read_manifest(folder: Path) -> BundleManifest:
    path = Path(folder) / MANIFEST
    try:
        return BundleManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: missing; not a complete bundle") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "(the file)"
        raise ArtifactError(f"{path}: not a bundle manifest ({where}: {first['msg']})") from exc


def _verify_files(folder: Path, manifest: BundleManifest) -> None:
    """Every file the manifest lists is there and unmodified, and no file is there that it does not list."""
    for name, expected in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing; the bundle is incomplete")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: sha256 {actual[:12]}… does not match the bundle manifest's {expected[:12]}…; "
                "the bundle was modified after publication and will not be loaded"
            )
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    unlisted = sorted(present - set(manifest.files))
    required = {f"{MODEL_DIR}/{registry.MANIFEST_FILE}", f"{MODEL_DIR}/{registry.TRANSFORM_FILE}"}
    if unlisted or not required <= set(manifest.files):
        name = unlisted[0] if unlisted else MANIFEST
        raise ArtifactError(f"{folder / name}: not in the bundle as published; the bundle was modified")


def load(root: Path, pipeline: PipelineSpec, sources: dict[str, SourceSpec], bundle_id: str) -> Bundle:
    """A published bundle, every file checked against its manifest's sha256 and the contract against
    the pipeline as this process configures it; ArtifactError naming the file otherwise."""
    folder = pipeline_folder(root, pipeline.name) / bundle_id
    manifest = read_manifest(folder)
    if manifest.pipeline != pipeline.name:
        raise ArtifactError(
            f"{folder / MANIFEST}: a bundle of pipeline '{manifest.pipeline}', not '{pipeline.name}'"
        )
    _verify_files(folder, manifest)
    model_dir = folder / MODEL_DIR
    try:
        version = registry.parse_manifest(
            (model_dir / registry.MANIFEST_FILE).read_bytes(), model_dir / registry.MANIFEST_FILE
        )
        transform = FeatureTransform.load(model_dir / registry.TRANSFORM_FILE)
        model = ServableModel(version, transform, load_predictor(model_dir, version))
        tables = {p.stem: pq.read_table(p) for p in sorted((folder / LOOKUPS_DIR).glob("*.parquet"))}
        state = _bundled_state(folder, pipeline)
        lookups = Lookups(pipeline, sources, tables, tuple(map(tuple, manifest.lookup_fingerprint)), state)
    except (OSError, ValueError, duckdb.Error, pa.ArrowException, lgb.basic.LightGBMError) as exc:
        raise ArtifactError(f"{folder}: the bundle does not load ({type(exc).__name__}: {exc})") from exc
    contract = _contract(lookups, model)
    published = {k: getattr(manifest, k) for k in contract}
    if published != contract:
        changed = sorted(k for k in contract if contract[k] != published[k])
        raise ArtifactError(
            f"{folder / MANIFEST}: published for another version of pipeline '{pipeline.name}' "
            f"({', '.join(changed)} differ from this process's pipeline file); serve the same pipeline files "
            "the pipelines run with"
        )
    lookups.warm([pl.read_parquet(p) for p in sorted((folder / WARM_DIR).glob("*.parquet"))])
    return Bundle(bundle_id, manifest, model, lookups)
