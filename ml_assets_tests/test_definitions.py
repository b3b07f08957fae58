"""The code location as Dagster's own CLI loads it (what `dagster dev` does via workspace.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ml_assets.core.spec.load import PIPELINES_DIR_ENV, default_pipelines_dir

ROOT = Path(__file__).resolve().parents[1]


def _validate(pipelines_dir: Path | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != PIPELINES_DIR_ENV}
    tmp_path.mkdir(parents=True, exist_ok=True)
    env["DAGSTER_HOME"] = str(tmp_path)
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    if pipelines_dir is not None:
        env[PIPELINES_DIR_ENV] = str(pipelines_dir)
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_shipped_definitions_validate(tmp_path):
    result = _validate(None, tmp_path)
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
    result = _validate(pipelines, tmp_path / "home")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "flight_delay.yaml: model.metric: expected one of" in output and "'rmse'" in output
