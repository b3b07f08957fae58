"""The point-in-time guard of a history feature set: a random sample of its rows recomputed from scratch,
in the plainest way, and compared with what the build stored.

Independent of the build on purpose: no window functions, no stored events, no SQL for the fallback.
For each sampled row and family, the source rows are read straight from the validated table with one
filter per row (same keys, `known_at < as_of` and inside the window; a schedule family: event time
inside [at - w, at + ahead)), aggregated, and the features are finished in Python. Only the user's
definitions (keys, value, condition, known_at, time) are shared, read from the same pipeline file.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

import duckdb

from ml_assets.core import history
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.spec.schema import HistoryFamily, duration_minutes
from ml_assets.core.sql import q
from ml_assets.core.validate import CheckOutcome

# Exact sums on both sides; the quotients and square roots are doubles on one side, Python floats here.
TOLERANCE = 1e-9


def _aggregates(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    family: HistoryFamily,
    keys: list[str],
    window: str,
) -> dict[int, dict[str, Any]]:
    """Per sampled row (`__gq._qid`): count, sum, sum of squares, conditioned count, min, max and the
    last value of the family's source rows it may see in `window`, grouped by `keys`."""
    anchor = "q._at" if family.schedule else "q._as_of"
    ahead = duration_minutes(family.ahead) if family.ahead else 0
    end = f"e._t < {anchor} + INTERVAL {ahead} MINUTE" if ahead else f"e._t < {anchor}"
    same = "".join(f" AND e.{q(k)} = q.{q(k)}" for k in keys)
    rows = conn.execute(
        f"""SELECT q._qid, count(e._v), sum(e._v), sum(CAST(e._v AS DECIMAL(38, 6)) * CAST(e._v AS DECIMAL(38, 6))),
                sum(e._c) FILTER (WHERE e._v IS NOT NULL), min(e._v), max(e._v),
                max(struct_pack(t := e._t, v := e._v)) FILTER (WHERE e._v IS NOT NULL)
            FROM __gq q LEFT JOIN ({history.event_select(pipeline, sources, family)}) e
              ON e._t IS NOT NULL AND e._t >= {anchor} - INTERVAL {duration_minutes(window)} MINUTE
              AND {end}{same}
            GROUP BY q._qid"""
    ).fetchall()
    names = ("n", "s", "ss", "c", "min", "max", "last")
    return {r[0]: dict(zip(names, r[1:], strict=True)) for r in rows}


def _value(fn: str, a: dict[str, Any]) -> float | None:
    n = a["n"]
    if fn == "count":
        return float(n)
    if fn == "sum":
        return float(a["s"] or Decimal(0))  # an empty window sums to 0, as the build's
    if not n:
        return None
    if fn == "mean":
        return float(a["s"]) / n
    if fn == "share":
        return float(a["c"]) / n
    if fn == "std":
        return math.sqrt(max(0.0, (float(a["ss"]) - float(a["s"]) ** 2 / n) / (n - 1))) if n > 1 else None
    if fn == "last":
        return float(a["last"]["v"])
    return float(a[fn])


def _expected(
    family: HistoryFamily, fn: str, own: dict[str, Any], parent: dict[str, Any] | None
) -> float | None:
    value = _value(fn, own)
    if fn in ("count", "sum"):
        return value
    fallback = _value(fn, parent) if parent is not None else None
    if parent is not None and family.prior and fn in ("mean", "share") and fallback is not None:
        value = ((value or 0.0) * own["n"] + family.prior * fallback) / (own["n"] + family.prior)
    return fallback if own["n"] < family.min_count else value


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def check_point_in_time(
    conn: duckdb.DuckDBPyConnection,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    sample_rows: int = 200,
    seed: int | None = None,
) -> CheckOutcome:
    """Recompute `sample_rows` random rows of the stored feature set (see the module docstring) and
    require every feature to equal the stored one."""
    spec = history.spec_of(pipeline)
    seed = random.randrange(2**31) if seed is None else seed
    stored = history.table_name(pipeline)
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE __gq AS SELECT *, row_number() OVER () AS _qid FROM "
        f"(SELECT * FROM {stored} USING SAMPLE reservoir({sample_rows} ROWS) REPEATABLE ({seed}))"
    )
    try:
        sampled = conn.execute("SELECT * FROM __gq").pl()
        mismatches: list[str] = []
        for name, family in spec.families.items():
            for window in family.windows:
                own = _aggregates(conn, pipeline, sources, family, family.keys, window)
                parent = (
                    _aggregates(conn, pipeline, sources, family, family.fallback, window)
                    if family.fallback is not None
                    else None
                )
                for fn in family.functions:
                    column = f"{name}_{fn}_{window}"
                    for qid, found in zip(sampled["_qid"], sampled[column], strict=True):
                        want = _expected(family, fn, own[qid], parent[qid] if parent else None)
                        if not _same(None if found is None else float(found), want):
                            mismatches.append(f"{column} row {qid}: stored {found}, recomputed {want}")
    finally:
        conn.execute("DROP TABLE IF EXISTS __gq")
    ids = ", ".join(pipeline.row_id)
    detail = {"sampled_rows": sampled.height, "seed": seed, "mismatches": len(mismatches)}
    if mismatches:
        return CheckOutcome(
            False,
            f"{len(mismatches)} feature values of {sampled.height} sampled rows (by {ids}) differ from a "
            f"recomputation over the source rows known before as_of, e.g. {mismatches[:3]}: the feature "
            "set sees values it could not know when the row is predicted (or is stale); rebuild it",
            detail | {"examples": mismatches[:10]},
        )
    return CheckOutcome(
        True,
        f"{sampled.height} sampled rows recomputed from the source rows known before as_of: every feature equal",
        detail,
    )
