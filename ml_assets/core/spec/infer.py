"""Schemas read from the data: column types and rules from a file's header and a sample, feature specs from
column types, and the safe feature names of any column name a file can hold.

Used when a pipeline file leaves out a source's `columns` or the pipeline's `features` (the loader fills
them in and stores what it inferred beside the pipeline file, so the schema cannot change silently
between runs), and by `ml-assets init`, which writes the same inference out as a commented YAML file.
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import polars as pl

from ml_assets.core.errors import ConfigError, SourceError
from ml_assets.core.ingest import TimeWindow, database, http, landing_dir, resolve_files
from ml_assets.core.spec.package_data import PKG_SCHEME, package_file
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.store import data_dir

SAMPLE_ROWS = 20_000
# Observed ranges widen by this share of their span (and never cross zero from a non-negative range): a
# rule should catch a broken batch, not the next value a little beyond what the sample held.
HEADROOM = 0.5
INFERRED_DIR = ".inferred"


def safe_name(column: str) -> str:
    """A feature name for any column name: lower case, runs of other characters as one `_`, never a
    leading digit or underscore (`Purchase Amount` -> `purchase_amount`, `2nd` -> `f_2nd`)."""
    name = re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_")
    return name if re.match(r"[a-z]", name) else f"f_{name}".rstrip("_")


def resolve_paths(pattern: str, base_dir: Path) -> list[Path]:
    if pattern.startswith(PKG_SCHEME):
        return [package_file(pattern)]
    full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
    return sorted(Path(p) for p in glob.glob(full)) if glob.has_magic(full) else [Path(full)]


def sample_frame(
    paths: list[Path], null_values: list[str], rows: int = SAMPLE_ROWS, encoding: str = "utf-8"
) -> pl.DataFrame:
    """The first `rows` rows of the first file, each CSV column typed from all of its sampled values (a
    CSV decoded from the source's `encoding`)."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        raise SourceError(f"no data file found at {', '.join(map(str, paths)) or '(empty glob)'}")
    path = existing[0]
    if path.name.lower().endswith(".parquet"):
        return pl.read_parquet(path, n_rows=rows)
    data: Path | bytes = path
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if not n.endswith("/")))
    if codecs.lookup(encoding).name != "utf-8":  # polars reads UTF-8 only
        data = (data if isinstance(data, bytes) else data.read_bytes()).decode(encoding, "replace").encode()
    # Read as text and type each column from every value: polars' own inference over all rows is ten
    # times slower, and over the first rows only it can miss a later value of another type.
    text = pl.read_csv(
        io.BytesIO(data) if isinstance(data, bytes) else data,
        n_rows=rows,
        infer_schema=False,
        null_values=null_values,
    )
    return text.with_columns(_typed(text.get_column(c)) for c in text.columns)


_BOOLEANS = {"true", "false"}


def _typed(column: pl.Series) -> pl.Series:
    """The column cast to the narrowest type every non-null value parses as: int, float, bool, date,
    datetime, else text."""
    values = column.drop_nulls()
    if values.len() == 0:
        return column
    for dtype in (pl.Int64, pl.Float64):
        try:
            values.cast(dtype, strict=True)
            return column.cast(dtype)
        except pl.exceptions.PolarsError:
            pass
    if set(values.str.to_lowercase().unique().to_list()) <= _BOOLEANS:
        return column.str.to_lowercase() == "true"
    for parse in (lambda s: s.str.to_date(strict=True), lambda s: s.str.to_datetime(strict=True)):
        try:
            parse(values)
            return parse(column)
        except pl.exceptions.PolarsError:
            pass
    return column


def column_type(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int"
    if dtype.is_numeric():
        return "float"
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    if dtype == pl.Date:
        return "date"
    return "str"


def _bounds(series: pl.Series, ctype: str) -> dict[str, float | int]:
    lo, hi = series.min(), series.max()
    if lo is None or hi is None or (isinstance(lo, float) and not math.isfinite(lo + hi)):
        return {}
    # A constant column (a year) gets a tenth of its value, at least 1, either side.
    span = (hi - lo) or 2 * max(abs(lo) / 10, 1.0)
    low, high = lo - HEADROOM * span, hi + HEADROOM * span
    if lo >= 0:
        low = max(low, 0)
    if ctype == "int":
        return {"min": math.floor(low), "max": math.ceil(high)}
    return {"min": round(low, 6), "max": round(high, 6)}


def infer_columns(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Column specs (as YAML would hold them) from a typed sample: type, not_null when the sample has no
    missing value, and a min/max range with headroom for numbers."""
    columns: dict[str, dict[str, Any]] = {}
    for name in frame.columns:
        series = frame.get_column(name)
        ctype = column_type(series.dtype)
        spec: dict[str, Any] = {"type": ctype}
        if series.len() and series.null_count() == 0:
            spec["not_null"] = True
        if ctype in ("int", "float"):
            spec |= _bounds(series, ctype)
        columns[name] = spec
    return columns


FEATURE_TYPE = {
    "int": "numeric",
    "float": "numeric",
    "bool": "boolean",
    "str": "categorical",
    "datetime": "datetime",
    "date": "datetime",
}
DATE_PARTS = ["year", "month", "dayofweek", "dayofyear"]


def infer_features(column_types: dict[str, str], where: str) -> list[dict[str, Any]]:
    """One feature per column (config type -> feature type), named safely; two columns with the same
    safe name are refused, naming both."""
    features: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for column, ctype in column_types.items():
        name = safe_name(column)
        if name in owner:
            raise ConfigError(
                f"{where}: columns '{owner[name]}' and '{column}' both become feature '{name}'; list "
                "features with distinct names (or rename a column)"
            )
        owner[name] = column
        feature: dict[str, Any] = {"name": name, "type": FEATURE_TYPE[ctype]}
        if name != column:
            feature["column"] = column
        if ctype == "date":
            feature["parts"] = DATE_PARTS
        features.append(feature)
    return features


def stored_columns(pipeline_file: Path, source: str) -> Path:
    return pipeline_file.parent / INFERRED_DIR / f"{source}.json"


def _typed_sample(spec: SourceSpec, name: str, pipeline_file: Path) -> tuple[pl.DataFrame, list[str]]:
    """A typed sample of what the source reads, and where it came from (no credentials): its files; for
    a landing zone, the replay origin (the whole history) if it has one, else the files landed so far;
    a database's or HTTP API's first SAMPLE_ROWS rows in time order."""
    base = pipeline_file.parent
    if spec.path or spec.replay:
        paths = resolve_paths(spec.path or spec.replay.path, base)
        return sample_frame(paths, spec.null_values, encoding=spec.encoding), [str(p) for p in paths[:5]]
    if spec.landing:
        paths = resolve_files(name, spec, base, data_dir())
        if not paths:
            raise SourceError(f"landing zone {landing_dir(data_dir(), name)} holds no data file yet")
        return sample_frame(paths, spec.null_values, encoding=spec.encoding), [str(p) for p in paths[:5]]
    reader = database.read_database if spec.database else http.read_http
    text, label = reader(name, spec, TimeWindow(), limit=SAMPLE_ROWS)
    text = text.drop("_source_row")
    return text.with_columns(_typed(text.get_column(c)) for c in text.columns), [label]


def source_columns(
    pipeline_file: Path, source: str, spec: SourceSpec
) -> tuple[dict[str, dict[str, Any]], bool]:
    """The columns of a source whose file leaves them out: the stored inference if there is one, else
    inferred now from a sample of its data and stored. Returns (columns, inferred now)."""
    stored = stored_columns(pipeline_file, source)
    if stored.exists():
        return json.loads(stored.read_text())["columns"], False
    try:
        frame, origin = _typed_sample(spec, source, pipeline_file)
    except (SourceError, pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(
            f"{pipeline_file}: sources.{source}.columns: omitted, and they cannot be inferred ("
            f"{str(exc).splitlines()[0]}); list them, or make the data readable"
        ) from exc
    if frame.width == 0 or frame.height == 0:
        raise ConfigError(
            f"{pipeline_file}: sources.{source}.columns: omitted, and {origin[0]} holds no rows to infer "
            "them from; list them"
        )
    columns = infer_columns(frame)
    stored.parent.mkdir(parents=True, exist_ok=True)
    record = {"source": source, "inferred_from": origin, "rows_sampled": frame.height}
    stored.write_text(json.dumps(record | {"columns": columns}, indent=1))
    return columns, True
