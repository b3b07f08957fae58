"""The suite's own rules: a test module imports shared helpers from conftest.py or a helpers module, never
from another test module (importing one re-runs its module-level set-up and ties the two together); and
Dagster's deprecation and beta warnings are errors."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import dagster as dg
import pytest

TESTS = Path(__file__).parent


def _imported_test_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [n for n in names if any(part.startswith("test_") for part in n.split(".")[1:2])]
    return found


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("*.py"))
    assert len([m for m in modules if m.name.startswith("test_")]) > 20
    offending = {m.name: hits for m in modules if (hits := _imported_test_modules(m))}
    assert not offending, offending


def test_the_finder_sees_both_import_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ml_assets_tests.test_a\nfrom ml_assets_tests.test_b import x\nfrom ml_assets_tests import test_c\n"
        "from ml_assets_tests.helpers import FLAGSHIP\n"
    )
    assert _imported_test_modules(probe) == [
        "ml_assets_tests.test_a",
        "ml_assets_tests.test_b",
        "ml_assets_tests.test_b.x",
        "ml_assets_tests.test_c",
    ]


def test_dagster_deprecations_and_beta_warnings_fail_the_test_that_triggers_them():
    """pyproject's filterwarnings: Dagster's deprecation text, beta and preview warnings are errors; other
    libraries' deprecations are not ours to fix and stay quiet."""
    with pytest.raises(DeprecationWarning, match="is deprecated and will be removed in"):
        warnings.warn("Foo is deprecated and will be removed in 2.0.", DeprecationWarning, stacklevel=1)
    with pytest.raises(dg.BetaWarning):
        warnings.warn("Parameter `x` of function `y` is currently in beta", dg.BetaWarning, stacklevel=1)
    with pytest.raises(dg.PreviewWarning):
        warnings.warn("`z` is currently in preview", dg.PreviewWarning, stacklevel=1)
    warnings.warn("numpy.core is deprecated and has been renamed", DeprecationWarning, stacklevel=1)
