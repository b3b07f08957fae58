"""The simple candidates every model is judged against, saved as JSON and served with numpy (no pickle).

- `linear`: logistic regression (classification) or ridge (regression) on the transformed features,
  numeric columns imputed (median) and standardised, categorical codes one-hot encoded;
- `constant`: the training split's class shares or mean, the floor any model must clear.

scikit-learn fits them; only the numbers are kept (imputation values, means, scales, vocabularies,
coefficients, intercepts), and `predict` recomputes exactly what the fitted estimator would, so what the
gate judged at training time is what serves.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge

FORMAT_VERSION = 1
MAX_ITER = 1000
# With a deadline, the solver runs this many iterations at a time (warm-started), so the fit stops at
# most one chunk after the deadline instead of whenever it converges.
CHUNK_ITER = 50
KINDS = ("constant", "linear")
# Rows whose design matrix `predict` builds at a time.
PREDICT_ROWS = 200_000


def _column(X: pl.DataFrame | pd.DataFrame, name: str, dtype: type | None = None) -> np.ndarray:
    """One column as numpy, NaN for a missing float; a polars frame never goes through pandas (one
    online request's conversion costs more than the whole prediction)."""
    if isinstance(X, pl.DataFrame):
        column = X.get_column(name)
        return (column.cast(pl.Float64) if dtype is float else column).to_numpy()
    column = X[name]
    return (column.astype(float) if dtype is float else column).to_numpy()


def _rows(X: pl.DataFrame | pd.DataFrame, offset: int, length: int) -> pl.DataFrame | pd.DataFrame:
    return X.slice(offset, length) if isinstance(X, pl.DataFrame) else X.iloc[offset : offset + length]


@dataclass(frozen=True)
class LinearModel:
    """y = link(X @ coef.T + intercept) over the encoded features; `constant` has no inputs."""

    kind: str
    task: str
    numeric: list[dict[str, Any]]
    categorical: list[dict[str, Any]]
    coef: list[list[float]]
    intercept: list[float]

    @classmethod
    def fit_constant(cls, task: str, y: np.ndarray, n_classes: int | None) -> LinearModel:
        if task == "regression":
            intercept = [float(np.mean(y))]
        else:
            shares = np.bincount(y.astype(int), minlength=n_classes or 2) / max(len(y), 1)
            intercept = [float(shares[1])] if task == "binary" else shares.tolist()
        return cls("constant", task, [], [], [], intercept)

    @classmethod
    def fit_linear(
        cls,
        task: str,
        X: pd.DataFrame,
        y: np.ndarray,
        categorical: list[str],
        seed: int = 0,
        deadline: float | None = None,
    ) -> tuple[LinearModel, bool]:
        """The fitted model, and whether `deadline` (a time.monotonic() instant) stopped the solver
        before it converged (the coefficients so far are kept). Ridge is one direct solve."""
        numeric = []
        for column in [c for c in X.columns if c not in categorical]:
            values = X[column].astype(float)
            median = float(values.median()) if values.notna().any() else 0.0
            filled = values.fillna(median)
            std = float(filled.std(ddof=0))
            numeric.append(
                {"name": column, "impute": median, "mean": float(filled.mean()), "scale": std or 1.0}
            )
        cats = [
            {"name": c, "categories": sorted(int(v) for v in pd.unique(X[c].dropna()))} for c in categorical
        ]
        model = cls("linear", task, numeric, cats, [], [])
        design = model._design(X)
        cut_short = False
        if task == "regression":
            fitted = Ridge(alpha=1.0).fit(design, y)
            coef, intercept = [np.atleast_1d(fitted.coef_).tolist()], [float(fitted.intercept_)]
        else:
            chunk = MAX_ITER if deadline is None else CHUNK_ITER
            fitted = LogisticRegression(max_iter=chunk, warm_start=True, random_state=seed)
            iterations = 0
            with warnings.catch_warnings():
                # An unconverged chunk is expected: the next one continues from its coefficients.
                if deadline is not None:
                    warnings.simplefilter("ignore", ConvergenceWarning)
                while True:
                    fitted.fit(design, y)
                    ran = int(np.max(fitted.n_iter_))
                    iterations += ran
                    if ran < chunk or iterations >= MAX_ITER:
                        break
                    if time.monotonic() > deadline:
                        cut_short = True
                        break
            coef, intercept = fitted.coef_.tolist(), fitted.intercept_.tolist()
        return cls("linear", task, numeric, cats, coef, intercept), cut_short

    def _design(self, X: pl.DataFrame | pd.DataFrame) -> np.ndarray:
        # Filled in place: with a few hundred one-hot columns the matrix is the model step's largest
        # allocation (1M flights: ~2 GB), and stacking per-column parts would hold it twice.
        width = len(self.numeric) + sum(len(c["categories"]) for c in self.categorical)
        design = np.empty((len(X), width))
        for j, n in enumerate(self.numeric):
            values = _column(X, n["name"], float)
            design[:, j] = (np.where(np.isnan(values), n["impute"], values) - n["mean"]) / n["scale"]
        offset = len(self.numeric)
        for c in self.categorical:
            codes = _column(X, c["name"])
            categories = np.asarray(c["categories"])
            # An unseen code matches no column: all zeros, as OneHotEncoder(handle_unknown="ignore").
            design[:, offset : offset + len(categories)] = codes[:, None] == categories[None, :]
            offset += len(categories)
        return design

    def predict(self, features: pl.DataFrame | pd.DataFrame) -> np.ndarray:
        """P(positive) (binary), class probabilities (multiclass) or values, like the booster's."""
        n = len(features)
        intercept = np.asarray(self.intercept, dtype=float)
        if self.kind == "constant":
            if self.task == "multiclass":
                return np.tile(intercept, (n, 1))
            return np.full(n, intercept[0])
        coef = np.asarray(self.coef, dtype=float).T
        # Chunk by chunk: the dense design matrix of a whole test split would be its largest allocation.
        z = (
            np.concatenate(
                [
                    _scores(self._design(_rows(features, i, PREDICT_ROWS)), coef)
                    for i in range(0, max(n, 1), PREDICT_ROWS)
                ]
            )
            + intercept
        )
        if self.task == "regression":
            return z[:, 0]
        if self.task == "binary":
            return 1.0 / (1.0 + np.exp(-z[:, 0]))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def importance(self) -> list[tuple[str, float]]:
        """|coefficient| per input column (summed over classes and one-hot columns), largest first."""
        if self.kind == "constant":
            return []
        weights = np.abs(np.asarray(self.coef)).sum(axis=0)
        names = [n["name"] for n in self.numeric] + [
            c["name"] for c in self.categorical for _ in c["categories"]
        ]
        totals: dict[str, float] = {}
        for name, w in zip(names, weights.tolist(), strict=True):
            totals[name] = totals.get(name, 0.0) + w
        return sorted(totals.items(), key=lambda t: -t[1])

    def to_json(self) -> str:
        body = {"format_version": FORMAT_VERSION, **self.__dict__}
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LinearModel:
        data = json.loads(text)
        if data.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError("unsupported baseline model format")
        return cls(**data)


def _scores(design: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """design @ coef, each row summed in one fixed order: BLAS picks its kernel by the number of rows, so a
    row scored alone and the same row in a batch differed in the last bit (an API request of one object
    against a list); products summed along each row's contiguous axis do not."""
    design = np.ascontiguousarray(design, dtype=float)
    return np.stack([(design * coef[:, k]).sum(axis=1) for k in range(coef.shape[1])], axis=1)
