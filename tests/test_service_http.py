"""The BentoML service started for real (`bentoml serve`) on free localhost ports.

Four servers, started in parallel, cover every path:
  main      a trained tiny BERT4Rec (learned "next item = current + 1"), Feast SQLite online store
  lying     a bundle whose manifest claims a longer max_len than the graph takes -> model errors
  broken    a bundle with one byte of the weights changed (refused -> degraded) and Redis unreachable
  slow      the main bundle with a 10 µs model budget -> model timeouts
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest

from recsys_assets.data.schema import RAW_EVENTS_COLUMNS
from recsys_assets.data.served_events import append_served_events
from recsys_assets.export.bundle import write_bundle
from recsys_serving.bundle import MODEL_FILE, ModelSpec, read_manifest
from recsys_serving.contract import SERVED_EVENTS_DIR

from _service_harness import POPULARITY, REPO, VOCABULARY, Server, build_serving_home, free_port

HISTORIES = {"alice": [3, 4, 5], "carol": [10, 11], "dave": [30, 31]}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("recsys_home")
    phases: dict[str, float] = {}
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        phases[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HOME", str(home))
        good = build_serving_home(home, HISTORIES)
        phase("train, bundle, feast")
        root = home / "bundles"
        spec = read_manifest(Path(good.path)).model
        lying = write_bundle(root, home / "work" / MODEL_FILE, VOCABULARY, POPULARITY,
                             ModelSpec(**{**spec.model_dump(), "max_len": 64}), version="lying")
        broken = home / "broken"
        shutil.copytree(good.path, broken)
        weights = broken / MODEL_FILE
        weights.chmod(0o644)
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
        phase("bundles")

    servers = {
        "main": Server("main", home, {}),
        "lying": Server("lying", home, {"RECSYS_BUNDLE": lying.path}),
        "broken": Server("broken", home, {"RECSYS_BUNDLE": str(broken), "RECSYS_FEAST_ONLINE_STORE": "redis",
                                          "RECSYS_REDIS_CONNECTION": f"127.0.0.1:{free_port()}"}),
        "slow": Server("slow", home, {"RECSYS_MODEL_TIMEOUT_MS": "0.01"}),
    }
    try:
        deadline = time.monotonic() + 180
        for server in servers.values():
            server.wait_ready(deadline)
        phase("servers")
        print(f"setup phases (s): {phases}")
        yield {**servers, "home": home, "version": good.version}
    finally:
        for server in servers.values():
            server.stop()


def _ids(answer: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def test_recommend_uses_the_model_and_excludes_history(servers: dict[str, Any]) -> None:
    main = servers["main"]
    answer = main.recommend(user_id="alice", k=5)
    assert answer["fallback"] is False and answer["reason"] == "model"
    assert answer["model_version"] == servers["version"]
    assert len(answer["items"]) == 5 and _ids(answer)[0] == "i6"  # learned successor of the last item
    assert not {"i3", "i4", "i5"} & set(_ids(answer))
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    assert len(main.recommend(user_id="alice")["items"]) == 10  # default k


def test_event_changes_the_next_answer(servers: dict[str, Any]) -> None:
    main, home = servers["main"], servers["home"]
    before = main.recommend(user_id="carol", k=5)
    assert _ids(before)[0] == "i12"
    assert main.recommend(user_id="carol", k=5)["cached"] is True
    receipt = main.event(user_id="carol", item_id="i20", event_type="purchase", device="desktop")
    assert receipt["accepted"] and receipt["feature_store_updated"] and receipt["sequence_length"] == 3
    after = main.recommend(user_id="carol", k=5)
    assert after["cached"] is False, "the event must invalidate the cached answer"
    assert _ids(after)[0] == "i21" and "i20" not in _ids(after)

    # the durable log holds the event in the canonical schema, readable by the ingest stage
    files = sorted((home / "events" / "served").glob("*.jsonl"))
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    mine = [r for r in records if r["user_id"] == "carol"]
    assert mine and mine[-1]["item_id"] == "i20" and mine[-1]["event_type"] == "purchase"
    assert mine[-1]["category"] == "c0" and mine[-1]["device"] == "desktop"
    con = duckdb.connect()
    con.execute("CREATE TABLE raw_events (" + ", ".join(f'"{c}" {t}' for c, t in RAW_EVENTS_COLUMNS.items()) + ")")
    assert append_served_events(con, files).rows == len(records)
    row = con.execute("SELECT item_id, event_type, ts FROM raw_events WHERE user_id = 'carol'").fetchall()[-1]
    assert row[:2] == ("i20", "purchase")
    assert abs(row[2] - datetime.now(timezone.utc).replace(tzinfo=None)) < timedelta(minutes=5)


def test_recent_items_override_and_cold_start(servers: dict[str, Any]) -> None:
    main = servers["main"]
    answer = main.recommend(user_id="nobody", k=3, recent_items=["i30", "i31"])
    assert answer["reason"] == "model" and _ids(answer)[0] == "i32"
    cold = main.recommend(user_id="nobody", k=3, recent_items=["not-an-item"])
    assert cold["fallback"] and cold["reason"] == "cold_start"
    assert _ids(cold) == ["i39", "i38", "i37"]  # global popularity
    by_device = main.recommend(user_id="nobody", k=3, recent_items=["i0", "unknown"], context={"device": "mobile"})
    assert by_device["reason"] == "model"
    cold_mobile = main.recommend(user_id="nobody", k=3, recent_items=["x"], context={"device": "mobile"})
    assert _ids(cold_mobile) == ["i0", "i1", "i2"]  # the device's popularity list


def test_unknown_user_gets_popularity(servers: dict[str, Any]) -> None:
    main = servers["main"]
    answer = main.recommend(user_id="stranger", k=4)
    assert answer["fallback"] and answer["reason"] == "unknown_user"
    assert _ids(answer) == ["i39", "i38", "i37", "i36"]
    main.event(user_id="stranger", item_id="i7", event_type="view")
    now_known = main.recommend(user_id="stranger", k=4)
    assert now_known["reason"] == "model" and _ids(now_known)[0] == "i8"


def test_model_error_falls_back(servers: dict[str, Any]) -> None:
    lying = servers["lying"]
    short = lying.recommend(user_id="x", k=3, recent_items=["i1", "i2"])
    assert short["reason"] == "model"
    long = lying.recommend(user_id="x", k=3, recent_items=[f"i{k}" for k in range(20)])
    assert long["fallback"] and long["reason"] == "model_error"
    assert not set(_ids(long)) & {f"i{k}" for k in range(20)}
    assert lying.client.get("/healthz").json()["degraded"] is False


def test_model_timeout_falls_back(servers: dict[str, Any]) -> None:
    answer = servers["slow"].recommend(user_id="alice", k=3)
    assert answer["fallback"] and answer["reason"] == "model_timeout"
    assert answer["model_version"] == servers["version"]
    assert not set(_ids(answer)) & {"i3", "i4", "i5"}


def test_refused_bundle_and_feature_store_outage(servers: dict[str, Any]) -> None:
    broken = servers["broken"]
    health = broken.client.get("/healthz").json()
    assert health["status"] == "degraded" and health["degraded"] is True
    assert "model.onnx sha256" in health["reason"] and health["model_version"] is None
    outage = broken.recommend(user_id="alice", k=3)
    assert outage["fallback"] and outage["reason"] == "feature_store_unavailable"
    assert _ids(outage) == ["i39", "i38", "i37"]  # popularity salvaged from the refused bundle
    no_model = broken.recommend(user_id="alice", k=3, recent_items=["i39"])
    assert no_model["reason"] == "model_unavailable" and _ids(no_model) == ["i38", "i37", "i36"]
    receipt = broken.event(user_id="alice", item_id="i9", event_type="view")
    assert receipt["accepted"] and not receipt["feature_store_updated"]
    assert receipt["reason"].startswith("feature_store_unavailable")
    metrics = broken.metrics()
    assert metrics[("recsys_degraded", ())] == 1.0
    assert metrics[("recsys_fallbacks_total", (("reason", "feature_store_unavailable"),))] >= 1
    assert metrics[("recsys_fallbacks_total", (("reason", "model_unavailable"),))] >= 1


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/recommend", {"user_id": "alice", "k": 0}, 400, "k"),
        ("/recommend", {"user_id": "alice", "k": 101}, 400, "less than or equal to 100"),
        ("/recommend", {"user_id": "alice", "k": "ten"}, 400, "k"),
        ("/recommend", {"user_id": "alice", "colour": "red"}, 400, "colour"),
        ("/recommend", {}, 400, "user_id"),
        ("/recommend", {"user_id": "   "}, 400, "user_id"),
        ("/recommend", {"user_id": "a", "recent_items": ["i1"] * 501}, 400, "recent_items"),
        ("/recommend", {"user_id": "a", "context": {"device": "mobile", "browser": "x"}}, 400, "browser"),
        ("/recommend", b"{not json", 400, "Invalid JSON"),
        ("/recommend", b"[1, 2]", 400, "object"),
        ("/recommend", {"user_id": "a", "recent_items": ["x" * 200] * 400}, 413, "exceeds"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "like"}, 400, "event_type"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "ts": "2999-01-01T00:00:00"}, 400, "future"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "ts": "1600-01-01T00:00:00"}, 400, "before 1990"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "ts": "0001-01-01T00:00:00"}, 400, "before 1990"),
        ("/recommend", {"user_id": "a", "context": {"ts": "1600-01-01T00:00:00"}}, 400, "before 1990"),
        ("/recommend", {"user_id": "a", "k": "10"}, 400, "k"),
        ("/recommend", {"user_id": "a", "k": True}, 400, "k"),
        ("/recommend", {"user_id": "a\u0000b"}, 400, "user_id"),
        ("/events", {"user_id": "a", "item_id": "i1\nDROP", "event_type": "view"}, 400, "item_id"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "device": "mob\u0007ile"}, 400, "device"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "price": 1e12}, 400, "price"),
        ("/events", {"user_id": "a", "event_type": "view"}, 400, "item_id"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "price": -1}, 400, "price"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "price": False}, 400, "price"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "price": "12.5"}, 400, "price"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "ts": 1700000000}, 400, "ts"),
        ("/events", {"user_id": "a", "item_id": "i1", "event_type": "view", "ts": "2025-01-01"}, 400, "ts"),
        ("/events", {"event_id": "a b/../c", "user_id": "a", "item_id": "i1", "event_type": "view"}, 400, "event_id"),
    ],
)
def test_bad_input_gets_a_clear_4xx(servers: dict[str, Any], path: str, body: Any, status: int, needle: str) -> None:
    client = servers["main"].client
    logged = _event_log_lines(servers["home"])
    if isinstance(body, bytes):
        resp = client.post(path, content=body, headers=JSON)
    else:
        resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert needle in resp.text
    assert _event_log_lines(servers["home"]) == logged, "a refused event must not reach the event log"


def _event_log_lines(home: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in (home / SERVED_EVENTS_DIR).glob("*.jsonl"))


def test_protocol_errors(servers: dict[str, Any]) -> None:
    client = servers["main"].client
    assert client.post("/recommend", content=b'{"user_id": "a"}', headers={"content-type": "text/plain"}).status_code == 415
    assert client.get("/recommend").status_code == 405

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies to the streamed body
        yield b'{"user_id": "a", "recent_items": ['
        for _ in range(2000):
            yield b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",'
        yield b'"x"]}'

    assert client.post("/recommend", content=chunks(), headers=JSON).status_code == 413


def test_healthz_and_metrics(servers: dict[str, Any]) -> None:
    main = servers["main"]
    health = main.client.get("/healthz").json()
    assert health == {**health, "status": "ok", "degraded": False, "model_version": servers["version"]}
    main.recommend(user_id="dave", k=2)
    main.recommend(user_id="dave", k=2)  # a cache hit
    main.client.post("/recommend", json={"user_id": "dave", "k": 0})
    metrics = main.metrics()

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert value("recsys_requests_total", endpoint="recommend", outcome="model") >= 1
    assert value("recsys_requests_total", endpoint="recommend", outcome="cache") >= 1
    assert value("recsys_requests_total", endpoint="recommend", outcome="rejected") >= 1
    assert value("recsys_requests_total", endpoint="events", outcome="accepted") >= 1
    assert value("recsys_fallbacks_total", reason="unknown_user") >= 1
    assert value("recsys_fallbacks_total", reason="model_timeout") == 0  # that server is another process
    assert 0 < value("recsys_cache_hit_ratio") < 1
    assert value("recsys_model_info", model_version=servers["version"], provider="CPUExecutionProvider") == 1
    assert value("recsys_degraded") == 0
    count = value("recsys_request_latency_seconds_count", endpoint="recommend")
    assert count >= 3
    assert value("recsys_request_latency_seconds_bucket", endpoint="recommend", le="+Inf") == count


def test_workers_share_cache_invalidation(servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Recommenders on one RECSYS_HOME stand for two worker processes: an event on one must
    invalidate the other's cached answer (SharedStamps is a memory-mapped file, as across processes)."""
    import asyncio

    import prometheus_client

    from recsys_serving.metrics import ServiceMetrics
    from recsys_serving.recommender import Recommender
    from recsys_serving.schemas import RecommendRequest
    from recsys_serving.settings import ServingSettings

    monkeypatch.setenv("RECSYS_HOME", str(servers["home"]))
    settings = ServingSettings.from_env(feature_repo=str(REPO / "feature_repo"))
    one, two = (Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry())) for _ in range(2))
    request = RecommendRequest(user_id="dave", k=3)

    async def scenario() -> None:
        assert (await one.recommend(request)).cached is False
        assert (await one.recommend(request)).cached is True
        two.invalidate("dave")  # what POST /events does on the other worker
        assert (await one.recommend(request)).cached is False
        assert (await one.recommend(request)).cached is True

    asyncio.run(scenario())
    one.close()
    two.close()


def test_execution_modes_agree_and_keep_the_model_budget(servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """inline (on the event loop) and thread (worker threads) give the same answers; both answer a
    blown model budget with the model_timeout fallback. Inline cannot interrupt a run, so it checks
    the budget before inference against the time since the request arrived (load shedding)."""
    import asyncio
    import copy

    import prometheus_client

    from recsys_serving.metrics import ServiceMetrics
    from recsys_serving.recommender import INLINE_MAX_INFERENCE_MS, Recommender
    from recsys_serving.schemas import RecommendRequest
    from recsys_serving.settings import ServingSettings

    monkeypatch.setenv("RECSYS_HOME", str(servers["home"]))
    monkeypatch.delenv("RECSYS_FEAST_ONLINE_STORE", raising=False)  # the main server's SQLite store

    def recommender(**overrides: Any) -> Recommender:
        settings = ServingSettings.from_env(feature_repo=str(REPO / "feature_repo"), cache_ttl_s=0.001, **overrides)
        return Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))

    inline, thread = recommender(execution="inline"), recommender(execution="thread")
    assert inline.inline and not thread.inline
    requests = [RecommendRequest(user_id="dave", k=5), RecommendRequest(user_id="x", k=5, recent_items=["i10", "i11"])]

    async def scenario() -> None:
        for request in requests:
            a, b = await inline.recommend(request), await thread.recommend(request)
            assert a.reason == b.reason == "model" and a.items == b.items
        assert (await inline.recommend(requests[1])).items[0].item_id == "i12"
        # arrived 1 s ago with a 250 ms budget: inline skips the model instead of answering late
        late = await inline.recommend(requests[1], started=time.perf_counter() - 1.0)
        assert late.fallback and late.reason == "model_timeout" and "i11" not in [i.item_id for i in late.items]
        for mode in ("inline", "thread"):
            tight = recommender(execution=mode, model_timeout_ms=0.01)
            answer = await tight.recommend(requests[0])
            assert answer.reason == "model_timeout", mode
            tight.close()

    asyncio.run(scenario())
    inline.close()
    thread.close()
    # auto: inline only with the local SQLite store and a short inference; a networked store or a
    # long inference (measured at warm-up) stays off the event loop
    auto = ServingSettings(execution="auto")
    assert inline.ranker is not None and 0 < inline.ranker.inference_ms < INLINE_MAX_INFERENCE_MS
    assert Recommender._resolve_inline(auto, inline.ranker) is True
    assert Recommender._resolve_inline(auto, None) is True  # refused bundle: only the store matters
    slow_model = copy.copy(inline.ranker)
    slow_model.inference_ms = 10 * INLINE_MAX_INFERENCE_MS  # what a 2M-item catalogue measures
    assert Recommender._resolve_inline(auto, slow_model) is False
    assert Recommender._resolve_inline(ServingSettings(execution="inline"), slow_model) is True
    monkeypatch.setenv("RECSYS_FEAST_ONLINE_STORE", "redis")
    assert Recommender._resolve_inline(auto, inline.ranker) is False
    with pytest.raises(ValueError, match="execution"):
        ServingSettings.from_env({"RECSYS_EXECUTION": "fast"})


def test_event_is_refused_when_the_log_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is acknowledged that is not on disk: an unwritable log raises (the API answers 503), a
    retried event id is logged once, and the log recovers by itself when its volume is back."""
    import asyncio

    import prometheus_client

    from recsys_serving.event_writer import EventLogUnavailable
    from recsys_serving.metrics import ServiceMetrics
    from recsys_serving.recommender import Recommender
    from recsys_serving.schemas import EventRequest
    from recsys_serving.settings import ServingSettings

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    settings = ServingSettings.from_env(feature_repo=str(tmp_path / "no_feature_repo"))
    recommender = Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))
    event = EventRequest(event_id="order-7-line-1", user_id="u", item_id="i1", event_type="view")
    try:
        receipt = asyncio.run(recommender.record_event(event))  # no bundle, no feature store: still logged
        assert receipt.accepted and receipt.durable and not receipt.duplicate and not receipt.feature_store_updated
        assert receipt.event_id == "order-7-line-1"
        retry = asyncio.run(recommender.record_event(event))
        assert retry.duplicate and retry.reason.value == "duplicate"
        log_dir = settings.resolved_event_log_dir()
        lines = [json.loads(line) for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
        assert [(r["event_id"], r["item_id"]) for r in lines] == [("order-7-line-1", "i1")]

        shutil.rmtree(log_dir)
        log_dir.write_text("not a directory")  # the volume is gone
        with pytest.raises(EventLogUnavailable):
            asyncio.run(recommender.record_event(event.model_copy(update={"event_id": "order-8"})))
        assert recommender.event_log_error is not None
        log_dir.unlink()  # the volume is back (empty)
        back = asyncio.run(recommender.record_event(event.model_copy(update={"event_id": "order-8"})))
        assert back.accepted and not back.duplicate and recommender.event_log_error is None
        assert len(list(log_dir.glob("*.jsonl"))) == 1
    finally:
        recommender.close()