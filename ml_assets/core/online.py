"""Online scoring: request-time inputs completed with the modelling table's own joins, then scored.

A caller sends what it knows at request time: the base source's columns without the target's and the
leakage columns (for the flagship, the scheduled flight). `Lookups` holds an in-memory DuckDB copy of the
validated tables the pipeline joins, and completes a request with `dataset.joined_select` and the
derived columns, the very SQL that builds the modelling table (as-of joins included: the latest weather at
or before the scheduled departure). Batch and online rows therefore cannot be completed differently.

`OnlineModel` is what one pipeline serves: the champion and the lookups, replaced as one object when the
registry's champion or a joined table changes (`refresh`, called by a poller). A request reads that
reference once, so a swap never fails a request in flight. The warehouse is only ever touched by
`refresh`, through short-lived connections that copy what they need and close.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from ml_assets.core import history, registry
from ml_assets.core.dataset import derived_columns, joined_select, table_name
from ml_assets.core.errors import ArtifactError, UserError
from ml_assets.core.request_log import RequestLog
from ml_assets.core.score import PROBABILITIES, score_frame
from ml_assets.core.serve import ServableModel
from ml_assets.core.spec import ColumnSpec, JoinSpec, PipelineSpec, SourceSpec
from ml_assets.core.spec.expressions import reads_other_rows
from ml_assets.core.sql import DUCKDB_TYPES, q
from ml_assets.core.validate import CheckOutcome

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
ROW = "__request_row"
# How many of the skew check's rows it sends as single objects, one request each.
SKEW_SINGLE_ROWS = 20
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
    windowed = [name for name, expr in pipeline.derived.items() if reads_other_rows(expr)]
    if not windowed:
        return None
    return (
        f"pipeline '{pipeline.name}' is not served online: derived column(s) {', '.join(map(repr, windowed))} "
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
    columns: dict[str, list[Any]] = {name: [] for name in fields}
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
        for name, spec in fields.items():
            value = row.get(name)
            if value is None:
                if spec.not_null:
                    problems.append((at, name, "missing" if name not in row else "must not be null"))
                columns[name].append(None)
                continue
            parsed, problem = _value(spec, value)
            if problem:
                problems.append((at, name, problem))
            columns[name].append(parsed)
    if problems:
        raise RequestError(problems)
    return pl.DataFrame([_series(name, spec.type, columns[name]) for name, spec in fields.items()])


_EPOCH = dt.datetime(1970, 1, 1)
_MICROSECOND = dt.timedelta(microseconds=1)


def _series(name: str, kind: str, values: list[Any]) -> pl.Series:
    # Polars converts Python datetimes one by one, five times slower than integers on a request's row:
    # the same values as microseconds (days) since the epoch, cast.
    if kind == "datetime":
        ticks = [None if v is None else (v - _EPOCH) // _MICROSECOND for v in values]
        return pl.Series(name, ticks, dtype=pl.Int64).cast(POLARS_TYPES[kind])
    if kind == "date":
        days = [None if v is None else (v - _EPOCH.date()).days for v in values]
        return pl.Series(name, days, dtype=pl.Int32).cast(POLARS_TYPES[kind])
    return pl.Series(name, values, dtype=POLARS_TYPES[kind])


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


def _joined_sources(pipeline: PipelineSpec) -> list[str]:
    return sorted({j.source for j in pipeline.joins})


def lookup_fingerprint(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> tuple:
    """Changes whenever a joined validated table changes (rows added, replaced or re-validated)."""
    tables = [f"validated.{q(s)}" for s in _joined_sources(pipeline)]
    tables += [history.table_name(pipeline)] if pipeline.history else []
    return tuple(
        conn.execute(f"SELECT count(*), coalesce(sum(hash(t)), 0) FROM {table} t").fetchone()
        for table in tables
    )


class Lookups:
    """An in-memory DuckDB holding copies of the validated tables a pipeline joins; completes request
    rows into modelling-table rows with the modelling table's own SQL."""

    def __init__(
        self,
        pipeline: PipelineSpec,
        sources: Mapping[str, SourceSpec],
        tables: Mapping[str, pa.Table],
        fingerprint: tuple,
    ) -> None:
        self.pipeline, self.fingerprint = pipeline, fingerprint
        self._db = duckdb.connect(":memory:")
        self._db.execute("SET TimeZone = 'UTC'")
        # Requests are a few rows: one thread per query, no coordination cost (requests run in parallel).
        self._db.execute("SET threads = 1")
        self._db.execute("CREATE SCHEMA validated")
        for name, table in tables.items():
            self._db.register("__copy", table)
            self._db.execute(f"CREATE TABLE validated.{q(name)} AS SELECT * FROM __copy")
            self._db.unregister("__copy")
        self._columns = list(sources[pipeline.base].columns.items())
        self.fields = request_fields(pipeline, sources)
        # The request's columns arrive as one list parameter each, unnested into rows: no relation to
        # register per request, and the rows keep their order through the joins by their number.
        unnested = ", ".join(
            f"unnest(${i + 1}::{DUCKDB_TYPES[spec.type]}[]) AS {q(name)}"
            for i, (name, spec) in enumerate(self._columns)
        )
        base = f"(SELECT {unnested}, unnest(range(len($1::{DUCKDB_TYPES[self._columns[0][1].type]}[]))) AS {ROW})"
        self._sql = (
            f"SELECT *{derived_columns(pipeline)} FROM "
            f"({joined_select(pipeline, dict(sources), base=base, carry=(ROW,))}) ORDER BY {ROW}"
        )
        # What the SQL answers for no rows: the completed frame's columns and types, which the per-key
        # path reproduces exactly.
        self.schema = self.complete_sql(pl.DataFrame()).schema
        self.keyed, self.keyed_problem = KeyedCompletion.prepare(self, sources)

    @classmethod
    def copy(
        cls, conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: Mapping[str, SourceSpec]
    ) -> Lookups:
        """Copy the joined tables out of the warehouse (the caller closes the connection right after)."""
        # Read one by one: a result left unread when the next query runs on the connection is lost.
        tables = {}
        for name in _joined_sources(pipeline):
            tables[name] = conn.execute(f"SELECT * FROM validated.{q(name)}").fetch_arrow_table()
        fingerprint = lookup_fingerprint(conn, pipeline)
        if pipeline.history is not None:
            tables[history.LOOKUP_SOURCE] = conn.execute(history.lookup_select(pipeline)).fetch_arrow_table()
            pipeline, sources = history.as_lookup_join(pipeline, dict(sources))
        lookups = cls(pipeline, sources, tables, fingerprint)
        if lookups.keyed is not None:
            lookups.keyed.warm(conn)
        return lookups

    def complete(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Modelling-table rows (joins and derived columns; no target) for request rows, in their order.

        Every request the API accepts (at most `serving.max_batch` rows) goes through the per-key
        lookups when the joins allow them, which is what the skew check exercises; more rows (a file
        given to `ml-assets predict`) go through the SQL, cheaper in bulk. Both give the same frame."""
        if self.keyed is None or rows.height > self.pipeline.serving.max_batch:
            return self.complete_sql(rows)
        return self.keyed.complete(rows)

    def complete_sql(self, rows: pl.DataFrame) -> pl.DataFrame:
        """The modelling table's own SQL over the request rows (a fixed cost of milliseconds per call)."""
        return self._run(self._sql, self._params(rows)).drop(ROW)

    def _params(self, rows: pl.DataFrame) -> list[list[Any]]:
        none = [None] * rows.height
        return [rows.get_column(c).to_list() if c in rows.columns else none for c, _ in self._columns]

    def _run(self, sql: str, params: list[Any]) -> pl.DataFrame:
        cursor = self._db.cursor()  # one per call: requests may come from several threads
        try:
            return cursor.execute(sql, params).pl()
        finally:
            cursor.close()


def _expression_reads(db: duckdb.DuckDBPyConnection, expression: str) -> tuple[set[str], bool]:
    """(the column names an SQL expression reads, whether its value is a function of them alone), from
    DuckDB's own parse tree: every function called must be CONSISTENT (not random(), not now()) and no
    window may look at other rows."""
    tree = json.loads(db.execute("SELECT json_serialize_sql(?)", [f"SELECT {expression}"]).fetchone()[0])
    found: set[str] = set()
    functions: set[str] = set()
    window = False

    def walk(node: Any) -> None:
        nonlocal window
        if isinstance(node, dict):
            if node.get("class") == "COLUMN_REF":
                found.add(node["column_names"][-1])
            elif node.get("class") == "WINDOW":
                window = True
            elif node.get("class") == "FUNCTION":
                functions.add(node["function_name"].lower())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree["statements"][0]["node"]["select_list"])
    stable = {
        name
        for name, consistent in db.execute(
            "SELECT lower(function_name), bool_and(stability = 'CONSISTENT') FROM duckdb_functions() "
            "GROUP BY 1"
        ).fetchall()
        if consistent
    }
    return found, not window and functions <= stable


# Derived values are remembered only in types whose Python values convert back to polars exactly.
_MEMO_TYPES = (pl.Int64, pl.Int32, pl.Float64, pl.String, pl.Boolean, pl.Date, pl.Datetime)
_MEMO_SIZE = 100_000
_UNKNOWN = object()


@dataclass(frozen=True)
class _JoinIndex:
    """One join's columns as the modelling table's SQL computes them (`table`, whose last row is all
    NULL: no match), and the row of `table` for each key. For an as-of join, per key: the joined source's
    times, ascending, and the row holding the as-of values at each of those times."""

    keys: tuple[str, ...]
    asof_left: str | None
    table: pl.DataFrame
    rows: dict[tuple, Any]

    def lookup(self, request: Mapping[str, list[Any]]) -> pl.DataFrame:
        """The join's columns for the request's rows."""
        none = self.table.height - 1
        keys = zip(*(request[k] for k in self.keys), strict=True)
        if self.asof_left is None:
            # A NULL key matches nothing in SQL, so it is never looked up (no row is keyed by None).
            return self.table[[none if None in key else self.rows.get(key, none) for key in keys]]
        found: list[int] = []
        for key, at in zip(keys, request[self.asof_left], strict=True):
            series = None if at is None or None in key else self.rows.get(key)
            if series is None:
                found.append(none)
                continue
            times, rows = series
            # The latest time at or before `at` (an exact match included), as ASOF's `>=`.
            i = bisect.bisect_right(times, at) - 1
            found.append(rows[i] if i >= 0 else none)
        return self.table[found]


class KeyedCompletion:
    """Request rows completed from per-key dictionaries instead of a DuckDB query per request.

    The dictionaries are prepared once per refresh by the modelling table's own SQL (`joined_select`,
    one join at a time) over base rows made of the joined source's keys: for a key join, one base row per
    distinct key; for an as-of join, one per distinct (key, time) with the base time set to that time, so
    SQL computes the as-of values at every time a reading exists. A request time then takes the values of
    the latest such time at or before it (bisect), which is the ASOF join's answer by definition. Derived
    columns are still DuckDB's: one small query over only the columns they read. `prepare` declines (and
    the SQL completes requests) when a dictionary could match differently than the SQL: keys of
    different types on the two sides, float keys (NaN), a nullable as-of column, or duplicate keys (SQL
    would multiply rows or pick one arbitrarily).
    """

    def __init__(
        self,
        lookups: Lookups,
        indexes: list[_JoinIndex],
        derived_sql: str | None,
        reads: list[str],
        expression_reads: Mapping[str, list[str]] | None = None,
    ) -> None:
        self._lookups, self._indexes = lookups, indexes
        self._derived_sql, self._reads = derived_sql, reads
        schema = lookups.schema
        self._derived_schema = {n: schema[n] for n in lookups.pipeline.derived}
        # Each derived value by the values of the base columns its expression reads: a deterministic
        # expression gives the same answer for the same inputs, and a hit skips DuckDB's fixed cost per
        # query (about a millisecond). Per expression, not per row: few distinct inputs each (a time of
        # day, a route) where whole rows are nearly all distinct.
        remembered = expression_reads is not None and all(
            isinstance(t, _MEMO_TYPES) for t in self._derived_schema.values()
        )
        self._memos: dict[str, tuple[list[str], dict[tuple, Any]]] | None = (
            {n: (expression_reads[n], {}) for n in self._derived_schema} if remembered else None
        )
        self._base = [
            pl.col(c) if c in lookups.fields else pl.lit(None, dtype=schema[c]).alias(c)
            for c, _ in lookups._columns
        ]
        self._base_columns = [c for c, _ in lookups._columns]

    @classmethod
    def prepare(
        cls, lookups: Lookups, sources: Mapping[str, SourceSpec]
    ) -> tuple[KeyedCompletion | None, str | None]:
        """(the keyed completion, None), or (None, why the joins need the SQL)."""
        pipeline, db = lookups.pipeline, lookups._db
        base_columns = sources[pipeline.base].columns
        indexes = []
        for i, join in enumerate(pipeline.joins):
            problem = _keyed_problem(join, base_columns, sources[join.source].columns)
            index = None if problem else _prepare_join(db, pipeline, sources, join)
            if index is None:
                return None, f"joins.{i}: {problem or f'{join.source!r} has duplicate keys'}"
            indexes.append(index)
        if not pipeline.derived:
            return cls(lookups, indexes, None, []), None
        analysed = {n: _expression_reads(db, e) for n, e in pipeline.derived.items()}
        read = set().union(*(columns for columns, _ in analysed.values()))
        reads = [c for c in lookups.schema if c in read and c not in pipeline.derived]
        empty = [[] for _ in lookups._columns]
        types = {d[0]: str(d[1]) for d in db.execute(f"{lookups._sql} LIMIT 0", empty).description}
        unnested = "".join(f"unnest(${j + 1}::{types[c]}[]) AS {q(c)}, " for j, c in enumerate(reads))
        numbers = f"unnest(range(${len(reads) + 1}::BIGINT)) AS {ROW}"
        derived = ", ".join(f"{e} AS {q(n)}" for n, e in pipeline.derived.items())
        sql = f"SELECT {derived} FROM (SELECT {unnested}{numbers}) ORDER BY {ROW}"
        # Float inputs are not remembered: -0.0 == 0.0 in a dictionary, but an expression may tell them apart.
        memo = all(pure for _, pure in analysed.values()) and not any(
            lookups.schema[c].is_float() for c in reads
        )
        return cls(lookups, indexes, sql, reads, _base_reads(analysed) if memo else None), None

    def complete(self, rows: pl.DataFrame) -> pl.DataFrame:
        data = {c: rows.get_column(c).to_list() for c in self._base_columns if c in rows.columns}
        parts = [rows.select(self._base), *(index.lookup(data) for index in self._indexes)]
        if self._derived_sql is not None:
            completed = pl.concat(parts, how="horizontal")
            parts = [completed, self._derived(completed)]
        return pl.concat(parts, how="horizontal")

    def _derived(self, completed: pl.DataFrame) -> pl.DataFrame:
        values = {c: completed.get_column(c).to_list() for c in self._reads}
        if self._memos is not None:
            found = {
                n: self._recall(values, reads, memo, completed.height)
                for n, (reads, memo) in self._memos.items()
            }
            if all(v is not None for v in found.values()):
                return pl.DataFrame(found, schema=self._derived_schema)
        return self._compute(values, completed.height)

    @staticmethod
    def _recall(
        values: Mapping[str, list[Any]], reads: list[str], memo: dict[tuple, Any], height: int
    ) -> list[Any] | None:
        keys = zip(*(values[c] for c in reads), strict=True) if reads else [()] * height
        known = [memo.get(k, _UNKNOWN) for k in keys]
        return None if _UNKNOWN in known else known

    def _compute(self, values: Mapping[str, list[Any]], height: int) -> pl.DataFrame:
        """The derived columns by DuckDB, remembered per expression when they may be."""
        derived = self._lookups._run(self._derived_sql, [*(values[c] for c in self._reads), height])
        for name, (reads, memo) in (self._memos or {}).items():
            if len(memo) > _MEMO_SIZE:
                memo.clear()  # bounded: a long tail of distinct inputs must not grow the process
            keys = zip(*(values[c] for c in reads), strict=True) if reads else [()] * height
            memo.update(zip(keys, derived.get_column(name).to_list(), strict=True))
        return derived

    def warm(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Remember the derived values of every distinct input the base source holds (up to the memo's
        bound), so that requests like the rows trained on never wait for DuckDB: one query per expression
        over the warehouse's validated base table, each computed by the same SQL as a request's (the
        modelling table has computed them on these inputs already, so none fails here)."""
        if self._memos is None:
            return
        table = f"validated.{q(self._lookups.pipeline.base)}"
        for reads, _ in self._memos.values():
            # Only expressions of base columns: a joined column's values are not in the base table.
            if not reads or not set(reads) <= set(self._base_columns):
                continue
            inputs = conn.execute(
                f"SELECT DISTINCT {', '.join(map(q, reads))} FROM {table} LIMIT {_MEMO_SIZE}"
            ).pl()
            none = [None] * inputs.height
            self._compute(
                {c: inputs.get_column(c).to_list() if c in reads else none for c in self._reads},
                inputs.height,
            )


def _base_reads(analysed: Mapping[str, tuple[set[str], bool]]) -> dict[str, list[str]]:
    """The base columns each derived expression depends on, through the derived columns it reads."""

    def close(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        # A derived column reads only those listed before it (DuckDB's aliases); `seen` ends a loop
        # anyway.
        direct = analysed[name][0]
        inner = direct & analysed.keys() - seen - {name}
        return (direct - analysed.keys()).union(*(close(d, seen | {name}) for d in inner))

    return {n: sorted(close(n)) for n in analysed}


def _keyed_problem(
    join: JoinSpec, base: Mapping[str, ColumnSpec], right: Mapping[str, ColumnSpec]
) -> str | None:
    pairs = [(k, k) for k in join.keys] + ([(join.asof.left, join.asof.right)] if join.asof else [])
    for left, right_name in pairs:
        kind, other = base[left].type, right[right_name].type
        if kind != other:
            return f"'{left}' is {kind} in the base source but '{right_name}' is {other} in '{join.source}'"
        if kind == "float":
            return f"'{left}' is a float key (NaN equals NaN in SQL, not in a dictionary)"
    if join.asof and join.asof.left in join.keys:
        return f"the as-of column '{join.asof.left}' is also a key"
    if join.asof and not base[join.asof.left].not_null:
        # SQL says a NULL time matches nothing, but DuckDB 1.5's ASOF join over a request's rows was seen
        # to match one anyway; the SQL path then keeps online equal to batch, whatever DuckDB does.
        return f"the as-of column '{join.asof.left}' may be NULL"
    return None


def _prepare_join(
    db: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: Mapping[str, SourceSpec], join: JoinSpec
) -> _JoinIndex | None:
    """The join's values by key (see KeyedCompletion); None when the joined source has duplicate keys."""
    right = [*join.keys, *([join.asof.right] if join.asof else [])]
    table = f"validated.{q(join.source)}"
    present = " AND ".join(f"{q(c)} IS NOT NULL" for c in right)
    duplicated = db.execute(
        f"SELECT count(*) FROM (SELECT {', '.join(map(q, right))} FROM {table} WHERE {present} "
        "GROUP BY ALL HAVING count(*) > 1)"
    ).fetchone()[0]
    if duplicated:
        return None
    # Base rows made of the source's keys (every other base column NULL, typed as the base source's).
    given = {k: k for k in join.keys} | ({join.asof.left: join.asof.right} if join.asof else {})
    base_spec = sources[pipeline.base].columns
    select = ", ".join(
        f"CAST({q(given[c]) if c in given else 'NULL'} AS {DUCKDB_TYPES[s.type]}) AS {q(c)}"
        for c, s in base_spec.items()
    )
    base = f"(SELECT DISTINCT {select} FROM {table} WHERE {present})"
    single = pipeline.model_copy(update={"joins": [join]})
    done = db.execute(joined_select(single, dict(sources), base=base)).pl()
    # The same arrow-to-polars conversion as the SQL path's, plus the all-NULL row of "no match".
    table_ = done.drop(list(base_spec))
    table_ = pl.concat([table_, table_.clear(1)])
    keys = list(zip(*(done.get_column(k).to_list() for k in join.keys), strict=True))
    if join.asof is None:
        return _JoinIndex(tuple(join.keys), None, table_, {key: i for i, key in enumerate(keys)})
    series: dict[tuple, list[tuple[Any, int]]] = {}
    for i, (key, at) in enumerate(zip(keys, done.get_column(join.asof.left).to_list(), strict=True)):
        series.setdefault(key, []).append((at, i))
    rows = {}
    for key, points in series.items():
        points.sort(key=lambda p: p[0])
        rows[key] = ([p[0] for p in points], [p[1] for p in points])
    return _JoinIndex(tuple(join.keys), join.asof.left, table_, rows)


@dataclass(frozen=True)
class Served:
    """One pipeline's champion and lookups: replaced whole, never changed in place."""

    version: str
    model: ServableModel
    lookups: Lookups
    loaded_at: dt.datetime


@dataclass
class OnlineModel:
    """What one pipeline serves, kept current by `refresh` (a poller calls it every few seconds)."""

    pipeline: PipelineSpec
    sources: Mapping[str, SourceSpec]
    connect: Connect
    served: Served | None = None
    # Why the latest champion is not what serves (none yet, its files fail their hash check, ...).
    problem: str | None = None
    last_refresh: dt.datetime | None = None
    log: RequestLog | None = None
    # When given, a cheap reading that changes whenever the warehouse does (store.change_marker): a poll
    # that finds it unchanged skips the connection and the queries.
    marker: Callable[[], Hashable] | None = None
    _refused: str | None = None
    _seen: Hashable = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # The pipeline spec never changes under a served model: derived once, not on each poll or request.
    @cached_property
    def fields(self) -> dict[str, ColumnSpec]:
        return request_fields(self.pipeline, self.sources)

    @cached_property
    def offline_only(self) -> str | None:
        return not_servable_online(self.pipeline)

    def refresh(self) -> bool:
        """Load a new champion or new lookups if either changed; True when what serves changed. A
        champion whose files fail their hash check is refused once and the previous one kept serving."""
        if self.offline_only:
            self.problem = self.offline_only
            return False
        with self._lock:
            # Read before the connection: a write committed during this refresh makes the next one look.
            marker = self.marker() if self.marker else None
            if marker is not None and marker == self._seen:
                self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
                return False
            changed = self._refresh()
            self._seen = marker
            return changed

    def _refresh(self) -> bool:
        current = self.served
        with self.connect() as conn:
            version = registry.alias_version(conn, self.pipeline.name, registry.CHAMPION)
            if version is None:
                self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
                self.problem = f"pipeline '{self.pipeline.name}' has no champion yet"
                return False
            if version != self._refused:
                self._refused = None  # the champion moved: a version refused before may be fixed now
            fresh = lookup_fingerprint(conn, self.pipeline)
            lookups = current.lookups if current and current.lookups.fingerprint == fresh else None
            if lookups is None:
                lookups = Lookups.copy(conn, self.pipeline, self.sources)
            found = (
                registry.registered(conn, version, self.pipeline.name)
                if version and version != self._refused and (current is None or version != current.version)
                else None
            )
        self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        if current is not None and version == current.version:
            self.problem = None  # back to what serves: an earlier refusal is history
        model, served_version = (current.model, current.version) if current else (None, None)
        if found is not None:
            try:
                model, served_version = ServableModel.from_registry(found), version
                self.problem = None
            except ArtifactError as exc:
                self._refused = version
                self.problem = f"champion {version} refused: {exc}"
        if model is None or served_version is None or lookups is None:
            return False
        if current and current.version == served_version and current.lookups is lookups:
            return False
        self.served = Served(served_version, model, lookups, self.last_refresh)
        return True

    def predict(self, payload: Any) -> dict[str, Any]:
        """Scores of request rows (raises RequestError); names the version that answered."""
        served = self.served  # read once: a swap meanwhile does not touch this request
        if served is None:
            raise ArtifactError(self.problem or f"pipeline '{self.pipeline.name}': no model loaded yet")
        started = time.perf_counter()
        rows = parse_rows(self.fields, payload, self.pipeline.serving.max_batch)
        completed = served.lookups.complete(rows)
        scored = score_frame(served.model, self.pipeline, completed, served.version)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if self.log is not None:
            self.log.record(completed, scored, latency_ms)
        return {
            "pipeline": self.pipeline.name,
            "version": served.version,
            # Indexing, not drop: the same columns without a query.
            "predictions": _records(scored[[c for c in scored.columns if c != "version"]]),
            "latency_ms": latency_ms,
        }


def _records(frame: pl.DataFrame) -> list[dict[str, Any]]:
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
    return _records(frame.select(fields))


def compare_paths(
    connect: Connect,
    pipeline: PipelineSpec,
    sources: Mapping[str, SourceSpec],
    post: Callable[[list[dict[str, Any]]], dict[str, Any]],
    tolerance: float = 1e-9,
) -> CheckOutcome:
    """The skew check: a sample of the champion's test rows scored by the batch path (modelling-table
    rows) and by the online path (`post`: their request-time fields sent to the API, which completes them
    from its lookups) must agree to `tolerance`, decision and version included."""
    offline = not_servable_online(pipeline)
    if offline:
        # Nothing is served online, so nothing online can disagree with the batch scores.
        return CheckOutcome(True, f"{offline}: nothing to compare", {"rows": 0})
    n = pipeline.serving.skew_sample_rows
    with connect() as conn:
        version = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        if version is None:
            return CheckOutcome(True, "no champion yet: nothing to compare", {"rows": 0})
        found = registry.registered(conn, version, pipeline.name)
        # Sampled from the test rows: USING SAMPLE applies before the WHERE of its own SELECT.
        sample = conn.execute(
            f"SELECT * FROM (SELECT * FROM {table_name(pipeline)} WHERE _split = 'test') "
            f"USING SAMPLE reservoir({n} ROWS) REPEATABLE (0)"
        ).pl()
    if sample.height == 0:
        return CheckOutcome(True, "no test rows to compare", {"rows": 0})
    batch = score_frame(ServableModel.from_registry(found), pipeline, sample, version)
    requests = request_rows(sample, list(request_fields(pipeline, sources)))
    size = pipeline.serving.max_batch
    # Some rows one object at a time (what a single request sends), the rest in lists: both go through
    # the completion every request takes (per-key lookups, or the SQL when the joins need it).
    single = min(SKEW_SINGLE_ROWS, len(requests))
    answers = [post(r) for r in requests[:single]]
    answers += [post(requests[i : i + size]) for i in range(single, len(requests), size)]
    versions = {a.get("version") for a in answers}
    online = pl.DataFrame([p for a in answers for p in a.get("predictions", [])])
    if versions != {version} or online.height != batch.height:
        errors = "; ".join(str(a["error"])[:300] for a in answers if "error" in a)
        return CheckOutcome(
            False,
            f"the online path answered {online.height} rows with version(s) {sorted(map(str, versions))} for "
            f"{batch.height} rows of champion {version}{f' ({errors})' if errors else ''}",
            {"rows": batch.height, "online_versions": sorted(map(str, versions)), "champion": version},
        )
    diff = float((online.get_column("score") - batch.get_column("score")).abs().max() or 0.0)
    decisions = int((online.get_column("decision") != batch.get_column("decision")).sum() or 0)
    if PROBABILITIES in batch.columns:  # multiclass: every class' probability, in the same class order
        each = [f.get_column(PROBABILITIES).explode().struct.unnest() for f in (online, batch)]
        diff = max(diff, float((each[0]["probability"] - each[1]["probability"]).abs().max() or 0.0))
        decisions += int((each[0]["class"] != each[1]["class"]).sum() or 0)
    passed = diff <= tolerance and decisions == 0
    return CheckOutcome(
        passed,
        f"{batch.height} test rows of champion {version}: online and batch scores differ by at most "
        f"{diff:.2e} (tolerance {tolerance:.0e}), {decisions} decision(s) differ",
        {
            "rows": batch.height,
            "single_row_requests": single,
            "max_abs_diff": diff,
            "decisions_differing": decisions,
            "champion": version,
        },
    )
