"""The history feature set's worth on the flagship pipelines: test ROC-AUC (flight_delay) and RMSE
(flight_arr_delay) of the same model trained with and without it, on the whole of 2013 (test = the last
92 days), and without each feature family in turn (`--families`). Same data, split, settings and tuning
trials on every side (a fixed number of trials, no time budget), in one run.

    .venv/bin/python bench/history_ablation.py [--trials 4] [--families]
Last line: history_auc_gain=<with - without> history_rmse_drop=<1 - with / without>
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import sys
import tempfile
import time
from pathlib import Path

from ml_assets.core import dataset, history, ingest, validate
from ml_assets.core.features import build_features
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect
from ml_assets.core.train import train_and_register

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import pipelines_with  # noqa: E402


def land_year(project, root: Path) -> Path:
    db = root / "warehouse.duckdb"
    with connect(db) as conn:
        for name, spec in project.sources.items():
            files = ingest.resolve_files(name, spec, project.source_files[name].parent, root)
            window = (
                ingest.TimeWindow(
                    dt.datetime(2013, 1, 1), dt.datetime.combine(spec.partitions.end, dt.time())
                )
                if spec.partitions
                else None
            )
            ingest.load_raw(conn, name, spec, *ingest.read_files(name, spec, files), window)
            validate.validate_source(conn, name, spec, ingest.window_condition(window) if window else None)
    return db


def test_metric(db: Path, root: Path, pipeline, drop: set[str]) -> float:
    """The test metric of a model trained without the features named in `drop`."""
    kept = pipeline.model_copy(update={"features": [f for f in pipeline.features if f.name not in drop]})
    with connect(db) as conn:
        build_features(conn, kept, root / "features" / kept.name)
    _, manifest = train_and_register(
        functools.partial(connect, db), kept, root / "features" / kept.name, root / "models"
    )
    return manifest.test_metrics[kept.metric]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--families", action="store_true", help="also drop each family alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = load_project(pipelines_with(args.trials, root / "pipelines"))
        db = land_year(project, root)
        results = {}
        for name in ("flight_delay", "flight_arr_delay"):
            pipeline = project.pipelines[name]
            with connect(db) as conn:
                started = time.perf_counter()
                history.build_history(conn, pipeline, project.sources_of(pipeline))
                print(f"{name}: history built in {time.perf_counter() - started:.1f} s", flush=True)
                dataset.build_modelling_table(conn, pipeline, project.sources_of(pipeline))
            columns = set(pipeline.history.columns())
            sides = {"with": set(), "without": columns}
            if args.families:
                sides |= {
                    f"without {f}": {c for c in columns if c.startswith(f"{f}_")}
                    for f in pipeline.history.families
                }
            for side, drop in sides.items():
                metric = test_metric(db, root, pipeline, drop)
                results[(name, side)] = metric
                print(f"{name} {side}: test {pipeline.metric} = {metric:.4f}", flush=True)
    auc = results[("flight_delay", "with")] - results[("flight_delay", "without")]
    rmse = 1 - results[("flight_arr_delay", "with")] / results[("flight_arr_delay", "without")]
    print(f"history_auc_gain={auc:.4f} history_rmse_drop={rmse:.4f}")


if __name__ == "__main__":
    main()
