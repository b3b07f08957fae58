"""Serving: load a registered model version (hash-verified, no pickle) and score modelling-table rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from ml_assets.features import FeatureTransform
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
