"""Health tells the truth: a real Redis online store that goes down and comes back, a store that
accepts connections and never answers (health must not wait on it), an event log that cannot be
written; each reported per dependency, in `recsys_dependency_up`, and without paths or exception
texts."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import prometheus_client
import pytest

from recsys_assets.export.bundle import promote
from recsys_serving.event_writer import EventLogUnavailable
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import EventRequest, Health, RecommendRequest
from recsys_serving.settings import ServingSettings

from _service_harness import REPO, RedisServer, SilentServer, wait_until
from test_bundle import _write, exported  # noqa: F401  (exported: the module's tiny ONNX export fixture)

REDIS_SERVER = shutil.which("redis-server")
PROBE_S = 0.1


@pytest.fixture
def redis_home(tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, RedisServer]]:
    """$RECSYS_HOME with a promoted bundle and the Feast registry for a real Redis online store,
    where user u1 has a history."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found on PATH (install it: apt-get install -y redis-server)")
    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_serving.feature_client import FeatureStoreClient, load_feature_store

    server = RedisServer(tmp_path)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_FEAST_ONLINE_STORE", "redis")
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", f"127.0.0.1:{server.port}")
    _write(tmp_path / "bundles", exported, "v1")
    promote(tmp_path / "bundles", "v1")
    apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)
    client = FeatureStoreClient(REPO / "feature_repo")
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    for n, item in enumerate(["item-3", "item-4"]):
        client.push_event("u1", item, "view", start + timedelta(minutes=n))
    try:
        yield tmp_path, server
    finally:
        server.stop()


def _recommender(**overrides: Any) -> tuple[Recommender, prometheus_client.CollectorRegistry]:
    registry = prometheus_client.CollectorRegistry()
    settings = ServingSettings.from_env(**{
        "feature_repo": str(REPO / "feature_repo"), "reload_interval_s": 0, "health_probe_interval_s": PROBE_S,
        "feature_timeout_ms": 300, **overrides,
    })
    return Recommender(settings, ServiceMetrics(registry=registry)), registry


def _up(registry: prometheus_client.CollectorRegistry, dependency: str) -> float | None:
    return registry.get_sample_value("recsys_dependency_up", {"dependency": dependency})


def _statuses(health: Health) -> dict[str, str]:
    return {name: dep.status for name, dep in health.dependencies.items()}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _no_internals(health: Health, *secrets: str) -> None:
    """No path, address or exception text anywhere in the health document."""
    for text in _strings(health.model_dump(mode="json")):
        assert "/" not in text and "Error" not in text and "Exception" not in text, text
        for secret in secrets:
            assert secret not in text, (secret, text)


def _ask(recommender: Recommender, **body: Any) -> Any:
    return asyncio.run(recommender.recommend(RecommendRequest(**body)))


def test_the_online_store_going_down_and_coming_back(redis_home: tuple[Path, RedisServer]) -> None:
    home, server = redis_home
    recommender, registry = _recommender()
    try:
        health = recommender.health()
        assert health.status == "ok" and not health.degraded and health.reason is None
        assert _statuses(health) == {"model": "ok", "online_store": "ok", "event_log": "ok"}
        wait_until(lambda: _up(registry, "online_store") == 1, "the gauge reads up")
        assert _up(registry, "model") == 1 and _up(registry, "event_log") == 1
        assert _ask(recommender, user_id="u1", k=3).reason == "model"

        server.stop()
        wait_until(lambda: recommender.health().dependencies["online_store"].status == "down", "the probe sees the outage")
        health = recommender.health()
        assert health.status == "degraded" and health.degraded
        assert health.dependencies["online_store"].detail == "the redis online store does not answer"
        assert health.reason == "online_store: the redis online store does not answer"
        assert _statuses(health) == {"model": "ok", "online_store": "down", "event_log": "ok"}
        _no_internals(health, str(home), str(server.port), "127.0.0.1")
        wait_until(lambda: _up(registry, "online_store") == 0, "the gauge reads down")
        outage = _ask(recommender, user_id="u2", k=3)  # not cached: the store is read, and fails
        assert outage.fallback and outage.reason == "feature_store_unavailable"

        server = RedisServer(home, port=server.port)  # the same store back (empty: no persistence)
        wait_until(lambda: recommender.health().status == "ok", "recovery without a restart")
        wait_until(lambda: _up(registry, "online_store") == 1, "the gauge reads up again")
        assert _ask(recommender, user_id="u2", k=3).reason == "unknown_user"  # answered by the store again
    finally:
        recommender.close()
        server.stop()


def test_a_store_that_hangs_never_holds_up_health(redis_home: tuple[Path, RedisServer], monkeypatch: pytest.MonkeyPatch) -> None:
    silent = SilentServer()
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", f"127.0.0.1:{silent.port}")
    recommender, registry = _recommender(feature_timeout_ms=100)
    try:
        assert recommender.health().status == "degraded"  # the start-up read ran into the client's socket timeout
        wait_until(lambda: recommender.health().dependencies["online_store"].detail == "no answer within 100 ms",
              "the probe's own budget")
        _no_internals(recommender.health(), str(silent.port))
        # every health call answers at once from the latest probe, while probes keep hanging
        slowest = 0.0
        deadline = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert recommender.health().status == "degraded"
            slowest = max(slowest, time.perf_counter() - started)
            calls += 1
        # far below the probe's 100 ms budget and the client's 500 ms socket timeout: nothing waited on the store
        assert slowest < 0.05, f"a health call took {slowest * 1000:.1f} ms"
        probes = [t for t in threading.enumerate() if t.name == "recsys-probe-online_store"]
        assert len(probes) <= 1, "a hanging store costs at most one probe thread"
        wait_until(lambda: _up(registry, "online_store") == 0, "the gauge reads down")
        answer = _ask(recommender, user_id="u1", k=3)
        assert answer.reason == "feature_store_unavailable"  # the request's own budget, as before
        print(f"{calls} health calls in 2 s while the store hangs, slowest {slowest * 1000:.2f} ms")
    finally:
        recommender.close()
        silent.close()


def test_an_event_log_that_cannot_be_written(tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_serving.feature_client import load_feature_store

    _write(tmp_path / "bundles", exported, "v1")
    promote(tmp_path / "bundles", "v1")
    apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)
    blocker = tmp_path / "volume"
    blocker.write_text("a file where the event log's volume should be")
    recommender, registry = _recommender(event_log_dir=str(blocker / "events"))
    try:
        health = recommender.health()
        assert health.status == "degraded"
        assert health.dependencies["event_log"].detail == "the event log directory is missing or not writable"
        assert _statuses(health) == {"model": "ok", "online_store": "ok", "event_log": "down"}
        wait_until(lambda: _up(registry, "event_log") == 0, "the gauge reads down")

        with pytest.raises(EventLogUnavailable):
            asyncio.run(recommender.record_event(EventRequest(user_id="u1", item_id="item-3", event_type="view")))
        health = recommender.health()
        assert health.dependencies["event_log"].detail == "the last append to the event log failed: events are refused"
        _no_internals(health, str(tmp_path), "NotADirectory", "FileExists")

        blocker.unlink()  # the volume is back
        receipt = asyncio.run(recommender.record_event(EventRequest(user_id="u1", item_id="item-3", event_type="view")))
        assert receipt.accepted
        wait_until(lambda: recommender.health().status == "ok", "the event log is up again")
        wait_until(lambda: _up(registry, "event_log") == 1, "the gauge reads up again")
    finally:
        recommender.close()
