"""Check verdicts: a check's outcome (`CheckOutcome`), and the latest verdict of every check kept beside the
data it judges (`monitor.check_results`), so that a consumer launched in a later run can refuse data
whose check failed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import duckdb

from ml_assets.core.store import CHECK_RESULTS, insert


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, object] = field(default_factory=dict)
    # A failed "warn" outcome is reported but stops nothing (Dagster's WARN severity).
    severity: Literal["error", "warn"] = "error"

    @property
    def blocks(self) -> bool:
        return not self.passed and self.severity == "error"


def record_check(
    conn: duckdb.DuckDBPyConnection, asset: str, check: str, outcome: CheckOutcome, run_id: str | None
) -> None:
    """Keep a check's latest verdict beside the data it judges: a blocking check stops downstream steps
    only inside its own run, so a consumer launched later reads this to refuse failed data. A warning is
    kept as passed (its description says it): what a consumer reads here is whether to refuse."""
    insert(
        conn,
        CHECK_RESULTS,
        {
            "asset": asset,
            "check_name": check,
            "passed": not outcome.blocks,
            "description": outcome.description,
            "run_id": run_id,
            "checked_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
        },
        replace=True,
    )


def failed_checks(conn: duckdb.DuckDBPyConnection, assets: list[str]) -> list[str]:
    """'asset:check' for every check of these assets whose latest verdict failed."""
    if not assets:
        return []
    rows = conn.execute(
        f"SELECT asset || ':' || check_name FROM {CHECK_RESULTS} WHERE NOT passed AND list_contains(?, asset) "
        "ORDER BY 1",
        [assets],
    ).fetchall()
    return [r[0] for r in rows]
