"""Training: LightGBM tuned by time-aware cross-validation within a time budget, and a linear baseline.

Within `time_budget_s`: the baselines (bounded), then LightGBM's own defaults fitted on the whole training
split with early stopping on the validation split (the model if nothing better fits the budget, so the
model is never worse than a plain LightGBM script for want of time), then a seeded search (random or
Optuna's TPE, `model.tuning.method`) whose trials (the defaults first) are scored by k-fold CV on the
training split, folded as the split itself was made (tuning.py), and a refit of the best parameters if
they are not the defaults, kept only when it also scores at least as well on the validation split, in
the metric and in every metric the gate guards.
The test split is touched once, for the final metrics and the ablation (the chosen parameters refitted
without each history feature family, ablation.py, within the same budget); the defaults fit is recorded
as a candidate (`lightgbm_defaults`) beside the model.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl

from ml_assets.core import ablation, registry
from ml_assets.core.dask_fit import DaskFit
from ml_assets.core.dataset import bounded_sample, capped_train_rows, table_name
from ml_assets.core.errors import DatasetError
from ml_assets.core.features import TARGET, FeatureTransform, features_table_name, transform_of
from ml_assets.core.hashing import frame_fingerprint
from ml_assets.core.linear import LinearModel
from ml_assets.core.metrics import all_metrics, choose_threshold, improvement, score
from ml_assets.core.progress import Progress, silent
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.sql import q
from ml_assets.core.store import Connect
from ml_assets.core.tuning import (
    Split,
    TrainingData,
    Tuning,
    base_params,
    fit_booster,
    predict,
    tune,
)

SAMPLE_ROWS = 2000
BASELINE_NAME = {True: "logistic regression", False: "ridge regression"}


def training_data(pipeline: PipelineSpec, frame: pl.DataFrame, transform: FeatureTransform) -> TrainingData:
    """Split the feature table into pandas frames for LightGBM / scikit-learn (their boundary)."""
    frame = frame.sort(["_ts", "_key"])
    classes = None
    target = frame.get_column(TARGET)
    if pipeline.task == "regression":
        y_all = target.cast(pl.Float64).to_numpy()
    else:
        classes = sorted(target.unique().drop_nulls().to_list())
        if pipeline.task == "binary" and len(classes) != 2:
            raise DatasetError(
                f"pipeline '{pipeline.name}': a binary target needs exactly 2 classes, got {classes}"
            )
        y_all = target.replace_strict({c: i for i, c in enumerate(classes)}, return_dtype=pl.Int32).to_numpy()
    features = transform.output_columns

    def part(name: str) -> Split:
        mask = (frame.get_column("_split") == name).to_numpy()
        X = frame.filter(pl.Series(mask)).select(features).to_pandas()
        keys, groups = (frame.get_column(c).to_numpy()[mask] for c in ("_key", "_group"))
        return Split(X, y_all[mask], keys, groups)

    train_ts = frame.filter(pl.col("_split") == "train").get_column("_ts")
    window = {"start": None, "end": None}
    if train_ts.null_count() < train_ts.len():
        window = {"start": str(train_ts.min()), "end": str(train_ts.max())}
    return TrainingData(
        part("train"), part("valid"), part("test"), features, transform.categorical_columns, classes, window
    )


# Rows of the validation and test splits timed to estimate what scoring them all with the trees so far
# costs (scoring is part of the model step, and on a busy machine 1000 trees took 17 s for 98k rows).
SCORING_SAMPLE_ROWS = 2000


def _finish_at(
    deadline: float, cut: list[int], scored: pd.DataFrame, scored_rows: int, threads: int
) -> Callable[[Any], None]:
    """Stop boosting when the deadline, less the estimated time to score `scored_rows` rows with the trees
    so far, has passed, keeping the rounds so far (the final fit must yield a model, scored within the
    budget). The estimate times `scored` (a sample of those rows) after rounds 1, 2, 4, 8, ..."""
    per_round = [0.0]

    def callback(env: Any) -> None:
        rounds = env.iteration + 1
        if len(scored) and rounds & (rounds - 1) == 0:
            began = time.monotonic()
            # With the fit's own thread count: a prediction sets OpenMP's for the whole process, and
            # LightGBM's default (every core) left the rest of this fit contending for the cores,
            # 3-4 times slower on a busy machine (bench/RESULTS.md).
            env.model.predict(scored, num_threads=threads)
            per_round[0] = (time.monotonic() - began) / rounds * scored_rows / len(scored)
        if time.monotonic() + per_round[0] * rounds > deadline:
            cut.append(rounds)
            raise lgb.callback.EarlyStopException(env.iteration, env.evaluation_result_list or [])

    callback.order = 40  # after early stopping's own bookkeeping
    return callback


# Most of the time budget the baselines may use (the linear solver stops there).
BASELINE_SHARE = 0.25


LOCAL_FIT = {"engine": "lightgbm"}


def fit_final(
    pipeline: PipelineSpec,
    data: TrainingData,
    params: dict[str, Any],
    deadline: float | None = None,
    on_dask: DaskFit | None = None,
) -> tuple[lgb.Booster, int | None, dict[str, Any]]:
    """The chosen parameters refitted on the whole training split; stopped so that scoring the validation
    and test splits ends by `deadline` (returns the round it was cut at, else None), and how it was fitted.
    On a Dask cluster (`on_dask`) when the split is large enough for it: never cut (dask_fit.py)."""
    if on_dask is not None and on_dask.applies(len(data.train.y)):
        booster, how = on_dask.fit(params, pipeline, data)
        return booster, None, how
    half = SCORING_SAMPLE_ROWS // 2
    scored = pd.concat([data.valid.X.head(half), data.test.X.head(half)], ignore_index=True)
    cut: list[int] = []
    booster = fit_booster(
        params,
        pipeline,
        (data.train.X, data.train.y),
        (data.valid.X, data.valid.y),
        data.categorical,
        _finish_at(deadline, cut, scored, len(data.valid.y) + len(data.test.y), params["num_threads"])
        if deadline is not None
        else None,
    )
    return booster, (cut[0] if cut else None), LOCAL_FIT


def decision_threshold(pipeline: PipelineSpec, y_valid: np.ndarray, p_valid: np.ndarray) -> float:
    """The binary decision threshold the pipeline's rule picks on validation (0.5 for other tasks)."""
    if pipeline.task != "binary":
        return 0.5
    rule = pipeline.model.decision_threshold
    return choose_threshold(
        y_valid,
        p_valid,
        rule.objective(pipeline.metric),
        rule.false_positive_cost,
        rule.false_negative_cost,
        rule.target_recall,
    )


@dataclass
class Candidate:
    """A simple model trained beside LightGBM: judged by the same gate, servable from its JSON."""

    model: LinearModel
    threshold: float
    test_metrics: dict[str, float]
    test_pred: np.ndarray
    cut_short: bool = False
    train_rows: int = 0


# Training rows the linear baseline is fitted on at most (a seeded sample beyond): its design matrix is
# dense, one column per category (~2 GB a million flights), where LightGBM bins its features.
LINEAR_MAX_ROWS = 1_000_000


def fit_candidates(
    pipeline: PipelineSpec, data: TrainingData, deadline: float | None = None
) -> dict[str, Candidate]:
    """The constant floor and the linear baseline, on the same features and split; the linear fit stops
    at `deadline` (a time.monotonic() instant) with the coefficients it has, recorded as cut short."""
    n_classes = len(data.classes) if data.classes else None
    X, y = data.train.X, data.train.y
    if len(y) > LINEAR_MAX_ROWS:
        rows = np.sort(
            np.random.default_rng(pipeline.model.seed).choice(len(y), LINEAR_MAX_ROWS, replace=False)
        )
        X, y = X.iloc[rows], y[rows]
    linear, linear_cut = LinearModel.fit_linear(
        pipeline.task, X, y, data.categorical, pipeline.model.seed, deadline
    )
    models = {
        "constant": (LinearModel.fit_constant(pipeline.task, data.train.y, n_classes), False),
        "linear": (linear, linear_cut),
    }
    out = {}
    for kind, (model, cut_short) in models.items():
        threshold = decision_threshold(pipeline, data.valid.y, model.predict(data.valid.X))
        test_pred = model.predict(data.test.X)
        metrics = all_metrics(pipeline.task, data.test.y, test_pred, threshold)
        used = len(y) if kind == "linear" else len(data.train.y)
        out[kind] = Candidate(model, threshold, metrics, test_pred, cut_short, used)
    return out


@dataclass
class TrainedModel:
    booster: lgb.Booster
    tuning: Tuning
    threshold: float
    test_metrics: dict[str, float]
    candidates: dict[str, Candidate]
    lightgbm_defaults: dict[str, Any]
    test_predictions: pl.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    final_fit_cut_at: int | None = None
    final_fit: dict[str, Any] = field(default_factory=lambda: LOCAL_FIT)
    elapsed_s: float = 0.0
    baselines_s: float = 0.0
    search_budget_s: float = 0.0
    ablation: dict[str, Any] | None = None

    @property
    def baseline_test_metrics(self) -> dict[str, float]:
        return self.candidates["linear"].test_metrics


@dataclass
class _Scored:
    """A LightGBM fit scored once on the validation and test splits at its own decision threshold."""

    booster: lgb.Booster
    test_pred: np.ndarray
    threshold: float
    valid_metrics: dict[str, float]  # the pipeline's metric and the gate's guarded metrics
    test_metrics: dict[str, float]

    @classmethod
    def of(cls, pipeline: PipelineSpec, data: TrainingData, booster: lgb.Booster) -> _Scored:
        rounds = booster.best_iteration or booster.current_iteration()
        valid_pred = predict(booster, data.valid.X, rounds)
        test_pred = predict(booster, data.test.X, rounds)
        threshold = decision_threshold(pipeline, data.valid.y, valid_pred)
        valid = {
            m: score(pipeline.task, m, data.valid.y, valid_pred, threshold)
            for m in (pipeline.metric, *pipeline.gate.guarded_metrics)
        }
        metrics = all_metrics(pipeline.task, data.test.y, test_pred, threshold)
        return cls(booster, test_pred, threshold, valid, metrics)

    @property
    def valid_score(self) -> float:
        return next(iter(self.valid_metrics.values()))

    def at_least_as_good_as(self, other: _Scored) -> bool:
        """At least as good on the validation split in the pipeline's metric and in every metric the gate
        guards: a refit that ranks better but is worse calibrated (log loss) than the defaults' fit is not
        kept, as the gate would refuse it against a baseline the defaults' fit beats."""
        return all(improvement(m, v, other.valid_metrics[m]) >= 0 for m, v in self.valid_metrics.items())

    def summary(self, chosen: bool) -> dict[str, Any]:
        """What the manifest records of LightGBM's defaults as a candidate beside the model."""
        return {
            "rounds": self.booster.best_iteration or self.booster.current_iteration(),
            "valid_score": self.valid_score,
            "decision_threshold": self.threshold,
            "test_metrics": self.test_metrics,
            "chosen": chosen,
        }


def _as_columns(task: str, pred: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    if task == "multiclass":
        return {f"{prefix}_p{i}": pred[:, i] for i in range(pred.shape[1])}
    return {prefix: pred}


def train_model(
    pipeline: PipelineSpec,
    data: TrainingData,
    time_budget_s: float,
    max_trials: int,
    progress: Progress = silent,
    on_dask: DaskFit | None = None,
) -> TrainedModel:
    for name in ("train", "valid", "test"):
        if len(getattr(data, name).y) == 0:
            raise DatasetError(
                f"pipeline '{pipeline.name}': the {name} split is empty; check the split settings"
            )
    started = time.monotonic()
    deadline = started + time_budget_s
    progress("fitting the linear and constant baselines")
    # The baselines come first, bounded, so the whole model step (they included) fits the budget.
    candidates = fit_candidates(pipeline, data, started + time_budget_s * BASELINE_SHARE)
    baselines_s = time.monotonic() - started
    # Then LightGBM's own defaults on the whole training split, stopped at the budget's end: on a machine
    # too busy for even one CV trial this is the model, trained as long as the budget allows, and no
    # search can leave the model worse than what a plain LightGBM script gets on the same split.
    defaults = base_params(pipeline, len(data.classes) if data.classes else None)
    progress(f"fitting LightGBM's defaults on {len(data.train.y)} training rows")
    fitting = time.monotonic()
    booster, cut_at, how = fit_final(pipeline, data, defaults, deadline, on_dask)
    fit_s = time.monotonic() - fitting
    defaults_fit = chosen = _Scored.of(pipeline, data, booster)
    # The search leaves time for more fits like that one: the refit of the parameters it picks, and the
    # ablation's refits without each history family (ablation.py).
    refits = 1 + ablation.fits(pipeline, data.features)
    search_budget_s = max(0.0, deadline - time.monotonic() - fit_s * refits)
    tuning = Tuning(defaults, None, method=pipeline.model.tuning.method)
    if search_budget_s > 0:
        progress(
            f"tuning ({pipeline.model.tuning.method}): up to {max_trials} trials of "
            f"{pipeline.model.cv_folds}-fold CV within "
            f"{search_budget_s:.0f} s of the {time_budget_s:.0f} s budget"
        )
        tuning = tune(pipeline, data, search_budget_s, max_trials, progress)
    params = defaults
    if tuning.best_params != defaults:
        progress(f"{len(tuning.trials)} trials in {tuning.elapsed_s:.0f} s; refitting the best parameters")
        refit, refit_cut, refit_how = fit_final(pipeline, data, tuning.best_params, deadline, on_dask)
        # A refit the deadline stopped is not the model its CV score promised, and one that scores worse
        # than the defaults on the validation split (in the metric or a guarded one) won on CV by chance:
        # the defaults' model stays.
        tuned = _Scored.of(pipeline, data, refit) if refit_cut is None else None
        if tuned and tuned.at_least_as_good_as(defaults_fit):
            chosen, cut_at, params, how = tuned, None, tuning.best_params, refit_how
    ablated = ablation.ablate(pipeline, data, params, chosen.test_metrics[pipeline.metric], deadline)
    predictions = pl.DataFrame(
        {
            "_key": data.test.key,
            "y_true": data.test.y,
            **_as_columns(pipeline.task, chosen.test_pred, "model"),
            **_as_columns(pipeline.task, candidates["linear"].test_pred, "baseline"),
            **_as_columns(pipeline.task, candidates["constant"].test_pred, "constant"),
        }
    )
    return TrainedModel(
        booster=chosen.booster,
        tuning=tuning,
        threshold=chosen.threshold,
        test_metrics=chosen.test_metrics,
        candidates=candidates,
        lightgbm_defaults=defaults_fit.summary(chosen is defaults_fit),
        test_predictions=predictions,
        params=params,
        final_fit_cut_at=cut_at,
        final_fit=how,
        elapsed_s=time.monotonic() - started,
        baselines_s=baselines_s,
        search_budget_s=search_budget_s,
        ablation=ablated,
    )


def features_for_training(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec
) -> tuple[pl.DataFrame, int]:
    """The feature table with the training split capped at `model.max_train_rows` (rows ranked by a
    seeded hash of their key: the same rows every run, spread over the whole training window), and how
    many training rows there were. Capped in SQL so the rows left out never reach Python."""
    table = features_table_name(pipeline)
    available = conn.execute(f"SELECT count(*) FROM {table} WHERE _split = 'train'").fetchone()[0]
    cap = pipeline.model.max_train_rows
    if cap is None or available <= cap:
        return conn.execute(f"SELECT * FROM {table}").pl(), available
    rank = f"hash(_key, {pipeline.model.seed})"
    frame = conn.execute(
        f"SELECT * FROM {table} WHERE _split <> 'train' UNION ALL (SELECT * FROM {table} WHERE "
        f"{capped_train_rows(conn, table, rank, cap)} ORDER BY {rank} LIMIT {cap})"
    ).pl()
    return frame, available


def train_and_register(
    connect: Connect,
    pipeline: PipelineSpec,
    transforms_dir: Path,
    models_root: Path,
    time_budget_s: float | None = None,
    max_trials: int | None = None,
    run_id: str | None = None,
    progress: Progress = silent,
    on_dask: DaskFit | None = None,
) -> tuple[Path, registry.Manifest]:
    """Train on `<pipeline>.features`, write a new model version folder and register it, stamped with
    `run_id` so the later stages of the same run judge exactly this version.

    The warehouse connection is held only to read features and to register, not while training, so
    other steps and runs can write to DuckDB meanwhile.
    """
    with connect() as conn:
        frame, train_available = features_for_training(conn, pipeline)
        # Input rows kept with the version, so a fresh process can prove it reproduces these predictions:
        # ranked by a seeded hash of their id, the same rows whatever order the warehouse reads them in
        # (a reservoir sample follows the scan order, which differs between a DuckDB file and DuckLake).
        ids = ", ".join(q(c) for c in pipeline.row_id)
        sample = conn.execute(
            f"SELECT * FROM {table_name(pipeline)} WHERE _split = 'test' "
            f"ORDER BY hash({ids}, {pipeline.model.seed}), {ids} LIMIT {SAMPLE_ROWS}"
        ).pl()
    # One row order whatever the warehouse's scan order: the drift reference sample and the data
    # fingerprint below are drawn from it.
    frame = frame.sort(["_ts", "_key"])
    transform, transform_path = transform_of(frame, transforms_dir)
    data = training_data(pipeline, frame, transform)
    budget = time_budget_s if time_budget_s is not None else pipeline.model.time_budget_s
    trials = max_trials or pipeline.model.max_trials
    trained = train_model(pipeline, data, budget, trials, progress, on_dask)
    created = dt.datetime.now(dt.UTC)
    version = registry.new_version_id(created)
    best_iteration = trained.booster.best_iteration or trained.booster.current_iteration()
    manifest = _manifest(
        pipeline, frame, data, trained, transform, version, created, budget, train_available, best_iteration
    )
    sample_scores = trained.booster.predict(
        transform.apply(sample).select(data.features).to_pandas(), num_iteration=best_iteration
    )
    predictions, sample_rows, reference = io.BytesIO(), io.BytesIO(), io.BytesIO()
    # The drift reference: a bounded sample of the training features, drawn once per version.
    train_rows = frame.filter(pl.col("_split") == "train").select("_ts", *data.features)
    bounded_sample(train_rows, pipeline.monitoring.sample_rows, "_ts", pipeline.model.seed).write_parquet(
        reference
    )
    trained.test_predictions.write_parquet(predictions)
    sample.with_columns(**_as_columns(pipeline.task, sample_scores, "_prediction")).write_parquet(sample_rows)
    version_dir = registry.write_version(
        models_root,
        pipeline.name,
        version,
        {
            registry.MODEL_FILE: trained.booster.model_to_string(num_iteration=best_iteration).encode(),
            registry.TRANSFORM_FILE: transform_path,
            registry.PREDICTIONS_FILE: predictions.getvalue(),
            registry.SAMPLE_FILE: sample_rows.getvalue(),
            registry.REFERENCE_FILE: reference.getvalue(),
            **{registry.candidate_file(k): c.model.to_json().encode() for k, c in trained.candidates.items()},
        },
        manifest,
    )
    with connect() as conn:
        manifest = registry.register(conn, version_dir, run_id)
    return version_dir, manifest


def _manifest(
    pipeline: PipelineSpec,
    frame: pl.DataFrame,
    data: TrainingData,
    trained: TrainedModel,
    transform: FeatureTransform,
    version: str,
    created: dt.datetime,
    budget: float,
    train_available: int,
    best_iteration: int,
) -> registry.Manifest:
    """What a version records about itself: how it was trained, on what, and how it scored."""
    # Performance monitoring scores the model from its test split on, and judges it only on data that
    # arrived after the data it was built from.
    test_ts = frame.filter(pl.col("_split") == "test").get_column("_ts").drop_nulls()
    return registry.Manifest.model_validate(
        {
            "version": version,
            "pipeline": pipeline.name,
            "task": pipeline.task,
            "created_at": created.replace(tzinfo=None).isoformat(timespec="seconds"),
            "metric": pipeline.metric,
            "greater_is_better": pipeline.greater_is_better,
            "params": trained.params,
            "best_iteration": best_iteration,
            "features": data.features,
            "categorical_features": data.categorical,
            "input_columns": transform.input_columns,
            "id_columns": pipeline.row_id,
            "target": pipeline.target.name,
            "classes": data.classes,
            "decision_threshold": trained.threshold,
            "rows": {s: len(getattr(data, s).y) for s in ("train", "valid", "test")},
            "train_rows_available": train_available,
            "max_train_rows": pipeline.model.max_train_rows,
            "train_window": data.time_window,
            "test_start": str(test_ts.min()) if test_ts.len() else None,
            "data_end": str(frame.get_column("_ts").max()) if test_ts.len() else None,
            "data_fingerprint": frame_fingerprint(frame.filter(pl.col("_split") == "train")),
            "code_version": registry.code_version(),
            "cv": {
                "score": trained.tuning.best_cv_score,
                "folds": pipeline.model.cv_folds,
                "trials": trained.tuning.trials,
                "elapsed_s": round(trained.tuning.elapsed_s, 2),
                "time_budget_s": budget,
                "search_budget_s": round(trained.search_budget_s, 2),
                "baselines_s": round(trained.baselines_s, 2),
                "trials_cut_short": sum(t["cut_short"] for t in trained.tuning.trials),
                "method": trained.tuning.method,
                "trials_pruned": sum(t["pruned"] for t in trained.tuning.trials),
                "final_fit_cut_at_round": trained.final_fit_cut_at,
                "final_fit": trained.final_fit,
                "model_step_s": round(trained.elapsed_s, 2),
            },
            "model_kind": "lightgbm",
            "test_metrics": trained.test_metrics,
            "ablation": trained.ablation,
            "baseline": BASELINE_NAME[pipeline.task != "regression"],
            "baseline_test_metrics": trained.baseline_test_metrics,
            "baseline_threshold": trained.candidates["linear"].threshold,
            # The simpler models judged beside this one at a first promotion (registry.candidate_file).
            "candidates": {
                kind: {
                    "decision_threshold": c.threshold,
                    "test_metrics": c.test_metrics,
                    "cut_short": c.cut_short,
                    "train_rows": c.train_rows,
                }
                for kind, c in trained.candidates.items()
            }
            # LightGBM's defaults, early-stopped on the validation split: the model itself when `chosen`.
            | {"lightgbm_defaults": trained.lightgbm_defaults},
        }
    )
