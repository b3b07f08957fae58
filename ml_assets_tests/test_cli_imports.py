"""The commands that read the registry, the ledger or one pipeline's files (`versions`, `landing`,
`validate <pipeline>`, `--help`) answer without importing the training and orchestration stack: checked
in a fresh interpreter by what is in sys.modules after each command, not by a timing (bench/cli.py
times them)."""

from __future__ import annotations

import json
import subprocess
import sys

from ml_assets_tests.test_cli import _env

HEAVY = ("dagster", "lightgbm", "sklearn", "evidently")

# Runs each command in this one interpreter and prints, per command, its exit code and the heavy
# packages imported so far.
_SCRIPT = """
import contextlib, io, json, sys
from ml_assets import cli
heavy = {heavy}
seen = {{}}
for args in {commands}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(args)
        except SystemExit as exc:  # argparse's --help
            code = exc.code
    seen[" ".join(args)] = {{"code": code, "imported": sorted(m for m in heavy if m in sys.modules)}}
# Not vacuous: the same check sees what `init`'s path imports.
import ml_assets.core.scaffold
seen["init"] = {{"code": 0, "imported": sorted(m for m in heavy if m in sys.modules)}}
print(json.dumps(seen))
"""

COMMANDS = [["--help"], ["versions", "shop"], ["landing"], ["validate", "shop"]]


def test_registry_and_ledger_commands_do_not_import_the_training_stack(tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (tmp_path / "shop.csv").write_text("x,label\n1,0\n2,1\n3,0\n4,1\n")
    (pipelines / "shop.yaml").write_text(
        "name: shop\ntask: binary\nsources: {shop: {path: ../shop.csv, columns: {x: {type: int}, "
        "label: {type: int}}}}\nbase: shop\ntarget: {name: label}\nfeatures: [{name: x, type: numeric}]\n"
        "split: {method: random}\n"
    )
    script = _SCRIPT.format(heavy=HEAVY, commands=COMMANDS)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(tmp_path / "data", pipelines),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen.pop("init")["imported"] == ["sklearn"]
    assert set(seen) == {" ".join(c) for c in COMMANDS}
    for command, found in seen.items():
        assert found["code"] == 0, (command, found)
        assert found["imported"] == [], f"`ml-assets {command}` imported {found['imported']}"
