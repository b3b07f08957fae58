"""What `/metrics` says of the monitors and the served version, read from a real warehouse with the
platform's tables: the latest drift run and the latest scored period per pipeline, parsed back with the
Prometheus client's own parser. (The request counters are tested on a live server in test_serving.)"""

from __future__ import annotations

import datetime as dt
import functools

from prometheus_client.parser import text_string_to_metric_families

from ml_assets.api_metrics import ApiMetrics, monitor_state, monitor_watcher
from ml_assets.core.store import DRIFT_RUNS, PERFORMANCE_HISTORY, connect

T0 = dt.datetime(2013, 6, 1)


def _drift(conn, run: str, pipeline: str, at: dt.datetime, share: float, drift: bool) -> None:
    conn.execute(
        f"INSERT INTO {DRIFT_RUNS} (id, pipeline, computed_at, champion, drift_share, dataset_drift) "
        "VALUES (?, ?, ?, 'v1', ?, ?)",
        [run, pipeline, at, share, drift],
    )


def _period(conn, pipeline: str, start: dt.datetime, score: float | None, degraded: bool) -> None:
    conn.execute(
        f"INSERT INTO {PERFORMANCE_HISTORY} (pipeline, champion, period_start, period_end, rows, metric, "
        "score, expected, change, degraded, computed_at) VALUES (?, 'v1', ?, ?, 900, 'roc_auc', ?, 0.7, NULL, ?, ?)",
        [pipeline, start, start + dt.timedelta(days=7), score, degraded, T0],
    )


def samples(metrics: ApiMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_the_latest_drift_run_and_scored_period_become_gauges(tmp_path):
    db = functools.partial(connect, tmp_path / "warehouse.duckdb")
    with db() as conn:
        _drift(conn, "a", "p", T0, 0.5, True)
        _drift(conn, "b", "p", T0 + dt.timedelta(days=1), 0.125, False)
        _drift(conn, "c", "other", T0 + dt.timedelta(days=2), 0.9, True)
        _period(conn, "p", T0, 0.61, True)
        _period(conn, "p", T0 + dt.timedelta(days=7), 0.74, False)
        # A period with no score (too few labelled rows) is not "the latest performance".
        _period(conn, "p", T0 + dt.timedelta(days=14), None, False)
    with db() as conn:
        assert monitor_state(conn, "quiet") == monitor_state(conn, "quiet").__class__()
    metrics = ApiMetrics(lambda: {"p": "v1", "quiet": None})
    monitor_watcher(db, ["p", "quiet"], metrics, marker=None)()
    found = samples(metrics)
    assert found[("ml_assets_drift_share", frozenset({("pipeline", "p")}))] == 0.125
    assert found[("ml_assets_dataset_drift", frozenset({("pipeline", "p")}))] == 0.0
    assert found[("ml_assets_performance", frozenset({("pipeline", "p"), ("metric", "roc_auc")}))] == 0.74
    assert (
        found[("ml_assets_performance_expected", frozenset({("pipeline", "p"), ("metric", "roc_auc")}))]
        == 0.7
    )
    assert found[("ml_assets_performance_degraded", frozenset({("pipeline", "p")}))] == 0.0
    assert found[("ml_assets_model_info", frozenset({("pipeline", "p"), ("version", "v1")}))] == 1.0
    # Nothing is invented for a pipeline the monitors have not judged, nor a version for one not serving.
    assert not [key for key in found if ("pipeline", "quiet") in key[1]]


def test_the_watcher_reads_the_warehouse_only_when_it_changed(tmp_path):
    db = functools.partial(connect, tmp_path / "warehouse.duckdb")
    with db() as conn:
        _drift(conn, "a", "p", T0, 0.5, True)
    marker = ["m1"]
    metrics = ApiMetrics(dict)
    watch = monitor_watcher(db, ["p"], metrics, marker=lambda: marker[0])
    watch()
    assert metrics.monitors["p"].drift_share == 0.5
    with db() as conn:
        _drift(conn, "b", "p", T0 + dt.timedelta(days=1), 0.25, False)
    watch()  # same marker: the numbers stay as read
    assert metrics.monitors["p"].drift_share == 0.5
    marker[0] = "m2"
    watch()
    assert metrics.monitors["p"].drift_share == 0.25


def test_a_failed_read_keeps_the_last_numbers(tmp_path):
    db = functools.partial(connect, tmp_path / "warehouse.duckdb")
    with db() as conn:
        _drift(conn, "a", "p", T0, 0.5, True)
    metrics = ApiMetrics(dict)
    marker = ["m1"]
    broken = [False]

    def flaky():
        if broken[0]:
            import duckdb

            raise duckdb.IOException("Could not set lock on file")
        return db()

    watch = monitor_watcher(flaky, ["p"], metrics, marker=lambda: marker[0])
    watch()
    broken[0], marker[0] = True, "m2"
    watch()
    assert metrics.monitors["p"].drift_share == 0.5
