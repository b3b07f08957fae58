"""A new dataset needs one YAML file and no Python: a Parquet file with a multiclass target."""

from __future__ import annotations

import textwrap

import numpy as np
import polars as pl

from ml_assets.core import registry
from ml_assets.core.registry import read_manifest
from ml_assets.core.store import connect, warehouse_path
from ml_assets_tests.conftest import materialize_all


def test_a_yaml_file_is_a_whole_new_pipeline(tmp_path):
    rng = np.random.default_rng(7)
    n = 3000
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    shade = rng.choice(["red", "green", "blue"], size=n)
    # The class is learnable from the features, so the model must do clearly better than chance.
    score = x1 + 0.8 * (shade == "red") - 0.8 * (shade == "blue")
    label = np.where(score > 0.6, "high", np.where(score < -0.6, "low", "mid"))
    pl.DataFrame({"item": np.arange(n), "x1": x1, "x2": x2, "shade": shade, "label": label}).write_parquet(
        tmp_path / "items.parquet"
    )
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "items.yaml").write_text(
        textwrap.dedent("""
        name: items
        task: multiclass
        sources:
          items:
            path: ../items.parquet
            id: [item]
            columns:
              item: {type: int, not_null: true}
              x1: {type: float}
              x2: {type: float}
              shade: {type: str, allowed: [red, green, blue]}
              label: {type: str, not_null: true}
        base: items
        id: [item]
        target: {name: label}
        features:
          - {name: x1, type: numeric}
          - {name: x2, type: numeric}
          - {name: shade, type: categorical}
        split: {method: random, valid_fraction: 0.15, test_fraction: 0.2}
        model: {time_budget_s: 600, max_trials: 2, cv_folds: 2, max_rounds: 200}
    """)
    )
    root = tmp_path / "data"
    result = materialize_all(pipelines, root)
    assert result.success
    with connect(warehouse_path(root)) as conn:
        (path,) = conn.execute(
            "SELECT path FROM registry.model_versions WHERE pipeline = 'items' AND run_id IS NOT NULL"
        ).fetchone()
        splits = dict(
            conn.execute("SELECT _split, count(*) FROM items.modelling_table GROUP BY 1").fetchall()
        )
        champion = registry.alias_version(conn, "items", registry.CHAMPION)
        (decision,) = registry.decisions(conn, "items").rows(named=True)
    manifest = read_manifest(path)
    assert manifest["classes"] == ["high", "low", "mid"]
    assert abs(splits["test"] / n - 0.2) < 0.03
    # Far better than chance (a third, or log 3 nats): the pipeline really learned from the file.
    assert manifest["test_metrics"]["accuracy"] > 0.6
    assert manifest["test_metrics"]["log_loss"] < 0.7 * np.log(3)
    # The first run ends with a champion: whichever of constant, linear and LightGBM the ladder picked.
    assert champion is not None and decision["action"] == "promote_first"
    assert decision["champion_after"] == champion and decision["reason"].startswith("first champion: the ")
