"""Evaluation report of a model version: test metrics for model and baseline side by side, plots (PNG),
one self-contained HTML file, and the headline numbers for the Dagster UI.

Everything is computed from the version folder (its test predictions and model), so a report can be
rebuilt for any registered version.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from ml_assets.core.figures import axes as _axes
from ml_assets.core.figures import save as _save
from ml_assets.core.linear import LinearModel
from ml_assets.core.metrics import all_metrics, expected_calibration_error
from ml_assets.core.registry import MODEL_FILE, MODEL_JSON_FILE, PREDICTIONS_FILE, Manifest, read_manifest


@dataclass(frozen=True)
class Evaluation:
    version: str
    metric: str
    model: dict[str, float]
    baseline: dict[str, float]
    extra: dict[str, Any]
    report_path: Path
    plots: dict[str, Path]

    @property
    def beats_baseline(self) -> bool:
        ours, theirs = self.model[self.metric], self.baseline[self.metric]
        return ours > theirs if self.extra["greater_is_better"] else ours < theirs


def _scores(task: str, frame: pl.DataFrame, prefix: str) -> np.ndarray:
    if task == "multiclass":
        return frame.select(pl.col(f"^{prefix}_p\\d+$")).to_numpy()
    return frame.get_column(prefix).to_numpy()


def _importance(version_dir: Path, manifest: Manifest) -> tuple[list[tuple[str, float]], str]:
    """Features ranked by LightGBM's total gain, or by a linear model's |coefficients|."""
    if manifest.model_kind != "lightgbm":
        model = LinearModel.from_json((Path(version_dir) / MODEL_JSON_FILE).read_text())
        return model.importance(), "|coefficient| (standardised)"
    booster = lgb.Booster(model_file=str(Path(version_dir) / MODEL_FILE))
    gain = booster.feature_importance(importance_type="gain")
    return sorted(zip(booster.feature_name(), gain.tolist(), strict=True), key=lambda t: -t[1]), "total gain"


def _importance_plot(ranked: list[tuple[str, float]], measure: str, out: Path) -> Path:
    top = ranked[:20][::-1]
    fig, ax = _axes(5, 0.3 * len(top) + 1)
    ax.barh([n for n, _ in top], [g for _, g in top], color="#4c72b0")
    ax.set_xlabel(measure)
    ax.set_title(f"Feature importance ({measure})")
    return _save(fig, out / "feature_importance.png")


def _classification_plots(
    y: np.ndarray, model: np.ndarray, baseline: np.ndarray, out: Path
) -> dict[str, Path]:
    plots = {}
    fig, ax = _axes()
    for name, p in (("model", model), ("baseline", baseline)):
        fpr, tpr, _ = skm.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend()
    plots["roc"] = _save(fig, out / "roc.png")
    fig, ax = _axes()
    for name, p in (("model", model), ("baseline", baseline)):
        precision, recall, _ = skm.precision_recall_curve(y, p)
        ax.plot(recall, precision, label=f"{name} (AP {skm.average_precision_score(y, p):.3f})")
    ax.axhline(y.mean(), color="k", ls=":", lw=1, label=f"base rate {y.mean():.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    ax.legend()
    plots["pr"] = _save(fig, out / "pr.png")
    fig, ax = _axes()
    for name, p in (("model", model), ("baseline", baseline)):
        frac, mean_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
        ax.plot(mean_pred, frac, marker="o", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Calibration (test)")
    ax.legend()
    plots["calibration"] = _save(fig, out / "calibration.png")
    return plots


def _regression_plots(y: np.ndarray, model: np.ndarray, out: Path) -> dict[str, Path]:
    fig, axes = _axes(5.5, 3, ncols=2)  # fits the UI's metadata value column at 1600 px
    sample = np.random.default_rng(0).choice(len(y), size=min(len(y), 5000), replace=False)
    axes[0].scatter(y[sample], model[sample], s=3, alpha=0.3)
    lo, hi = np.percentile(y, [0.5, 99.5])
    axes[0].plot([lo, hi], [lo, hi], "k:", lw=1)
    axes[0].set(
        xlim=(lo, hi), ylim=(lo, hi), xlabel="actual", ylabel="predicted", title="Predicted vs actual (test)"
    )
    residuals = y - model
    axes[1].hist(np.clip(residuals, *np.percentile(residuals, [0.5, 99.5])), bins=60, color="#4c72b0")
    axes[1].set(xlabel="residual (actual - predicted)", ylabel="rows", title="Residuals (test)")
    return {"residuals": _save(fig, out / "residuals.png")}


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_html(
    path: Path,
    manifest: Manifest,
    ev_rows: list[list[Any]],
    extra: dict[str, Any],
    plots: dict[str, Path],
) -> None:
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, p in plots.items()
    )
    extras = "".join(
        f"<h3>{html.escape(k)}</h3><pre>{html.escape(json.dumps(v, indent=1))}</pre>"
        for k, v in extra.items()
        if k in ("confusion_matrix", "calibration", "decision_threshold")
    )
    params = _table([[k, v] for k, v in sorted(manifest.params.items())], ["parameter", "value"])
    candidates = _table(candidate_rows(manifest), ["candidate", f"test {manifest.metric}", "note"])
    ablation = ""
    if manifest.ablation:
        ablation = f"""<h2>Ablation: history feature families</h2><p>The model's parameters refitted without
each family's features (early-stopped on the validation split, as the model was); difference = the
model's test {manifest.metric} minus that refit's.</p>
{_table(ablation_rows(manifest.ablation), ["without", f"test {manifest.metric}", "difference", "features"])}"""
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(manifest.pipeline)} {html.escape(manifest.version)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:8px}}</style>
</head><body>
<h1>{html.escape(manifest.pipeline)}: evaluation of {html.escape(manifest.version)}</h1>
<p>Task: {manifest.task}. Primary metric: <b>{manifest.metric}</b>. Test rows: {manifest.rows["test"]}
(train {manifest.rows["train"]}, validation {manifest.rows["valid"]}). Training window:
{manifest.train_window["start"]} to {manifest.train_window["end"]}. Code: {html.escape(manifest.code_version)}.</p>
<h2>Test metrics</h2>{_table(ev_rows, ["metric", "model", manifest.baseline, "difference"])}
<h2>Candidates</h2>{candidates}
{ablation}
{extras}<h2>Plots</h2>{images}
<h2>Parameters ({manifest.model_kind}; best of {len(manifest.cv.trials)} CV trials, CV
{manifest.metric} {_fmt(manifest.cv.score)})</h2>{params}
</body></html>""")


CANDIDATE_NOTES = {
    "constant": "the training split's prior",
    "linear": "the linear baseline",
    "lightgbm_defaults": "LightGBM's defaults, early-stopped on the validation split",
}


def candidate_rows(manifest: Manifest) -> list[list[Any]]:
    """The models fitted beside this one, with their test metric: a tuned model shown next to
    LightGBM's defaults on the same split (the model is the defaults' fit when marked so)."""
    metric = manifest.metric
    rows = []
    for kind, found in manifest.candidates.items():
        note = CANDIDATE_NOTES.get(kind, kind)
        if found.chosen:
            note += " (this model: the tuned parameters did not beat it on validation)"
        rows.append([kind, found.test_metrics[metric], note])
    return rows + [["model", manifest.test_metrics[metric], manifest.model_kind]]


def ablation_rows(ablation: dict[str, Any]) -> list[list[Any]]:
    """One row per refit without a family (or the whole history set), and the families the model step's
    budget left unmeasured."""
    rows = [
        [r["without"], r["test"], r["difference"], ", ".join(r["features"])] for r in ablation["families"]
    ]
    return rows + [
        [f, "not measured", "", "the model step's time budget ran out"] for f in ablation["not_measured"]
    ]


def evaluate_version(version_dir: Path, reports_root: Path, manifest_sha256: str | None = None) -> Evaluation:
    """Report on a version folder, every artifact hash-verified; a registered version passes the sha256 the
    registry recorded for its manifest (`registry.registered`), so its threshold and metrics are the ones
    registered."""
    manifest = read_manifest(version_dir, manifest_sha256=manifest_sha256)
    task = manifest.task
    frame = pl.read_parquet(Path(version_dir) / PREDICTIONS_FILE)
    y = frame.get_column("y_true").to_numpy()
    model, baseline = _scores(task, frame, "model"), _scores(task, frame, "baseline")
    out = reports_root / manifest.pipeline / manifest.version
    out.mkdir(parents=True, exist_ok=True)
    threshold = manifest.decision_threshold
    model_metrics = all_metrics(task, y, model, threshold)
    baseline_metrics = manifest.baseline_test_metrics
    extra: dict[str, Any] = {"greater_is_better": manifest.greater_is_better}
    ranked, measure = _importance(Path(version_dir), manifest)
    importance_plot = _importance_plot(ranked, measure, out)
    extra["top_features"] = [n for n, _ in ranked[:10]]
    if manifest.ablation:
        extra["ablation"] = manifest.ablation
    if task == "binary":
        plots = _classification_plots(y, model, baseline, out)
        labels = (model >= threshold).astype(int)
        extra["decision_threshold"] = threshold
        extra["baseline_threshold"] = manifest.baseline_threshold
        extra["confusion_matrix"] = {
            "labels": manifest.classes,
            "rows_actual_cols_predicted": skm.confusion_matrix(y, labels).tolist(),
        }
        model_metrics["ece"] = expected_calibration_error(y, model)
        baseline_metrics = baseline_metrics | {"ece": expected_calibration_error(y, baseline)}
        frac, mean_pred = calibration_curve(y, model, n_bins=10, strategy="quantile")
        extra["calibration"] = {
            "mean_predicted": mean_pred.round(4).tolist(),
            "observed": frac.round(4).tolist(),
        }
    elif task == "multiclass":
        plots = {}
        extra["confusion_matrix"] = {
            "labels": manifest.classes,
            "rows_actual_cols_predicted": skm.confusion_matrix(y, model.argmax(axis=1)).tolist(),
        }
    else:
        plots = _regression_plots(y, model, out)
    plots["feature_importance"] = importance_plot
    rows = [
        [m, v, baseline_metrics.get(m, float("nan")), v - baseline_metrics.get(m, float("nan"))]
        for m, v in model_metrics.items()
    ]
    report = out / "report.html"
    _write_html(report, manifest, rows, extra, plots)
    (out / "metrics.json").write_text(
        json.dumps({"model": model_metrics, "baseline": baseline_metrics, **extra}, indent=2)
    )
    return Evaluation(
        manifest.version, manifest.metric, model_metrics, baseline_metrics, extra, report, plots
    )


def markdown_summary(ev: Evaluation, pipeline: str) -> str:
    lines = [f"### {pipeline} — {ev.version}", "", "| metric | model | baseline |", "|---|---|---|"]
    lines += [
        f"| {m}{' **(primary)**' if m == ev.metric else ''} | {v:.4f} | {ev.baseline.get(m, float('nan')):.4f} |"
        for m, v in ev.model.items()
    ]
    verdict = "beats" if ev.beats_baseline else "does NOT beat"
    lines += [
        "",
        f"The model {verdict} the baseline on {ev.metric}. Top features: {', '.join(ev.extra['top_features'][:5])}.",
    ]
    return "\n".join(lines)


def markdown_ablation(ev: Evaluation) -> str | None:
    """The ablation as a markdown table for the UI (None without history features)."""
    if "ablation" not in ev.extra:
        return None
    lines = [f"| without | test {ev.metric} | difference |", "|---|---|---|"]
    return "\n".join(
        lines + [f"| {r[0]} | {_fmt(r[1])} | {_fmt(r[2])} |" for r in ablation_rows(ev.extra["ablation"])]
    )
