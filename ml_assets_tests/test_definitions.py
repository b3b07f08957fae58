"""The code location as Dagster's own CLI loads it (what `dagster dev` does via workspace.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ml_assets.core.spec.load import default_pipelines_dir
from ml_assets_tests.helpers import validate_definitions

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_definitionsvalidate_definitions(tmp_path):
    result = validate_definitions(None, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_a_bad_pipeline_file_fails_validation_with_file_and_field(tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    for path in default_pipelines_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if raw["name"] == "flight_delay":
            raw["model"]["metric"] = "rmse"
        (pipelines / path.name).write_text(yaml.safe_dump(raw))
    result = validate_definitions(pipelines, tmp_path / "home")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "flight_delay.yaml: model.metric: expected one of" in output and "'rmse'" in output
