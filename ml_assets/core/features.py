"""Feature transform: declared in the pipeline config, fitted on the training split, saved as JSON.

`FeatureTransform.fit` learns what must come from training data only (imputation values, category
vocabularies); `apply` is a pure polars function of a frame of modelling-table rows, so training, batch
scoring and online serving compute exactly the same features from the same saved JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from ml_assets.core.dataset import capped_train_rows, table_name
from ml_assets.core.errors import ArtifactError, DatasetError
from ml_assets.core.hashing import sha256_file
from ml_assets.core.spec import FeatureSpec, PipelineSpec, resolve_function
from ml_assets.core.sql import q
from ml_assets.core.store import cursor, transactions

MISSING = "__missing__"
FORMAT_VERSION = 1
PART_EXPR = {
    "year": lambda e: e.dt.year(),
    "month": lambda e: e.dt.month(),
    "day": lambda e: e.dt.day(),
    "dayofweek": lambda e: e.dt.weekday(),
    "dayofyear": lambda e: e.dt.ordinal_day(),
    "hour": lambda e: e.dt.hour(),
    "minute": lambda e: e.dt.minute(),
}


def _input(spec: dict[str, Any], frame: pl.DataFrame) -> pl.Series:
    if spec.get("function"):
        values = resolve_function(spec["function"])(frame)
        series = values if isinstance(values, pl.Series) else pl.Series(values)
        if series.len() != frame.height:
            raise DatasetError(
                f"feature '{spec['name']}': {spec['function']} returned {series.len()} values "
                f"for {frame.height} rows"
            )
        return series.alias(spec["name"])
    column = spec["column"]
    if column not in frame.columns:
        raise DatasetError(
            f"feature '{spec['name']}' needs input column '{column}', which is not in the data"
        )
    return frame.get_column(column)


def _impute_value(series: pl.Series, how: str) -> float | None:
    if how == "none":
        return None
    if how == "zero":
        return 0.0
    value = series.median() if how == "median" else series.mean()
    return float(value) if value is not None else 0.0


def _fit_one(feature: FeatureSpec, frame: pl.DataFrame) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": feature.name,
        "type": feature.type,
        "column": feature.input_column,
        "function": feature.function,
    }
    values = _input(spec, frame)
    if feature.type in ("numeric", "boolean"):
        spec["impute"] = _impute_value(values.cast(pl.Float64, strict=False), feature.impute)
    elif feature.type == "categorical":
        # The count column's name is one no user column can have (feature names cannot start with "_").
        counts = (
            values.cast(pl.String)
            .fill_null(MISSING)
            .value_counts(name="__count")
            .filter(pl.col("__count") >= feature.min_frequency)
            .sort(["__count", values.name], descending=[True, False])
            .head(feature.max_categories)
        )
        # Codes follow sorted category names, so the vocabulary is independent of row order.
        spec["categories"] = sorted(counts.get_column(values.name).to_list())
    else:
        spec["parts"] = list(feature.parts)
        spec["timezone"] = feature.timezone
    return spec


def _apply_one(spec: dict[str, Any], values: pl.Expr) -> list[pl.Expr]:
    name = spec["name"]
    if spec["type"] in ("numeric", "boolean"):
        out = values.cast(pl.Float64, strict=False)
        if spec["impute"] is not None:
            # Null and NaN both take the imputed value (is_not_nan of a null is null, so `otherwise`):
            # the values of fill_null(v).fill_nan(v) in one pass, about half its cost on one row.
            out = pl.when(out.is_not_nan()).then(out).otherwise(pl.lit(spec["impute"], dtype=pl.Float64))
        return [out.alias(name)]
    if spec["type"] == "categorical":
        categories = spec["categories"]
        # A category's code is its position in the vocabulary, which is an Enum's physical value; unseen
        # and rare categories fail the cast and share the code len(categories) ("other"). Half the cost
        # of replace_strict's mapping on the few rows of a request, the same codes.
        codes = (
            values.cast(pl.String)
            .fill_null(MISSING)
            .cast(pl.Enum(categories), strict=False)
            .to_physical()
            .cast(pl.Int32)
            .fill_null(len(categories))
        )
        return [codes.alias(name)]
    stamps = values.cast(pl.Datetime("us"), strict=False)
    if spec["timezone"]:
        stamps = stamps.dt.replace_time_zone("UTC").dt.convert_time_zone(spec["timezone"])
    return [PART_EXPR[part](stamps).cast(pl.Float64).alias(f"{name}_{part}") for part in spec["parts"]]


@dataclass(frozen=True)
class FeatureTransform:
    features: list[dict[str, Any]]

    @classmethod
    def fit(cls, pipeline: PipelineSpec, train: pl.DataFrame) -> FeatureTransform:
        if train.height == 0:
            raise DatasetError(
                f"pipeline '{pipeline.name}': the training split is empty; check split settings"
            )
        return cls([_fit_one(f, train) for f in pipeline.features])

    @cached_property
    def _expressions(self) -> list[list[pl.Expr]]:
        # Built once per loaded transform: building ~25 expressions (the category mappings among them)
        # costs more than running them on the one row of an online request.
        return [
            _apply_one(spec, pl.col(f"__function_{i}") if spec.get("function") else pl.col(spec["column"]))
            for i, spec in enumerate(self.features)
        ]

    def apply(self, frame: pl.DataFrame) -> pl.DataFrame:
        # One select of expressions rather than a Series operation per feature: the same values, and an
        # online request of one row pays polars' per-call overhead once instead of ~100 times.
        computed: list[pl.Series] = []
        # Float columns a feature takes as they are (no imputation) skip the select: its cost grows
        # with the expressions in it, ~25 us each on a request's row, and a history feature set adds
        # a dozen such columns. Casting a Float64 to Float64 is the identity, so the values are the same.
        kept: dict[str, pl.Series] = {}
        schema = frame.schema
        for i, spec in enumerate(self.features):
            if spec.get("function"):
                computed.append(_input(spec, frame).alias(f"__function_{i}"))
            elif spec["column"] not in schema:
                _input(spec, frame)  # raises, naming the feature
            elif (
                spec["type"] == "numeric" and spec["impute"] is None and schema[spec["column"]] == pl.Float64
            ):
                kept[spec["name"]] = frame.get_column(spec["column"]).alias(spec["name"])
        expressions = [
            e
            for spec, es in zip(self.features, self._expressions, strict=True)
            if spec["name"] not in kept
            for e in es
        ]
        if not kept:
            # hstack, not with_columns: the same frame without a query of its own.
            return frame.hstack(computed).select(expressions)
        passed = pl.DataFrame(list(kept.values()))
        selected = passed.hstack(frame.hstack(computed).select(expressions)) if expressions else passed
        # Indexing by name, not select: the columns in the transform's order without a query.
        return selected[self.output_columns]

    @property
    def input_columns(self) -> list[str]:
        return sorted({f["column"] for f in self.features if not f.get("function")})

    @property
    def output_columns(self) -> list[str]:
        return [
            f"{f['name']}_{p}" if f["type"] == "datetime" else f["name"]
            for f in self.features
            for p in (f.get("parts") or [None])
        ]

    @property
    def categorical_columns(self) -> list[str]:
        return [f["name"] for f in self.features if f["type"] == "categorical"]

    def to_json(self) -> str:
        return json.dumps(
            {"format_version": FORMAT_VERSION, "features": self.features}, indent=2, sort_keys=True
        )

    def save(self, folder: Path) -> str:
        """Write the transform as `<sha256>.json` in `folder`, atomically (readers never see half a file);
        returns the sha256. Same content, same file: a re-fit on the same data writes nothing new."""
        text = self.to_json()
        sha = hashlib.sha256(text.encode()).hexdigest()
        path = Path(folder) / f"{sha}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return sha

    @classmethod
    def load(cls, path: Path) -> FeatureTransform:
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: unsupported feature transform format {data.get('format_version')!r}"
            )
        return cls(data["features"])


TARGET = "_target"
# The sha256 of the transform that produced a features table row (see build_features).
TRANSFORM_COLUMN = "_transform"
META_COLUMNS = ("_key", "_ts", "_split", "_group", TARGET)


def row_key(id_columns: list[str]) -> pl.Expr:
    """One string per row from its id columns: joins predictions back to source rows."""
    return pl.concat_str([pl.col(c).cast(pl.String) for c in id_columns], separator="|", ignore_nulls=False)


def feature_table(pipeline: PipelineSpec, frame: pl.DataFrame, transform: FeatureTransform) -> pl.DataFrame:
    """Features of every modelling-table row, with the platform's meta columns in front.

    `_key` joins predictions back to source rows, `_ts` orders rows in time, `_split` and `_target`
    come from the modelling table, and `_group` is the unit the split assigns (the `group_by` values,
    else the row), so cross-validation folds can keep a group whole as the split does.
    """
    key = row_key(pipeline.row_id)
    ts = pl.col(pipeline.timestamp) if pipeline.timestamp else pl.lit(None, dtype=pl.Datetime("us"))
    meta = frame.select(
        key.alias("_key"),
        ts.alias("_ts"),
        pl.col("_split"),
        # Rows missing a group value form one group (folds need a comparable value for every row).
        row_key(pipeline.split.group_by or pipeline.row_id).fill_null("").alias("_group"),
        pl.col(pipeline.target.name).alias(TARGET),
    )
    return pl.concat([meta, transform.apply(frame)], how="horizontal")


def features_table_name(pipeline: PipelineSpec) -> str:
    return f"{q(pipeline.name)}.features"


@dataclass(frozen=True)
class FeaturesResult:
    rows: int
    columns: list[str]
    transform_sha256: str
    vocabulary_sizes: dict[str, int]


# Modelling-table rows transformed at a time.
APPLY_ROWS = 500_000


def _fit_rows(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> pl.DataFrame:
    """The training split, or, when `model.max_train_rows` caps the model's training sample, a sample of
    as many rows ranked by a seeded hash of the row id: the transform is fitted on bounded memory too."""
    table, cap = table_name(pipeline), pipeline.model.max_train_rows
    train = f"SELECT * FROM {table} WHERE _split = 'train'"
    if cap is None or conn.execute(f"SELECT count(*) FROM ({train})").fetchone()[0] <= cap:
        return conn.execute(train).pl()
    rank = f"hash({', '.join(q(c) for c in pipeline.row_id)}, {pipeline.model.seed})"
    return conn.execute(f"SELECT * FROM {table} WHERE {capped_train_rows(conn, table, rank, cap)}").pl()


def build_features(
    conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, transforms_dir: Path
) -> FeaturesResult:
    """Fit the transform on the training split of the modelling table (_fit_rows), apply it to every row, and write
    `<pipeline>.features` and the transform file.

    Transform files are named by their content's sha256, which every row of the table carries
    (`_transform`): a later step (or run) reading the table finds the exact transform that made it,
    even if another run has fitted a different one since.
    """
    transform = FeatureTransform.fit(pipeline, _fit_rows(conn, pipeline))
    sha = transform.save(transforms_dir)
    target, building, rows = features_table_name(pipeline), f"{q(pipeline.name)}.__features_building", 0
    # Applied chunk by chunk (the transform is row-wise): the modelling table never is in Python whole.
    # Written to a table of its own, committed chunk by chunk, and swapped in at the end: a failure
    # part-way leaves the previous features table, and one transaction over every chunk would hold all
    # of them in memory until it commits (10M rows: +4.5 GiB).
    try:
        with cursor(conn) as reader:
            chunks = reader.execute(f"SELECT * FROM {table_name(pipeline)}").to_arrow_reader(APPLY_ROWS)
            for chunk in chunks:
                table = feature_table(pipeline, pl.from_arrow(chunk), transform)
                conn.register("_features", table.with_columns(pl.lit(sha).alias(TRANSFORM_COLUMN)).to_arrow())
                try:
                    into = f"INSERT INTO {building} " if rows else f"CREATE OR REPLACE TABLE {building} AS "
                    conn.execute(into + "SELECT * FROM _features")
                finally:
                    conn.unregister("_features")
                rows += table.height
        for attempt in transactions(conn, target):
            with attempt:
                conn.execute(f"DROP TABLE IF EXISTS {target}")
                conn.execute(f"ALTER TABLE {building} RENAME TO features")
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {building}")
    return FeaturesResult(
        rows,
        transform.output_columns,
        sha,
        {f["name"]: len(f["categories"]) for f in transform.features if "categories" in f},
    )


def transform_of(features: pl.DataFrame, transforms_dir: Path) -> tuple[FeatureTransform, Path]:
    """The transform that produced a features table (by the sha its rows carry), hash-checked."""
    shas = (
        features.get_column(TRANSFORM_COLUMN).unique().to_list()
        if TRANSFORM_COLUMN in features.columns
        else []
    )
    if len(shas) != 1:
        raise DatasetError(
            f"the features table names {len(shas)} transforms ({shas[:3]}); re-materialize its features asset"
        )
    path = Path(transforms_dir) / f"{shas[0]}.json"
    if not path.exists() or sha256_file(path) != shas[0]:
        raise ArtifactError(
            f"{path}: the feature transform of the features table is missing or was modified; "
            "re-materialize the features asset"
        )
    return FeatureTransform.load(path), path
