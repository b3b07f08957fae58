"""Request parsing: what a caller sends at request time (a JSON object or a list of them, or a file's
columns), checked and typed as the pipeline's request fields; every problem is named by row and field.

A caller sends what it knows at request time: the base source's columns without the target's and the
leakage columns (for the flagship, the scheduled flight).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from ml_assets.core.errors import UserError
from ml_assets.core.spec import ColumnSpec, PipelineSpec, SourceSpec
from ml_assets.core.spec.expressions import reads_other_rows

POLARS_TYPES: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "str": pl.String(),
    "bool": pl.Boolean(),
    "datetime": pl.Datetime("us"),
    "date": pl.Date(),
}


class RequestError(UserError):
    """A request's rows are unusable; `problems` lists (row, field, problem) for every one found."""

    def __init__(self, problems: list[tuple[int | None, str, str]]) -> None:
        self.problems = problems
        shown = "; ".join(
            f"{'' if row is None else f'row {row}: '}{name}: {problem}"
            for row, name, problem in problems[:10]
        )
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(shown + more)


def request_fields(pipeline: PipelineSpec, sources: Mapping[str, SourceSpec]) -> dict[str, ColumnSpec]:
    """What a caller knows at request time: the base source's columns, less the target's source columns,
    the target and the leakage columns (all known only later)."""
    later = {*pipeline.leakage, *pipeline.target.source_columns, pipeline.target.name}
    return {c: s for c, s in sources[pipeline.base].columns.items() if c not in later}


def not_servable_online(pipeline: PipelineSpec) -> str | None:
    """Why the online path cannot complete this pipeline's rows, if it cannot: a derived column over a
    window (a lag of the target, a moving average) needs the rows before the request, which one request
    does not carry. Completing it from the request alone would silently serve a different feature than
    the model learned from (the skew check caught exactly that), so such a pipeline is scored in batch."""
    history = [name for name, expr in pipeline.derived.items() if reads_other_rows(expr)]
    if not history:
        return None
    return (
        f"pipeline '{pipeline.name}' is not served online: derived column(s) {', '.join(map(repr, history))} "
        "read earlier rows (a window function), which a request does not carry; its batch scores "
        f"(`{pipeline.name}/predictions`) score it"
    )


def _value(spec: ColumnSpec, value: Any) -> tuple[Any, str | None]:
    """(the value as its column type, or None with the problem)."""
    kind = spec.type
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"expected a boolean, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"expected a number, got {value!r}"
        if not math.isfinite(value):
            return None, f"must be a finite number, got {value!r}"
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                return None, f"expected an integer, got {value!r}"
            if not -(2**63) <= int(value) < 2**63:
                return None, f"{value!r} is out of range for a 64-bit integer"
            return int(value), None
        return float(value), None
    if not isinstance(value, str):
        return None, f"expected a string, got {value!r}"
    if kind == "str":
        return value, None
    try:
        if kind == "date":
            return dt.date.fromisoformat(value), None
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None, f"expected an ISO 8601 {kind}, got {value!r}"
    # The warehouse keeps naive UTC; a value without an offset is taken as UTC.
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
    return stamp, None


def parse_rows(fields: Mapping[str, ColumnSpec], payload: Any, max_rows: int) -> pl.DataFrame:
    """Request rows (a JSON object or a list of them) as a typed frame, or RequestError naming every
    missing, null, mistyped, non-finite or unknown field. Unknown categories are fine: they are scored."""
    rows = payload if isinstance(payload, list) else [payload]
    if not rows:
        raise RequestError([(None, "body", "an empty list: send one object or a list of them")])
    if len(rows) > max_rows:
        raise RequestError(
            [(None, "body", f"{len(rows)} rows, more than the limit of {max_rows} per request")]
        )
    problems: list[tuple[int | None, str, str]] = []
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        at = i if isinstance(payload, list) else None
        if not isinstance(row, dict):
            problems.append((at, "body", f"expected an object of fields, got {type(row).__name__}"))
            continue
        problems += [
            (at, k, "not a request-time input of this pipeline (see GET /v1/<pipeline>/model)")
            for k in row
            if k not in fields
        ]
        record: dict[str, Any] = {}
        for name, spec in fields.items():
            value = row.get(name)
            if value is None:
                if spec.not_null:
                    problems.append((at, name, "missing" if name not in row else "must not be null"))
                record[name] = None
                continue
            parsed, problem = _value(spec, value)
            if problem:
                problems.append((at, name, problem))
            record[name] = parsed
        records.append(record)
    if problems:
        raise RequestError(problems)
    # One constructor over the rows, typed by the fields: a Series per field (and a cast per time) cost
    # four times as much on a request's one row.
    return pl.from_dicts(records, schema={name: POLARS_TYPES[spec.type] for name, spec in fields.items()})


def cast_frame(fields: Mapping[str, ColumnSpec], frame: pl.DataFrame, origin: str) -> pl.DataFrame:
    """A file's columns (e.g. CSV text) as the request fields' types; other columns are dropped. Errors
    name the file, the column and the first value that does not convert."""
    missing = [n for n, s in fields.items() if s.not_null and n not in frame.columns]
    if missing:
        raise RequestError([(None, n, f"missing from {origin}") for n in missing])
    out = []
    for name, spec in fields.items():
        target = POLARS_TYPES[spec.type]
        if name not in frame.columns:
            out.append(pl.lit(None, dtype=target).alias(name))
            continue
        column = frame.get_column(name)
        if spec.type == "datetime" and column.dtype == pl.String:
            converted = column.str.to_datetime(time_zone="UTC", strict=False).dt.replace_time_zone(None)
        elif isinstance(column.dtype, pl.Datetime) and column.dtype.time_zone:
            converted = column.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        else:
            converted = column.cast(target, strict=False)
        bad = column.is_not_null() & converted.cast(target).is_null()
        if spec.type == "float":
            bad |= converted.is_infinite() | converted.is_nan()
        if spec.not_null:
            bad |= column.is_null()
        if bad.any():
            index = int(bad.arg_max() or 0)
            raise RequestError([(index, name, f"{column[index]!r} in {origin} is not a valid {spec.type}")])
        out.append(converted.cast(target).alias(name))
    return pl.select(out)


def json_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    # Times as the text polars would cast them to (naive UTC, microseconds), formatted in Python: a
    # polars cast is a query of its own, most of the cost of a one-row response.
    stamps = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime | pl.Date)]
    records = frame.to_dicts()
    for record in records:
        for c in stamps:
            value = record[c]
            if isinstance(value, dt.datetime):
                record[c] = value.isoformat(sep=" ", timespec="microseconds")
            elif value is not None:
                record[c] = value.isoformat()
    return records


def request_rows(frame: pl.DataFrame, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a frame as a caller would send them (JSON-able request objects)."""
    return json_rows(frame.select(fields))
