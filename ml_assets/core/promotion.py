"""Promotion gate: may the challenger replace the champion? (Rolling it back: rollback.py.)

The challenger is promoted only if, on the same holdout rows,
  (a) its primary metric is better by at least the margin, and the paired bootstrap interval of the
      improvement (resampling rows, scoring both models on each resample) excludes zero;
  (b) no guarded metric and no slice (e.g. per carrier) regresses beyond its tolerance;
  (c) its artifact reloads in a fresh process and reproduces its training-time predictions.
All three are recorded with their numbers, whatever the verdict.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ml_assets.core import registry
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ArtifactError
from ml_assets.core.metrics import improvement, score
from ml_assets.core.serving.loader import ServableModel, reproduces_training_predictions
from ml_assets.core.spec import GateSpec, PipelineSpec
from ml_assets.core.store import Connect


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def paired_bootstrap(
    task: str,
    metric: str,
    y: np.ndarray,
    old: np.ndarray,
    new: np.ndarray,
    samples: int,
    confidence: float,
    seed: int = 0,
    thresholds: tuple[float, float] = (0.5, 0.5),
) -> dict[str, float]:
    """Point estimate and percentile interval of the improvement of `new` over `old`."""
    rng = np.random.default_rng(seed)
    n = len(y)

    def gain(idx: np.ndarray | slice) -> float:
        return improvement(
            metric,
            score(task, metric, y[idx], new[idx], thresholds[1]),
            score(task, metric, y[idx], old[idx], thresholds[0]),
        )

    draws = []
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        if task != "regression" and len(np.unique(y[idx])) < 2:
            continue
        draws.append(gain(idx))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return {
        "improvement": gain(slice(None)),
        "ci_low": float(low),
        "ci_high": float(high),
        "samples": len(draws),
    }


def decide(
    task: str,
    metric: str,
    gate: GateSpec,
    y: np.ndarray,
    old: np.ndarray,
    new: np.ndarray,
    slices: dict[str, np.ndarray],
    thresholds: tuple[float, float] = (0.5, 0.5),
    against: str = "champion",
) -> Verdict:
    boot = paired_bootstrap(
        task, metric, y, old, new, gate.bootstrap_samples, gate.confidence, thresholds=thresholds
    )
    level = f"{gate.confidence:.0%}"
    summary = (
        f"{metric} improves by {boot['improvement']:+.5f} over the {against} ({level} CI "
        f"{boot['ci_low']:+.5f} to {boot['ci_high']:+.5f})"
    )
    failures: list[str] = []
    if boot["improvement"] < gate.margin or boot["ci_low"] <= 0:
        failures.append(f"needs at least {gate.margin:+.5f} with a CI above zero")
    guarded = {}
    for name, tolerance in gate.guarded_metrics.items():
        delta = improvement(
            name, score(task, name, y, new, thresholds[1]), score(task, name, y, old, thresholds[0])
        )
        guarded[name] = delta
        if delta < -tolerance:
            failures.append(f"guarded metric {name} regresses by {-delta:.5f} (tolerance {tolerance})")
    slice_deltas: dict[str, dict[str, float]] = {}
    for column, values in slices.items():
        slice_deltas[column] = {}
        labels = values.astype(str)
        for value in np.unique(labels):
            mask = labels == value
            if mask.sum() < gate.min_slice_rows or (task != "regression" and len(np.unique(y[mask])) < 2):
                continue
            delta = improvement(
                metric,
                score(task, metric, y[mask], new[mask], thresholds[1]),
                score(task, metric, y[mask], old[mask], thresholds[0]),
            )
            slice_deltas[column][value] = delta
            if delta >= -gate.slice_tolerance:
                continue
            # A small slice's metric is noisy: it blocks promotion only when it is worse beyond the
            # tolerance and significantly worse (its own bootstrap interval lies below zero).
            sliced = paired_bootstrap(
                task,
                metric,
                y[mask],
                old[mask],
                new[mask],
                gate.bootstrap_samples,
                gate.confidence,
                seed=1,
                thresholds=thresholds,
            )
            if sliced["ci_high"] < 0:
                failures.append(
                    f"slice {column}={value} ({int(mask.sum())} rows): {metric} regresses by {-delta:.5f} "
                    f"(tolerance {gate.slice_tolerance}, {level} CI of the change {sliced['ci_low']:+.5f} to "
                    f"{sliced['ci_high']:+.5f})"
                )
    details = {
        "bootstrap": boot,
        "guarded": guarded,
        "slices": slice_deltas,
        "rows": len(y),
        "against": against,
    }
    if failures:
        return Verdict(False, f"{summary}; " + "; ".join(failures), details)
    return Verdict(True, f"{summary}; no guarded metric or slice regresses significantly", details)


# --- champion decisions: promote or refuse, automatic and manual rollback ------------------------------


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    details: dict[str, Any] = field(default_factory=dict)


def promote_or_refuse(
    connect: Connect,
    pipeline: PipelineSpec,
    challenger: str | None = None,
    run_id: str | None = None,
    trigger: dict[str, str] | None = None,
) -> Decision:
    """Judge a version (by default the `challenger` alias: the latest registered) against the champion
    (or, for the first model, against its baseline) on the latest holdout, and record the verdict; the
    champion alias moves only on promotion."""
    with connect() as conn:
        challenger = challenger or registry.alias_version(conn, pipeline.name, registry.CHALLENGER)
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if challenger is None:
            raise ArtifactError(f"pipeline '{pipeline.name}': no challenger; materialize its model first")
        if challenger == champion:
            return Decision(
                "unchanged",
                f"challenger {challenger} is already the champion",
                challenger,
                champion,
                champion,
            )
        new_version = registry.registered(conn, challenger, pipeline.name)
        old_version = registry.registered(conn, champion, pipeline.name) if champion else None
        rows = conn.execute(f"SELECT * FROM {table_name(pipeline)} WHERE _split = 'test'").pl()
    # Both load before the slow fresh-process check, so a modified version is refused at once, by name.
    new_model = ServableModel.from_registry(new_version)
    old_model = ServableModel.from_registry(old_version) if old_version else None
    if old_model is None:
        return _first_champion(connect, pipeline, new_version, new_model, rows, run_id, trigger)
    infra_ok, infra = reproduces_training_predictions(new_version.path, new_version.manifest_sha256)
    y, old, new = new_model.labels(rows), old_model.predict(rows), new_model.predict(rows)
    thresholds, against = (old_model.threshold, new_model.threshold), f"champion {champion}"
    slices = {c: rows.get_column(c).to_numpy() for c in pipeline.gate.slices}
    verdict = decide(pipeline.task, pipeline.metric, pipeline.gate, y, old, new, slices, thresholds, against)
    promote = verdict.promote and infra_ok
    reason = verdict.reason if infra_ok else f"{infra}; {verdict.reason}"
    details = verdict.details | {
        "infra_check": {"passed": infra_ok, "detail": infra},
        "trigger": trigger or {},
    }
    action = "promote" if promote else "refuse"
    with connect() as conn:
        registry.record_decision(
            conn, pipeline.name, action, reason, challenger, challenger if promote else None, details, run_id
        )
    return Decision(action, reason, challenger, champion, challenger if promote else champion, details)


# The first champion is the best of these, simplest first: a candidate replaces the one before only when
# the gate would promote it over that one (significantly better, no slice or guarded metric worse).
LADDER = ("constant", "linear", "lightgbm")
DESCRIBED = {
    "constant": "constant baseline (the training split's prior)",
    "linear": "linear baseline",
    "lightgbm": "LightGBM model",
}


def _first_champion(
    connect: Connect,
    pipeline: PipelineSpec,
    trained: registry.Registered,
    model: ServableModel,
    rows: pl.DataFrame,
    run_id: str | None,
    trigger: dict[str, str] | None,
) -> Decision:
    """No champion yet: climb the ladder on the holdout rows, every step judged by `decide` with each
    model's own decision threshold, so the pipeline always ends with a champion to serve and monitor."""
    kinds = [k for k in LADDER if k == "lightgbm" or k in model.manifest.candidates]
    models = {k: model if k == "lightgbm" else model.candidate(k, trained.path) for k in kinds}
    y = model.labels(rows)
    scores = {k: m.predict(rows) for k, m in models.items()}
    slices = {c: rows.get_column(c).to_numpy() for c in pipeline.gate.slices}
    best, steps = kinds[0], []
    for kind in kinds[1:]:
        verdict = decide(
            pipeline.task,
            pipeline.metric,
            pipeline.gate,
            y,
            scores[best],
            scores[kind],
            slices,
            (models[best].threshold, models[kind].threshold),
            against=DESCRIBED[best],
        )
        steps.append(
            verdict.details
            | {"candidate": kind, "against": best, "promote": verdict.promote, "reason": verdict.reason}
        )
        if verdict.promote:
            best = kind
    winner = trained if best == "lightgbm" else _register_candidate(connect, trained, models[best], run_id)
    infra_ok, infra = reproduces_training_predictions(winner.path, winner.manifest_sha256)
    lightgbm_step = steps[-1]["reason"] if steps else "no simpler candidate to compare with"
    if best == "lightgbm":
        reason = f"first champion: the LightGBM model {trained.version}: {lightgbm_step}"
    else:
        reason = (
            f"first champion: the {DESCRIBED[best]}, registered as {winner.version}, since the LightGBM model "
            f"{trained.version} is not significantly better: {lightgbm_step}"
        )
    if not infra_ok:
        reason = f"{infra}; {reason}"
    details = {
        "ladder": steps,
        # Every model fitted beside LightGBM's, LightGBM's defaults among them, by its test metric.
        "candidates": {k: c.test_metrics[pipeline.metric] for k, c in model.manifest.candidates.items()},
        "champion_kind": best,
        "rows": len(y),
        "infra_check": {"passed": infra_ok, "detail": infra},
        "trigger": trigger or {},
    }
    if steps:
        # The last step (LightGBM against the best simpler model) in the fields every verdict has.
        details |= {k: steps[-1][k] for k in ("bootstrap", "guarded", "slices")}
        details["against"] = DESCRIBED[steps[-1]["against"]]
    action = "promote_first" if infra_ok else "refuse"
    after = winner.version if infra_ok else None
    with connect() as conn:
        registry.record_decision(conn, pipeline.name, action, reason, trained.version, after, details, run_id)
    return Decision(action, reason, trained.version, None, after, details)


def _register_candidate(
    connect: Connect, trained: registry.Registered, model: ServableModel, run_id: str | None
) -> registry.Registered:
    """Register a simpler candidate of a LightGBM version as a version of its own (model.json), so it can
    be served, monitored and rolled back like any other: same transform and drift reference, its own
    test predictions, threshold and sample-row predictions. Not made the challenger."""
    parent, kind = trained.path, model.kind
    source = {"linear": "baseline", "constant": "constant"}[kind]
    predictions = pl.read_parquet(parent / registry.PREDICTIONS_FILE)
    renamed = predictions.select(
        "_key",
        "y_true",
        *(
            pl.col(c).alias(c.replace(source, "model", 1))
            for c in predictions.columns
            if c.startswith(source)
        ),
        *(
            pl.col(c).alias(c.replace("constant", "baseline", 1))
            for c in predictions.columns
            if c.startswith("constant")
        ),
    )
    sample = pl.read_parquet(parent / registry.SAMPLE_FILE)
    inputs = sample.select(pl.exclude("^_prediction.*$"))
    scores = np.asarray(model.predict(inputs)).reshape(len(inputs), -1)
    columns = [c for c in sample.columns if c.startswith("_prediction")]
    sample = inputs.with_columns(
        **{c: pl.Series(scores[:, i]) for i, c in enumerate(columns)} if len(inputs) else {}
    )
    buffers = {registry.PREDICTIONS_FILE: renamed, registry.SAMPLE_FILE: sample}
    files: dict[str, bytes | Path] = {
        registry.MODEL_JSON_FILE: (parent / registry.candidate_file(kind)).read_bytes(),
        registry.TRANSFORM_FILE: parent / registry.TRANSFORM_FILE,
        registry.REFERENCE_FILE: parent / registry.REFERENCE_FILE,
    }
    for name, frame in buffers.items():
        out = io.BytesIO()
        frame.write_parquet(out)
        files[name] = out.getvalue()
    version = f"{registry.new_version_id()}-{kind}"
    constant = model.manifest.candidates["constant"]
    manifest = model.manifest.model_copy(
        update={
            # Written now: this code's schema, whatever the trained version's was.
            "schema_version": registry.MANIFEST_SCHEMA_VERSION,
            "files": {},
            "candidates": {},
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds"),
            "params": {},
            "best_iteration": None,
            "derived_from": trained.version,
            "baseline": DESCRIBED["constant"],
            "baseline_test_metrics": constant.test_metrics,
            "baseline_threshold": constant.decision_threshold,
            "cv": registry.CrossValidation(
                score=None, folds=0, trials=[], note=f"{kind} models are not tuned"
            ),
        }
    )
    models_root = parent.parent.parent
    folder = registry.write_version(models_root, trained.pipeline, version, files, manifest)
    with connect() as conn:
        registry.register(conn, folder, run_id=None, challenger=False)
        return registry.registered(conn, version, trained.pipeline)
