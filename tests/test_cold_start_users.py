"""New users: a user with no events gets popularity by context (device, segment, time of day), one with
1 to 3 events gets the model. What the context lists are worth is measured by
benchmarks/cold_start_users.py (HR@10 of answering each user's last event with no history), pinned
here on data where context decides what is popular and on the built-in generator, where it does not."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import numpy as np
import prometheus_client
import pyarrow as pa
import pytest

from recsys_assets.data import sources
from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.synthetic import DEFAULT_CONFIG, generate_events
from recsys_assets.export.bundle import model_spec_for, promote, write_bundle
from recsys_serving.contract import time_of_day_token
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

from _service_harness import REPO
from test_bundle import ITEMS, VOCABULARY, _metrics, exported  # noqa: F401  (exported: the tiny ONNX export fixture)


def _benchmark() -> ModuleType:
    """benchmarks/cold_start_users.py (a script, not a package) as a module: its import runs nothing."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cold_start_users.py"
    spec = importlib.util.spec_from_file_location("cold_start_users", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the report's annotations through it
    spec.loader.exec_module(module)
    return module


cold_start_users = _benchmark()

DEVICES = ("mobile", "desktop", "app")
PEAK_HOURS = (20, 11, 22)  # each device's busiest hour


def _context_events(n_users: int = 3000, events_per_user: int = 20, n_items: int = 400, seed: int = 0) -> pa.Table:
    """Events where context decides what is popular: half of the views draw their item from a ranking
    of the (device, time of day) they happen in, the rest from one global ranking; devices have their
    own hours of the day; the segment carries nothing (a dimension the lists must not be hurt by)."""
    rng = np.random.default_rng(seed)
    n = n_users * events_per_user
    owner = np.repeat(np.arange(n_users), events_per_user)
    primary = rng.integers(0, len(DEVICES), n_users)
    device = np.where(rng.random(n) < 0.8, primary[owner], rng.integers(0, len(DEVICES), n))
    hour = (np.array(PEAK_HOURS)[device] + np.rint(rng.normal(0, 3, n)).astype(int)) % 24
    tod = np.array([time_of_day_token(h) for h in range(24)])[hour]
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.1
    rank = np.searchsorted(np.cumsum(weights) / weights.sum(), rng.random(n))
    rankings = np.stack([rng.permutation(n_items) for _ in range(len(DEVICES) * 7)])  # per (device, tod)
    item = np.where(rng.random(n) < 0.5, rankings[device * 7 + tod, rank], rank)
    start = datetime(2025, 1, 1)
    ts = [start + timedelta(days=int(d), hours=int(h), seconds=int(s))
          for d, h, s in zip(rng.integers(0, 60, n), hour, rng.integers(0, 3600, n))]
    return pa.table({
        "event_id": np.arange(n),
        "user_id": [f"u{u}" for u in owner],
        "item_id": [f"i{i}" for i in item],
        "event_type": ["view"] * n,
        "ts": pa.array(ts, pa.timestamp("us")),
        "device": np.array(DEVICES)[device],
        "segment": np.array(["new", "vip"])[rng.integers(0, 2, n_users)][owner],
    })


def test_context_popularity_beats_global_where_context_decides_what_is_popular() -> None:
    con = duckdb.connect()
    events = _context_events()
    con.execute("CREATE TABLE cleaned_interactions AS SELECT * FROM events")
    report = cold_start_users.measure(con, folds=5, n_bootstrap=200)  # new users: their own events in no list
    figures = report.figures
    print(cold_start_users.markdown(report))
    assert report.users == 3000
    # the most specific list answers (every context has enough events), and it is much better than global
    assert report.answered_by["all three"] > 0.95
    assert figures["context"].hr >= figures["global"].hr + 0.05
    assert figures["context"].ndcg >= figures["global"].ndcg + 0.03
    assert report.context_minus_global_hr_ci[0] > 0
    # the time of day is used: device alone (the old fallback's choice) is clearly worse
    assert figures["context"].hr >= figures["device"].hr + 0.03


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    """make run's data (the built-in generator at its default size), loaded and cleaned."""
    events = tmp_path_factory.mktemp("generated")
    generate_events(events, DEFAULT_CONFIG.model_copy(update={"output_format": "parquet", "malformed_rate": 0.0}))
    con = duckdb.connect()
    sources.load_events(con, events, "parquet", table="raw_events")
    clean_events(con, CleaningConfig(now=datetime(2030, 1, 1)))
    return con


def test_context_popularity_is_no_worse_than_global_on_the_built_in_generator(
    generated: duckdb.DuckDBPyConnection,
) -> None:
    """The generator's item choice does not depend on device, segment or time of day: there the
    context lists must cost nothing. Unshrunk, lists of a few hundred events do cost (their ranking
    is noise); shrunk towards global (the default prior), they do not."""
    shrunk = cold_start_users.measure(generated, folds=5, n_bootstrap=500)
    raw = cold_start_users.measure(generated, folds=5, n_bootstrap=500, prior_events=0)
    print(cold_start_users.markdown(shrunk))
    assert shrunk.users == raw.users > 5000
    assert shrunk.answered_by["all three"] > 0.5  # the context lists do answer
    assert shrunk.context_minus_global_hr_ci[1] > 0, "context lists made new users' answers worse than global"
    assert raw.context_minus_global_hr_ci[1] < 0  # what the shrinkage is for
    assert shrunk.figures["context"].hr > raw.figures["context"].hr


# -- serving ---------------------------------------------------------------------------------------

LATE, MORNING = 21, 9  # hours of the day (UTC) of the requests below
POPULARITY = {
    "global": [{"item_id": i, "score": 1.0 / (r + 1)} for r, i in enumerate(ITEMS[:40])],
    "groups": [
        {"context": {"device": "mobile"}, "items": [{"item_id": i, "score": 0.1} for i in ITEMS[20:30]]},
        {"context": {"device": "mobile", "time_of_day": str(time_of_day_token(LATE))},
         "items": [{"item_id": i, "score": 0.2} for i in ITEMS[50:60]]},
        {"context": {"time_of_day": str(time_of_day_token(MORNING))},
         "items": [{"item_id": i, "score": 0.3} for i in ITEMS[40:50]]},
    ],
}


def _serving(home: Path, exported: Any) -> None:
    """$RECSYS_HOME with a promoted bundle (POPULARITY) and the Feast SQLite online store applied."""
    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_serving.feature_client import load_feature_store

    config, report = exported
    info = write_bundle(home / "bundles", Path(report.path), VOCABULARY, POPULARITY, model_spec_for(config, report),
                        metrics=_metrics(0.1), data_window={"start": None, "end": None}, version="v1")
    promote(home / "bundles", info.version)
    apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)


def _recommender(**overrides: Any) -> Recommender:
    settings = ServingSettings.from_env(
        **{"feature_repo": str(REPO / "feature_repo"), "reload_interval_s": 0, "answer_log": False, **overrides}
    )
    return Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))


def _at(hour: int) -> datetime:
    return datetime.now(timezone.utc).replace(hour=hour, minute=15) - timedelta(days=1)


def test_unknown_users_get_the_list_of_their_time_of_day_and_device(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _serving(tmp_path, exported)
    cached, uncached = _recommender(), _recommender(cache_max_bytes=0)
    try:
        async def ask(recommender: Recommender, **context: Any) -> list[str]:
            answer = await recommender.recommend(RecommendRequest(user_id="newcomer", k=12, context=context))
            assert answer.fallback and answer.reason == "unknown_user"
            return [i.item_id for i in answer.items]

        async def scenario() -> None:
            for recommender in (cached, uncached, cached):  # cached twice: the cache keeps the variants apart
                late = await ask(recommender, device="mobile", ts=_at(LATE))
                assert late == ITEMS[50:60] + ITEMS[20:22]  # device + time of day, topped up from the device's list
                assert await ask(recommender, device="mobile", ts=_at(MORNING)) == ITEMS[40:50] + ITEMS[20:22]
                assert await ask(recommender, device="tablet", ts=_at(LATE)) == ITEMS[:12]  # nothing specific: global
                assert await ask(recommender, ts=_at(MORNING)) == ITEMS[40:50] + ITEMS[:2]

        asyncio.run(scenario())
    finally:
        cached.close()
        uncached.close()


def test_users_with_one_to_three_events_are_answered_by_the_model(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BERT4Rec needs no user embedding: any history of items it knows, a single event included, is
    encoded and ranked; only a user with no events at all gets the popularity fallback."""
    from recsys_serving.feature_client import FeatureStoreClient, PushedEvent

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _serving(tmp_path, exported)
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    histories = {f"user-{n}": ITEMS[3 * n : 4 * n] for n in (1, 2, 3)}
    FeatureStoreClient(REPO / "feature_repo").push_events([
        PushedEvent(user_id=user, item_id=item, event_type="view", ts=start + timedelta(minutes=m), device="mobile")
        for user, items in histories.items() for m, item in enumerate(items)
    ])
    recommender = _recommender()
    try:
        async def scenario() -> None:
            for user, items in histories.items():
                answer = await recommender.recommend(RecommendRequest(user_id=user, k=10, context={"device": "mobile"}))
                assert answer.reason == "model" and not answer.fallback, (user, answer.reason)
                assert len(answer.items) == 10 and not {i.item_id for i in answer.items} & set(items)
            nobody = await recommender.recommend(RecommendRequest(user_id="user-0", k=10))
            assert nobody.reason == "unknown_user"

        asyncio.run(scenario())
    finally:
        recommender.close()
