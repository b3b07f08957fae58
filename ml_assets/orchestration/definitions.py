"""The code location: every pipeline file of the pipelines directory turned into assets, checks, jobs,
sensors and schedules, with resources.

`dagster dev` (via workspace.yaml) and `dagster definitions validate` load `defs` from here. Paths come
from the environment: ML_ASSETS_DATA_DIR (default ./data) and ML_ASSETS_PIPELINES_DIR (default: the
pipelines shipped in the package).
"""

from __future__ import annotations

from ml_assets.core.spec.load import pipelines_dir
from ml_assets.core.store import data_dir
from ml_assets.orchestration.build import build_definitions, resources

__all__ = ["build_definitions", "defs", "resources"]

defs = build_definitions(pipelines_dir(), data_dir())
