"""Lookups: request-time inputs completed with the modelling table's own joins and derived columns.

`Lookups` holds an in-memory DuckDB copy of the validated tables the pipeline joins, and completes a
request with `dataset.joined_select` and the derived columns, the very SQL that builds the modelling table
(as-of joins included: the latest weather at or before the scheduled departure). Batch and online rows
therefore cannot be completed differently. `KeyedCompletion` answers the same from per-key dictionaries,
without a query per request. A pipeline's history feature set is computed for each request row as of its
own as_of from the state the refresh loads (`history_state`), by both paths.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from ml_assets.core import history
from ml_assets.core.dataset import derived_columns, joined_select
from ml_assets.core.serving.history_state import HistoryState
from ml_assets.core.serving.request_parsing import request_fields
from ml_assets.core.spec import ColumnSpec, JoinSpec, PipelineSpec, SourceSpec
from ml_assets.core.sql import DUCKDB_TYPES, q

ROW = "__request_row"


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


def lookup_tables(conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec) -> dict[str, pa.Table]:
    """The validated tables a pipeline joins, copied out of the warehouse."""
    # Read one by one: a result left unread when the next query runs on the connection is lost.
    return {
        name: conn.execute(f"SELECT * FROM validated.{q(name)}").fetch_arrow_table()
        for name in _joined_sources(pipeline)
    }


class Lookups:
    """An in-memory DuckDB holding copies of the validated tables a pipeline joins; completes request
    rows into modelling-table rows with the modelling table's own SQL."""

    def __init__(
        self,
        pipeline: PipelineSpec,
        sources: Mapping[str, SourceSpec],
        tables: Mapping[str, pa.Table],
        fingerprint: tuple,
        history_state: HistoryState | None = None,
    ) -> None:
        self.pipeline, self.fingerprint = pipeline, fingerprint
        self.history = history_state
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
        joined = joined_select(pipeline, dict(sources), base=base, carry=(ROW,))
        self._at = _HistoryTime(self, pipeline) if history_state else None
        if history_state is not None:
            # The history features (computed from the state, see history_state) as more list parameters,
            # after the joins' columns and before the derived ones, as the modelling table has them.
            first = len(self._columns) + 1
            features = ", ".join(
                f"unnest(${first + i}::{'BIGINT' if kind == pl.Int64 else 'DOUBLE'}[]) AS {q(name)}"
                for i, (name, kind) in enumerate(history_state.schema.items())
            )
            joined = (
                f"SELECT j.*, h.* EXCLUDE ({ROW}) FROM ({joined}) j JOIN (SELECT {features}, "
                f"unnest(range(len($1::{DUCKDB_TYPES[self._columns[0][1].type]}[]))) AS {ROW}) h USING ({ROW})"
            )
        self._sql = f"SELECT *{derived_columns(pipeline)} FROM ({joined}) ORDER BY {ROW}"
        # What the SQL answers for no rows: the completed frame's columns and types, which the per-key
        # path reproduces exactly.
        self.schema = self.complete_sql(pl.DataFrame()).schema
        self.keyed, self.keyed_problem = KeyedCompletion.prepare(self, sources)

    @classmethod
    def copy(
        cls, conn: duckdb.DuckDBPyConnection, pipeline: PipelineSpec, sources: Mapping[str, SourceSpec]
    ) -> Lookups:
        """Copy the joined tables out of the warehouse (the caller closes the connection right after)."""
        # The history feature set's state (None without a history block), loaded with the joined tables.
        state = HistoryState.load(conn, pipeline) if pipeline.history is not None else None
        lookups = cls(
            pipeline, sources, lookup_tables(conn, pipeline), lookup_fingerprint(conn, pipeline), state
        )
        if lookups._at is not None:
            lookups._at.warm(conn)
        lookups.warm(lookups.warm_inputs(conn))
        return lookups

    def warm_inputs(self, conn: duckdb.DuckDBPyConnection) -> list[pl.DataFrame]:
        """What `warm` takes, read from the warehouse (none when requests are completed by the SQL)."""
        return self.keyed.warm_inputs(conn) if self.keyed is not None else []

    def warm(self, inputs: list[pl.DataFrame]) -> None:
        """Remember the derived values of `inputs` (`warm_inputs`), so requests like them never wait for
        DuckDB."""
        if self.keyed is not None:
            self.keyed.warm(inputs)

    @property
    def completion_sql(self) -> str:
        """The SQL that completes request rows: a function of the joins, the derived columns and the
        sources' columns and types, so its text names what the completion depends on."""
        return self._sql

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
        base = {c: rows.get_column(c).to_list() if c in rows.columns else none for c, _ in self._columns}
        features = self.history_features(base, rows.height)
        return [*base.values(), *(features.get_column(c).to_list() for c in features.columns)]

    def history_features(self, base: Mapping[str, list[Any]], height: int) -> pl.DataFrame:
        """The history feature set of rows given by their base columns, as of each row's own as_of, from
        the state the refresh loaded (no columns without a history block)."""
        if self.history is None or self._at is None:
            return pl.DataFrame()
        return self.history.features(base, self._at.values(base, height))

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
            return self._rows([none if None in key else self.rows.get(key, none) for key in keys])
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
        return self._rows(found)

    def _rows(self, found: list[int]) -> pl.DataFrame:
        # A single request's one row is a slice, which copies nothing and costs a twentieth of a gather.
        return self.table.slice(found[0], 1) if len(found) == 1 else self.table[found]


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
        # The base source's columns: a request's own, or (those known only later) null of the SQL's type.
        self._base = [(c, None if c in lookups.fields else schema[c]) for c, _ in lookups._columns]
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
        empty = lookups._params(pl.DataFrame())
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
        # Columns gathered and null ones made, not a select: the same frame without a query.
        base = [
            rows.get_column(c) if dtype is None else pl.Series(c, [None] * rows.height, dtype=dtype)
            for c, dtype in self._base
        ]
        parts = [pl.DataFrame(base), *(index.lookup(data) for index in self._indexes)]
        if self._lookups.history is not None:
            none = [None] * rows.height
            values = {c: data.get(c, none) for c in self._base_columns}
            parts.append(self._lookups.history_features(values, rows.height))
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
                # Built from rows: a quarter of the cost of the column-wise constructor on one row.
                rows = [dict(zip(found, values, strict=True)) for values in zip(*found.values(), strict=True)]
                return pl.from_dicts(rows, schema=self._derived_schema)
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

    def warm_inputs(self, conn: duckdb.DuckDBPyConnection) -> list[pl.DataFrame]:
        """Every distinct input the base source holds (up to the memo's bound) of each remembered
        expression: one query per expression over the warehouse's validated base table."""
        if self._memos is None:
            return []
        table = f"validated.{q(self._lookups.pipeline.base)}"
        found = []
        for reads, _ in self._memos.values():
            # Only expressions of base columns: a joined column's values are not in the base table.
            if not reads or not set(reads) <= set(self._base_columns):
                continue
            found.append(
                conn.execute(
                    f"SELECT DISTINCT {', '.join(map(q, reads))} FROM {table} LIMIT {_MEMO_SIZE}"
                ).pl()
            )
        return found

    def warm(self, inputs: list[pl.DataFrame]) -> None:
        """Remember the derived values of `inputs` (`warm_inputs`), each computed by the same SQL as a
        request's (the modelling table has computed them on the base table's inputs already, so none
        fails here)."""
        if self._memos is None:
            return
        for frame in inputs:
            none = [None] * frame.height
            self._compute(
                {c: frame.get_column(c).to_list() if c in frame.columns else none for c in self._reads},
                frame.height,
            )


class _HistoryTime:
    """`history.at` of request rows, in microseconds since the epoch, by DuckDB (the build's own
    expression), remembered per value of the base columns it reads when it is a function of them."""

    def __init__(self, lookups: Lookups, pipeline: PipelineSpec) -> None:
        self._run, self._table = lookups._run, f"validated.{q(pipeline.base)}"
        at = history.spec_of(pipeline).at
        read, pure = _expression_reads(lookups._db, at)
        types = dict(lookups._columns)
        self._reads = [c for c in types if c in read]
        unnested = "".join(
            f"unnest(${i + 1}::{DUCKDB_TYPES[types[c].type]}[]) AS {q(c)}, "
            for i, c in enumerate(self._reads)
        )
        self._sql = (
            f"SELECT epoch_us(CAST(({at}) AS TIMESTAMP)) FROM (SELECT {unnested}"
            f"unnest(range(${len(self._reads) + 1}::BIGINT)) AS {ROW}) ORDER BY {ROW}"
        )
        self._memo: dict[tuple, int | None] | None = {} if pure else None

    def _compute(self, inputs: list[tuple], height: int) -> list[int | None]:
        lists = [list(c) for c in zip(*inputs, strict=True)] if inputs else [[] for _ in self._reads]
        found = self._run(self._sql, [*lists, height]).to_series(0).to_list()
        if self._memo is not None:
            if len(self._memo) > _MEMO_SIZE:
                self._memo.clear()  # bounded, as the derived columns' memo
            self._memo.update(zip(inputs, found, strict=True))
        return found

    def values(self, base: Mapping[str, list[Any]], height: int) -> list[int | None]:
        inputs = list(zip(*(base[c] for c in self._reads), strict=True)) if self._reads else [()] * height
        if self._memo is not None:
            known = [self._memo.get(k, _UNKNOWN) for k in inputs]
            if _UNKNOWN not in known:
                return known  # type: ignore[return-value]
        return self._compute(inputs, height)

    def warm(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Remember the times of the inputs the base table holds (up to the memo's bound)."""
        if self._memo is None or not self._reads:
            return
        rows = conn.execute(
            f"SELECT DISTINCT {', '.join(map(q, self._reads))} FROM {self._table} LIMIT {_MEMO_SIZE}"
        ).fetchall()
        self._compute([tuple(r) for r in rows], len(rows))


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
