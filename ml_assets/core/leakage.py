"""Leakage hints for `ml-assets init`: columns that predict the target too well to be known before it.

A strong feature is not a leak; a column that predicts the target almost perfectly usually is (the same
day's return beside "did the price go up", an arrival time beside the arrival delay). So each column is
judged by how well it alone predicts the target on a holdout (a shallow tree: ROC-AUC for classes, R^2
for numbers); and a number target by how well a few columns together predict it, to find a target that
is an exact function of several columns (a loan's rate from its installment, amount and term): columns
are added one at a time, the one that helps most first, to a least-squares fit of degree 2 in each
column and its logarithm (exact for sums, products, ratios and powers, and within 1e-5 of the annuity
formula), until the fit is near perfect. The holdout is the split `init` writes: the latest rows by time
when there is a time column, else a seeded random share.

Only near perfection is flagged; the thresholds are stated here and in docs/own-data.md.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

# A column alone (a depth-6 tree) reaching this holdout ROC-AUC (classes) or R^2 (numbers) is flagged: an
# honest feature leaves a share of the outcome to chance (the flights' departure delay, correlation 0.91
# with the arrival delay, explains R^2 0.83 of it and is not flagged).
ALONE_AUC = 0.99
ALONE_R2 = 0.99
# A few columns together reaching this R^2 are flagged when no column alone does: only a target that is
# an exact function of them leaves less than a thousandth of its variance unexplained.
TOGETHER_R2 = 0.999
# Rows the hints are computed on (a seeded sample): init stays a few seconds on a file of millions.
SAMPLE_ROWS = 20_000
HOLDOUT = 0.3
MAX_TOGETHER = 4
SEED = 0


def _numeric(series: pl.Series) -> np.ndarray:
    """A column as floats a tree can split: numbers and booleans as they are, text as the rank of its
    value's frequency (a tree of depth 6 tells 64 values apart), missing as NaN."""
    if series.dtype == pl.String or series.dtype == pl.Categorical:
        codes = series.cast(pl.String).value_counts(sort=True).with_row_index("_code")
        mapped = series.cast(pl.String).replace_strict(
            codes.get_column(series.name), codes.get_column("_code"), default=None, return_dtype=pl.Float64
        )
        return mapped.fill_null(float("nan")).to_numpy()
    return series.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()


def _score(task: str, y: np.ndarray, model, X: np.ndarray) -> float:
    if task == "regression":
        return float(r2_score(y, model.predict(X)))
    proba = model.predict_proba(X)
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=model.classes_))


def _fit_score(task: str, model, split: tuple[np.ndarray, ...]) -> float:
    X_fit, X_hold, y_fit, y_hold = split
    model.fit(X_fit, y_fit)
    try:
        return _score(task, y_hold, model, X_hold)
    except ValueError:  # a class missing from one side: no score, no hint
        return float("nan")


def _tree(task: str):
    kind = DecisionTreeRegressor if task == "regression" else DecisionTreeClassifier
    return kind(max_depth=6, min_samples_leaf=5, random_state=SEED)


def _smooth_fit():
    return make_pipeline(StandardScaler(), PolynomialFeatures(2), LinearRegression())


def _with_logs(X: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Each column, missing values as its median, and its logarithm beside it when it is positive."""
    parts = []
    for j in range(X.shape[1]):
        column = X[:, j].copy()
        median = np.nanmedian(column[fit_rows]) if np.isfinite(column[fit_rows]).any() else 0.0
        column[~np.isfinite(column)] = median
        parts.append(column)
        if (column > 0).all():
            parts.append(np.log(column))
    return np.column_stack(parts)


def _prepared(
    frame: pl.DataFrame, target: str, task: str, columns: list[str], time: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, holdout mask) on a seeded sample of rows with a target, in time order with a time column."""
    rows = frame.filter(pl.col(target).is_not_null())
    if rows.height > SAMPLE_ROWS:
        rows = rows.sample(SAMPLE_ROWS, seed=SEED)
    if time is not None:
        rows = rows.sort(time)
    y_col = rows.get_column(target)
    y = _numeric(y_col) if task == "regression" else y_col.cast(pl.String).to_numpy()
    X = (
        np.column_stack([_numeric(rows.get_column(c)) for c in columns])
        if columns
        else np.empty((rows.height, 0))
    )
    cut = int(round(rows.height * (1 - HOLDOUT)))
    if time is not None:
        hold = np.arange(rows.height) >= cut
    else:
        hold = np.zeros(rows.height, dtype=bool)
        hold[np.random.default_rng(SEED).permutation(rows.height)[cut:]] = True
    return X, y, hold


def predictive_hints(
    frame: pl.DataFrame, target: str, task: str, columns: list[str], time: str | None = None
) -> dict[str, str]:
    """Column -> why it predicts `target` too well: alone, or together with other columns."""
    X, y, hold = _prepared(frame, target, task, columns, time)
    if hold.sum() < 20 or (~hold).sum() < 20 or not columns:
        return {}
    measure, alone = ("R^2", ALONE_R2) if task == "regression" else ("ROC-AUC", ALONE_AUC)

    def split(idx: list[int]) -> tuple[np.ndarray, ...]:
        return X[~hold][:, idx], X[hold][:, idx], y[~hold], y[hold]

    hints = {}
    for i, name in enumerate(columns):
        value = _fit_score(task, _tree(task), split([i]))
        if value >= alone:
            hints[name] = f"alone it predicts {target!r} with holdout {measure} {value:.3f} (>= {alone})"
    if hints:
        return hints
    if task == "regression":
        hints |= _function_of_several(X, y, hold, columns, target)
    return hints


def _function_of_several(
    X: np.ndarray, y: np.ndarray, hold: np.ndarray, columns: list[str], target: str
) -> dict[str, str]:
    """The fewest columns (at most MAX_TOGETHER, added greedily) whose smooth fit reaches TOGETHER_R2."""
    chosen: list[int] = []
    best = -np.inf
    while len(chosen) < min(MAX_TOGETHER, len(columns)):
        tried = {}
        for j in (j for j in range(len(columns)) if j not in chosen):
            Z = _with_logs(X[:, [*chosen, j]], ~hold)
            tried[j] = _fit_score("regression", _smooth_fit(), (Z[~hold], Z[hold], y[~hold], y[hold]))
        j, value = max(tried.items(), key=lambda item: np.nan_to_num(item[1], nan=-np.inf))
        if not value > best:
            return {}
        chosen, best = [*chosen, j], value
        if best >= TOGETHER_R2:
            break
    if best < TOGETHER_R2 or len(chosen) < 2:
        return {}
    names = [columns[j] for j in sorted(chosen)]
    return {
        name: f"with {', '.join(repr(n) for n in names if n != name)} it predicts {target!r} with holdout "
        f"R^2 {best:.5f} (>= {TOGETHER_R2}): the target looks like a function of them"
        for name in names
    }
