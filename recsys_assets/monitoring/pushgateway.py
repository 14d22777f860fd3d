"""Pipeline signals for Prometheus through its Pushgateway: drift reports and batch-job outcomes.

Batch jobs end before Prometheus could scrape them, so they push their last state to a Pushgateway
(`RECSYS_PUSHGATEWAY_URL`, e.g. `http://127.0.0.1:9091`), which Prometheus scrapes with
`honor_labels: true` (deploy/monitoring/prometheus.yml). The alert rules and the Grafana dashboard
read the gauges pushed here.

Monitoring must never fail a retrain: with no URL configured the functions do nothing and return
False; an unreachable or refusing gateway is logged as a warning and returns False. A malformed
drift summary is a programming error and raises ValueError naming the field.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import push_to_gateway, pushadd_to_gateway
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recsys_serving.contract import DriftVerdict

logger = logging.getLogger(__name__)

PUSHGATEWAY_URL_ENV = "RECSYS_PUSHGATEWAY_URL"
# Pushgateway group (its `job` label) of the drift gauges; pipeline outcomes are grouped by their job.
DRIFT_GROUP = "recsys_drift_report"
PUSH_TIMEOUT_S = 5.0  # a black-holed gateway must not hold a retrain for the client's default 30 s

DRIFT_DETECTED = "recsys_drift_detected"
DRIFT_DEGRADED = "recsys_drift_performance_degraded"
DRIFT_VERDICT = "recsys_drift_verdict"
DRIFT_SHARE = "recsys_drift_share_drifted_signals"
DRIFT_SIGNAL_DRIFTED = "recsys_drift_signal_drifted"
DRIFT_SIGNAL_STATISTIC = "recsys_drift_signal_statistic"
DRIFT_SIGNAL_THRESHOLD = "recsys_drift_signal_threshold"
DRIFT_PERFORMANCE_DROP = "recsys_drift_performance_drop"
DRIFT_REPORT_TIMESTAMP = "recsys_drift_report_timestamp_seconds"
PIPELINE_LAST_SUCCESS = "recsys_pipeline_last_success_timestamp_seconds"
PIPELINE_LAST_FAILURE = "recsys_pipeline_last_failure_timestamp_seconds"


class PushedSignal(BaseModel):
    model_config = ConfigDict(extra="ignore")

    statistic: float | None = None
    threshold: float | None = None
    drifted: bool
    evaluated: bool = True  # the drift report marks signals it could not judge; those are not pushed


class PushedPerformance(BaseModel):
    model_config = ConfigDict(extra="ignore")

    drop: float | None = None


class PushedDriftSummary(BaseModel):
    """The drift report's summary; only `verdict` is required, extra keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    verdict: DriftVerdict
    share_drifted: float | None = Field(default=None, ge=0.0, le=1.0)
    signals: dict[str, PushedSignal] = Field(default_factory=dict)
    performance: PushedPerformance | None = None
    created_at: datetime | None = None  # when the report was made; naive = UTC

    def verdict_parts(self) -> set[str]:
        return set(self.verdict.split("_and_"))  # "drift_and_degradation" is both

    def report_time(self) -> float | None:
        if self.created_at is None:
            return None
        at = self.created_at
        return (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()


def parse_drift_summary(summary: Mapping[str, Any] | BaseModel) -> PushedDriftSummary:
    if isinstance(summary, BaseModel):  # the drift report's own model
        summary = summary.model_dump(mode="json")
    if not isinstance(summary, Mapping):
        raise ValueError(f"drift summary must be a mapping, got {type(summary).__name__}")
    try:
        return PushedDriftSummary.model_validate(dict(summary))
    except ValidationError as exc:
        raise ValueError(f"drift summary is malformed: {exc}") from exc


def drift_registry(summary: Mapping[str, Any] | BaseModel, at: float | None = None) -> CollectorRegistry:
    """The gauges of one drift report; optional parts missing from the summary are left out.

    The report's time is `at`, else the summary's `created_at`, else now.
    """
    parsed = parse_drift_summary(summary)
    registry = CollectorRegistry()
    parts = parsed.verdict_parts()
    Gauge(DRIFT_DETECTED, "1 when the last drift report found drift", registry=registry).set(int("drift" in parts))
    Gauge(DRIFT_DEGRADED, "1 when the last drift report found a performance degradation",
          registry=registry).set(int("degradation" in parts))
    Gauge(DRIFT_VERDICT, "1 for the verdict of the last drift report", ["verdict"],
          registry=registry).labels(verdict=parsed.verdict).set(1)
    if parsed.share_drifted is not None:
        Gauge(DRIFT_SHARE, "Share of the monitored signals that drifted", registry=registry).set(parsed.share_drifted)
    judged = {name: signal for name, signal in parsed.signals.items() if signal.evaluated}
    if judged:
        drifted = Gauge(DRIFT_SIGNAL_DRIFTED, "1 when the signal drifted", ["signal"], registry=registry)
        statistic = Gauge(DRIFT_SIGNAL_STATISTIC, "Drift statistic of the signal", ["signal"], registry=registry)
        threshold = Gauge(DRIFT_SIGNAL_THRESHOLD, "Threshold the statistic is compared with", ["signal"],
                          registry=registry)
        for name, signal in judged.items():
            drifted.labels(signal=name).set(int(signal.drifted))
            if signal.statistic is not None:
                statistic.labels(signal=name).set(signal.statistic)
            if signal.threshold is not None:
                threshold.labels(signal=name).set(signal.threshold)
    if parsed.performance is not None and parsed.performance.drop is not None:
        Gauge(DRIFT_PERFORMANCE_DROP, "Drop of the model's quality metric against the reference",
              registry=registry).set(parsed.performance.drop)
    report_time = at if at is not None else parsed.report_time()
    Gauge(DRIFT_REPORT_TIMESTAMP, "Unix time of the last drift report", registry=registry).set(
        time.time() if report_time is None else report_time
    )
    return registry


def pipeline_registry(job: str, succeeded: bool, at: float | None = None) -> CollectorRegistry:
    """One gauge: the time of this outcome (success or failure) of `job`."""
    if not isinstance(job, str) or not job.strip():
        raise ValueError(f"job must be a non-empty job name, got {job!r}")
    registry = CollectorRegistry()
    name, doc = (
        (PIPELINE_LAST_SUCCESS, "Unix time of the job's last successful run")
        if succeeded
        else (PIPELINE_LAST_FAILURE, "Unix time of the job's last failed run")
    )
    Gauge(name, doc, registry=registry).set(time.time() if at is None else at)
    return registry


def _gateway(url: str | None) -> str | None:
    url = url if url is not None else os.environ.get(PUSHGATEWAY_URL_ENV, "")
    return url.strip() or None


def push_drift(summary: Mapping[str, Any] | BaseModel, url: str | None = None, *, at: float | None = None,
               timeout: float = PUSH_TIMEOUT_S) -> bool:
    """Push the drift gauges of `summary`; True when the gateway took them.

    PUT (push_to_gateway) replaces the whole group: a signal or an optional part missing from this
    report disappears instead of showing the previous report's value.
    """
    registry = drift_registry(summary, at)  # a malformed summary raises even without a gateway
    gateway = _gateway(url)
    if gateway is None:
        return False
    return _push(push_to_gateway, gateway, DRIFT_GROUP, registry, timeout)


def push_pipeline_outcome(job: str, succeeded: bool, url: str | None = None, *, at: float | None = None,
                          timeout: float = PUSH_TIMEOUT_S) -> bool:
    """Push the time of `job`'s success or failure; True when the gateway took it.

    POST (pushadd_to_gateway) replaces only the metric pushed, so the job's group keeps the other
    timestamp: the retrain alert compares the last failure with the last success.
    """
    registry = pipeline_registry(job, succeeded, at)
    gateway = _gateway(url)
    if gateway is None:
        return False
    return _push(pushadd_to_gateway, gateway, job, registry, timeout)


def _push(method: Any, gateway: str, job: str, registry: CollectorRegistry, timeout: float) -> bool:
    try:
        method(gateway, job=job, registry=registry, timeout=timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError/HTTPError are OSErrors
        logger.warning("could not push %s metrics to the Pushgateway at %s: %s", job, gateway, exc)
        return False
    return True
