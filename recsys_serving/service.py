"""BentoML service: POST /recommend, POST /events, GET /healthz, GET /metrics.

    bentoml serve recsys_serving.service:RecommenderService --host 127.0.0.1 --port 3100

Routing notes (BentoML 1.4): /healthz, /livez, /readyz and /metrics are BentoML system routes
matched before any mounted app, so /healthz is answered by `ApiGuard` (an ASGI middleware, which
runs before routing) with the model version and degraded state; /livez and /readyz stay BentoML's
probes. /metrics is BentoML's endpoint: our `recsys_*` series live in the same multiprocess
Prometheus registry (see metrics.py). Bad input never reaches the model: pydantic errors become a
400 with the field and the reason (BentoML's handler), oversized bodies a 413 and non-JSON
content types a 415 (ApiGuard).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

import bentoml
from bentoml.exceptions import ServiceUnavailable

from recsys_serving.contract import SERVICE_NAME
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import EventLogUnavailable, Recommender
from recsys_serving.schemas import EventRequest, EventResponse, RecommendRequest, RecommendResponse
from recsys_serving.settings import ServingSettings

logger = logging.getLogger("recsys_serving")

API_ENDPOINTS = {"/recommend": "recommend", "/events": "events"}
JSON_TYPES = ("application/json", "text/json")

# The live Recommender of this worker process, for the middleware (set by the service constructor).
_RUNTIME: dict[str, Any] = {}
# time.perf_counter() when ApiGuard received the request: the model budget counts from there.
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("recsys_arrived", default=None)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class ApiGuard:
    """/healthz with model state; body size and content-type limits; latency and 4xx accounting."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        recommender: Recommender | None = _RUNTIME.get("recommender")
        if path == "/healthz" and method == "GET":
            if recommender is None:
                return await _send_json(send, 503, {"status": "starting", "degraded": True})
            return await _send_json(send, 200, recommender.health().model_dump(mode="json"))
        endpoint = API_ENDPOINTS.get(path)
        if endpoint is None or method != "POST":
            return await self.app(scope, receive, send)

        started = time.perf_counter()
        _ARRIVED.set(started)  # the API handler runs in this task, so it sees the value
        status_holder = {"status": 500, "started": False}

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if content_type not in JSON_TYPES:
                return await _send_json(
                    send_wrapper, 415, {"error": f"content-type {content_type!r} is not supported; send application/json"}
                )
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                return await _send_json(
                    send_wrapper, 413, {"error": f"request body exceeds {self.max_body_bytes} bytes"}
                )
            # Bodies are small: read them here (bounded) so that an oversized or chunked body is
            # refused before the application buffers it, then replay it.
            chunks: list[bytes] = []
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    return await _send_json(
                        send_wrapper, 413, {"error": f"request body exceeds {self.max_body_bytes} bytes"}
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect as usual

            await self.app(scope, replay, send_wrapper)
        finally:
            metrics = _RUNTIME.get("metrics")
            if metrics is not None:
                metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
                status = status_holder["status"]
                if status >= 400:
                    outcome = "rejected" if status < 500 else "error"
                    metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()


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
        self.metrics = ServiceMetrics()
        self.recommender = Recommender(_SETTINGS, self.metrics)
        _RUNTIME.update(recommender=self.recommender, metrics=self.metrics)

    @bentoml.api(route="/recommend")
    async def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        """Top-k next items for a user; `fallback` and `reason` say when popularity answered."""
        response = await self.recommender.recommend(request, started=_ARRIVED.get())
        outcome = "cache" if response.cached else ("fallback" if response.fallback else "model")
        self.metrics.requests.labels(endpoint="recommend", outcome=outcome).inc()
        return response

    @bentoml.api(route="/events")
    async def events(self, request: EventRequest, /) -> EventResponse:
        """Append an event to the durable log, update the user's sequence, invalidate the cache."""
        try:
            response = await self.recommender.record_event(request)
        except EventLogUnavailable as exc:
            logger.error("event not accepted: %s", exc)
            raise ServiceUnavailable(str(exc)) from exc
        outcome = "accepted" if response.feature_store_updated else "accepted_log_only"
        self.metrics.requests.labels(endpoint="events", outcome=outcome).inc()
        return response

    @bentoml.on_shutdown
    def close(self) -> None:
        self.recommender.close()


RecommenderService.add_asgi_middleware(ApiGuard, max_body_bytes=_SETTINGS.max_body_bytes)  # type: ignore[attr-defined]
