"""Serving: load a registered model version (hash-verified, no pickle) and score modelling-table rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from ml_assets.features import FeatureTransform
from ml_assets.metrics import score
from ml_assets.registry import MODEL_FILE, TRANSFORM_FILE, read_manifest


@dataclass(frozen=True)
class ServableModel:
    manifest: dict[str, Any]
    transform: FeatureTransform
    booster: lgb.Booster

    @classmethod
    def load(cls, version_dir: Path) -> ServableModel:
        version_dir = Path(version_dir)
        manifest = read_manifest(version_dir, verify=True)
        booster = lgb.Booster(model_file=str(version_dir / MODEL_FILE))
        return cls(manifest, FeatureTransform.load(version_dir / TRANSFORM_FILE), booster)

    def predict_features(self, features: pl.DataFrame) -> np.ndarray:
        return self.booster.predict(features.select(self.manifest["features"]).to_pandas())

    def predict(self, rows: pl.DataFrame) -> np.ndarray:
        """Scores for modelling-table rows: P(positive) (binary), class probabilities, or values."""
        return self.predict_features(self.transform.apply(rows))

    @property
    def threshold(self) -> float:
        """The decision threshold chosen at training time (binary); 0.5 otherwise."""
        return float(self.manifest.get("decision_threshold", 0.5))

    def labels(self, rows: pl.DataFrame) -> np.ndarray:
        """The rows' targets encoded as the model predicts them (class index, or the value)."""
        target = rows.get_column(self.manifest["target"])
        if self.manifest["task"] == "regression":
            return target.cast(pl.Float64).to_numpy()
        mapping = {c: i for i, c in enumerate(self.manifest["classes"])}
        return target.replace_strict(mapping, default=-1, return_dtype=pl.Int32).to_numpy()

    def score(self, rows: pl.DataFrame, metric: str) -> float:
        return score(self.manifest["task"], metric, self.labels(rows), self.predict(rows), self.threshold)
