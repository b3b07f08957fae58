"""The training-split cap (model.max_train_rows): which rows reach Python, and that it is repeatable."""

from __future__ import annotations

import duckdb

from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.train import features_for_training


def _pipeline(cap: int | None):
    pipeline = load_project(default_pipelines_dir()).pipelines["flight_delay"]
    return pipeline.model_copy(update={"model": pipeline.model.model_copy(update={"max_train_rows": cap})})


def _warehouse() -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA flight_delay")
    conn.execute(
        "CREATE TABLE flight_delay.features AS SELECT i::VARCHAR AS _key, "
        "CASE WHEN i < 5000 THEN 'train' WHEN i < 5300 THEN 'valid' ELSE 'test' END AS _split "
        "FROM range(6000) t(i)"
    )
    return conn


def test_cap_samples_only_the_training_split_and_repeats():
    with _warehouse() as conn:
        frame, available = features_for_training(conn, _pipeline(1200))
        again, _ = features_for_training(conn, _pipeline(1200))
        whole, _ = features_for_training(conn, _pipeline(None))
    assert available == 5000
    counts = dict(frame.group_by("_split").len().iter_rows())
    assert counts == {"train": 1200, "valid": 300, "test": 700}
    train = frame.filter(frame["_split"] == "train")["_key"].cast(int)
    # A spread over the whole training window, not its first rows.
    assert train.min() < 500 and train.max() > 4500
    assert set(train) == set(again.filter(again["_split"] == "train")["_key"].cast(int))
    assert whole.height == 6000
