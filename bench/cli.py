"""How fast the CLI answers: the commands that read the registry, the ledger or one pipeline's files
against `python -c pass` (the interpreter's own start), measured in the same run.

    .venv/bin/python bench/cli.py [--repeat 5] [--with-stack]

Each command runs as a user runs it (`ml-assets ...`, a fresh process) on a small project in a temporary
folder; the commands are interleaved, so a change of load hits each alike. Prints each one's median
wall time, its excess over `python -c pass`, and a last line `cli_worst_s=<s> goal_s=1.5` (the slowest
command's median). `--with-stack` also times importing the Dagster definitions: what every command paid
before the CLI imported the training and orchestration stack lazily.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 1.5
BIN = Path(sys.executable).parent


def _project(folder: Path) -> dict[str, str]:
    """A pipeline file and its CSV; the environment pointing the CLI at them and an empty data folder."""
    (folder / "pipelines").mkdir()
    (folder / "shop.csv").write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(200)))
    (folder / "pipelines" / "shop.yaml").write_text(
        "name: shop\ntask: binary\nsources: {shop: {path: ../shop.csv, columns: {x: {type: int}, "
        "label: {type: int}}}}\nbase: shop\ntarget: {name: label}\nfeatures: [{name: x, type: numeric}]\n"
        "split: {method: random}\n"
    )
    drop = ("DAGSTER_HOME", "ML_ASSETS_DATA_DIR", "ML_ASSETS_PIPELINES_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {
        "ML_ASSETS_DATA_DIR": str(folder / "data"),
        "ML_ASSETS_PIPELINES_DIR": str(folder / "pipelines"),
    }


def _seconds(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--with-stack", action="store_true")
    args = parser.parse_args()
    cli = str(BIN / "ml-assets")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "ml-assets --help": [cli, "--help"],
        "ml-assets versions shop": [cli, "versions", "shop"],
        "ml-assets landing": [cli, "landing"],
        "ml-assets validate shop": [cli, "validate", "shop"],
    }
    if args.with_stack:
        commands["import the Dagster definitions"] = [
            sys.executable,
            "-c",
            "import ml_assets.orchestration.definitions",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        env = _project(Path(tmp))
        _seconds(commands["ml-assets versions shop"], env)  # creates the warehouse; warms the file cache
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, command in commands.items():
                times[name].append(_seconds(command, env))
    base = statistics.median(times["python -c pass"])
    print(f"median of {args.repeat}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"  {name:<34} {median:6.2f} s   +{median - base:5.2f} s over python   x{median / base:.1f}")
    worst = max(statistics.median(times[n]) for n in commands if n.startswith("ml-assets"))
    print(f"cli_worst_s={worst:.2f} goal_s={GOAL_S}")


if __name__ == "__main__":
    main()
