"""The hand-written random search against Optuna (TPE, median pruning on CV folds) under the same time
budget, on the same folds and metric (`core.tuning.tune` with `method` random or optuna).

    .venv/bin/python -m bench.tuning [--budget 60] [--flagship-budget 120] [--repeats 2] [--max-trials N]
        [--datasets flight_delay imbalanced wide_categorical] [--keep DIR]

(Run from the repository's root as a module: it reuses bench/e2e.py's and bench/own_data.py's set-up.)

Datasets: the flagship `flight_delay` on the whole recorded year (its training split, test = the last 92
days; sources read from their origin as bench/e2e.py does) and `ml-assets init` pipelines on datasets of
bench/own_data.py (default: `imbalanced`, binary with 3% positives; `wide_categorical`, regression on
twelve text columns), written unedited by `init`. Each is ingested up to its features once.

Per dataset and repeat (seed = the pipeline's seed + repeat), each method searches within the same budget
and trial cap (default: the pipeline's own `model.max_trials`, as a run applies it, which also sets
Optuna's warm-up; `--max-trials 0`: no cap, the budget alone ends each search); the two alternate which
goes first, so the load of a shared machine hits both. The best parameters are then refitted on the
whole training split (early stopping on validation, as the model step does) and scored on the test
split. One line per search, then per dataset the mean test metric of each and a verdict: a win needs a
mean lead larger than the noise (the larger of the two methods' standard deviations over the repeats,
and 0.1% of the metric), else a tie. Last line: `optuna_wins_or_ties=k/n`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.e2e import pipelines_with, up_to_features
from bench.own_data import SOURCES, WRITTEN, cli
from ml_assets.core import metrics
from ml_assets.core.features import transform_of
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, default_pipelines_dir, load_project
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path
from ml_assets.core.train import features_for_training, fit_final, training_data
from ml_assets.core.tuning import TrainingData, tune

FLAGSHIP = "flight_delay"
METHODS = ("random", "optuna")
# `--max-trials 0`: no trial cap, the budget alone ends each search.
UNCAPPED = 100_000


def prepared(work: Path, name: str) -> tuple[PipelineSpec, TrainingData]:
    """Pipeline `name` and its training data, built from its sources in `work`."""
    root, pipelines = work / name / "data", work / name / "pipelines"
    if name == FLAGSHIP:
        pipelines_with(UNCAPPED, pipelines)
    else:
        if name in WRITTEN:
            WRITTEN[name]().to_csv(work / f"{name}.csv", index=False)
        source, target = SOURCES[name]
        env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
        env |= {DATA_DIR_ENV: str(root), PIPELINES_DIR_ENV: str(pipelines)}
        out = str(pipelines / f"{name}.yaml")
        cli("init", source.format(dir=work), "--target", target, "--out", out, env=env)
    transforms = up_to_features(pipelines, root, name)
    pipeline = load_project(pipelines).pipelines[name]
    if name == FLAGSHIP:
        # pipelines_with replaced its trial cap: the shipped file's is the one a run applies.
        shipped = load_project(default_pipelines_dir()).pipelines[name].model.max_trials
        pipeline = pipeline.model_copy(
            update={"model": pipeline.model.model_copy(update={"max_trials": shipped})}
        )
    with connect(warehouse_path(root)) as conn:
        frame, _ = features_for_training(conn, pipeline)
    frame = frame.sort(["_ts", "_key"])
    transform, _ = transform_of(frame, transforms)
    return pipeline, training_data(pipeline, frame, transform)


def one_search(pipeline: PipelineSpec, data: TrainingData, method: str, budget: float, cap: int) -> dict:
    tuning = tune(pipeline, data, budget, cap, method=method)
    booster, _, _ = fit_final(pipeline, data, tuning.best_params)
    pred = booster.predict(data.test.X, num_iteration=booster.best_iteration)
    return {
        "test": metrics.score(pipeline.task, pipeline.metric, data.test.y, pred),
        "cv": tuning.best_cv_score,
        "trials": len(tuning.trials),
        "complete": sum(t["cv_score"] is not None for t in tuning.trials),
        "pruned": sum(t["pruned"] for t in tuning.trials),
        "search_s": tuning.elapsed_s,
    }


def verdict(pipeline: PipelineSpec, runs: dict[str, list[dict]]) -> tuple[str, bool]:
    """'optuna'/'random' wins, or 'tie'; and whether Optuna won or tied."""
    tests = {m: [r["test"] for r in runs[m]] for m in METHODS}
    means = {m: statistics.mean(v) for m, v in tests.items()}
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in tests.values())
    noise = max(spread, 0.001 * abs(means["random"]))
    lead = (means["optuna"] - means["random"]) * (1 if pipeline.greater_is_better else -1)
    winner = "optuna" if lead > noise else "random" if -lead > noise else "tie"
    line = (
        f"{pipeline.name}: {pipeline.metric} random={means['random']:.4f} optuna={means['optuna']:.4f} "
        f"lead_optuna={lead:+.4f} noise={noise:.4f} verdict={winner}"
    )
    return line, winner != "random"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per search, init datasets")
    parser.add_argument("--flagship-budget", type=float, default=120.0, help="seconds per search, flagship")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--max-trials",
        type=int,
        help="trial cap per search (default: the pipeline's own model.max_trials; 0: none, the budget alone)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=[FLAGSHIP, "imbalanced", "wide_categorical"],
        choices=[FLAGSHIP, *SOURCES],
    )
    parser.add_argument("--keep", type=Path, help="work here (kept) instead of a temporary directory")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    work.mkdir(parents=True, exist_ok=True)
    verdicts = []
    for name in args.datasets:
        pipeline, data = prepared(work, name)
        budget = args.flagship_budget if name == FLAGSHIP else args.budget
        cap = pipeline.model.max_trials if args.max_trials is None else args.max_trials or UNCAPPED
        print(
            f"{name}: train={len(data.train.y)} valid={len(data.valid.y)} test={len(data.test.y)} "
            f"budget_s={budget:.0f} max_trials={cap}",
            flush=True,
        )
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for repeat in range(args.repeats):
            seeded = pipeline.model_copy(
                update={"model": pipeline.model.model_copy(update={"seed": pipeline.model.seed + repeat})}
            )
            for method in METHODS[:: 1 if repeat % 2 == 0 else -1]:
                run = one_search(seeded, data, method, budget, cap)
                runs[method].append(run)
                print(
                    f"  repeat {repeat} {method}: test_{pipeline.metric}={run['test']:.4f} "
                    f"cv={run['cv'] if run['cv'] is None else round(run['cv'], 4)} trials={run['trials']} "
                    f"complete={run['complete']} pruned={run['pruned']} search_s={run['search_s']:.0f}",
                    flush=True,
                )
        line, optuna_ok = verdict(pipeline, runs)
        verdicts.append(optuna_ok)
        print(line, flush=True)
    print(f"optuna_wins_or_ties={sum(verdicts)}/{len(verdicts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
