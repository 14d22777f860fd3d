"""The same online read / push / cold-start / outage checks against a real Redis online store.

Starts `redis-server` on a free localhost port (no persistence) for the module; skips only when the
binary cannot be found (`apt-get install -y redis-server` provides it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import redis

from recsys_serving.feature_client import FeatureStoreClient, FeatureStoreUnavailable
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.process.stdout.read().decode() if self.process.stdout else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {output}")
                time.sleep(0.05)
        self.client = client

    @property
    def connection(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found on PATH (install it: apt-get install -y redis-server)")
    server = RedisServer(REDIS_SERVER, tmp_path_factory.mktemp("redis"))
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
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", f"127.0.0.1:{_free_port()}")  # nothing listens there
    client = FeatureStoreClient(FEATURE_REPO, online_store="redis")
    started = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable, match="redis online store"):
        client.get_user_sequence("u0001")
    with pytest.raises(FeatureStoreUnavailable, match="redis online store"):
        client.push_event("u0001", "i1", "view", datetime(2030, 1, 1))
    assert time.monotonic() - started < 5  # fails fast: serving falls back within its budget
