"""The pipeline-file reference and JSON Schema are generated from the pydantic models: they must equal
what the generator writes today, accept every shipped pipeline file, refuse what the loader refuses
field by field, and be what `ml-assets init` points editors at."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import polars as pl
import pytest
import yaml

from ml_assets.core.scaffold import scaffold
from ml_assets.core.spec.load import default_pipelines_dir
from ml_assets.core.spec.reference import SCHEMA_COMMENT, SCHEMA_FILE, file_schema, rendered


@pytest.mark.parametrize("path", sorted(rendered()), ids=lambda p: p.name)
def test_generated_file_is_up_to_date(path: Path):
    assert path.exists() and path.read_text() == rendered()[path], (
        f"{path} differs from the models in core/spec/schema.py: run python -m ml_assets.core.spec.reference"
    )


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_pipeline_files_validate_and_name_the_schema():
    files = sorted(default_pipelines_dir().glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        text = path.read_text()
        assert text.splitlines()[0] == f"{SCHEMA_COMMENT}{SCHEMA_FILE.name}", path
        errors = [e.message for e in validator().iter_errors(as_editor_sees(text))]
        assert errors == [], f"{path.name}: {errors}"


def as_editor_sees(text: str) -> dict:
    """YAML as a JSON-Schema validator sees it: dates stay strings."""
    return json.loads(json.dumps(yaml.safe_load(text), default=str))


def flagship() -> dict:
    return as_editor_sees((default_pipelines_dir() / "flight_delay.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda f: f["model"].update(metrc="roc_auc"), ["model"]),  # a typo'd key
        (lambda f: f["split"].update(method="sometimes"), ["split", "method"]),
        (lambda f: f["sources"]["flights"]["columns"]["dep_delay"].update(type="number"), ["type"]),
        (lambda f: f.update(serving={"max_batch": 0}), ["serving", "max_batch"]),
        (lambda f: f.pop("task"), []),  # required without extends
    ],
)
def test_schema_refuses_what_the_loader_refuses_and_says_where(change, where):
    broken = flagship()
    change(broken)
    error = jsonschema.exceptions.best_match(validator().iter_errors(broken))
    assert error is not None, "the schema accepted a broken file"
    assert list(error.absolute_path)[len(list(error.absolute_path)) - len(where) :] == where, (
        list(error.absolute_path),
        error.message,
    )


def test_a_file_that_extends_another_may_leave_out_what_its_parent_gives():
    child = {"extends": "flight_delay", "name": "child", "target": {"expr": "arr_delay > 30"}}
    assert list(validator().iter_errors(child)) == []
    assert "extends" in file_schema()["properties"]


def test_init_points_editors_at_the_installed_schema_and_its_file_validates(tmp_path, monkeypatch):
    rows = 60
    pl.DataFrame(
        {
            "x": [float(i) for i in range(rows)],
            "kind": ["a", "b", "c"] * (rows // 3),
            "y": [i % 2 for i in range(rows)],
        }
    ).write_csv(tmp_path / "data.csv")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine.yaml"
    text = scaffold("data.csv", "y", out)
    first = text.splitlines()[0]
    assert first.startswith(SCHEMA_COMMENT) and Path(first.removeprefix(SCHEMA_COMMENT)).is_file()
    assert list(validator().iter_errors(as_editor_sees(text))) == []
