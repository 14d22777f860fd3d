"""BentoML service: POST /recommend, POST /events, GET /healthz, GET /readyz, GET /metrics.

    bentoml serve recsys_serving.service:RecommenderService --host 127.0.0.1 --port 3100

The HTTP edge (BentoML 1.4) has two layers of ours:
- `EdgeGate`, in front of every BentoML middleware: a path that no route serves gets a 404 JSON
  there, before BentoML's traffic-metrics middleware, which labels its series with the raw path
  (one new series per random path). BentoML adds service middlewares inside that one, and Starlette
  has no insertion point once BentoML has built the app, so `ApiGuard` puts the gate in front of the
  built stack when the lifespan starts.
- `ApiGuard` (a service middleware, which runs before routing): /healthz and /readyz answer the
  health JSON, 200 iff its status is ok (BentoML matches both before mounted apps; /livez stays
  BentoML's); for the API routes: bearer tokens, the per-client rate limit, the body size and
  content type, the per-endpoint concurrency caps (access.py), a handler cancelled when its client
  disconnects, and latency and outcome accounting.
/metrics is BentoML's endpoint: our `recsys_*` series live in the same multiprocess Prometheus
registry (see metrics.py). Bad input never reaches the model: pydantic errors become a 400 with the
field and the reason (BentoML's handler, logged as one WARNING line by `ClientErrorLogFilter`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

from recsys_serving.access import EdgeControls, Refusal, client_key
from recsys_serving.contract import SERVICE_NAME
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.openapi import OpenApiDocument
from recsys_serving.event_writer import EventLogUnavailable, EventQueueFull
from recsys_serving.recommender import Recommender, TargetMismatch
from recsys_serving.schemas import ErrorBody, EventRequest, EventResponse, RecommendRequest, RecommendResponse
from recsys_serving.settings import ServingSettings

logger = logging.getLogger("recsys_serving")

API_ENDPOINTS = {"/recommend": "recommend", "/events": "events"}
JSON_TYPES = ("application/json", "text/json")

# The live Recommender of this worker process, for the middleware (set by the service constructor).
_RUNTIME: dict[str, Any] = {}
# time.perf_counter() when ApiGuard received the request: the model budget counts from there.
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("recsys_arrived", default=None)


HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _count_refusal(endpoint: str, reason: str) -> None:
    metrics: ServiceMetrics | None = _RUNTIME.get("metrics")
    if metrics is not None:
        metrics.refused.labels(endpoint=endpoint, reason=reason).inc()


class EdgeGate:
    """In front of BentoML's middlewares: a path no route serves is answered 404 here, so that it
    never becomes a label value of BentoML's per-path traffic metrics."""

    def __init__(self, app: Any, routes: list[Any]) -> None:
        self.app = app
        self.exact: set[str] = set()
        self.matched: list[Any] = []  # routes with path parameters, mounted apps: Starlette's own match
        for route in routes:
            if isinstance(route, Mount) and isinstance(route.app, StaticFiles) and route.app.directory is not None:
                root = Path(route.app.directory)  # a file that exists, not any path under the mount
                self.exact.update(
                    f"{route.path}/{f.relative_to(root).as_posix()}" for f in root.rglob("*") if f.is_file()
                )
            elif isinstance(route, Route) and not route.param_convertors:
                self.exact.add(route.path)
                self.matched.append(route)  # also matches under a root_path
            else:
                self.matched.append(route)

    def known(self, scope: Any) -> bool:
        if scope["path"] in self.exact:
            return True
        probe = {**scope, "type": "http", "method": scope.get("method", "GET")}
        return any(route.matches(probe)[0] is not Match.NONE for route in self.matched)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or self.known(scope):
            return await self.app(scope, receive, send)
        _count_refusal("other", "not_found")
        if kind == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _send_json(send, 404, {"error": "not found: the service answers POST /recommend, POST /events, "
                                              "GET /healthz, /readyz, /livez, /metrics, /docs.json"})


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every request it refuses (a pydantic validation error, a 4xx BentoMLException)
    as an ERROR with the stack trace; a client's mistake becomes one WARNING line here. Other
    records (5xx: a fault of the service) pass unchanged, trace included."""

    MAX_CHARS = 300

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if isinstance(exc, ValidationError):
            status = 400
            issues = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
                for error in exc.errors(include_url=False, include_context=False, include_input=False)[:3]
            )
            summary = f"{exc.error_count()} validation error(s) for {exc.title}: {issues}"
        elif isinstance(exc, BentoMLException) and exc.error_code.value < 500:
            status, summary = exc.error_code.value, str(exc)
        else:
            return True
        args = record.args if isinstance(record.args, tuple) and len(record.args) == 2 else ("?", "?")
        # ids and field names come from the client: no control characters reach the log
        summary = "".join(c if c.isprintable() else repr(c)[1:-1] for c in summary)[: self.MAX_CHARS]
        record.msg, record.args = "%s %s -> %d: %s", (args[1], args[0], status, summary)
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def install_client_error_log_filter() -> None:
    """On the logger of BentoML's `log_exception` (the http app's), once per process."""
    from bentoml._internal.server import http_app

    if not any(isinstance(f, ClientErrorLogFilter) for f in http_app.logger.filters):
        http_app.logger.addFilter(ClientErrorLogFilter())


class ApiGuard:
    """Health routing; for the API routes: access, rate limit, body limits, concurrency caps,
    cancellation on disconnect, latency and outcome accounting (see the module docstring)."""

    def __init__(self, app: Any, settings: ServingSettings) -> None:
        self.app = app
        self.max_body_bytes = settings.max_body_bytes
        self.controls = EdgeControls.from_settings(settings)  # a bad token file stops the worker here
        self._gated = False

    def _install_gate(self, scope: Any) -> None:
        self._gated = True
        app = scope.get("app")
        if app is None or not hasattr(app, "middleware_stack") or app.middleware_stack is None:
            logger.warning("unknown paths are not gated: the ASGI app is not a built Starlette app")
            return
        app.middleware_stack = EdgeGate(app.middleware_stack, list(app.routes))

    async def _health(self, send: Any) -> None:
        recommender: Recommender | None = _RUNTIME.get("recommender")
        if recommender is None:
            starting = {"status": "unavailable", "degraded": True, "reason": "the service is starting"}
            return await _send_json(send, 503, starting)
        health = recommender.health()
        await _send_json(send, 200 if health.status == "ok" else 503, health.model_dump(mode="json"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan" and not self._gated:
                self._install_gate(scope)
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in HEALTH_PATHS and method in ("GET", "HEAD"):  # (the server drops a HEAD's body)
            return await self._health(send)
        endpoint = API_ENDPOINTS.get(path)
        if endpoint is None or method != "POST":
            return await self.app(scope, receive, send)

        started = time.perf_counter()
        _ARRIVED.set(started)  # the API handler runs in this task, so it sees the value
        status = 500
        responded = False  # the last body message was sent
        refused = False
        cancelled = False
        entered = False
        controls = self.controls

        async def send_wrapper(message: Any) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 503 and not any(k == b"retry-after" for k, _ in message.get("headers", ())):
                    message = {**message, "headers": [*message.get("headers", ()), (b"retry-after", b"1")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True  # before the await: the disconnect watcher must not cancel from here on
            await send(message)

        async def refuse(refusal: Refusal) -> None:
            nonlocal refused
            refused = True
            _count_refusal(endpoint, refusal.reason)
            await _send_json(send_wrapper, refusal.status, {"error": refusal.message}, refusal.headers)

        try:
            content_type, declared, authorization = "application/json", None, None
            for key, value in scope["headers"]:  # ASGI header names are lower-case
                if key == b"content-type":
                    content_type = value.decode("latin-1").split(";")[0].strip().lower()
                elif key == b"content-length":
                    declared = value.decode("latin-1")
                elif key == b"authorization":
                    authorization = value.decode("latin-1")
            principal, bad_credential = controls.policy.identify(authorization)
            if controls.limiter.enabled:  # before the credential's verdict: a flood of bad tokens is limited too
                wait_s = controls.limiter.acquire(client_key(principal, scope.get("client")))
                if wait_s > 0:
                    return await refuse(controls.limiter.refusal(wait_s))
            refusal = controls.policy.authorize(endpoint, path, principal, bad_credential)
            if refusal is not None:
                return await refuse(refusal)
            if content_type not in JSON_TYPES:
                return await refuse(Refusal(415, "unsupported_media_type",
                                            f"content-type {content_type!r} is not supported; send application/json"))
            too_large = Refusal(413, "body_too_large", f"request body exceeds {self.max_body_bytes} bytes")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                return await refuse(too_large)
            # Bodies are small: read them here (bounded) so that an oversized or chunked body is
            # refused before the application buffers it, then replay it.
            chunks: list[bytes] = []
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    cancelled = True
                    return
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    return await refuse(too_large)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            if not controls.caps.try_enter(endpoint):
                return await refuse(controls.caps.refusal(endpoint, path))
            entered = True
            body = b"".join(chunks)
            cancelled = await self._run_until_disconnect(scope, receive, send_wrapper, body, lambda: responded)
        finally:
            if entered:
                controls.caps.leave(endpoint)
            metrics: ServiceMetrics | None = _RUNTIME.get("metrics")
            if metrics is not None:
                if cancelled:
                    metrics.cancelled.labels(endpoint=endpoint).inc()
                else:
                    metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
                    if refused or status >= 400:
                        outcome = "rejected" if refused or status < 500 else "error"
                        metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    async def _run_until_disconnect(
        self, scope: Any, receive: Any, send: Any, body: bytes, responded: Callable[[], bool]
    ) -> bool:
        """Runs the application on the read body; True when the client disconnected first and the
        handler was cancelled. Hand-written: an anyio task group per request costs far more than the
        one watcher task that is all this needs."""
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        client_gone = False
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # after the body only the disconnect can come, which the watcher receives
            return {"type": "http.disconnect"}

        async def watch() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not responded():  # (the server also reports a disconnect once the response is complete)
                client_gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, replay, send)
        except asyncio.CancelledError:
            if not client_gone or task.uncancel() > 0:  # another cancellation (a timeout) goes on
                raise
            logger.debug("%s: the client disconnected; its handler was cancelled", scope["path"])
            return True
        finally:
            watcher.cancel()
        if client_gone:  # cancelled, but the application finished anyway: the request is not pending
            task.uncancel()
        return client_gone


_SETTINGS = ServingSettings.from_env()


@bentoml.service(
    name=SERVICE_NAME,
    # Processes per server; their caches stay coherent with /events through invalidation.SharedStamps.
    workers=_SETTINGS.workers,
    traffic={"timeout": 10, "max_concurrency": 512},
    logging={"access": {"enabled": False}},  # per-request log lines cost more than the inference
    # BentoML's OpenTelemetry middleware runs on every request even when no trace is sampled; the
    # API routes skip it unless RECSYS_TRACE_REQUESTS asks for spans.
    tracing={} if _SETTINGS.trace_requests else {"excluded_urls": [f"{route}$" for route in API_ENDPOINTS]},
)
class RecommenderService:
    def __init__(self) -> None:
        install_client_error_log_filter()
        self.metrics = ServiceMetrics()
        self.recommender = Recommender(_SETTINGS, self.metrics)
        _RUNTIME.update(recommender=self.recommender, metrics=self.metrics)

    @bentoml.api(route="/recommend")
    async def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        """Top-k next items for a user; `fallback` and `reason` say when popularity answered."""
        try:
            response = await self.recommender.recommend(request, started=_ARRIVED.get())
        except TargetMismatch as exc:  # counted as rejected by ApiGuard, from the status
            return JSONResponse(ErrorBody(error=str(exc)).model_dump(), status_code=409)  # type: ignore[return-value]
        outcome = "cache" if response.cached else ("fallback" if response.fallback else "model")
        self.metrics.requests.labels(endpoint="recommend", outcome=outcome).inc()
        return response

    @bentoml.api(route="/events")
    async def events(self, request: EventRequest, /) -> EventResponse:
        """Log an event durably (once per event_id), then update the user's sequence and the cache."""
        try:
            response = await self.recommender.record_event(request)
        except (EventLogUnavailable, EventQueueFull) as exc:
            logger.error("event not accepted: %s", exc)
            # A Response passes BentoML through unchanged: a raised 5xx would lose its message.
            return JSONResponse(  # type: ignore[return-value]
                ErrorBody(error=f"event not accepted, retry later: {exc}").model_dump(),
                status_code=503,
                headers={"Retry-After": "1"},
            )
        if response.duplicate:
            outcome = "duplicate"
        else:
            outcome = "accepted" if response.feature_store_updated else "accepted_log_only"
        self.metrics.requests.labels(endpoint="events", outcome=outcome).inc()
        return response

    @bentoml.on_shutdown
    def close(self) -> None:
        self.recommender.close()


# Outside ApiGuard: /docs.json is answered whatever the edge does with other paths.
RecommenderService.add_asgi_middleware(OpenApiDocument, service=RecommenderService, settings=_SETTINGS)  # type: ignore[attr-defined]
RecommenderService.add_asgi_middleware(ApiGuard, settings=_SETTINGS)  # type: ignore[attr-defined]
