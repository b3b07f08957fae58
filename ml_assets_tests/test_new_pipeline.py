"""A new dataset needs one YAML file and no Python: a Parquet file with a multiclass target."""

from __future__ import annotations

import functools
import textwrap

import dagster as dg
import numpy as np
import polars as pl

from ml_assets.api import create_app, post_in_process
from ml_assets.core import registry
from ml_assets.core.registry import read_manifest
from ml_assets.core.serving import request_parsing
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets_tests.conftest import materialize_all, run_metadata


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
    assert manifest.classes == ["high", "low", "mid"]
    assert abs(splits["test"] / n - 0.2) < 0.03
    # Far better than chance (a third, or log 3 nats): the pipeline really learned from the file.
    assert manifest.test_metrics["accuracy"] > 0.6
    assert manifest.test_metrics["log_loss"] < 0.7 * np.log(3)
    # The first run ends with a champion: whichever of constant, linear and LightGBM the ladder picked.
    assert champion is not None and decision["action"] == "promote_first"
    assert decision["champion_after"] == champion and decision["reason"].startswith("first champion: the ")
    _every_class_probability_is_served(pipelines, root, manifest.classes, champion)
    _new_id_columns_rebuild_the_predictions_table(pipelines, root)


def _every_class_probability_is_served(pipelines, root, classes: list[str], champion: str) -> None:
    """Batch and online scores of a multiclass champion carry every class' probability, in the model's
    class order: the decision is the most likely class and the score its probability."""
    with connect(warehouse_path(root)) as conn:
        batch = conn.execute("SELECT * FROM items.predictions ORDER BY item").pl()
        rows = conn.execute("SELECT * FROM items.modelling_table ORDER BY item LIMIT 5").pl()
    probabilities = batch.get_column("probabilities").to_list()
    assert batch.height == n_rows(root) and all([p["class"] for p in ps] == classes for ps in probabilities)
    values = np.array([[p["probability"] for p in ps] for ps in probabilities])
    assert np.allclose(values.sum(axis=1), 1.0)
    assert batch.get_column("decision").to_list() == [classes[i] for i in values.argmax(axis=1)]
    assert np.allclose(batch.get_column("score").to_numpy(), values.max(axis=1))
    project = load_project(pipelines)
    app = create_app(project, functools.partial(connect, warehouse_path(root)), ["items"], poll=False)
    fields = list(
        request_parsing.request_fields(
            project.pipelines["items"], project.sources_of(project.pipelines["items"])
        )
    )
    answer = post_in_process(app, "/v1/items/predict", request_parsing.request_rows(rows, fields))
    assert answer["version"] == champion
    expected = batch.filter(pl.col("item").is_in(rows.get_column("item").to_list()))
    assert [a["probabilities"] for a in answer["predictions"]] == expected.get_column(
        "probabilities"
    ).to_list()
    assert [a["decision"] for a in answer["predictions"]] == expected.get_column("decision").to_list()


def n_rows(root) -> int:
    with connect(warehouse_path(root)) as conn:
        return conn.execute("SELECT count(*) FROM items.modelling_table").fetchone()[0]


def _new_id_columns_rebuild_the_predictions_table(pipelines, root) -> None:
    """A pipeline whose id columns change gets a predictions table keyed by the new ones, rebuilt with a
    message naming the table, and its Parquet export follows."""
    path = pipelines / "items.yaml"
    path.write_text(path.read_text().replace("id: [item]\ntarget", "id: [item, shade]\ntarget"))
    result = materialize_all(pipelines, root, selection=[dg.AssetKey(["items", "predictions"])])
    metadata = run_metadata(result)
    assert "items.predictions" in metadata["table_rebuilt"].value
    assert "['item', 'shade']" in metadata["table_rebuilt"].value
    with connect(warehouse_path(root)) as conn:
        rebuilt = conn.execute("SELECT * FROM items.predictions").pl()
    assert rebuilt.columns[:2] == ["item", "shade"] and rebuilt.height == n_rows(root)
    exported = pl.read_parquet(root / "predictions" / "items" / "all.parquet")
    assert exported.columns == rebuilt.columns and exported.height == rebuilt.height
    again = materialize_all(pipelines, root, selection=[dg.AssetKey(["items", "predictions"])])
    assert "table_rebuilt" not in run_metadata(again)
