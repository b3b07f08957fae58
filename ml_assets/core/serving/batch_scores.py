"""Scores of the champion: one row per entity (id, timestamp, score, decision, version), for the batch
asset (`<pipeline>.predictions`), the `ml-assets predict` command and the online API alike.

Batch scores live in a per-pipeline table, beside the pipeline's modelling table: their columns are the
pipeline's id columns, which differ from pipeline to pipeline, so they cannot be one platform table of
store.py. Every row names the version that scored it and when. A partition window is re-scored by deleting
its rows and inserting the new ones in one transactions, chunk by chunk, so memory stays bounded by
`serving.chunk_rows` whatever the partition's size, and a reader sees the old scores or the new ones.

The same rows are readable as Parquet: one file per partition, `<data>/predictions/<pipeline>/<partition>
.parquet`, written by DuckDB's COPY under a temporary name and renamed (a reader sees the previous file or
the new one, never half of one), so re-scoring a partition replaces its file as it replaces its rows.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from ml_assets.core import registry
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ArtifactError
from ml_assets.core.ingest import TimeWindow, window_condition
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.sql import lit, q, table_exists
from ml_assets.core.store import cursor, transactions

SCORE_COLUMNS = ("score", "decision", "version", "scored_at", "run_id")


class NoChampion(ArtifactError):
    """A pipeline has no champion yet: there is nothing to score with."""


def predictions_table(pipeline: PipelineSpec) -> str:
    return f"{q(pipeline.name)}.predictions"


def entity_columns(pipeline: PipelineSpec) -> list[str]:
    """The id columns, then the timestamp (when it is not one of them): what names a scored row."""
    ids = pipeline.row_id  # the built-in row id when the config names none
    ts = [pipeline.timestamp] if pipeline.timestamp and pipeline.timestamp not in ids else []
    return [*ids, *ts]


def champion(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> registry.Registered:
    """The champion as the alias names it now: for the doors (`ml-assets predict`), not for assets after
    `<pipeline>/champion`, which score the version it settled."""
    version = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
    if version is None:
        raise NoChampion(
            f"pipeline '{pipeline.name}' has no champion yet: materialize its model and promotion "
            f"(`ml-assets run`), or make a version champion with `ml-assets rollback {pipeline.name} --to <version>`"
        )
    return registry.registered(conn, version, pipeline.name)


# A multiclass row's probability of every class: a list of {class, probability} in the model's class order.
PROBABILITIES = "probabilities"


def score_columns(model: ServableModel, rows: pl.DataFrame, version: str) -> pl.DataFrame:
    """score, decision and version for completed rows (modelling-table columns), and for a multiclass
    model the probability of every class (`probabilities`).

    score: P(positive class) (binary), the predicted class' probability (multiclass), or the value
    (regression); decision: the class at the champion's threshold (binary) or the most likely class,
    None for regression."""
    predicted = np.asarray(model.predict(rows), dtype=np.float64)
    task = model.manifest.task
    decision: pl.Series
    extra: list[pl.Series] = []
    if task == "regression":
        score = predicted
        decision = pl.Series("decision", [None] * rows.height, dtype=pl.String)
    else:
        classes = model.class_names
        if task == "binary":
            score = predicted
            index = (predicted >= model.threshold).astype(np.int64)
        else:
            index = predicted.argmax(axis=1)
            score = predicted[np.arange(len(index)), index]
            n = len(classes)
            per_class = pl.DataFrame(
                {
                    "class": classes[np.tile(np.arange(n), rows.height)],
                    "probability": predicted.ravel(),
                }
            )
            probabilities = per_class.to_struct().reshape((rows.height, n)).arr.to_list()
            extra.append(probabilities.alias(PROBABILITIES))
        # Indexed by the numpy array, not `gather`: the same rows at a quarter of the cost, at any size.
        decision = classes[index]
    return pl.DataFrame(
        [
            pl.Series("score", score, dtype=pl.Float64),
            decision,
            pl.Series("version", [version] * rows.height, dtype=pl.String),
            *extra,
        ]
    )


def score_frame(
    model: ServableModel, pipeline: PipelineSpec, rows: pl.DataFrame, version: str
) -> pl.DataFrame:
    """Entity columns and scores of completed rows. A request's rows have no built-in row id (it is made
    at ingestion), so a file scored by `ml-assets predict` keeps the entity columns it has."""
    entities = [c for c in entity_columns(pipeline) if c in rows.columns]
    # Columns gathered, not selected: the same frame without a query (`rows[[]]` would not be empty).
    chosen = pl.DataFrame([rows.get_column(c) for c in entities])
    return pl.concat([chosen, score_columns(model, rows, version)], how="horizontal")


@dataclass(frozen=True)
class ScoreRun:
    version: str
    rows: int
    replaced: int
    window: TimeWindow | None
    summary: dict[str, Any]
    # Why the table was rebuilt before this run wrote to it (see _ensure_table), if it was.
    rebuilt: str | None = None


def _ensure_table(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, task: str) -> str | None:
    """Create the predictions table, or rebuild it when its columns are not the ones the pipeline now
    scores (its id columns or the champion's task changed): the rows it holds could not be replaced by
    entity and no longer match the modelling table's rows. Returns what was rebuilt and why."""
    modelling = table_name(pipeline)
    ids = [
        (c[0], str(c[1]))
        for c in conn.execute(
            f"SELECT {', '.join(q(c) for c in entity_columns(pipeline))} FROM {modelling} LIMIT 0"
        ).description
    ]
    scores = [
        ("score", "DOUBLE"),
        ("decision", "VARCHAR"),
        ("version", "VARCHAR"),
        ("scored_at", "TIMESTAMP"),
    ]
    if task == "multiclass":
        scores.append((PROBABILITIES, 'STRUCT("class" VARCHAR, probability DOUBLE)[]'))
    # Last: where the migration to schema version 9 (store.add_score_run_ids) added it to older tables.
    scores.append(("run_id", "VARCHAR"))
    table = predictions_table(pipeline)
    rebuilt = None
    if table_exists(conn, pipeline.name, "predictions"):
        found = [(c[0], str(c[1])) for c in conn.execute(f"SELECT * FROM {table} LIMIT 0").description]
        if found == ids + scores:
            return None
        rebuilt = (
            f"{pipeline.name}.predictions had columns {[c for c, _ in found]} but pipeline '{pipeline.name}' now scores "
            f"{[c for c, _ in ids + scores]} (id columns {[c for c, _ in ids]}, {task} champion): the "
            "table was rebuilt; scores of the partitions not in this run are gone until they are scored "
            f"again (materialize {pipeline.name}/predictions for them)"
        )
        conn.execute(f"DROP TABLE {table}")
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(pipeline.name)}")
    not_null = {"version", "scored_at"}
    columns = ", ".join(f"{q(c)} {t}{' NOT NULL' if c in not_null else ''}" for c, t in ids + scores)
    conn.execute(f"CREATE TABLE {table} ({columns})")
    return rebuilt


def _window_sql(pipeline: PipelineSpec, window: TimeWindow | None) -> str:
    if window is None or not pipeline.timestamp:
        return "TRUE"
    return window_condition(window, q(pipeline.timestamp))


def score_window(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    window: TimeWindow | None,
    version: str,
    run_id: str | None = None,
) -> ScoreRun:
    """Score the modelling table's rows in `window` with `version` (the champion the caller's champion
    step settled) and replace that window's rows of `<pipeline>.predictions`, in one transaction; every
    row names the version and the `run_id` that scored it."""
    found = registry.registered(conn, version, pipeline.name)
    model = ServableModel.from_registry(found)
    rebuilt = _ensure_table(conn, pipeline, model.manifest.task)
    where = _window_sql(pipeline, window)
    needed = sorted({*model.transform.input_columns, *entity_columns(pipeline)})
    # Functions of features may read any column, so only a transform without them reads fewer columns.
    select = "*" if any(f.get("function") for f in model.transform.features) else ", ".join(map(q, needed))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    table, rows = predictions_table(pipeline), 0
    # Scored chunk by chunk into a temp table (DuckDB bounds and spills it), then swapped in by one
    # statement in a transaction: inserting every chunk inside the transaction would hold them all in
    # memory until it commits (10M rows: +4 GiB).
    try:
        with cursor(conn) as reader:
            batches = reader.execute(
                f"SELECT {select} FROM {table_name(pipeline)} WHERE {where}"
            ).to_arrow_reader(pipeline.serving.chunk_rows)
            conn.execute(f"CREATE OR REPLACE TEMP TABLE __scored AS SELECT * FROM {table} LIMIT 0")
            for batch in batches:
                chunk = pl.from_arrow(batch)
                if not isinstance(chunk, pl.DataFrame) or chunk.height == 0:
                    continue
                scored = score_frame(model, pipeline, chunk, found.version).with_columns(
                    pl.lit(now).alias("scored_at"), pl.lit(run_id, dtype=pl.String).alias("run_id")
                )
                conn.register("__scores", scored.to_arrow())
                try:
                    names = ", ".join(q(c) for c in scored.columns)
                    conn.execute(f"INSERT INTO __scored ({names}) SELECT {names} FROM __scores")
                finally:
                    conn.unregister("__scores")
                rows += chunk.height
        for attempt in transactions(conn, table):
            with attempt:
                replaced = conn.execute(f"DELETE FROM {table} WHERE {where}").fetchone()[0]
                conn.execute(f"INSERT INTO {table} SELECT * FROM __scored")
    finally:
        conn.execute("DROP TABLE IF EXISTS __scored")
    return ScoreRun(found.version, rows, replaced, window, score_summary(conn, pipeline, where), rebuilt)


def parquet_path(root: Path, pipeline: PipelineSpec, partition: str | None) -> Path:
    """Where a partition's scores are exported (`all` for an unpartitioned pipeline)."""
    return Path(root) / "predictions" / pipeline.name / f"{partition or 'all'}.parquet"


def export_parquet(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    root: Path,
    partition: str | None,
    window: TimeWindow | None,
) -> Path:
    """Write the scores of `window` (one partition's) to its Parquet file, replacing the previous one."""
    path = parquet_path(root, pipeline, partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    order = ", ".join(q(c) for c in entity_columns(pipeline))
    try:
        conn.execute(
            f"COPY (SELECT * FROM {predictions_table(pipeline)} WHERE {_window_sql(pipeline, window)} "
            f"ORDER BY {order}) TO {lit(str(tmp))} (FORMAT parquet)"
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def score_summary(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, where: str = "TRUE") -> dict:
    """Count, mean and quantiles of the scores in a window, and the share of each decision."""
    table = predictions_table(pipeline)
    count, mean, p05, p50, p95 = conn.execute(
        f"SELECT count(*), avg(score), quantile_cont(score, 0.05), quantile_cont(score, 0.5), "
        f"quantile_cont(score, 0.95) FROM {table} WHERE {where}"
    ).fetchone()
    shares = conn.execute(
        f"SELECT decision, count(*) / sum(count(*)) OVER () FROM {table} WHERE {where} AND decision IS NOT NULL "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    summary: dict[str, Any] = {"rows": count, "mean": mean, "p05": p05, "p50": p50, "p95": p95}
    if shares:
        summary["decision_share"] = {str(d): round(float(s), 6) for d, s in shares}
    return summary


def windows_to_rescore(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> tuple[str | None, list]:
    """(champion, the days among the latest `serving.rescore_partitions` days with modelling rows whose
    scores are not all the champion's). Days, as the flagship's time axis; the caller maps them to its
    partitions. Empty when there is no champion, no timestamp, or nothing to re-score."""
    version = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
    n = pipeline.serving.rescore_partitions
    if version is None or not pipeline.timestamp or n == 0 or not _has_modelling_table(conn, pipeline):
        return version, []
    ts = q(pipeline.timestamp)
    latest = f"SELECT DISTINCT date_trunc('day', {ts}) AS day FROM {table_name(pipeline)} ORDER BY day DESC LIMIT {n}"
    if not table_exists(conn, pipeline.name, "predictions"):
        return version, sorted(r[0] for r in conn.execute(latest).fetchall())
    stale = conn.execute(
        f"""SELECT l.day FROM ({latest}) l LEFT JOIN (
                SELECT date_trunc('day', {ts}) AS day, bool_and(version = ?) AS current
                FROM {predictions_table(pipeline)} GROUP BY 1) p USING (day)
            WHERE p.current IS DISTINCT FROM TRUE ORDER BY l.day""",
        [version],
    ).fetchall()
    return version, [r[0] for r in stale]


def _has_modelling_table(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> bool:
    return table_exists(conn, pipeline.name, "modelling_table")
