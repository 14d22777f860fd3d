"""The answer cache is bounded in bytes across users and request variants: floods of random segments
and of random user ids keep it under RECSYS_CACHE_MAX_BYTES, with the real Recommender, bundle and
Feast online store; its byte estimate holds against tracemalloc; unknown users share one answer per
variant; context values no model or popularity list knows share one variant, with identical answers."""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import prometheus_client
import psutil
import pytest

from recsys_assets.export.bundle import promote
from recsys_serving.answer_cache import Answer, AnswerCache
from recsys_serving.invalidation import SharedStamps
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

from _service_harness import REPO
from test_bundle import ITEMS, _write, exported  # noqa: F401  (exported: the module's tiny ONNX export fixture)

KNOWN_USERS = [f"known-{n}" for n in range(200)]
FLOOD = 20_000
BOUND = 1024 * 1024  # small enough that both floods overflow it many times over


def _store_with_known_users() -> None:
    """The real Feast SQLite online store under $RECSYS_HOME, every known user with a short history."""
    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_serving.feature_client import FeatureStoreClient, PushedEvent, load_feature_store

    apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)
    client = FeatureStoreClient(REPO / "feature_repo")
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    rng = random.Random(0)
    client.push_events([
        PushedEvent(user_id=user, item_id=rng.choice(ITEMS), event_type="view", ts=start + timedelta(seconds=n),
                    device="mobile")
        for user in KNOWN_USERS for n in range(3)
    ])


def _recommender(**overrides: Any) -> Recommender:
    settings = ServingSettings.from_env(
        **{"feature_repo": str(REPO / "feature_repo"), "reload_interval_s": 0, "answer_log": False, **overrides}
    )
    return Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))


def _random_token(rng: random.Random) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12))


def _context(rng: random.Random) -> dict[str, Any]:
    """A random segment string, a known, unknown or absent device and any hour of the day."""
    hour = datetime.now(timezone.utc).replace(hour=rng.randrange(24), minute=0) - timedelta(days=1)
    return {"segment": _random_token(rng), "device": rng.choice([None, "mobile", _random_token(rng)]), "ts": hour}


async def _flood(recommender: Recommender, requests: list[dict[str, Any]], bound: int) -> tuple[float, int]:
    """Sends the requests; -> (largest cache byte count seen, hits)."""
    largest, hits = 0.0, 0
    for n, body in enumerate(requests):
        answer = await recommender.recommend(RecommendRequest(**body))
        hits += answer.cached
        if n % 50 == 0:
            largest = max(largest, recommender.health().cache["bytes"])
            assert largest <= bound
    return max(largest, recommender.health().cache["bytes"]), hits


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_floods_of_random_segments_and_user_ids_stay_under_the_byte_bound(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _write(tmp_path / "bundles", exported, "v1")
    promote(tmp_path / "bundles", "v1")
    _store_with_known_users()
    recommender = _recommender(cache_max_bytes=BOUND)
    rng = random.Random(1)
    try:
        segments = [{"user_id": rng.choice(KNOWN_USERS), "k": 10, "context": _context(rng)} for _ in range(FLOOD)]
        strangers = [{"user_id": f"stranger-{_random_token(rng)}", "k": 10, "context": _context(rng)}
                     for _ in range(FLOOD)]
        asyncio.run(_flood(recommender, segments[:500] + strangers[:500], BOUND))  # warm-up: ORT, Feast, allocator
        before = _rss()
        largest_segments, hits = asyncio.run(_flood(recommender, segments, BOUND))
        after_segments = _rss()
        largest_strangers, _ = asyncio.run(_flood(recommender, strangers, BOUND))
        after = _rss()
        stats = recommender.health().cache
        print(f"random segments: cache <= {largest_segments / 2**20:.2f} MiB, {hits} hits, RSS "
              f"{(after_segments - before) / 2**20:+.1f} MiB; random user ids: cache <= "
              f"{largest_strangers / 2**20:.2f} MiB, RSS {(after - after_segments) / 2**20:+.1f} MiB; "
              f"final {stats['entries']:.0f} entries, {stats['bytes'] / 2**20:.2f} MiB")
        assert largest_segments <= BOUND and largest_strangers <= BOUND and stats["max_bytes"] == BOUND
        assert largest_segments > BOUND * 0.8, "the flood filled the cache: the bound, not the traffic, limited it"
        # memory follows the bound, not the traffic (the answers of 20k variants or ids take tens of MiB)
        assert after - before < BOUND + 16 * 2**20
        assert hits > 0, "repeated variants are answered from the cache"
    finally:
        recommender.close()


def test_unknown_users_share_one_answer_and_unknown_context_values_one_variant(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _write(tmp_path / "bundles", exported, "v1")
    promote(tmp_path / "bundles", "v1")
    _store_with_known_users()
    cached, uncached = _recommender(), _recommender(cache_max_bytes=0)
    rng = random.Random(2)
    try:
        async def ask(recommender: Recommender, **body: Any) -> Any:
            return await recommender.recommend(RecommendRequest(k=10, **body))

        async def scenario() -> None:
            ts = datetime.now(timezone.utc).replace(hour=9) - timedelta(days=1)
            # 1,000 unknown ids in one variant: one shared answer plus a marker each
            for n in range(1000):
                answer = await ask(cached, user_id=f"nobody-{n}", context={"ts": ts})
                assert answer.reason == "unknown_user" and answer.cached is False  # each id is looked up once
            stats = cached.health().cache
            assert stats["entries"] == 1001
            marker_bytes = stats["bytes"] / 1000
            assert marker_bytes < 1024, f"a marker costs {marker_bytes:.0f} bytes, not an answer's"
            again = await ask(cached, user_id="nobody-7", context={"ts": ts})
            assert again.cached and again.reason == "unknown_user"

            # random segments and devices that nothing knows: one variant, and the same answer as uncached
            user = KNOWN_USERS[0]
            for n in range(200):
                context = {"ts": ts, "segment": _random_token(rng), "device": _random_token(rng)}
                got, expected = await ask(cached, user_id=user, context=context), await ask(uncached, user_id=user, context=context)
                assert got.cached is (n > 0)
                assert (got.items, got.reason, got.model_version) == (expected.items, expected.reason, expected.model_version)
            # a device the model and popularity know is its own variant, with its own answer
            mobile = await ask(cached, user_id=user, context={"ts": ts, "device": "mobile"})
            assert mobile.cached is False
            assert mobile.items == (await ask(uncached, user_id=user, context={"ts": ts, "device": "mobile"})).items
            assert cached.health().cache["entries"] == 1003

            # an event (any worker) makes the user's entries stale, markers included
            cached.invalidate("nobody-7")
            assert (await ask(cached, user_id="nobody-7", context={"ts": ts})).cached is False
            cached.invalidate(user)
            assert (await ask(cached, user_id=user, context={"ts": ts, "device": "mobile"})).cached is False

        asyncio.run(scenario())
    finally:
        cached.close()
        uncached.close()


def test_the_byte_estimate_holds_against_tracemalloc(tmp_path: Path) -> None:
    """What the cache counts is what its entries take (within a margin), for model-sized answers
    and for unknown users' markers: everything an entry holds is made while tracemalloc traces,
    except the item id strings, which belong to the bundle."""
    item_ids = [f"item-{k}" for k in range(100)]
    cache = AnswerCache(max_bytes=1 << 40, ttl_s=60, stamps=SharedStamps(tmp_path / "stamps.u32"))
    shared = Answer.of([(i, 0.5) for i in item_ids], "v1", "unknown_user")
    n = 5000

    def answers() -> None:
        for k in range(n):
            scores = [(item, 1.0 / (r + 1 + k)) for r, item in enumerate(item_ids)]
            cache.put(f"user-{k}", ("v1", None, None, k % 6), Answer.of(scores, "v1", "model"), 0)

    def markers() -> None:
        for k in range(n):
            cache.put(f"unknown-{k}", ("v1", None, None, 3), shared, 0, shared=True)

    for label, fill in (("answers", answers), ("markers", markers)):
        counted_before = cache.stats()["bytes"]
        gc.collect()
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        tracemalloc.stop()
        counted = cache.stats()["bytes"] - counted_before
        print(f"{label}: counted {counted / n:.0f} bytes per entry, traced {traced / n:.0f}")
        assert 0.9 * traced <= counted <= 1.5 * traced, (label, counted, traced)
