"""Integrity of registered versions: the registry guards each manifest (which guards the artifacts), and a
pipeline never loads, judges, monitors or serves another pipeline's model, nor rolls back onto a version
of another task or one reading columns its modelling table no longer has.

One real flight_delay model on the sample data; the other versions are registered copies of its files
with a changed manifest (another pipeline, another task, an unknown input column), as versions trained
under other settings would be. Every test that modifies a file restores it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from ml_assets.core import promotion as gate
from ml_assets.core import registry, rollback
from ml_assets.core.errors import ArtifactError
from ml_assets.core.evaluate import evaluate_version
from ml_assets.core.hashing import sha256_file
from ml_assets.core.serving.loader import ServableModel, reproduces_training_predictions
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, load_project
from ml_assets.core.store import DATA_DIR_ENV, LATEST, MIGRATIONS, connect, schema_version, warehouse_path
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, write_pipelines
from ml_assets_tests.helpers import FLAGSHIP, FLAGSHIP_MODEL, gate_chooses_champion

DELAY = "flight_delay"
TIMEOUT_S = 600
TAMPERED_THRESHOLD = 0.01


@dataclass(frozen=True)
class Trained:
    pipelines: Path
    root: Path
    project: Project
    first: str  # the trained model: champion
    second: str  # a copy: the previous champion, and the challenger
    foreign: str  # a copy registered under flight_arr_delay
    regression: str  # a copy whose manifest says it was trained for a regression task
    unknown_column: str  # a copy reading a column the modelling table does not have

    @property
    def spec(self) -> PipelineSpec:
        return self.project.pipelines[DELAY]

    def connect(self):
        return connect(warehouse_path(self.root))

    def found(self, version: str, pipeline: str = DELAY) -> registry.Registered:
        with self.connect() as conn:
            return registry.registered(conn, version, pipeline)

    def state(self) -> tuple[str | None, pl.DataFrame]:
        with self.connect() as conn:
            return registry.alias_version(conn, DELAY, registry.CHAMPION), registry.decisions(conn, DELAY)

    def rollback(self, to: str | None = None) -> gate.Decision:
        return rollback.rollback(self.connect, self.spec, self.project.sources_of(self.spec), to)


def _register_copy(trained_dir: Path, connect_to, pipeline: str, **changes) -> str:
    """Register the files of a real version as a new version of `pipeline`, its manifest changed first."""
    manifest = registry.read_manifest(trained_dir)
    version = registry.new_version_id()
    folder = registry.write_version(
        trained_dir.parent.parent,
        pipeline,
        version,
        {name: trained_dir / name for name in manifest.files},
        manifest.model_copy(update=changes | {"version": version, "pipeline": pipeline}),
    )
    with connect_to() as conn:
        registry.register(conn, folder)
    return version


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_sources: Path) -> Trained:
    base = tmp_path_factory.mktemp("integrity")
    pipelines = write_pipelines(base / "pipelines", sample_sources, FAST_MODEL)
    root = base / "data"
    assert materialize_all(pipelines, root, selection=FLAGSHIP_MODEL).success
    # The gate makes the trained model champion (over the constant baseline: a known outcome).
    first = gate_chooses_champion(pipelines, root).champion
    db = functools.partial(connect, warehouse_path(root))
    with db() as conn:
        source = registry.version_dir(conn, first, DELAY)
    copies = {
        "foreign": _register_copy(source, db, "flight_arr_delay"),
        "regression": _register_copy(source, db, DELAY, task="regression"),
        "unknown_column": _register_copy(
            source, db, DELAY, input_columns=[*registry.read_manifest(source).input_columns, "runway"]
        ),
        "second": _register_copy(source, db, DELAY),
    }
    result = Trained(pipelines, root, load_project(pipelines), first, **copies)
    # `first` serves and `second` served before it: the operator rolled back to the copy and back again.
    result.rollback(to=result.second)
    result.rollback(to=first)
    assert result.state()[0] == first
    # The rest of the flagship's assets, the gate's step aside (it has judged): the champion step settles
    # `first` (it keeps it: `second` is a copy of it), so the monitors materialized alone below judge `first`.
    rest = FLAGSHIP - FLAGSHIP_MODEL - dg.AssetSelection.assets(*_asset_keys("promotion"))
    assert materialize_all(pipelines, root, selection=rest).success
    assert result.state()[0] == first
    with db() as conn:
        assert registry.alias_version(conn, DELAY, registry.CHALLENGER) == result.second
        assert registry.previous_champion(conn, DELAY) == result.second
    return result


@contextmanager
def tampered_manifest(folder: Path) -> Iterator[Path]:
    """The folder's manifest with another decision threshold and the artifact hashes untouched (so they
    all still match); restored afterwards."""
    path = folder / registry.MANIFEST_FILE
    original = path.read_bytes()
    manifest = json.loads(original) | {"decision_threshold": TAMPERED_THRESHOLD}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    try:
        yield path
    finally:
        path.write_bytes(original)


def _refusal(path: Path, registered_sha256: str) -> str:
    """What a refusal of the modified manifest at `path` says: the file, both hash prefixes, the verdict."""
    return (
        f"{path}: sha256 {sha256_file(path)[:12]}… does not match the registry's {registered_sha256[:12]}…; "
        "the file was modified after training and will not be loaded"
    )


def test_registration_records_the_sha256_of_the_manifest(trained):
    found = trained.found(trained.first)
    assert found.manifest_sha256 == sha256_file(found.path / registry.MANIFEST_FILE)
    assert (found.version, found.pipeline) == (trained.first, DELAY)


def test_a_modified_manifest_is_refused_by_every_registered_load(trained):
    found = trained.found(trained.second)
    with tampered_manifest(found.path) as path:
        refusal = _refusal(path, found.manifest_sha256)
        # The artifact hashes alone cannot see it: the manifest is what lists them.
        assert ServableModel.load(found.path).threshold == TAMPERED_THRESHOLD
        with pytest.raises(ArtifactError) as load:
            ServableModel.from_registry(found)
        with pytest.raises(ArtifactError) as manifest:
            registry.read_manifest(found.path, manifest_sha256=found.manifest_sha256)
        with pytest.raises(ArtifactError) as evaluation:
            evaluate_version(found.path, trained.root / "reports", found.manifest_sha256)
        fresh_ok, fresh = reproduces_training_predictions(found.path, found.manifest_sha256)
    assert str(load.value).startswith(refusal)
    assert str(manifest.value).startswith(refusal)
    assert str(evaluation.value).startswith(refusal)
    assert not fresh_ok and refusal in fresh

    # Restored, the same version loads everywhere.
    model = ServableModel.from_registry(found)
    assert model.threshold != TAMPERED_THRESHOLD
    assert (
        evaluate_version(found.path, trained.root / "reports", found.manifest_sha256).version == found.version
    )
    fresh_ok, fresh = reproduces_training_predictions(found.path, found.manifest_sha256)
    assert fresh_ok, fresh


def test_the_gate_refuses_a_modified_challenger_or_champion_and_leaves_the_champion(trained):
    before = trained.state()
    for modified in (trained.second, trained.first):  # the challenger, then the champion
        found = trained.found(modified)
        with tampered_manifest(found.path) as path:
            with pytest.raises(ArtifactError) as refused:
                gate.promote_or_refuse(trained.connect, trained.spec, trained.second)
            assert str(refused.value).startswith(_refusal(path, found.manifest_sha256))
        champion, log = trained.state()
        assert champion == before[0] and log.equals(before[1])


def test_the_gate_never_judges_another_pipelines_version(trained):
    before = trained.state()
    with pytest.raises(ArtifactError) as refused:
        gate.promote_or_refuse(trained.connect, trained.spec, trained.foreign)
    assert str(refused.value).startswith(
        f"model version '{trained.foreign}' belongs to pipeline 'flight_arr_delay', not '{DELAY}'"
    )
    champion, log = trained.state()
    assert champion == before[0] and log.equals(before[1])


def test_the_rollback_check_refuses_a_modified_champion_or_previous_champion(trained):
    before = trained.state()
    for modified in (trained.first, trained.second):  # the champion, then the previous champion
        found = trained.found(modified)
        with tampered_manifest(found.path) as path:
            with pytest.raises(ArtifactError) as refused:
                rollback.check_champion(trained.connect, trained.spec)
            assert str(refused.value).startswith(_refusal(path, found.manifest_sha256))
    # Intact, both load and compare: the same model twice, nothing to roll back.
    assert rollback.check_champion(trained.connect, trained.spec).action == "keep"
    champion, log = trained.state()
    assert champion == before[0] and log.equals(before[1])


def _step_failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {e.step_key: e.step_failure_data.error.message for e in result.all_events if e.is_step_failure}


def _asset_keys(*names: str) -> list[dg.AssetKey]:
    return [dg.AssetKey([DELAY, name]) for name in names]


def test_assets_fail_naming_a_modified_manifest_and_the_champion_stays(trained):
    before = trained.state()
    champion, challenger = trained.found(trained.first), trained.found(trained.second)
    # The champion's manifest: both monitors load it, and the gate judging the challenger against it.
    with tampered_manifest(champion.path) as path:
        result = materialize_all(
            trained.pipelines,
            trained.root,
            raise_on_error=False,
            selection=_asset_keys("performance", "drift_report", "promotion"),
        )
        refusal = _refusal(path, champion.manifest_sha256)
    failures = _step_failures(result)
    assert sorted(failures) == [f"{DELAY}__{name}" for name in ("drift_report", "performance", "promotion")]
    assert all(refusal in message for message in failures.values()), failures
    # The challenger's (also the previous champion's): evaluation judges it, the rollback check compares it.
    with tampered_manifest(challenger.path) as path:
        result = materialize_all(
            trained.pipelines,
            trained.root,
            raise_on_error=False,
            selection=_asset_keys("evaluation", "champion"),
        )
        refusal = _refusal(path, challenger.manifest_sha256)
    failures = _step_failures(result)
    assert sorted(failures) == [f"{DELAY}__champion", f"{DELAY}__evaluation"], failures
    assert all(refusal in message for message in failures.values()), failures
    champion_after, log = trained.state()
    assert champion_after == before[0] and log.equals(before[1])


def _cli_concurrently(
    trained: Trained, calls: dict[str, tuple[str, ...]]
) -> dict[str, subprocess.CompletedProcess]:
    """`python -m ml_assets.cli <args>` for each call at once, as a user runs it, on the trained data."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {DATA_DIR_ENV: str(trained.root), PIPELINES_DIR_ENV: str(trained.pipelines)}
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", "ml_assets.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, args in calls.items()
    }
    results = {}
    try:
        for label, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results[label] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ml-assets rollback: "), result
    return lines[0]


def test_rollback_cli_refuses_a_modified_a_foreign_and_another_tasks_version(trained):
    before = trained.state()
    second = trained.found(trained.second)
    with tampered_manifest(second.path) as path:
        results = _cli_concurrently(
            trained,
            {
                label: ("rollback", DELAY, "--to", version)
                for label, version in {
                    "modified": trained.second,
                    "foreign": trained.foreign,
                    "task": trained.regression,
                }.items()
            },
        )
        refusal = _refusal(path, second.manifest_sha256)
    assert _error_line(results["modified"]).startswith(f"ml-assets rollback: {refusal}")
    assert _error_line(results["foreign"]) == (
        f"ml-assets rollback: model version '{trained.foreign}' belongs to pipeline 'flight_arr_delay', not "
        f"'{DELAY}'; `ml-assets versions {DELAY}` lists its own versions"
    )
    task = _error_line(results["task"])
    assert f"will not roll back to {trained.regression}" in task
    assert "trained for task 'regression'" in task and "now has task 'binary'" in task
    champion, log = trained.state()
    assert champion == before[0] and log.equals(before[1])


def test_rollback_refuses_a_version_reading_columns_the_modelling_table_lacks(trained):
    before = trained.state()
    version = trained.unknown_column
    with pytest.raises(ArtifactError) as refused:
        trained.rollback(to=version)
    assert str(refused.value) == (
        f"pipeline '{DELAY}': will not roll back to {version}: version {version} reads columns ['runway'] that "
        f"the modelling table of pipeline '{DELAY}' no longer has; `ml-assets versions {DELAY}` lists its versions"
    )
    champion, log = trained.state()
    assert champion == before[0] and log.equals(before[1])


def test_the_rollback_check_never_falls_back_on_a_version_of_another_task(trained):
    """A champion before the pipeline changed task (here set by hand) is no fallback, whatever it scores."""
    with trained.connect() as conn:
        registry.record_decision(conn, DELAY, "rollback", "test: a champion of old", None, trained.regression)
        registry.record_decision(conn, DELAY, "rollback", "test: back", None, trained.first)
    try:
        decision = rollback.check_champion(trained.connect, trained.spec)
        assert (decision.action, decision.champion_after) == ("keep", trained.first)
        assert f"previous champion {trained.regression} cannot serve it now" in decision.reason
        assert "trained for task 'regression'" in decision.reason
        with pytest.raises(ArtifactError, match="trained for task 'regression'"):
            trained.rollback()  # the manual rollback to the previous champion refuses it too
        assert trained.state()[0] == trained.first
    finally:
        trained.rollback(to=trained.second)
        trained.rollback(to=trained.first)


def _old_registry(path: Path, row: dict) -> None:
    """A warehouse at the schema version before manifest hashes, holding `row` in registry.model_versions."""
    hashed_from = next(i for i, (_, ddl) in enumerate(MIGRATIONS) if "manifest_sha256" in ddl)
    conn = duckdb.connect(str(path))
    try:
        conn.execute("CREATE SCHEMA meta")
        conn.execute(
            "CREATE TABLE meta.schema_version (version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
        )
        for version, (description, ddl) in enumerate(MIGRATIONS[:hashed_from], start=1):
            conn.execute(ddl)
            conn.execute("INSERT INTO meta.schema_version VALUES (?, ?, now())", [version, description])
        assert (
            "manifest_sha256"
            not in conn.execute("SELECT * FROM registry.model_versions LIMIT 0").pl().columns
        )
        conn.execute(
            f"INSERT INTO registry.model_versions ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )
    finally:
        conn.close()


def test_a_version_registered_before_manifest_hashes_still_loads(trained, tmp_path):
    with trained.connect() as conn:
        row = (
            conn.execute(
                "SELECT * EXCLUDE (manifest_sha256) FROM registry.model_versions WHERE version = ?",
                [trained.first],
            )
            .pl()
            .row(0, named=True)
        )
    old = tmp_path / "old.duckdb"
    _old_registry(old, row)
    with connect(old) as conn:
        assert schema_version(conn) == LATEST
        found = registry.registered(conn, trained.first, DELAY)
    assert found.manifest_sha256 is None and found.path == trained.found(trained.first).path
    assert ServableModel.from_registry(found).manifest.version == trained.first
    # Its artifacts are still checked against its manifest, as before manifests were hashed.
    model_file = found.path / registry.MODEL_FILE
    original = model_file.read_bytes()
    model_file.write_bytes(original + b"\n# edited after training\n")
    try:
        with pytest.raises(
            ArtifactError, match=f"{re.escape(str(model_file))}: sha256 .* does not match the manifest's"
        ):
            ServableModel.from_registry(found)
    finally:
        model_file.write_bytes(original)
