"""The manifest as a typed model (registry.Manifest): read and validated in one place, the manifests on
disk from before the model (schema version 1, `manifest_schema1.json`: one the code wrote before this
change, its trials cut to one) still load field for field, and a manifest this code cannot read is
refused naming the file and the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ml_assets.core import registry, store
from ml_assets.core.errors import ArtifactError

SCHEMA1 = Path(__file__).with_name("manifest_schema1.json")


def written_before() -> dict:
    return json.loads(SCHEMA1.read_text())


def test_a_manifest_written_before_the_model_loads_with_every_field_as_written():
    raw = written_before()
    manifest = registry.parse_manifest(SCHEMA1.read_text(), SCHEMA1)
    assert "schema_version" not in raw and manifest.schema_version == 1
    dumped = manifest.model_dump(mode="json")
    assert {k: dumped[k] for k in raw} == raw
    # Typed all the way down: the tuning and the candidates are models, not dicts.
    assert manifest.cv.score == raw["cv"]["score"] and manifest.cv.trials == raw["cv"]["trials"]
    assert (
        manifest.candidates["linear"].decision_threshold == raw["candidates"]["linear"]["decision_threshold"]
    )


def test_a_version_written_now_carries_the_schema_version_and_registers_from_its_bytes(tmp_path):
    before = registry.parse_manifest(SCHEMA1.read_text(), SCHEMA1)
    # Built as the training step builds one: from its fields, this code's schema version by default.
    current = registry.Manifest.model_validate(before.model_dump(exclude={"schema_version"}))
    assert current.schema_version == registry.MANIFEST_SCHEMA_VERSION > before.schema_version
    folder = registry.write_version(
        tmp_path / "models", current.pipeline, current.version, {registry.MODEL_FILE: b"a model"}, current
    )
    read = registry.read_manifest(folder)
    assert read.schema_version == registry.MANIFEST_SCHEMA_VERSION
    assert read.files == {registry.MODEL_FILE: hashlib.sha256(b"a model").hexdigest()}
    assert read.model_copy(update={"files": before.files}) == current
    with store.connect(store.warehouse_path(tmp_path)) as conn:
        registry.register(conn, folder)
        found = registry.registered(conn, current.version, current.pipeline)
        (kept,) = conn.execute("SELECT manifest FROM registry.model_versions").fetchone()
    content = (folder / registry.MANIFEST_FILE).read_bytes()
    assert found.manifest_sha256 == hashlib.sha256(content).hexdigest()
    assert registry.parse_manifest(kept, "the registry's copy") == read


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"schema_version": registry.MANIFEST_SCHEMA_VERSION + 1}, "written by a newer ml_assets"),
        ({"features": None}, "field features"),
        ({"task": "ranking"}, "field task"),
        ({"cv": {"folds": 2}}, "field cv.score"),
    ],
    ids=["newer", "missing_field", "unknown_task", "nested_field"],
)
def test_a_manifest_this_code_cannot_read_is_refused_naming_file_and_field(tmp_path, change, says):
    raw = {k: v for k, v in (written_before() | change).items() if v is not None}
    path = tmp_path / registry.MANIFEST_FILE
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=says) as refused:
        registry.read_manifest(tmp_path, verify=False)
    assert str(path) in str(refused.value)


def test_a_manifest_that_is_not_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / registry.MANIFEST_FILE
    path.write_text("{ not json")
    with pytest.raises(ArtifactError, match="not a model manifest") as refused:
        registry.read_manifest(tmp_path, verify=False)
    assert str(path) in str(refused.value)
