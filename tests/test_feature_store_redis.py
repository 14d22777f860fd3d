"""The same online read / push / cold-start / outage checks against a real Redis online store.

Starts `redis-server` on a free localhost port (no persistence) for the module; skips only when the
binary cannot be found (`apt-get install -y redis-server` provides it).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from recsys_serving.feature_client import FeatureStoreClient, FeatureStoreUnavailable

from _service_harness import RedisServer, free_port
from test_feature_store import (  # noqa: F401  (the `home` and `interactions` fixtures are used by name)
    FEATURE_REPO,
    check_online_matches_offline,
    check_push_updates_next_read,
    check_unknown_user_is_cold_start,
    home,
    interactions,
    materialized_client,
)

REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found on PATH (install it: apt-get install -y redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_env(redis_server: RedisServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> RedisServer:
    redis_server.client.flushall()
    monkeypatch.setenv("RECSYS_FEAST_ONLINE_STORE", "redis")
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", redis_server.connection)
    return redis_server


def test_redis_online_features_equal_offline_features(
    redis_env: RedisServer, home: Path, interactions: pd.DataFrame
) -> None:
    client, path = materialized_client(home, interactions, online_store="redis")
    assert client.store.config.online_store.type == "redis"
    assert redis_env.client.dbsize() == interactions["user_id"].nunique()  # one hash per user
    check_online_matches_offline(client, path, interactions)
    check_unknown_user_is_cold_start(client)


def test_redis_push_makes_the_next_read_reflect_the_event(
    redis_env: RedisServer, home: Path, interactions: pd.DataFrame
) -> None:
    client, _ = materialized_client(home, interactions, online_store="redis", max_len=12)
    check_push_updates_next_read(client, interactions)
    # the selection by environment variable reaches the same records
    assert FeatureStoreClient(FEATURE_REPO).get_user_sequence("brand-new-user").item_ids == ["i1"]


def test_redis_outage_raises_feature_store_unavailable(
    redis_env: RedisServer, home: Path, interactions: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    materialized_client(home, interactions, online_store="redis")
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", f"127.0.0.1:{free_port()}")  # nothing listens there
    client = FeatureStoreClient(FEATURE_REPO, online_store="redis")
    started = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable, match="redis online store"):
        client.get_user_sequence("u0001")
    with pytest.raises(FeatureStoreUnavailable, match="redis online store"):
        client.push_event("u0001", "i1", "view", datetime(2030, 1, 1))
    assert time.monotonic() - started < 5  # fails fast: serving falls back within its budget
