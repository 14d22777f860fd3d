"""The Feast feature store: point-in-time offline table, online reads, pushes, outages, cold start.

The online-store tests are written as helpers taking a client so that tests/test_feature_store_redis.py
runs the very same checks against a real redis-server.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from recsys_serving.contract import EVENT_TYPES, time_of_day_token
from recsys_assets.data.user_features import (
    FEATURE_FILE,
    UserFeaturesConfig,
    apply_feature_repo,
    build_user_sequence_features,
    historical_user_sequences,
    materialize_latest,
    materialize_with_feast,
)
from recsys_serving.feature_client import (
    FeatureStoreClient,
    FeatureStoreUnavailable,
    UserSequence,
    load_feature_store,
    load_repo_config,
    to_epoch_us,
)

REPO = Path(__file__).resolve().parent.parent
FEATURE_REPO = REPO / "feature_repo"
T0 = datetime(2024, 3, 1, 6, 0)
DEVICES = ("web", "ios", "android", None)
SEGMENTS = ("new", "regular", "vip", None)


# ------------------------------------------------------------------------------------------------
# data


def make_interactions(n_users: int = 120, seed: int = 7) -> pd.DataFrame:
    """A table in the cleaned_interactions contract: several days per user, same-second ties,
    unknown devices, segments that change or are missing."""
    rng = np.random.default_rng(seed)
    rows = []
    event_id = 0
    for u in range(n_users):
        t = T0 + timedelta(minutes=int(rng.integers(0, 600)))
        segment = SEGMENTS[u % len(SEGMENTS)]
        for _ in range(int(rng.integers(1, 90))):
            gap = int(rng.choice([0, 40, 600, 7_200, 90_000]))  # 0: a tie on ts
            t = t + timedelta(seconds=gap)
            if rng.random() < 0.05:
                segment = SEGMENTS[int(rng.integers(0, len(SEGMENTS)))]
            rows.append(
                {
                    "user_id": f"u{u:04d}",
                    "item_id": f"i{int(rng.zipf(1.3)) % 500:03d}",
                    "event_type": EVENT_TYPES[int(rng.choice(3, p=[0.8, 0.15, 0.05]))],
                    "ts": t,
                    "session_id": f"s{u}-{t.date()}" if rng.random() < 0.9 else None,
                    "category": "c1",
                    "device": DEVICES[int(rng.integers(0, len(DEVICES)))],
                    "segment": segment,
                    "price": 1.0,
                    "event_id": event_id,
                }
            )
            event_id += 1
    frame = pd.DataFrame(rows).sort_values(["user_id", "ts", "event_id"], kind="stable")
    return frame.reset_index(drop=True)


def write_warehouse(path: Path, frame: pd.DataFrame) -> None:
    with duckdb.connect(str(path)) as con:
        con.register("incoming", frame)
        con.execute("CREATE OR REPLACE TABLE cleaned_interactions AS SELECT * FROM incoming")


def expected_state(events: pd.DataFrame, max_len: int) -> dict:
    """The latest `max_len` events of one user's (chronologically sorted) events, by brute force."""
    tail = events.tail(max_len)
    segments = events["segment"].dropna()
    return {
        "item_ids": tail["item_id"].tolist(),
        "event_types": tail["event_type"].tolist(),
        "tod": [time_of_day_token(t.hour) for t in tail["ts"]],
        "devices": [d if isinstance(d, str) else "" for d in tail["device"]],
        "last_event_ts_us": to_epoch_us(events["ts"].iloc[-1].to_pydatetime()),
        "segment": segments.iloc[-1] if len(segments) else None,
    }


def read_table(path: Path) -> pd.DataFrame:
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute("SELECT * FROM read_parquet(?) ORDER BY user_id, event_timestamp", [str(path)]).df()


def as_state(row: pd.Series | dict) -> dict:
    return {
        "item_ids": list(row["item_ids"]),
        "event_types": list(row["event_types"]),
        "tod": [int(t) for t in row["tod"]],
        "devices": list(row["devices"]),
        "last_event_ts_us": int(row["last_event_ts_us"]),
        "segment": row["segment"] if isinstance(row["segment"], str) else None,
    }


def seq_state(seq: UserSequence) -> dict:
    return {
        "item_ids": seq.item_ids,
        "event_types": seq.event_types,
        "tod": seq.tod,
        "devices": seq.devices,
        "last_event_ts_us": seq.last_event_ts_us,
        "segment": seq.segment,
    }


# ------------------------------------------------------------------------------------------------
# fixtures and shared checks (also used by test_feature_store_redis.py)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_FEAST_ONLINE_STORE", raising=False)
    monkeypatch.delenv("RECSYS_FEATURE_TTL_DAYS", raising=False)
    return tmp_path / "home"


@pytest.fixture
def interactions() -> pd.DataFrame:
    return make_interactions()


def build_features(home: Path, frame: pd.DataFrame, **config: object) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    write_warehouse(home / "warehouse.duckdb", frame)
    out = home / "features" / FEATURE_FILE
    with duckdb.connect(str(home / "warehouse.duckdb")) as con:
        build_user_sequence_features(con, "cleaned_interactions", out, UserFeaturesConfig(**config))
    return out


def materialized_client(
    home: Path, frame: pd.DataFrame, online_store: str = "sqlite", max_len: int = 50
) -> tuple[FeatureStoreClient, Path]:
    path = build_features(home, frame, max_len=max_len)
    store = load_feature_store(FEATURE_REPO, online_store)
    apply_feature_repo(store, FEATURE_REPO, max_len=max_len)
    stats = materialize_latest(store, path, batch_size=37)  # several batches
    assert stats.written == stats.users_in_source == frame["user_id"].nunique()
    return FeatureStoreClient(FEATURE_REPO, online_store=online_store), path


def check_online_matches_offline(client: FeatureStoreClient, path: Path, frame: pd.DataFrame) -> None:
    table = read_table(path)
    latest = table.groupby("user_id").tail(1).set_index("user_id")
    users = random.Random(3).sample(sorted(latest.index), 40)
    online = client.get_user_sequences(users)
    for user, seq in zip(users, online):
        assert seq is not None, user
        assert seq_state(seq) == as_state(latest.loc[user]), user
        # and the offline row is the real latest state of the user's events
        assert seq_state(seq) == expected_state(frame[frame.user_id == user], client.max_len), user
        assert seq.last_event_ts == frame[frame.user_id == user]["ts"].iloc[-1].to_pydatetime().replace(
            tzinfo=timezone.utc
        )
    # the offline store's point-in-time join just after each user's last event agrees too
    last_ts = frame.groupby("user_id")["ts"].max()
    entity = pd.DataFrame({"user_id": users, "event_timestamp": [last_ts[u] + timedelta(seconds=1) for u in users]})
    hist = historical_user_sequences(client.store, entity).set_index("user_id")
    for user, seq in zip(users, online):
        assert as_state(hist.loc[user]) == seq_state(seq), user


def check_push_updates_next_read(client: FeatureStoreClient, frame: pd.DataFrame) -> None:
    user = frame["user_id"].value_counts().index[0]  # the longest history: truncation applies
    before = client.get_user_sequence(user)
    assert before is not None and len(before) == client.max_len
    ts = datetime(2030, 5, 1, 13, 30, tzinfo=timezone.utc)
    returned = client.push_event(user, "i-new", "cart", ts, device="ios")
    after = client.get_user_sequence(user)
    assert after is not None and seq_state(after) == seq_state(returned)
    assert after.item_ids == before.item_ids[1:] + ["i-new"]
    assert after.event_types == before.event_types[1:] + ["cart"]
    assert after.tod == before.tod[1:] + [4] and after.devices == before.devices[1:] + ["ios"]
    assert after.last_event_ts == ts and after.segment == before.segment

    # same timestamp again: still applied (Redis ignores writes that are not newer)
    client.push_event(user, "i-tie", "purchase", ts)
    tie = client.get_user_sequence(user)
    assert tie is not None and tie.item_ids[-2:] == ["i-new", "i-tie"] and tie.devices[-1] == ""
    assert tie.last_event_ts_us == to_epoch_us(ts) + 1

    # a repeated view of the item just viewed is not appended (cleaning quarantines it)
    client.push_event(user, "i-view", "view", ts + timedelta(minutes=1))
    client.push_event(user, "i-view", "view", ts + timedelta(minutes=2))
    viewed = client.get_user_sequence(user)
    assert viewed is not None and viewed.item_ids[-3:] == ["i-new", "i-tie", "i-view"]

    # a user the store never saw starts a sequence
    assert client.get_user_sequence("brand-new-user") is None
    client.push_event("brand-new-user", "i1", "view", "2030-05-01T10:00:00")
    fresh = client.get_user_sequence("brand-new-user")
    assert fresh is not None and fresh.item_ids == ["i1"] and fresh.tod == [3] and fresh.segment is None

    with pytest.raises(ValueError, match="event_type"):
        client.push_event(user, "i1", "wishlist", ts)
    with pytest.raises(ValueError, match="user_id"):
        client.push_event("", "i1", "view", ts)


def check_unknown_user_is_cold_start(client: FeatureStoreClient) -> None:
    assert client.get_user_sequence("no-such-user") is None
    assert client.get_user_sequences(["no-such-user", "u0000"])[0] is None


# ------------------------------------------------------------------------------------------------
# offline table


def test_event_snapshots_are_point_in_time_correct(home: Path, interactions: pd.DataFrame) -> None:
    table = read_table(build_features(home, interactions, max_len=20, granularity="event"))
    assert not table.duplicated(["user_id", "event_timestamp"]).any()
    # one row per distinct (user, ts): ties collapse into one snapshot
    assert len(table) == len(interactions.drop_duplicates(["user_id", "ts"]))
    rng = random.Random(0)
    for _ in range(60):
        user = rng.choice(sorted(interactions["user_id"].unique()))
        events = interactions[interactions.user_id == user]
        as_of = events["ts"].iloc[rng.randrange(len(events))] + timedelta(seconds=rng.choice([0, 1, 30]))
        rows = table[(table.user_id == user) & (table.event_timestamp <= pd.Timestamp(as_of, tz="UTC"))]
        assert as_state(rows.iloc[-1]) == expected_state(events[events.ts <= as_of], 20)


@pytest.mark.parametrize("granularity", ["day", "session"])
def test_coarser_snapshots_never_see_the_future(home: Path, interactions: pd.DataFrame, granularity: str) -> None:
    table = read_table(build_features(home, interactions, max_len=20, granularity=granularity))
    assert not table.duplicated(["user_id", "event_timestamp"]).any()
    assert len(table) < len(interactions.drop_duplicates(["user_id", "ts"]))
    for _, row in table.sample(n=120, random_state=0).iterrows():
        events = interactions[(interactions.user_id == row.user_id)]
        cut = row.event_timestamp.tz_convert(None)
        assert as_state(row) == expected_state(events[events.ts <= cut], 20)
    latest = table.groupby("user_id").tail(1)
    assert len(latest) == interactions["user_id"].nunique()
    for _, row in latest.iterrows():  # the last snapshot is the exact latest state
        assert as_state(row) == expected_state(interactions[interactions.user_id == row.user_id], 20)


def test_build_rejects_bad_input(home: Path, interactions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="device"):
        build_features(home, interactions.drop(columns=["device"]))
    broken = interactions.copy()
    broken.loc[3, "item_id"] = None
    with pytest.raises(ValueError, match="item_id"):
        build_features(home, broken)
    with pytest.raises(ValueError, match="granularity"):
        UserFeaturesConfig(granularity="hour")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# configuration


def test_paths_follow_recsys_home_and_redis_is_selected_by_env(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_repo_config(FEATURE_REPO)
    assert config.online_store.type == "sqlite"
    assert Path(config.online_store.path) == home.resolve() / "feast" / "online_store.db"
    assert Path(config.registry.path) == home.resolve() / "feast" / "registry.db"
    monkeypatch.setenv("RECSYS_FEAST_ONLINE_STORE", "redis")
    monkeypatch.setenv("RECSYS_REDIS_CONNECTION", "redis.prod:6380,db=2")
    redis_config = load_repo_config(FEATURE_REPO)
    assert redis_config.online_store.type == "redis"
    assert redis_config.online_store.connection_string.startswith("redis.prod:6380,db=2,")
    monkeypatch.delenv("RECSYS_HOME")
    default = load_repo_config(FEATURE_REPO, "sqlite")
    assert Path(default.online_store.path) == REPO / ".recsys" / "feast" / "online_store.db"
    with pytest.raises(ValueError, match="memcached"):
        load_repo_config(FEATURE_REPO, "memcached")


def test_feast_cli_reads_the_same_yaml(home: Path) -> None:
    """Feast's own loader (used by the `feast` CLI) substitutes ${RECSYS_HOME} the same way."""
    from feast.repo_config import load_repo_config as feast_load

    config = feast_load(FEATURE_REPO, FEATURE_REPO / "feature_store.yaml")
    assert Path(config.online_store.path) == home / "feast" / "online_store.db"


# ------------------------------------------------------------------------------------------------
# online store (SQLite)


def test_online_features_equal_offline_features(home: Path, interactions: pd.DataFrame) -> None:
    client, path = materialized_client(home, interactions)
    check_online_matches_offline(client, path, interactions)


def test_feast_materialize_gives_the_same_online_store(home: Path, interactions: pd.DataFrame) -> None:
    path = build_features(home, interactions)
    store = load_feature_store(FEATURE_REPO)
    apply_feature_repo(store, FEATURE_REPO, max_len=50)
    stats = materialize_with_feast(store, path)
    assert stats.written == interactions["user_id"].nunique()
    check_online_matches_offline(FeatureStoreClient(FEATURE_REPO), path, interactions)


def test_push_makes_the_next_read_reflect_the_event(home: Path, interactions: pd.DataFrame) -> None:
    client, _ = materialized_client(home, interactions, max_len=12)
    assert client.max_len == 12  # from the feature view's tag, as applied
    check_push_updates_next_read(client, interactions)


def test_unknown_user_is_cold_start(home: Path, interactions: pd.DataFrame) -> None:
    client, _ = materialized_client(home, interactions)
    check_unknown_user_is_cold_start(client)


def test_rematerialization_keeps_newer_pushed_records(home: Path, interactions: pd.DataFrame) -> None:
    client, path = materialized_client(home, interactions)
    pushed = client.push_event("u0001", "i-late", "purchase", datetime(2031, 1, 1))
    stats = materialize_latest(client.store, path)
    assert stats.kept_newer_online == 1 and stats.written == stats.users_in_source - 1
    assert seq_state(client.get_user_sequence("u0001")) == seq_state(pushed)


def test_ttl_expires_stale_users_and_historical_join_is_point_in_time(
    home: Path, interactions: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_FEATURE_TTL_DAYS", "2")
    old = make_interactions(n_users=3, seed=1).assign(
        user_id=lambda f: "old-" + f.user_id, ts=lambda f: f.ts - timedelta(days=400)
    )
    frame = pd.concat([interactions, old], ignore_index=True)
    frame["event_id"] = range(len(frame))
    path = build_features(home, frame, granularity="event")
    store = load_feature_store(FEATURE_REPO)
    apply_feature_repo(store, FEATURE_REPO, max_len=50)
    stats = materialize_latest(store, path)
    client = FeatureStoreClient(FEATURE_REPO)
    assert stats.expired >= 3 and client.get_user_sequence("old-u0000") is None

    user = interactions["user_id"].value_counts().index[0]
    events = frame[frame.user_id == user]
    first, mid = events["ts"].iloc[0], events["ts"].iloc[len(events) // 2]
    entity = pd.DataFrame(
        {"user_id": [user] * 3, "event_timestamp": [first - timedelta(seconds=1), mid, mid], "label": [0, 1, 2]}
    )
    hist = historical_user_sequences(store, entity)
    assert hist["label"].tolist() == [0, 1, 2]  # every entity row comes back, in order
    assert hist["item_ids"].isna().iloc[0]  # before the first event: cold start
    # `mid` is an event time, so the snapshot as of `mid` is that event's, well inside the 2-day TTL
    expected = expected_state(events[events.ts <= mid], 50)
    assert as_state(hist.iloc[1]) == expected and as_state(hist.iloc[2]) == expected
    later = events[events.ts > mid]
    assert len(later) and hist.iloc[1]["last_event_ts_us"] < to_epoch_us(later["ts"].iloc[0].to_pydatetime())


def test_unavailable_store_raises_feature_store_unavailable(home: Path, interactions: pd.DataFrame) -> None:
    never_applied = FeatureStoreClient(FEATURE_REPO)
    with pytest.raises(FeatureStoreUnavailable, match="not applied yet"):
        never_applied.get_user_sequence("u0001")

    client, _ = materialized_client(home, interactions)
    online_db = Path(client.store.config.online_store.path)
    fresh = FeatureStoreClient(FEATURE_REPO)
    online_db.unlink()
    online_db.mkdir()  # the path is no longer a database
    with pytest.raises(FeatureStoreUnavailable, match="sqlite online store"):
        fresh.get_user_sequence("u0001")
    with pytest.raises(FeatureStoreUnavailable):
        fresh.push_event("u0001", "i1", "view", datetime(2030, 1, 1))
    with pytest.raises(FeatureStoreUnavailable):
        fresh.check()


# ------------------------------------------------------------------------------------------------
# real data and the Dagster assets


def test_real_rees46_sample_round_trips(home: Path) -> None:
    source = REPO.parent / "shared" / "data" / "rees46" / "2019-Oct_head.csv.gz"
    if not source.exists():
        pytest.skip(f"{source} not present")
    with duckdb.connect() as con:
        frame = con.execute(
            f"""SELECT CAST(user_id AS VARCHAR) user_id, CAST(product_id AS VARCHAR) item_id, event_type,
                       CAST(replace(event_time, ' UTC', '') AS TIMESTAMP) ts, user_session session_id,
                       category_code category, NULL::VARCHAR device, NULL::VARCHAR segment, price,
                       row_number() OVER () event_id
                FROM read_csv('{source}', header=true, all_varchar=true)
                ORDER BY user_id, ts, event_id"""
        ).df()
    client, path = materialized_client(home, frame)
    check_online_matches_offline(client, path, frame)


def test_assets_materialize_and_check(home: Path, interactions: pd.DataFrame) -> None:
    from dagster import AssetSpec, materialize

    from recsys_assets.assets import features
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager
    from recsys_assets.resources import WarehouseResource

    home.mkdir(parents=True)
    write_warehouse(home / "warehouse.duckdb", interactions)
    result = materialize(
        [
            AssetSpec("cleaned_interactions").with_io_manager_key("warehouse_io_manager"),
            *features.assets,
            *features.asset_checks,
        ],
        resources={
            "warehouse": WarehouseResource(memory_limit="1GB", threads=2),
            "warehouse_io_manager": DuckDBTableIOManager(),
            "artifact_io_manager": JsonArtifactIOManager(),
        },
        run_config={"ops": {"user_sequence_features": {"config": {"max_len": 30, "granularity": "session"}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("feast_online_store")[0].metadata
    users = interactions["user_id"].nunique()
    assert meta["users_written"].value == users and meta["users_in_source"].value == users
    assert meta["online_store"].value == "sqlite"
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True] and checks[0].metadata["sampled_users"].value == users
    assert (home / "features" / FEATURE_FILE).exists()
    seq = FeatureStoreClient(FEATURE_REPO).get_user_sequence("u0003")
    assert seq is not None and len(seq) <= 30
    assert result.output_for_node("user_sequence_features")["granularity"] == "session"


def test_serving_process_reads_without_torch(home: Path, interactions: pd.DataFrame) -> None:
    """A fresh process (as serving) reads what the pipeline wrote, and Feast does not pull in torch."""
    import subprocess
    import sys

    materialized_client(home, interactions)
    code = (
        "import sys; from recsys_serving.feature_client import FeatureStoreClient; "
        f"seq = FeatureStoreClient({str(FEATURE_REPO)!r}).get_user_sequence('u0002'); "
        "print(len(seq.item_ids), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_items = min(int((interactions.user_id == "u0002").sum()), 50)
    assert out.stdout.split() == [str(n_items), "False"]
