"""The online REST API on each pipeline's champion (`ml-assets serve`): FastAPI on uvicorn.

Routes: `POST /v1/<pipeline>/predict` (one object or a list), `GET /v1/<pipeline>/model`, `GET /health`,
`GET /ready`, `GET /metrics` (Prometheus, see api_metrics), OpenAPI at `/docs`. The scoring itself is core.serving's; this module only speaks HTTP: a bad
request is a 4xx whose JSON names the field and the problem, never a 500 with a traceback. A poller thread
refreshes every served pipeline every `serving.poll_s` seconds (hot swap; see core.serving.online_model).
Given a bundle root, the API serves the published bundles (core.serving.bundle) and never opens the
warehouse: what an API on another host than the pipelines does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_assets.api_metrics import ApiMetrics, MetricsMiddleware, monitor_watcher
from ml_assets.core.errors import ArtifactError, UsageError
from ml_assets.core.serving.online_model import OnlineModel
from ml_assets.core.serving.request_log import RequestLog, log_dir
from ml_assets.core.serving.request_parsing import RequestError
from ml_assets.core.spec import Project
from ml_assets.core.store import Connect

log = logging.getLogger("ml_assets.api")
JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}


def _error(status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, **({"errors": errors} if errors else {})}, status_code=status)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _request_schema(model: OnlineModel) -> dict[str, Any]:
    """The request body's JSON schema for /docs (the handler validates it itself, naming field and row)."""
    props = {}
    for name, spec in model.fields.items():
        kind = JSON_TYPES.get(spec.type)
        prop = {"type": kind} if kind else {"type": "string", "format": "date-time"}
        props[name] = prop if spec.not_null else {"anyOf": [prop, {"type": "null"}]}
    row = {
        "type": "object",
        "properties": props,
        "required": [n for n, s in model.fields.items() if s.not_null],
    }
    return {"anyOf": [row, {"type": "array", "items": row, "maxItems": model.pipeline.serving.max_batch}]}


def _model_info(model: OnlineModel) -> dict[str, Any]:
    served = model.served
    if served is None:
        return {"pipeline": model.pipeline.name, "version": None, "problem": model.problem}
    manifest = served.model.manifest
    return {
        "pipeline": model.pipeline.name,
        "version": served.version,
        "task": manifest.task,
        "decision_threshold": served.model.threshold if manifest.task == "binary" else None,
        "classes": manifest.classes,
        "features": manifest.features,
        "request_fields": {n: {"type": s.type, "required": s.not_null} for n, s in model.fields.items()},
        "metric": manifest.metric,
        "test_metrics": manifest.test_metrics,
        "train_window": manifest.train_window,
        "loaded_at": str(served.loaded_at),
        # The published bundle it came from (None: loaded from the warehouse).
        "bundle": served.bundle,
        # How requests are completed: per-key lookups, or the SQL (and why the joins need it).
        "completion": "per-key lookups"
        if served.lookups.keyed is not None
        else f"sql ({served.lookups.keyed_problem})",
        "problem": model.problem,
    }


def _poll(
    models: Sequence[OnlineModel],
    stop: threading.Event,
    interval: float,
    metrics: ApiMetrics,
    watch_monitors: Callable[[], None],
) -> None:
    while not stop.wait(interval):
        for model in models:
            try:
                if model.log is not None:
                    model.log.flush()
                if model.refresh():
                    metrics.swaps.labels(model.pipeline.name).inc()
                    log.warning(
                        "%s now serves %s", model.pipeline.name, model.served and model.served.version
                    )
            except Exception as exc:  # keep serving what is loaded; a later poll retries
                source = "the bundles" if model.bundles is not None else "the warehouse"
                model.problem = f"refreshing from {source} failed: {exc}"
                log.warning("%s: %s", model.pipeline.name, model.problem)
        watch_monitors()


def create_app(
    project: Project,
    connect: Connect | None,
    pipelines: Sequence[str] | None = None,
    poll: bool = True,
    log_root: Path | None = None,
    marker: Callable[[], Hashable] | None = None,
    bundles: Path | None = None,
) -> FastAPI:
    """The API over `pipelines` (default: all), each loaded once now; with `poll`, a thread keeps them
    current while the app runs (and flushes the request logs under `log_root`, when given). `marker`
    (store.change_marker of the warehouse) lets a poll that finds nothing changed skip the warehouse.
    With `bundles` (a bundle root), the models come from the published bundles and `connect` is not
    used: the monitors' numbers, which live in the warehouse only, are then not in /metrics."""
    models = _online_models(project, connect, pipelines, log_root, marker, bundles)
    metrics = ApiMetrics(lambda: {n: m.served.version if m.served else None for n, m in models.items()})
    watch_monitors = (
        monitor_watcher(connect, list(models), metrics, marker)
        if bundles is None and connect is not None
        else _nothing
    )
    watch_monitors()
    app = FastAPI(
        title="ml_assets",
        description="Scores of each pipeline's champion; inputs are what a caller knows at request time, "
        "completed with the modelling table's own joins.",
        lifespan=_lifespan(models, poll, metrics, watch_monitors),
    )
    app.state.models = models
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, pipelines=frozenset(models))
    _error_handlers(app)
    _routes(app, models, metrics)
    return app


def _nothing() -> None:
    return None


def _online_models(
    project: Project,
    connect: Connect | None,
    pipelines: Sequence[str] | None,
    log_root: Path | None,
    marker: Callable[[], Hashable] | None,
    bundles: Path | None,
) -> dict[str, OnlineModel]:
    """The served pipelines, each loaded once now (a problem is kept to report, not raised)."""
    names = list(pipelines or project.pipelines)
    unknown = [n for n in names if n not in project.pipelines]
    if unknown:
        raise UsageError(f"unknown pipeline(s) {unknown}; pipelines: {', '.join(sorted(project.pipelines))}")
    models = {
        n: OnlineModel(
            project.pipelines[n],
            project.sources_of(project.pipelines[n]),
            connect,
            marker=marker,
            bundles=bundles,
        )
        for n in names
    }
    for name, model in models.items():
        sample = model.pipeline.serving.request_log_sample
        if log_root is not None and sample > 0:
            model.log = RequestLog(log_dir(log_root, name), sample)
        try:
            model.refresh()
        except ArtifactError as exc:
            model.problem = str(exc)
    return models


def _lifespan(
    models: dict[str, OnlineModel], poll: bool, metrics: ApiMetrics, watch_monitors: Callable[[], None]
) -> Callable[[FastAPI], Any]:
    """With `poll`, a thread keeps the models (and the monitors' metrics) current while the app runs; the
    request logs are flushed at the end either way."""
    interval = min(m.pipeline.serving.poll_s for m in models.values())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=_poll, args=(list(models.values()), stop, interval, metrics, watch_monitors), daemon=True
        )
        if poll:
            thread.start()
        # Everything loaded so far (Dagster, polars, the models, the lookups) lives as long as the
        # process: frozen out of the collector, a full collection does not walk it in the middle of a
        # request (its effect on the p99 was not measured apart from the other changes).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            stop.set()
            for model in models.values():
                if model.log is not None:
                    model.log.flush()

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    """Every error a JSON body naming the problem; a bug a 500 without its traceback."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _routes(app: FastAPI, models: dict[str, OnlineModel], metrics: ApiMetrics) -> None:
    def _model(pipeline: str) -> OnlineModel | JSONResponse:
        if pipeline not in models:
            return _error(404, f"unknown pipeline '{pipeline}'; served: {', '.join(models)}")
        return models[pipeline]

    @app.get("/health", summary="The process is up")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Every served pipeline has a champion loaded")
    def ready() -> JSONResponse:
        state = {
            n: {
                "version": m.served.version if m.served else None,
                "problem": m.problem,
                "last_refresh": str(m.last_refresh) if m.last_refresh else None,
            }
            for n, m in models.items()
        }
        ok = all(m.served is not None for m in models.values())
        return JSONResponse({"ready": ok, "pipelines": state}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/{pipeline}/model", summary="The version that serves: features, metrics, trained window")
    def model_info(pipeline: str) -> Any:
        found = _model(pipeline)
        return found if isinstance(found, JSONResponse) else _model_info(found)

    @app.post(
        "/v1/{pipeline}/predict",
        summary="Score one request object or a list of them",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": next(iter(map(_request_schema, models.values())))}
                },
            }
        },
    )
    async def predict(pipeline: str, request: Request) -> Any:
        found = _model(pipeline)
        if isinstance(found, JSONResponse):
            return found
        limit = found.pipeline.serving.max_body_bytes
        try:
            payload = json.loads(await _read_body(request, limit), parse_constant=_reject_constant)
        except _TooLarge:
            return _error(413, f"body: larger than the limit of {limit} bytes")
        except ValueError as exc:
            return _error(400, f"body: not valid JSON ({exc})")
        try:
            answer = found.predict(payload)
            metrics.rows_scored.labels(pipeline).inc(len(answer["predictions"]))
            # A response of plain JSON types already: skips FastAPI's encoding walk over it.
            return JSONResponse(answer)
        except RequestError as exc:
            status = 413 if any("more than the limit" in p for _, _, p in exc.problems) else 422
            errors = [{"row": r, "field": f, "problem": p} for r, f, p in exc.problems]
            return _error(status, str(exc), errors)
        except ArtifactError as exc:
            return _error(503, str(exc))


def post_in_process(app: FastAPI, path: str, body: Any) -> dict[str, Any]:
    """POST through the ASGI app in this process: the API's own request handling, without a socket (the
    skew check). A non-200 answer comes back as {"error": <its body>}."""

    async def _post() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://in-process"
        ) as c:
            return await c.post(path, json=body)

    response = asyncio.run(_post())
    return response.json() if response.status_code == 200 else {"error": response.text}
