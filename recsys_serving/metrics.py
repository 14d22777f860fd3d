"""Service metrics, exported through BentoML's own /metrics endpoint.

BentoML runs prometheus_client in multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR when a
worker starts, after the service module is imported; prometheus_client picks its storage when
first imported, so it is imported here lazily (in `ServiceMetrics.__init__`, called from the
service constructor). Names carry the `recsys_` prefix so they never clash with BentoML's
`bentoml_*` series.
"""

from __future__ import annotations

import threading
from typing import Any

from recsys_serving.schemas import DEPENDENCIES, FallbackReason

FALLBACK_REASONS = tuple(r.value for r in FallbackReason)
OUTCOMES = {
    "recommend": ("model", "fallback", "cache", "rejected", "error"),
    "events": ("accepted", "accepted_log_only", "duplicate", "rejected", "error"),
}
SWITCH_OUTCOMES = ("switched", "refused")
# The HTTP edge (service.ApiGuard): requests answered before the application, by endpoint (unknown
# paths are "other", never the path itself) and reason; requests whose client went away.
_API_REFUSALS = ("unauthenticated", "forbidden", "rate_limited", "overloaded", "body_too_large", "unsupported_media_type")
REFUSALS = {"recommend": _API_REFUSALS, "events": _API_REFUSALS, "other": ("not_found",)}
ANSWER_LOG_DROP_REASONS = ("queue_full", "write_error")
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    def __init__(self, registry: Any | None = None) -> None:
        import prometheus_client as prom  # lazy on purpose, see the module docstring

        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.latency = prom.Histogram(
            "recsys_request_latency_seconds",
            "Server-side latency of API requests (body parsing included)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.requests = prom.Counter(
            "recsys_requests_total",
            "API requests by endpoint and outcome (model, fallback, cache, rejected, accepted, ...)",
            ["endpoint", "outcome"],
            **kw,
        )
        self.fallbacks = prom.Counter(
            "recsys_fallbacks_total", "Recommendations answered by the popularity fallback, by reason", ["reason"], **kw
        )
        self.cache_hits = prom.Counter("recsys_cache_hits_total", "Answer cache hits", **kw)
        self.cache_misses = prom.Counter("recsys_cache_misses_total", "Answer cache misses", **kw)
        self.cache_hit_ratio = prom.Gauge(
            "recsys_cache_hit_ratio",
            "Hits / lookups of the answer cache since start (per process; most recent value)",
            multiprocess_mode="mostrecent",
            **kw,
        )
        # Gauges of the served bundle use live* modes: a worker process that exits (a restart) takes
        # its values with it, instead of reporting the version it served forever as "max" would.
        # livemax of model_info: 1 while any live worker serves that version. At a switch a worker sets
        # its old version to 0 (`remove` would not work: in multiprocess mode the value stays in the
        # worker's file), so the old version reads 0 once no worker serves it any longer.
        self.model_info = prom.Gauge(
            "recsys_model_info",
            "1 for the bundle version being served by some worker (model_version='none' when none is)",
            ["model_version", "provider"],
            multiprocess_mode="livemax",
            **kw,
        )
        # livemin: the oldest model any live worker serves is what a model-age alert must see.
        self.model_created = prom.Gauge(
            "recsys_model_created_timestamp_seconds",
            "Creation time (manifest created_at, Unix seconds) of the served bundle; 0 while none is",
            multiprocess_mode="livemin",
            **kw,
        )
        self.model_loaded = prom.Gauge(
            "recsys_model_loaded_timestamp_seconds",
            "When the served bundle was loaded (Unix seconds; the latest load of any worker)",
            multiprocess_mode="livemax",
            **kw,
        )
        self.model_switches = prom.Counter(
            "recsys_model_switches_total",
            "Bundle switches by outcome: switched (a new bundle serves), refused (it failed to load or "
            "verify; the old one keeps serving). Each worker process counts its own",
            ["outcome"],
            **kw,
        )
        self.answer_log_dropped = prom.Counter(
            "recsys_answer_log_dropped_total",
            "Answers not written to the answer log, by reason (queue_full, write_error); requests never fail for it",
            ["reason"],
            **kw,
        )
        self.degraded = prom.Gauge(
            "recsys_degraded", "1 when the service runs on its fallback only", multiprocess_mode="max", **kw
        )
        # livemin: a dependency reads up only while every live worker sees it up.
        self.dependency_up = prom.Gauge(
            "recsys_dependency_up",
            "1 while a dependency works (model: a bundle serves; online_store: the latest probe read "
            "answered in time; event_log: writable, last append succeeded), else 0",
            ["dependency"],
            multiprocess_mode="livemin",
            **kw,
        )
        self.events_logged = prom.Counter("recsys_events_logged_total", "Events appended to the durable log", **kw)
        self.refused = prom.Counter(
            "recsys_requests_refused_total",
            "Requests the HTTP edge answered itself, by endpoint (recommend, events, other = an unknown path) "
            "and reason (unauthenticated, forbidden, rate_limited, overloaded, body_too_large, "
            "unsupported_media_type, not_found)",
            ["endpoint", "reason"],
            **kw,
        )
        self.cancelled = prom.Counter(
            "recsys_requests_cancelled_total",
            "API requests whose client disconnected before the answer; their handler was cancelled",
            ["endpoint"],
            **kw,
        )
        # Series that exist from the start read 0 instead of missing (dashboards, rate()).
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason=reason)
        for outcome in SWITCH_OUTCOMES:
            self.model_switches.labels(outcome=outcome)
        for dependency in DEPENDENCIES:
            self.dependency_up.labels(dependency=dependency)
        for reason in ANSWER_LOG_DROP_REASONS:
            self.answer_log_dropped.labels(reason=reason)
        for endpoint, reasons in REFUSALS.items():
            for reason in reasons:
                self.refused.labels(endpoint=endpoint, reason=reason)
        for endpoint in OUTCOMES:
            self.cancelled.labels(endpoint=endpoint)
        for endpoint, outcomes in OUTCOMES.items():
            self.latency.labels(endpoint=endpoint)
            for outcome in outcomes:
                self.requests.labels(endpoint=endpoint, outcome=outcome)
        self._lock = threading.Lock()
        self._hits = 0
        self._lookups = 0

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()
        with self._lock:
            self._lookups += 1
            self._hits += int(hit)
            ratio = self._hits / self._lookups
        self.cache_hit_ratio.set(ratio)

    def cache_ratio(self) -> float:
        with self._lock:
            return self._hits / self._lookups if self._lookups else 0.0
