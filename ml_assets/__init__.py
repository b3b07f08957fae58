"""ml_assets: a Dagster-native ML platform."""

import os
from typing import Any

# Offline machines: Evidently must not try to send usage telemetry.
os.environ.setdefault("DO_NOT_TRACK", "1")

__version__ = "0.1.0"

# The Dagster Component, `type: ml_assets.MlPipelineComponent` in a dg project's defs.yaml (and what the
# `dagster_dg_cli.registry_modules` entry point lists). Imported on first use only: the CLI and the core
# stay free of Dagster until they need it.
_LAZY = {"MlPipelineComponent": "ml_assets.orchestration.component"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ml_assets' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
