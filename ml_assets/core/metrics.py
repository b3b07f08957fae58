"""Metrics per task, shared by tuning (CV scores), training (manifest) and the evaluation report.

Predictions are: binary, P(class 1) as a vector; multiclass, an (n, k) probability matrix;
regression, the predicted values.
"""

from __future__ import annotations

import numpy as np

# scikit-learn and scipy are imported by the functions that use them: the pipeline schema reads the
# tables below, and a CLI command that only loads pipeline files should not pay for importing them.


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (average ranks for ties): equal to scikit-learn's, several
    times faster, which matters inside the promotion gate's bootstrap."""
    from scipy.stats import rankdata

    positives = y == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    ranks = rankdata(p)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _labels(task: str, pred: np.ndarray, threshold: float) -> np.ndarray:
    return (pred >= threshold).astype(int) if task == "binary" else pred.argmax(axis=1)


def score(task: str, metric: str, y: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """One metric, as the config names it."""
    from sklearn import metrics as skm

    if task == "regression":
        return {
            "rmse": lambda: float(np.sqrt(skm.mean_squared_error(y, pred))),
            "mae": lambda: float(skm.mean_absolute_error(y, pred)),
            "r2": lambda: float(skm.r2_score(y, pred)),
            # Percentage errors are undefined at a zero actual; those rows are left out of MAPE (WAPE keeps them).
            "mape": lambda: float(skm.mean_absolute_percentage_error(y[y != 0], pred[y != 0])),
            "wape": lambda: float(np.abs(y - pred).sum() / max(np.abs(y).sum(), 1e-12)),
        }[metric]()
    if metric == "log_loss":
        labels = None if task == "binary" else list(range(pred.shape[1]))
        return float(skm.log_loss(y, pred, labels=labels))
    if metric == "roc_auc":
        return roc_auc(y, pred)
    if metric == "roc_auc_ovr":
        return float(skm.roc_auc_score(y, pred, multi_class="ovr", labels=list(range(pred.shape[1]))))
    if metric == "pr_auc":
        return float(skm.average_precision_score(y, pred))
    labels = _labels(task, pred, threshold)
    return {
        "accuracy": lambda: float(skm.accuracy_score(y, labels)),
        "f1": lambda: float(skm.f1_score(y, labels, zero_division=0)),
        "f1_macro": lambda: float(skm.f1_score(y, labels, average="macro", zero_division=0)),
        "precision": lambda: float(skm.precision_score(y, labels, zero_division=0)),
        "recall": lambda: float(skm.recall_score(y, labels, zero_division=0)),
        "brier": lambda: float(skm.brier_score_loss(y, pred)),
    }[metric]()


GREATER_IS_BETTER = {
    "roc_auc": True,
    "pr_auc": True,
    "log_loss": False,
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "brier": False,
    "f1_macro": True,
    "roc_auc_ovr": True,
    "rmse": False,
    "mae": False,
    "r2": True,
    "mape": False,
    "wape": False,
}

REPORTED = {
    "binary": ["roc_auc", "pr_auc", "log_loss", "accuracy", "precision", "recall", "f1", "brier"],
    "multiclass": ["log_loss", "accuracy", "f1_macro", "roc_auc_ovr"],
    "regression": ["rmse", "mae", "r2", "mape", "wape"],
}


def all_metrics(task: str, y: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return {m: score(task, m, y, pred, threshold) for m in REPORTED[task]}


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Decision threshold that maximises F1 (chosen on validation data, never on test)."""
    from sklearn import metrics as skm

    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))]) if len(thresholds) else 0.5


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(total)


def improvement(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old`, positive when better, in the metric's units."""
    return new - old if GREATER_IS_BETTER[metric] else old - new


def choose_threshold(
    y: np.ndarray,
    p: np.ndarray,
    optimise: str,
    false_positive_cost: float = 1.0,
    false_negative_cost: float = 1.0,
    target_recall: float = 0.8,
) -> float:
    """Decision threshold on P(positive), chosen on validation data (never on test) for what the
    pipeline values: `f1`, `accuracy`, least total `cost` of errors, or the highest threshold that keeps
    `recall` at `target_recall`."""
    if optimise == "f1":
        return best_f1_threshold(y, p)
    if len(np.unique(y)) < 2:
        return 0.5
    from sklearn import metrics as skm

    fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    # roc_curve starts at +inf (nothing predicted positive); above every probability says the same.
    thresholds = np.minimum(thresholds, 1.0 + 1e-9)
    positives, negatives = int((y == 1).sum()), int((y != 1).sum())
    tp, fp = tpr * positives, fpr * negatives
    if optimise == "accuracy":
        best = np.argmax(tp + negatives - fp)
    elif optimise == "cost":
        best = np.argmin(fp * false_positive_cost + (positives - tp) * false_negative_cost)
    elif optimise == "recall":
        # tpr only grows as the threshold falls: the first index that reaches the target is the highest.
        reaching = np.flatnonzero(tpr >= target_recall)
        best = reaching[0] if len(reaching) else len(tpr) - 1
    else:
        raise ValueError(f"unknown threshold objective {optimise!r}")
    return float(thresholds[int(best)])
