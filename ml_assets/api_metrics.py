"""Prometheus metrics of the REST API (`GET /metrics`, the text exposition format).

Names follow Prometheus' conventions (a `ml_assets_` prefix, base units, `_total` counters, an `_info`
metric for the served version). Label values are bounded: a route is the route's template
(`/v1/{pipeline}/predict`, or `unmatched`), a pipeline one of those served, so a scanner probing random
paths cannot grow the series without bound.

The monitors' latest numbers (drift share, the last judged period's metric) are read from the warehouse
by the API's poller when the warehouse changed, never by a scrape: a scrape must not wait for the
warehouse's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ml_assets.core.store import DRIFT_RUNS, PERFORMANCE_HISTORY, Connect

log = logging.getLogger("ml_assets.api")
# Online requests take milliseconds (the serve bench's p99 goal is 5 ms); the top buckets catch stalls.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class MonitorState:
    """What the monitors last said of one pipeline's champion."""

    drift_share: float | None = None
    dataset_drift: bool | None = None
    metric: str | None = None
    performance: float | None = None
    expected: float | None = None
    degraded: bool | None = None


def monitor_state(conn: duckdb.DuckDBPyConnection, pipeline: str) -> MonitorState:
    """The latest drift run and the latest scored period of `pipeline` (None where none exists yet)."""
    drift = conn.execute(
        f"SELECT drift_share, dataset_drift FROM {DRIFT_RUNS} WHERE pipeline = ? "
        "ORDER BY computed_at DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    period = conn.execute(
        f"SELECT metric, score, expected, degraded FROM {PERFORMANCE_HISTORY} "
        "WHERE pipeline = ? AND score IS NOT NULL ORDER BY period_start DESC, computed_at DESC LIMIT 1",
        [pipeline],
    ).fetchone()
    return MonitorState(*(drift or (None, None)), *(period or (None, None, None, None)))


class ApiMetrics(Collector):
    """The API's counters and histogram, and a collector for what is state rather than events (the
    served version, the monitors' numbers), read from `versions` and `monitors` at scrape time."""

    def __init__(self, versions: Callable[[], Mapping[str, str | None]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ml_assets_http_requests",
            "HTTP requests answered, by route template, method, status code and pipeline",
            ["route", "method", "status", "pipeline"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ml_assets_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows_scored = Counter(
            "ml_assets_rows_scored", "Rows scored by the online API", ["pipeline"], registry=self.registry
        )
        self.swaps = Counter(
            "ml_assets_model_swaps",
            "Times the API swapped the model it serves (a promotion or rollback seen by its poller)",
            ["pipeline"],
            registry=self.registry,
        )
        self._versions = versions
        self.monitors: dict[str, MonitorState] = {}
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        served = InfoMetricFamily(
            "ml_assets_model", "The model version each pipeline serves", labels=["pipeline"]
        )
        for pipeline, version in self._versions().items():
            if version is not None:
                served.add_metric([pipeline], {"version": version})
        yield served
        yield from self._monitor_families()

    def _monitor_families(self) -> Iterator[GaugeMetricFamily]:
        drift = GaugeMetricFamily(
            "ml_assets_drift_share",
            "Share of the champion's features that drifted in the latest window",
            labels=["pipeline"],
        )
        drifted = GaugeMetricFamily(
            "ml_assets_dataset_drift", "1 when the latest drift window counted as drift", labels=["pipeline"]
        )
        score = GaugeMetricFamily(
            "ml_assets_performance",
            "The champion's metric on the latest labelled period",
            labels=["pipeline", "metric"],
        )
        expected = GaugeMetricFamily(
            "ml_assets_performance_expected",
            "The test score the champion was promoted on (what the performance is judged against)",
            labels=["pipeline", "metric"],
        )
        degraded = GaugeMetricFamily(
            "ml_assets_performance_degraded",
            "1 when the latest labelled period was degraded",
            labels=["pipeline"],
        )
        for pipeline, state in self.monitors.items():
            if state.drift_share is not None:
                drift.add_metric([pipeline], state.drift_share)
                drifted.add_metric([pipeline], float(bool(state.dataset_drift)))
            if state.metric is not None and state.performance is not None:
                score.add_metric([pipeline, state.metric], state.performance)
                expected.add_metric([pipeline, state.metric], state.expected)
                degraded.add_metric([pipeline], float(bool(state.degraded)))
        yield from (drift, drifted, score, expected, degraded)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request the app answers. Pure ASGI: no per-request objects beyond a
    closure, which matters at a 5 ms p99."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, pipelines: frozenset[str]) -> None:
        self.app, self.metrics, self.pipelines = app, metrics, pipelines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # Routing filled in the matched route and its parameters on this same scope.
            route = getattr(scope.get("route"), "path", "unmatched")
            pipeline = (scope.get("path_params") or {}).get("pipeline")
            method = scope["method"]
            label = pipeline if pipeline in self.pipelines else ""
            self.metrics.requests.labels(route, method, str(status[0]), label).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)


def monitor_watcher(
    connect: Connect,
    pipelines: list[str],
    metrics: ApiMetrics,
    marker: Callable[[], Hashable] | None,
) -> Callable[[], None]:
    """A function for the API's poller: re-reads the monitors' numbers when the warehouse changed (every
    call without a marker), keeping the last good numbers when the read fails."""
    last: list[Hashable | object] = [object()]

    def watch() -> None:
        seen = marker() if marker is not None else object()
        if seen == last[0]:
            return
        try:
            with connect() as conn:
                metrics.monitors = {name: monitor_state(conn, name) for name in pipelines}
        except duckdb.Error as exc:
            log.warning("reading the monitors' numbers for /metrics failed: %s", exc)
            return
        last[0] = seen

    return watch
