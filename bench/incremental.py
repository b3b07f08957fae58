"""What one new daily partition costs against a full rebuild, through Dagster on the real pipeline config.

Full rebuild: the pipeline's job (every source, checks, modelling table, features, model, evaluation,
gate, monitors, batch scores) over every partition before the new day, in a fresh data directory.
Incremental: then what a landed batch refreshes (`jobs.landing_selection`: the sources' tables, checks
and profiles, the modelling table, champion, performance, drift report, batch scores) over the new
day's partition only. Last line:
    incremental_share=<incremental / full> full_s=<s> incremental_s=<s> modelling_table_share=<step / step>

`measure_incremental_share(pipelines_dir, root)` is the same measurement for other data (bench/scale.py
calls it on its generated sources): the pipelines' sources must already hold the new day's rows (file
sources are read whole and cut to the run's partitions), and `root` must be an empty data directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

from ml_assets.core.spec.load import load_project
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.jobs import landing_selection
from ml_assets.orchestration.partitions import partition_range_tags, partitions_def

sys.path.insert(0, str(Path(__file__).parent))
from e2e import PIPELINE, pipelines_with  # noqa: E402


def _timed_run(job: dg.JobDefinition, tags: dict[str, str], **kwargs) -> tuple[float, dict[str, float]]:
    """Wall time of one in-process run, and each step's own time (by step key)."""
    started = time.perf_counter()
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        instance=dg.DagsterInstance.ephemeral(),
        tags=tags,
        **kwargs,
    )
    elapsed = time.perf_counter() - started
    assert result.success
    steps = {
        e.step_key: e.event_specific_data.duration_ms / 1000
        for e in result.all_events
        if e.event_type_value == "STEP_SUCCESS" and e.step_key
    }
    return elapsed, steps


def measure_incremental_share(
    pipelines_dir: Path, root: Path, pipeline: str = PIPELINE, new_day: str | None = None
) -> dict[str, float | str]:
    """Time a full rebuild up to the day before `new_day` (default: the time axis' last full day), then
    the landing refresh of `new_day` alone; returns both times, their ratio, and the same ratio for the
    modelling table step alone."""
    project = load_project(pipelines_dir)
    pdef = partitions_def(project.time_axis)
    keys = pdef.get_partition_keys()
    # The last partition of a UTC axis holds the few evening hours New York's last day spills into.
    new_day = new_day or keys[-2]
    before = keys[keys.index(new_day) - 1]
    defs = build_definitions(pipelines_dir, root)
    job = defs.resolve_job_def(f"{pipeline}_job")
    full_s, full_steps = _timed_run(job, partition_range_tags(keys[0], before))
    spec = project.pipelines[pipeline]
    partitioned = {name: [pipeline] for name, s in project.sources_of(spec).items() if s.partitions}
    incremental_s, steps = _timed_run(
        job, partition_range_tags(new_day, new_day), asset_selection=landing_selection(partitioned, project)
    )
    table_step = f"{pipeline}__modelling_table"
    slowest = sorted(steps.items(), key=lambda kv: -kv[1])[:8]
    print("one day's slowest steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in slowest), file=sys.stderr)
    return {
        "new_day": new_day,
        "full_s": full_s,
        "incremental_s": incremental_s,
        "incremental_share": incremental_s / full_s,
        "modelling_table_share": steps[table_step] / full_steps[table_step],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-day", help="partition key of the new day (default: the last full day)")
    parser.add_argument("--max-trials", type=int, default=3)
    args = parser.parse_args()
    if args.new_day:
        dt.date.fromisoformat(args.new_day)  # a readable error before minutes of work
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        pipelines = pipelines_with(args.max_trials, Path(tmp) / "pipelines")
        m = measure_incremental_share(pipelines, Path(tmp) / "data", new_day=args.new_day)
    print(
        f"new day {m['new_day']}: full rebuild {m['full_s']:.2f} s, one day {m['incremental_s']:.2f} s",
        file=sys.stderr,
    )
    print(
        f"incremental_share={m['incremental_share']:.3f} full_s={m['full_s']:.2f} "
        f"incremental_s={m['incremental_s']:.2f} modelling_table_share={m['modelling_table_share']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
