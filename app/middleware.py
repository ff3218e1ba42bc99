"""Middleware, metrics and error handlers: limits and failures answered at the edge.

Pure ASGI middlewares (no BaseHTTPMiddleware) so streaming bodies can be counted and cut
off, and an unexpected exception becomes a plain 500 without a traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.store import StoreUnavailable

logger = logging.getLogger(__name__)


class ServiceMetrics:
    """Request counts and latencies per route template and micro-batch sizes, in a registry of the
    app's own (several apps in one process, as in tests, must not collide in the global registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ragrec_http_requests", "HTTP requests served", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ragrec_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_size = Histogram("ragrec_inference_batch_size", "Requests answered by one forward pass",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.inference = Histogram("ragrec_inference_duration_seconds", "Forward pass and top-k per micro-batch",
                                   registry=self.registry,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

        self.stage = Histogram("ragrec_recommend_stage_seconds", "Recommendation time per stage and micro-batch",
                               ["stage"], registry=self.registry,
                               buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
        self.cache = Counter("ragrec_result_cache", "Result cache lookups", ["outcome"], registry=self.registry)
        self.index_size = Gauge("ragrec_index_entries", "Live entries of the served memory bank",
                                registry=self.registry)
        self.index_version = Gauge("ragrec_index_version", "Served index version number (v000012 -> 12)",
                                   registry=self.registry)
        self.index_swaps = Counter("ragrec_index_swaps", "Index versions swapped in", registry=self.registry)
        self.index_load_failures = Counter("ragrec_index_load_failures", "Index versions refused at load",
                                           registry=self.registry)
        self.rebuild_seconds = Histogram("ragrec_index_rebuild_seconds", "Duration of successful rebuilds",
                                         registry=self.registry, buckets=(1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000))
        self.rebuild_failures = Counter("ragrec_index_rebuild_failures", "Failed rebuilds", registry=self.registry)
        self.live_entries = Counter("ragrec_index_live_entries_added", "Bank entries added from events",
                                    registry=self.registry)

        # Label lookups hash their values on every call: the per-request ones are bound once.
        self._cache_hit, self._cache_miss = self.cache.labels("hit"), self.cache.labels("miss")
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._stage_children: dict[str, Any] = {}

    def cache_outcome(self, hit: bool) -> None:
        (self._cache_hit if hit else self._cache_miss).inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._request_children.get((method, route, status))
        if children is None:  # routes x methods x statuses: a small set, bound on first use
            children = (self.latency.labels(method, route), self.requests.labels(method, route, str(status)))
            self._request_children[(method, route, status)] = children
        children[0].observe(seconds)
        children[1].inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:  # model, search, fusion: bound on first use
            child = self._stage_children[stage] = self.stage.labels(stage)
        child.observe(seconds)

    def index_swapped(self, serving: Any) -> None:
        """After a swap: size and version gauges from the ServingIndex now served."""
        if serving is None:
            return
        self.index_swaps.inc()
        self.index_size.set(len(serving.bank))
        self.index_version.set(int(serving.version.lstrip("v") or 0))


def _json_response(status: int, detail: str) -> tuple[dict[str, Any], bytes]:
    body = JSONResponse({"detail": detail}).body
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


def replay(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that gives the app ``body`` (already read) as one message, then waits on
    the real one (for the disconnect, as the server would)."""
    replayed = False

    async def receive_again() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


class MetricsMiddleware:
    """Pure ASGI (no response buffering): counts every answer, including 413s and 500s."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")  # set by the router on the shared scope; None: no route matched
            self.metrics.observe_request(scope["method"], getattr(route, "path", "unmatched"), status,
                                         time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, judged by Content-Length and by the bytes actually received
    (chunked uploads have no Content-Length). Bodies are small JSON, so the body is read here and
    replayed to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send: Any, status: int, detail: str) -> None:
        start, body = _json_response(status, detail)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body exceeds the limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await self._reject(send, 413, too_large)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)


class InternalErrorMiddleware:
    """A bug becomes a logged traceback and a bare 500 for the client. Unlike an `Exception` handler
    (Starlette re-raises after answering, and the server then drops the connection), the exception
    ends here, so a keep-alive connection stays usable."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:
                raise  # half an answer is out; only dropping the connection can signal the failure
            start, body = _json_response(500, "internal server error")  # no traceback leaves
            await send(start)
            await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> list[dict[str, str]]:
    """Field path and message per error; the offending input is not echoed back (it may be huge)."""
    out = []
    for err in exc.errors():
        parts = tuple(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            where = f" at character {parts[1]}" if len(parts) > 1 else ""
            parts, msg = parts[:1], f"malformed JSON{where}: {err.get('ctx', {}).get('error', 'cannot parse')}"
        elif err.get("type") == "missing" and parts == ("body",):
            msg = "a JSON request body is required"
        loc = ".".join(str(part) for part in parts)
        out.append({"loc": loc, "msg": msg})
    return out


_OUTAGE_LOG_INTERVAL_S = 5.0


def install_error_handlers(app: FastAPI) -> None:
    outage = {"logged_at": -_OUTAGE_LOG_INTERVAL_S, "count": 0}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_message(exc)
        detail = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # at most one line per interval: an outage under load would otherwise log every request
        now = time.monotonic()
        outage["count"] += 1
        if now - outage["logged_at"] >= _OUTAGE_LOG_INTERVAL_S:
            logger.warning("%s %s: %s (%d such answers since the last report)", request.method, request.url.path,
                           exc, outage["count"])
            outage.update(logged_at=now, count=0)
        return JSONResponse({"detail": "the user history store is unavailable; retry later (recommendations "
                                       "for explicit items without a user_id are still served)"}, status_code=503)
