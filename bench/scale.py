"""The flagship pipeline at scale: generated data (bench/scalegen.py) of `--rows` flights run through the
full graph (ingest -> validate -> modelling table -> features -> model with a fixed small search and no
time budget -> evaluation -> gate -> monitors) by Dagster in process and by a plain script calling the
same core functions (bench/e2e.py's two runners), alternating, each side in its own subprocess so its
peak memory is its own: wall time is measured inside the subprocess (imports excluded), peak RSS of the
subprocess and everything it starts by sampling /proc from this process.

The overlay caps the training sample with the config option a user has (`model.max_train_rows`,
scalegen.MAX_TRAIN_ROWS = 2,000,000: a no-op at 1M rows, whose training split is ~0.9M, a cap at 10M);
the manifest records the rows used (`rows.train`) and available (`train_rows_available`), and the
transform is fitted on the same bounded number of training rows.

After the first full Dagster build of each size, one more local day (held back by the generator) lands
and the landing job refreshes what it touches (ingest, validate, modelling table, monitors, batch
scores), as the landing sensor would launch it; its time over the median full Dagster rebuild is the
incremental share.

One line per size: `rows=N dagster_s=.. plain_s=.. ratio=.. rss_gib=.. incremental_share=..`, then:
    scale_ratio_1m=… scale_ratio_10m=… rss_10m_gib=… growth_10m_over_1m=… incremental_share=…
(`nan` for what this invocation did not measure; rss is the larger side's peak, growth is the Dagster
side's 10M time over its 1M time; `--quick` runs 200k rows, reported in the per-size line only).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import e2e
import scalegen

from ml_assets.core import ingest
from ml_assets.core.serving.batch_scores import predictions_table
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import MODEL_VERSIONS, connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.jobs import LANDING_JOB
from ml_assets.orchestration.partitions import range_tags_for

QUICK_ROWS = 200_000
GIB = 1024**3
SIDES = {"dagster": e2e.run_dagster, "plain": e2e.run_plain}


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc); 0 once it is gone."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next(
            (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0
        )
    return total


def run_measured(command: list[str], interval_s: float = 0.2) -> tuple[dict[str, Any], int]:
    """Run a side's subprocess; (its JSON report, peak RSS of its process tree in bytes)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak[0]


def _link_landing(source: Path, root: Path) -> None:
    # Symlinks: both sides read the same bytes without a copy per run (a symlinked file is data).
    for folder in (source / "landing").iterdir():
        (root / "landing" / folder.name).mkdir(parents=True)
        for path in folder.iterdir():
            (root / "landing" / folder.name / path.name).symlink_to(path)


def outputs(root: Path) -> dict[str, Any]:
    """What both sides must agree on: the model inputs (modelling and feature tables, as row-order-free
    hashes) and outputs (the registered model's scores and row counts, the batch scores)."""
    project = load_project(root / "pipelines")
    pipeline = project.pipelines[scalegen.PIPELINE]
    with connect(warehouse_path(root)) as conn:

        def digest(table: str, drop: str = "") -> list[int]:
            columns = f"* EXCLUDE ({drop})" if drop else "*"
            return list(
                conn.execute(
                    f"SELECT count(*), bit_xor(hash(t)) FROM (SELECT {columns} FROM {table}) t"
                ).fetchone()
            )

        model = conn.execute(
            f"SELECT cv_score, test_score, manifest->>'rows' FROM {MODEL_VERSIONS} ORDER BY 1, 2"
        ).fetchall()
        return {
            "modelling_table": digest(f"{pipeline.name}.modelling_table"),
            "features": digest(f"{pipeline.name}.features"),
            "models": [list(m) for m in model],
            # Without when, by which version id (a timestamp) and in which run each side scored.
            "predictions": digest(predictions_table(pipeline), "scored_at, version, run_id"),
        }


def land_new_day(data: Path, root: Path) -> float:
    """Drop the held-back day into the landing zone and run what the landing sensor would launch."""
    pipelines = root / "pipelines"
    project = load_project(pipelines)
    records = []
    for path in sorted((data / "new_day").iterdir()):
        source = path.name.split("-")[0]
        target = root / "landing" / source / path.name
        shutil.copy(path, target)
        records += ingest.read_files(source, project.sources[source], [target])[1]
    first = min(r["first_partition"] for r in records)
    last = max(r["last_partition"] for r in records)
    started = time.perf_counter()
    defs = build_definitions(pipelines, root)
    result = defs.resolve_job_def(LANDING_JOB).execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        instance=dg.DagsterInstance.ephemeral(),
        tags=range_tags_for(project, first, last),
    )
    assert result.success
    return time.perf_counter() - started


def run_side(side: str, data: Path, root: Path, new_day: bool) -> dict[str, Any]:
    shutil.copytree(data / "pipelines", root / "pipelines")
    _link_landing(data, root)
    started = time.perf_counter()
    SIDES[side](root / "pipelines", root)
    report: dict[str, Any] = {"seconds": time.perf_counter() - started, "outputs": outputs(root)}
    if new_day:
        report["incremental_s"] = land_new_day(data, root)
    return report


def measure(rows: int, repeats: int, max_trials: int, tmp: Path) -> dict[str, Any]:
    data = tmp / f"data-{rows}"
    started = time.perf_counter()
    scalegen.write_landing(data, rows, hold_back_last_day=True)
    scalegen.write_pipelines(data / "pipelines", years=3, max_trials=max_trials)
    print(f"{rows} rows generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    runs: dict[str, list[tuple[dict[str, Any], int]]] = {"dagster": [], "plain": []}
    for i in range(repeats):
        for side in ("dagster", "plain")[:: 1 if i % 2 == 0 else -1]:
            root = tmp / f"{side}-{rows}-{i}"
            command = [sys.executable, __file__, "--side", side, "--data", str(data), "--root", str(root)]
            report, peak = run_measured(command + (["--new-day"] if side == "dagster" and i == 0 else []))
            runs[side].append((report, peak))
            shutil.rmtree(root)
            print(
                f"rows {rows} run {i} {side}: {report['seconds']:.1f} s, peak {peak / GIB:.2f} GiB",
                file=sys.stderr,
            )
    shutil.rmtree(data)
    for side, done in runs.items():
        for i, (report, _) in enumerate(done):
            if report["outputs"] != runs["dagster"][0][0]["outputs"]:
                print(f"outputs of {side} run {i} differ: {report['outputs']}", file=sys.stderr)
                print(f"dagster run 0 had: {runs['dagster'][0][0]['outputs']}", file=sys.stderr)
    seconds = {side: statistics.median(r["seconds"] for r, _ in done) for side, done in runs.items()}
    return {
        "rows": rows,
        "dagster_s": seconds["dagster"],
        "plain_s": seconds["plain"],
        "ratio": seconds["dagster"] / seconds["plain"],
        "rss_gib": max(peak for done in runs.values() for _, peak in done) / GIB,
        "incremental_share": runs["dagster"][0][0]["incremental_s"] / seconds["dagster"],
        "same_outputs": all(
            r["outputs"] == runs["dagster"][0][0]["outputs"] for done in runs.values() for r, _ in done
        ),
    }


def final_line(results: dict[int, dict[str, Any]]) -> str:
    def field(rows: int, key: str) -> float:
        return results[rows][key] if rows in results else math.nan

    growth = field(10_000_000, "dagster_s") / field(1_000_000, "dagster_s")
    return (
        f"scale_ratio_1m={field(1_000_000, 'ratio'):.3f} scale_ratio_10m={field(10_000_000, 'ratio'):.3f} "
        f"rss_10m_gib={field(10_000_000, 'rss_gib'):.2f} growth_10m_over_1m={growth:.2f} "
        f"incremental_share={field(1_000_000, 'incremental_share'):.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, action="append", help="flights to generate (repeatable)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-trials", type=int, default=3)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--new-day", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.data, args.root, args.new_day)))
        return 0
    sizes = [QUICK_ROWS] if args.quick else args.rows or [1_000_000]
    repeats = 1 if args.quick else args.repeats
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for rows in sizes:
            result = measure(rows, repeats, args.max_trials, Path(tmp))
            results[rows] = result
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    print(final_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
