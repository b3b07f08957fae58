"""Dagster overhead on the flagship pipeline: a full materialization of `flight_delay` (sources, checks,
modelling table, features, model, evaluation, promotion gate, champion monitor, drift report) through
Dagster, against a plain Python script calling the same functions in the same order, on the same data
with the same model settings, in one run.

Both sides run a fixed number of tuning trials (no time budget) so they do identical work; runs
alternate so machine noise hits both. Last line:
    e2e_ratio=<dagster time / plain time> dagster_s=<median> plain_s=<median>
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

from ml_assets.core import dataset, drift, history, history_guard, ingest, performance, rollback, validate
from ml_assets.core import promotion as gate
from ml_assets.core.evaluate import evaluate_version
from ml_assets.core.features import build_features
from ml_assets.core.serving import batch_scores, skew
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.core.train import train_and_register
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.partitions import all_partitions_tags

PIPELINE = "flight_delay"
SOURCE_CHECKS = (
    validate.check_schema,
    validate.check_unique_ids,
    validate.check_rules,
    validate.check_quarantine_share,
)


def pipelines_with(max_trials: int, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for path in default_pipelines_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        raw["model"] = raw.get("model", {}) | {"max_trials": max_trials, "time_budget_s": 1e9}
        for source in raw.get("sources", {}).values():
            # The whole recorded year, read from its origin instead of a landing zone: same partitions.
            replay = source.pop("replay", None)
            if source.pop("landing", False):
                source["path"] = replay["path"]
        (dest / path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def run_dagster(pipelines: Path, root: Path) -> None:
    defs = build_definitions(pipelines, root)
    job = defs.resolve_job_def(f"{PIPELINE}_job")
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        instance=dg.DagsterInstance.ephemeral(),
        tags=all_partitions_tags(load_project(pipelines)),
    )
    assert result.success


def up_to_features(pipelines: Path, root: Path, name: str) -> Path:
    """Pipeline `name`'s sources ingested and validated, its modelling table and features built, as the
    assets do (their blocking checks asserted); returns its transforms folder."""
    project = load_project(pipelines)
    pipeline = project.pipelines[name]
    with connect(warehouse_path(root)) as conn:
        for source, spec in project.sources_of(pipeline).items():
            files = ingest.resolve_files(source, spec, project.source_files[source].parent, root)
            window = (
                ingest.TimeWindow(
                    dt.datetime.combine(spec.partitions.start, dt.time()),
                    dt.datetime.combine(spec.partitions.end, dt.time()),
                )
                if spec.partitions
                else None
            )
            # The read batch is passed, not kept: it is freed once loaded, as the Dagster asset frees it.
            ingest.load_raw(conn, source, spec, *ingest.read_files(source, spec, files), window)
            validate.validate_source(conn, source, spec, ingest.window_condition(window) if window else None)
            assert validate.check_row_conservation(conn, source).passed
            for check in SOURCE_CHECKS:
                assert check(conn, source, spec).passed
        if pipeline.history is not None:
            history.build_history(conn, pipeline, project.sources_of(pipeline))
            assert history_guard.check_point_in_time(conn, pipeline, project.sources_of(pipeline)).passed
        dataset.build_modelling_table(conn, pipeline, project.sources_of(pipeline))
        assert dataset.check_target_not_null(conn, pipeline).passed
        assert dataset.check_splits_populated(conn, pipeline).passed
        transforms = root / "features" / name
        build_features(conn, pipeline, transforms)
    return transforms


def run_plain(pipelines: Path, root: Path) -> None:
    project = load_project(pipelines)
    pipeline = project.pipelines[PIPELINE]
    db = warehouse_path(root)
    transforms = up_to_features(pipelines, root, PIPELINE)
    warehouse = functools.partial(connect, db)
    version_dir, manifest = train_and_register(warehouse, pipeline, transforms, root / "models")
    evaluate_version(version_dir, root / "reports")
    gate.promote_or_refuse(warehouse, pipeline, manifest.version)
    # What the champion step settled is what every step after it judges, as on the Dagster side.
    champion = rollback.check_champion(warehouse, pipeline).champion_after
    # The skew check and the batch scores, as the Dagster side runs them since serving (issue 13).
    sources = project.sources_of(pipeline)
    post = skew.online_path(warehouse, pipeline, sources, pinned=champion)
    skew.compare_paths(warehouse, pipeline, sources, post, champion)
    performance.run_performance(warehouse, pipeline, champion)
    with connect(db) as conn:
        batch_scores.score_window(conn, pipeline, None, champion)
    drift.run_drift(warehouse, pipeline, champion, None, root / "reports")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-trials", type=int, default=3)
    args = parser.parse_args()
    timings: dict[str, list[float]] = {"dagster": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        pipelines = pipelines_with(args.max_trials, Path(tmp) / "pipelines")
        # One untimed warm-up of each side: imports, page cache, LightGBM's first-call set-up.
        for i in range(args.repeats + 1):
            for side, fn in (("dagster", run_dagster), ("plain", run_plain))[:: 1 if i % 2 else -1]:
                started = time.perf_counter()
                fn(pipelines, Path(tmp) / f"{side}-{i}")
                elapsed = time.perf_counter() - started
                if i:
                    timings[side].append(elapsed)
                print(f"run {i} {side}: {elapsed:.2f} s{'' if i else ' (warm-up)'}", file=sys.stderr)
    dagster_s, plain_s = statistics.median(timings["dagster"]), statistics.median(timings["plain"])
    print(f"e2e_ratio={dagster_s / plain_s:.3f} dagster_s={dagster_s:.2f} plain_s={plain_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
