"""Running the `ml-assets` command line as a subprocess, exactly as a user runs it (test_cli, test_init_cli):
independent commands start at once, since each pays for importing the whole stack."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ml_assets.core.spec.load import PIPELINES_DIR_ENV
from ml_assets.core.store import DATA_DIR_ENV

TIMEOUT_S = 600


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"ml-assets {' '.join(self.args)} -> {self.returncode}\n{self.stdout}\n{self.stderr}"


def cli_env(root: Path, pipelines: Path) -> dict[str, str]:
    """The test's environment with the data and pipeline dirs set; no DAGSTER_HOME: an ephemeral instance."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", DATA_DIR_ENV, PIPELINES_DIR_ENV)}
    return env | {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}


def _start(args: tuple[str, ...], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ml_assets.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


Started = dict[str, tuple[tuple[str, ...], subprocess.Popen]]


def start_all(calls: dict[str, tuple[tuple[str, ...], dict[str, str]]]) -> Started:
    """Start independent commands at once: {label: (args, env)}."""
    return {label: (args, _start(args, env)) for label, (args, env) in calls.items()}


def finish_all(started: Started) -> dict[str, Result]:
    """Wait for started commands: {label: result}; on a timeout, none is left running."""
    try:
        results = {}
        for label, (args, proc) in started.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results[label] = Result(args, proc.returncode, out, err)
        return results
    finally:
        stop_all(started)


def stop_all(started: Started) -> None:
    for _, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def cli_concurrently(calls: dict[str, tuple[tuple[str, ...], dict[str, str]]]) -> dict[str, Result]:
    return finish_all(start_all(calls))


def cli(*args: str, env: dict[str, str]) -> Result:
    return cli_concurrently({"only": (args, env)})["only"]


def one_error_line(result: Result, command: str) -> str:
    """A user error: exit 2, exactly one stderr line `ml-assets <command>: ...`, no traceback."""
    assert result.returncode == 2, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith(f"ml-assets {command}: "), str(result)
    return lines[0]
