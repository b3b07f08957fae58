"""Serving: load a registered model version (hash-verified, no pickle) and score modelling-table rows.

`python -m ml_assets.core.serving.loader <version dir> [<manifest sha256>]` reloads a version in a fresh process and
re-predicts the sample rows saved with it: the promotion gate's proof that what was trained is what will
serve. A registered version is loaded with the sha256 the registry recorded for its manifest
(`registry.registered`), so an edited manifest is refused like an edited model file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import lightgbm as lgb
import numpy as np
import polars as pl

from ml_assets.core.features import FeatureTransform
from ml_assets.core.linear import LinearModel
from ml_assets.core.metrics import score
from ml_assets.core.registry import (
    MODEL_FILE,
    MODEL_JSON_FILE,
    SAMPLE_FILE,
    TRANSFORM_FILE,
    Manifest,
    Registered,
    candidate_file,
    read_manifest,
)


class Predictor(Protocol):
    def predict(self, features: pl.DataFrame | np.ndarray) -> np.ndarray: ...


def load_predictor(version_dir: Path, manifest: Manifest) -> Predictor:
    """The model of a (hash-verified) version folder: LightGBM's text model, or a JSON linear/constant
    model."""
    if manifest.model_kind == "lightgbm":
        return lgb.Booster(model_file=str(Path(version_dir) / MODEL_FILE))
    return LinearModel.from_json((Path(version_dir) / MODEL_JSON_FILE).read_text())


@dataclass(frozen=True)
class ServableModel:
    """A registered version ready to score modelling-table rows, whatever its model: LightGBM, or a
    linear / constant baseline (both saved as text, never pickled)."""

    manifest: Manifest
    transform: FeatureTransform
    model: Predictor

    @classmethod
    def load(cls, version_dir: Path, manifest_sha256: str | None = None) -> ServableModel:
        """Load a version folder, every artifact hash-verified; `manifest_sha256` (the registry's) checks
        the manifest too. None only for a folder outside the registry or a version registered before the
        registry recorded manifest hashes."""
        version_dir = Path(version_dir)
        manifest = read_manifest(version_dir, verify=True, manifest_sha256=manifest_sha256)
        model = load_predictor(version_dir, manifest)
        return cls(manifest, FeatureTransform.load(version_dir / TRANSFORM_FILE), model)

    def candidate(self, kind: str, version_dir: Path) -> ServableModel:
        """A simpler candidate trained beside this LightGBM version (its JSON is one of the version's
        hash-verified files), served with the same transform and its own decision threshold."""
        found = self.manifest.candidates[kind]
        model = LinearModel.from_json((Path(version_dir) / candidate_file(kind)).read_text())
        manifest = self.manifest.model_copy(
            update={
                "model_kind": kind,
                "decision_threshold": found.decision_threshold,
                "test_metrics": found.test_metrics,
            }
        )
        return ServableModel(manifest, self.transform, model)

    @property
    def kind(self) -> str:
        return self.manifest.model_kind

    @property
    def booster(self) -> lgb.Booster | None:
        """The LightGBM booster, or None for a baseline champion."""
        return self.model if isinstance(self.model, lgb.Booster) else None

    @classmethod
    def from_registry(cls, version: Registered) -> ServableModel:
        """Load a registered version (`registry.registered`), its manifest checked against the registry."""
        return cls.load(version.path, version.manifest_sha256)

    def predict_features(self, features: pl.DataFrame) -> np.ndarray:
        # The transform's own columns are the model's, in its order (checked, not assumed): no query to
        # pick them; otherwise indexing, not select.
        names = self.manifest.features
        selected = features if features.columns == names else features[names]
        if self.booster is None:
            return self.model.predict(selected)
        # A float matrix, not pandas: the features are numbers already (categories are their codes), and
        # LightGBM's pandas path costs a millisecond per call, which an online request cannot afford. One
        # thread, as the project trains: threads only contend on a busy machine.
        return self.booster.predict(selected.to_numpy().astype(np.float64, copy=False), num_threads=1)

    def predict(self, rows: pl.DataFrame) -> np.ndarray:
        """Scores for modelling-table rows: P(positive) (binary), class probabilities, or values."""
        return self.predict_features(self.transform.apply(rows))

    @cached_property
    def class_names(self) -> pl.Series:
        """The classes as the decisions name them (strings), in the model's order; built once per loaded
        model, as a request of one row pays for it otherwise."""
        return pl.Series("decision", self.manifest.classes).cast(pl.String)

    @property
    def threshold(self) -> float:
        """The decision threshold chosen at training time (binary); 0.5 otherwise."""
        return float(self.manifest.decision_threshold)

    def labels(self, rows: pl.DataFrame) -> np.ndarray:
        """The rows' targets encoded as the model predicts them (class index, or the value)."""
        target = rows.get_column(self.manifest.target)
        if self.manifest.task == "regression":
            return target.cast(pl.Float64).to_numpy()
        mapping = {c: i for i, c in enumerate(self.manifest.classes)}
        return target.replace_strict(mapping, default=-1, return_dtype=pl.Int32).to_numpy()

    def score(self, rows: pl.DataFrame, metric: str) -> float:
        return score(self.manifest.task, metric, self.labels(rows), self.predict(rows), self.threshold)


def reproduces_training_predictions(
    version_dir: Path, manifest_sha256: str | None = None, tolerance: float = 1e-9
) -> tuple[bool, str]:
    """Load the version in a fresh Python process (checking its manifest against `manifest_sha256`) and
    re-predict its saved sample rows."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml_assets.core.serving.loader",
            str(version_dir),
            *([manifest_sha256] if manifest_sha256 else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return (
            False,
            f"reloading {version_dir} in a fresh process failed: {lines[-1] if lines else proc.returncode}",
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = result["max_abs_diff"] <= tolerance and result["rows"] > 0
    return ok, (
        f"fresh-process reload reproduces {result['rows']} training-time predictions "
        f"(max abs diff {result['max_abs_diff']:.2e}, tolerance {tolerance:.0e})"
    )


def _reproduce(version_dir: Path, manifest_sha256: str | None) -> dict[str, float]:
    model = ServableModel.load(version_dir, manifest_sha256)
    rows = pl.read_parquet(version_dir / SAMPLE_FILE)
    expected = rows.select(pl.col("^_prediction.*$")).to_numpy()
    actual = np.asarray(model.predict(rows)).reshape(len(rows), -1)
    return {"rows": len(rows), "max_abs_diff": float(np.abs(actual - expected).max()) if len(rows) else 0.0}


if __name__ == "__main__":
    print(json.dumps(_reproduce(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)))
