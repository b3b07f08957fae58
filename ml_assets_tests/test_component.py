"""The Dagster Component and `dg` (issue 24): this repository is a dg project whose definitions are the
pipeline files; `dg scaffold defs ml_assets.MlPipelineComponent churn` in a new dg project writes a pipeline
that `dg check defs` accepts, `dg list defs` lists as the same definitions a pipeline file with those fields
gives, and `dg launch` materializes on the sample data it ships; a broken attribute is the one-line error
the same pipeline file gives.

Every `dg` command runs as a user runs it: a subprocess in the project's folder, with a DAGSTER_HOME whose
dagster.yaml turns telemetry off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ml_assets.core import registry
from ml_assets.core.errors import ConfigError
from ml_assets.core.spec.load import (
    PIPELINES_DIR_ENV,
    default_pipelines_dir,
    load_pipeline_attributes,
    load_project,
)
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse
from ml_assets.orchestration import deployments
from ml_assets.orchestration.build import build_definitions, project_definitions
from ml_assets_tests.helpers import ROOT

DG = Path(sys.executable).with_name("dg")
COMPONENT = "ml_assets.MlPipelineComponent"
# A new dg project like the one `create-dagster project` makes, laid out flat (no src/) so that dg imports
# it from its folder without an install: its definitions are whatever its defs folder holds.
PROJECT_FILES = {
    "pyproject.toml": """\
[project]
name = "churn_project"
version = "0.1.0"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "churn_project"
# What the package's entry point also registers once installed; named here so that an environment with
# an older install of ml_assets finds the component too.
registry_modules = ["ml_assets"]
""",
    "churn_project/__init__.py": "",
    "churn_project/defs/__init__.py": "",
    "churn_project/definitions.py": """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
""",
}


def dg_env(home: Path, data: Path) -> dict[str, str]:
    """The environment of a dg command: this checkout's package, its own data folder and Dagster home."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", DATA_DIR_ENV, PIPELINES_DIR_ENV)}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    env |= {
        "DAGSTER_HOME": str(home),
        DATA_DIR_ENV: str(data),
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # The environment dg runs in is the project's: no warning that another one is active.
        "VIRTUAL_ENV": sys.prefix,
    }
    return env


def run_dg(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DG), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def listed(cwd: Path, env: dict[str, str]) -> dict[str, set[str]]:
    """What `dg list defs --json` lists: asset keys, check names (`asset:check`), jobs, sensors, schedules."""
    proc = run_dg(cwd, env, "list", "defs", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return {
        "assets": {a["asset_key"] for a in out.get("assets", [])},
        "checks": {f"{c['asset_key']}:{c['name']}" for c in out.get("asset_checks", [])},
        **{kind: {d["name"] for d in out.get(kind, [])} for kind in ("jobs", "sensors", "schedules")},
    }


def expected(defs: dg.Definitions) -> dict[str, set[str]]:
    """The same, of definitions built in this process."""
    checked = [*(defs.assets or []), *(defs.asset_checks or [])]
    return {
        "assets": {key.to_user_string() for key in defs.resolve_all_asset_keys()},
        "checks": {f"{c.asset_key.to_user_string()}:{c.name}" for d in checked for c in d.check_specs},
        "jobs": {j.name for j in defs.jobs or []},
        "sensors": {s.name for s in defs.sensors or []},
        "schedules": {s.name for s in defs.schedules or []},
    }


def as_pipeline_file(defs_yaml: Path, folder: Path) -> Path:
    """The component's attributes as a pipeline file in `folder`, beside a copy of its data."""
    folder.mkdir(parents=True, exist_ok=True)
    for data in defs_yaml.parent.glob("*.csv"):
        shutil.copy(data, folder / data.name)
    attributes = yaml.safe_load(defs_yaml.read_text())["attributes"]
    path = folder / f"{attributes['name']}.yaml"
    path.write_text(yaml.safe_dump(attributes, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new dg project with one pipeline, written by `dg scaffold defs`; tests copy it before changing it."""
    project = tmp_path_factory.mktemp("churn_project")
    for name, text in PROJECT_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    work = tmp_path_factory.mktemp("scaffold")
    proc = run_dg(project, dg_env(work / "home", work / "data"), "scaffold", "defs", COMPONENT, "churn")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return project


def test_the_repository_is_a_dg_project_of_its_pipeline_files(tmp_path):
    env = dg_env(tmp_path / "home", tmp_path / "data")
    check = run_dg(ROOT, env, "check", "defs")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully." in check.stdout
    shown = listed(ROOT, env)
    assert shown == expected(build_definitions(default_pipelines_dir(), tmp_path / "data"))
    assert {"flight_delay/model", "raw/flights_raw"} <= shown["assets"]
    assert {"landing_zone", "flight_delay_retrain"} <= shown["sensors"]


def test_a_scaffolded_pipeline_is_checked_listed_and_materialized(scaffolded, tmp_path):
    defs_yaml = scaffolded / "churn_project" / "defs" / "churn" / "defs.yaml"
    assert yaml.safe_load(defs_yaml.read_text())["type"] == COMPONENT
    env = dg_env(tmp_path / "home", tmp_path / "data")
    check = run_dg(scaffolded, env, "check", "defs")
    assert check.returncode == 0, check.stdout + check.stderr

    shown = listed(scaffolded, env)
    as_file = as_pipeline_file(defs_yaml, tmp_path / "pipelines")
    # A component is its pipeline's definitions; the job over every asset belongs to the code location.
    local = deployments.local(tmp_path / "unused")
    assert shown == expected(project_definitions(load_project(as_file.parent), local, local.resources()))
    assert {"churn/model", "churn/champion", "validated/customers_validated"} <= shown["assets"]
    assert {"churn_job", "churn_retrain_job"} <= shown["jobs"]
    assert "churn_retrain" in shown["sensors"] and "churn_daily_drift" in shown["schedules"]

    launch = run_dg(scaffolded, env, "launch", "--job", "churn_job")
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    with connect(warehouse(tmp_path / "data")) as conn:
        assert registry.alias_version(conn, "churn", registry.CHAMPION) is not None


# (line of the scaffolded defs.yaml, what breaks it): a field the schema refuses, a column no source has.
BROKEN = {
    "unknown field": ("  leakage: []", "  leakge: []"),
    "missing column": (
        "{name: support_calls, type: numeric}",
        "{name: support_calls, type: numeric, column: support_call}",
    ),
}


def broken_project(scaffolded: Path, tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    """A copy of the scaffolded project with one defect: (project, its defs.yaml, the one line that
    `ml-assets validate` reports for the same fields in a pipeline file, naming defs.yaml instead)."""
    project = shutil.copytree(scaffolded, tmp_path / "project")
    defs_yaml = project / "churn_project" / "defs" / "churn" / "defs.yaml"
    line, broken = BROKEN[kind]
    assert line in defs_yaml.read_text()
    defs_yaml.write_text(defs_yaml.read_text().replace(line, broken))
    as_file = as_pipeline_file(defs_yaml, tmp_path / "pipelines")
    with pytest.raises(ConfigError) as today:
        load_project(as_file.parent)
    one_line = str(today.value).replace(str(as_file), str(defs_yaml))
    assert "\n" not in one_line and one_line.startswith(f"{defs_yaml}: ")
    return project, defs_yaml, one_line


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_attribute_is_the_error_of_a_pipeline_file(scaffolded, tmp_path, kind):
    _, defs_yaml, one_line = broken_project(scaffolded, tmp_path, kind)
    with pytest.raises(ConfigError) as component:
        load_pipeline_attributes(yaml.safe_load(defs_yaml.read_text())["attributes"], defs_yaml)
    assert str(component.value) == one_line


def test_dg_check_defs_reports_a_broken_attribute_in_one_line(scaffolded, tmp_path):
    project, _, one_line = broken_project(scaffolded, tmp_path, "missing column")
    check = run_dg(project, dg_env(tmp_path / "home", tmp_path / "data"), "check", "defs")
    assert check.returncode == 1
    # Alone on its line in Dagster's report, after the exception's name.
    error = f"{ConfigError.__module__}.{ConfigError.__name__}: {one_line}"
    assert error in (check.stdout + check.stderr).splitlines(), check.stdout + check.stderr


def test_a_component_is_one_whole_pipeline(tmp_path):
    defs_yaml = tmp_path / "defs.yaml"
    with pytest.raises(ConfigError) as no_parent:
        load_pipeline_attributes({"extends": "flight_delay", "name": "late"}, defs_yaml)
    assert str(no_parent.value) == (
        f"{defs_yaml}: extends: a component holds one whole pipeline; copy the fields it should share"
    )
    with pytest.raises(ConfigError) as empty:
        load_pipeline_attributes(None, defs_yaml)
    assert str(empty.value) == f"{defs_yaml}: attributes: required (the fields of a pipeline file)"
