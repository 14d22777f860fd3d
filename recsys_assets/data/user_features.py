"""The offline feature table of the Feast repository, and loading it into the online store.

`build_user_sequence_features` turns `cleaned_interactions` into point-in-time snapshots of every
user's latest `max_len` events and writes them as Parquet, the batch source of feature_repo/. It runs
as one DuckDB query streamed into the file (window functions + COPY), so it works out of core on
100M+ events.

Snapshot granularity (one row per user per ...):
- "event": per distinct event timestamp. Exact point-in-time answers, but ~one row per event, each
  holding up to max_len ids per list (100M events x 50 ids = billions of list elements).
- "day" (default): the state after the user's last event of each UTC day. A historical join at time t
  returns the sequence as of the user's last event on an earlier day, or the same day when no event
  followed before t; it never sees the future, it can miss events earlier on the same day.
  Rows ~ active user-days, typically 5-20x fewer than events.
- "session": the state after each session (session_id; by day where the source has none), a middle
  ground for session-based sources.
The last snapshot of every user always holds their exact latest sequence whatever the granularity, so
the online store (materialized from it) is exact.

Each row: `user_id`, `event_timestamp` (TIMESTAMPTZ, UTC: time of the snapshot's last event),
`item_ids VARCHAR[]`, `event_types VARCHAR[]`, `tod BIGINT[]` (time-of-day tokens, UTC), `devices VARCHAR[]`
('' when unknown), `last_event_ts_us BIGINT` (epoch microseconds), `segment VARCHAR` (the user's
latest known segment). Lists are oldest first and of equal length.

This module never imports dagster; Feast access goes through recsys_serving.feature_client so that
serving and the pipeline read and write the store with one set of names.
"""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from recsys_serving.contract import (
    DEFAULT_MAX_LEN,
    ENTITY_KEY,
    FEATURE_FIELDS,
    FEATURE_VIEW,
    MAX_LEN_TAG,
    REPEATED_VIEW_WINDOW_TAG,
    TIMESTAMP_FIELD,
    RepeatedViewRule,
    time_of_day_sql,
)
from recsys_serving.feature_client import FEATURE_REFS

FEATURE_FILE = "user_sequence_features.parquet"
DEFINITIONS_FILE = "user_sequences.py"
REQUIRED_COLUMNS: tuple[str, ...] = (
    "user_id", "item_id", "event_type", "ts", "event_id", "session_id", "device", "segment",
)
NOT_NULL_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "ts", "event_id")
OUTPUT_COLUMNS: tuple[str, ...] = (ENTITY_KEY, TIMESTAMP_FIELD, *FEATURE_FIELDS)

Granularity = Literal["event", "session", "day"]


class UserFeaturesConfig(BaseModel):
    """How the offline feature table is built."""

    model_config = ConfigDict(frozen=True)

    max_len: int = Field(default=DEFAULT_MAX_LEN, ge=1, le=4096, description="Events kept per sequence (the latest).")
    granularity: Granularity = Field(default="day", description="One snapshot row per user per event|session|day.")


class FeatureTableStats(BaseModel):
    path: str
    rows: int
    users: int
    events: int
    max_len: int
    granularity: Granularity
    min_event_timestamp: datetime | None
    max_event_timestamp: datetime | None


class MaterializationStats(BaseModel):
    users_in_source: int
    written: int
    expired: int = Field(description="Users whose latest snapshot is older than the feature view's TTL.")
    kept_newer_online: int = Field(description="Users whose online record (a push) was newer than the batch row.")
    start: datetime
    end: datetime


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _snapshot_key(granularity: Granularity) -> str:
    return {
        "event": "CAST(ts AS VARCHAR)",
        "day": "CAST(CAST(ts AS DATE) AS VARCHAR)",
        "session": "coalesce('s:' || session_id, 'd:' || CAST(CAST(ts AS DATE) AS VARCHAR))",
    }[granularity]


def feature_table_sql(source_table: str, config: UserFeaturesConfig) -> str:
    """SELECT producing the snapshot rows from a table in the cleaned_interactions contract."""
    n = config.max_len
    order = "ORDER BY ts, event_id"
    return f"""
WITH ev AS (
    -- TIMESTAMP (microseconds, naive UTC) whatever the source's precision
    SELECT user_id, item_id, event_type, CAST(ts AS TIMESTAMP) AS ts, event_id, session_id,
           coalesce(device, '') AS device, segment
    FROM {_quote(source_table)}
), keyed AS (
    SELECT *, CAST({time_of_day_sql("ts")} AS BIGINT) AS tod,
           {_snapshot_key(config.granularity)} AS snap_key
    FROM ev
), win AS (
    SELECT user_id, ts, snap_key,
           list(item_id {order}) OVER latest AS item_ids,
           list(event_type {order}) OVER latest AS event_types,
           list(tod {order}) OVER latest AS tod,
           list(device {order}) OVER latest AS devices,
           last_value(segment IGNORE NULLS) OVER (PARTITION BY user_id {order}
               ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS segment,
           lead(ts) OVER by_user AS next_ts,
           lead(snap_key) OVER by_user AS next_key
    FROM keyed
    WINDOW latest AS (PARTITION BY user_id {order} ROWS BETWEEN {n - 1} PRECEDING AND CURRENT ROW),
           by_user AS (PARTITION BY user_id {order})
)
SELECT user_id,
       timezone('UTC', ts) AS {TIMESTAMP_FIELD},
       item_ids, event_types, tod, devices,
       epoch_us(ts) AS last_event_ts_us,
       segment
FROM win
-- a snapshot closes where the key changes; ties on ts stay in one row so (user_id, ts) is unique
WHERE next_ts IS NULL OR (next_ts > ts AND next_key IS DISTINCT FROM snap_key)
"""


def _validate_source(con: duckdb.DuckDBPyConnection, source_table: str, config: UserFeaturesConfig) -> int:
    columns = {row[0] for row in con.execute(f"DESCRIBE {_quote(source_table)}").fetchall()}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"table {source_table!r} lacks column(s) {missing} of the cleaned_interactions contract")
    counts = ", ".join(f"count(*) FILTER (WHERE {c} IS NULL)" for c in NOT_NULL_COLUMNS)
    total, *nulls = con.execute(f"SELECT count(*), {counts} FROM {_quote(source_table)}").fetchall()[0]
    bad = {c: int(k) for c, k in zip(NOT_NULL_COLUMNS, nulls) if k}
    if bad:
        raise ValueError(f"table {source_table!r} has NULLs where cleaned_interactions guarantees none: {bad}")
    return int(total)


def build_user_sequence_features(
    con: duckdb.DuckDBPyConnection,
    source_table: str,
    out_path: str | Path,
    config: UserFeaturesConfig | None = None,
) -> FeatureTableStats:
    """Writes the snapshot table of `source_table` to `out_path` (Parquet, replaced atomically)."""
    config = config or UserFeaturesConfig()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    events = _validate_source(con, source_table, config)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    # Row order of the file does not matter: let DuckDB stream without keeping insertion order.
    keep_order = con.execute("SELECT current_setting('preserve_insertion_order')").fetchall()[0][0]
    con.execute("SET preserve_insertion_order = false")
    target = str(tmp).replace("'", "''")
    try:
        con.execute(
            f"COPY ({feature_table_sql(source_table, config)}) TO '{target}' "
            "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)"
        )
        rows, users, lo, hi = con.execute(
            f"SELECT count(*), count(DISTINCT user_id), min({TIMESTAMP_FIELD}), max({TIMESTAMP_FIELD}) "
            "FROM read_parquet(?)",
            [str(tmp)],
        ).fetchall()[0]
        tmp.replace(out)  # readers (Feast, serving's materialization) never see half a file
    finally:
        tmp.unlink(missing_ok=True)
        con.execute(f"SET preserve_insertion_order = {str(bool(keep_order)).lower()}")
    return FeatureTableStats(
        path=str(out),
        rows=int(rows),
        users=int(users),
        events=events,
        max_len=config.max_len,
        granularity=config.granularity,
        min_event_timestamp=lo,
        max_event_timestamp=hi,
    )


# ----------------------------------------------------------------------------------------------
# Feast: apply, materialize, point-in-time join


def load_definitions(repo_path: str | Path) -> dict[str, Any]:
    """Executes feature_repo/user_sequences.py afresh and returns its module namespace.

    Not feast.repo_operations.parse_repo: that imports through sys.modules (so a second call in the
    same process keeps paths computed from an earlier RECSYS_HOME) and needs the cwd to be the repo.
    """
    path = Path(repo_path).resolve() / DEFINITIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Feast definitions {path} are missing")
    spec = importlib.util.spec_from_file_location("_recsys_feature_definitions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module)


def apply_feature_repo(
    store: Any, repo_path: str | Path, max_len: int, repeated_view_rule: RepeatedViewRule | None = None
) -> dict[str, int]:
    """`feast apply` of feature_repo/ (creates the online tables). The feature view carries `max_len`
    and the cleaning's repeated-view rule as tags, so that serving truncates and dedupes pushed events
    exactly like the offline build."""
    rule = repeated_view_rule or RepeatedViewRule()
    from feast import Entity, FeatureView
    from feast.data_source import DataSource

    # Feast creates the registry's directory but not its parents (a fresh RECSYS_HOME).
    Path(store.config.registry.path).parent.mkdir(parents=True, exist_ok=True)
    online_path = getattr(store.config.online_store, "path", None)
    if online_path:
        Path(online_path).parent.mkdir(parents=True, exist_ok=True)
    namespace = load_definitions(repo_path)
    objects = [obj for obj in namespace.values() if isinstance(obj, (Entity, DataSource, FeatureView))]
    for obj in objects:
        if isinstance(obj, FeatureView):
            obj.tags = {**obj.tags, MAX_LEN_TAG: str(max_len), REPEATED_VIEW_WINDOW_TAG: rule.tag()}
    store.apply(objects)
    return {
        "entities": sum(isinstance(o, Entity) for o in objects),
        "data_sources": sum(isinstance(o, DataSource) for o in objects),
        "feature_views": sum(isinstance(o, FeatureView) for o in objects),
    }


def materialize_latest(
    store: Any,
    feature_path: str | Path,
    *,
    batch_size: int = 10_000,
    keep_newer_online: bool = True,
) -> MaterializationStats:
    """Loads every user's latest snapshot into the online store.

    Written instead of `store.materialize` for scale: Feast's file offline store sorts the whole
    source in memory (Dask/pandas) to find each user's latest row; DuckDB does it out of core and the
    rows are streamed to the online store in batches.

    The window is Feast's: snapshots older than the feature view's TTL (counted back from the newest
    event in the data, so that historical datasets load too) are skipped. With `keep_newer_online`, a
    user whose online record is newer than the batch row (an event pushed by serving after the
    ingest cut-off) keeps it, as Redis does by itself; SQLite would otherwise overwrite it.
    """
    path = Path(feature_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialize asset 'user_sequence_features' first")
    fv = store.get_feature_view(FEATURE_VIEW)
    columns = ", ".join(OUTPUT_COLUMNS)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        users, end = con.execute(
            f"SELECT count(DISTINCT user_id), max({TIMESTAMP_FIELD}) FROM read_parquet(?)", [str(path)]
        ).fetchall()[0]
        end = end or datetime.now(timezone.utc)
        start = end - fv.ttl if fv.ttl else datetime(1970, 1, 1, tzinfo=timezone.utc)
        reader = con.sql(
            f"""SELECT {columns} FROM read_parquet(?)
                WHERE {TIMESTAMP_FIELD} >= ?
                QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY {TIMESTAMP_FIELD} DESC) = 1""",
            params=[str(path), start],
        ).to_arrow_reader(batch_size)
        written = kept = 0
        for batch in reader:
            frame = _to_feast_frame(batch)
            if keep_newer_online:
                online_us = _online_versions(store, frame[ENTITY_KEY].tolist())
                newer = [o is not None and o > b for o, b in zip(online_us, frame["last_event_ts_us"])]
                kept += sum(newer)
                frame = frame[[not n for n in newer]]
            if len(frame):
                store.write_to_online_store(FEATURE_VIEW, frame)
                written += len(frame)
    store.registry.apply_materialization(fv, store.project, start, end)
    return MaterializationStats(
        users_in_source=int(users),
        written=written,
        expired=int(users) - written - kept,
        kept_newer_online=kept,
        start=start,
        end=end,
    )


def materialize_with_feast(store: Any, feature_path: str | Path) -> MaterializationStats:
    """Feast's own `materialize` over the same window (for small data or to cross-check)."""
    fv = store.get_feature_view(FEATURE_VIEW)
    with duckdb.connect() as con:
        users, end = con.execute(
            f"SELECT count(DISTINCT user_id), max({TIMESTAMP_FIELD}) FROM read_parquet(?)", [str(feature_path)]
        ).fetchall()[0]
        end = (end or datetime.now(timezone.utc)) + timedelta(microseconds=1)  # Feast's end is exclusive here
        start = end - fv.ttl if fv.ttl else datetime(1970, 1, 1, tzinfo=timezone.utc)
        written = con.execute(
            f"SELECT count(DISTINCT user_id) FROM read_parquet(?) WHERE {TIMESTAMP_FIELD} >= ?",
            [str(feature_path), start],
        ).fetchall()[0][0]
    store.materialize(start, end, feature_views=[FEATURE_VIEW])
    return MaterializationStats(
        users_in_source=int(users), written=int(written), expired=int(users) - int(written),
        kept_newer_online=0, start=start, end=end,
    )


def _to_feast_frame(batch: pa.RecordBatch) -> pd.DataFrame:
    frame = batch.to_pandas()
    # Lists arrive as numpy arrays; Feast's proto conversion wants plain Python lists.
    for name in ("item_ids", "event_types", "tod", "devices"):
        frame[name] = [list(v) for v in frame[name]]
    frame[TIMESTAMP_FIELD] = pd.to_datetime(frame[TIMESTAMP_FIELD], utc=True)
    return frame


def _online_versions(store: Any, user_ids: list[str]) -> list[int | None]:
    if not user_ids:
        return []
    result = store.get_online_features(
        features=[f"{FEATURE_VIEW}:last_event_ts_us"], entity_rows=[{ENTITY_KEY: u} for u in user_ids]
    ).to_dict()
    return result["last_event_ts_us"]


def historical_user_sequences(store: Any, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join: for each (user_id, event_timestamp) row, the sequence as of that time.

    Every input row comes back (Feast's file offline store drops rows that match no snapshot); their
    feature columns are null, i.e. a cold-start user at that time. Naive timestamps are UTC.
    """
    missing = {ENTITY_KEY, TIMESTAMP_FIELD} - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks column(s) {sorted(missing)}")
    entities = entity_df[[ENTITY_KEY, TIMESTAMP_FIELD]].copy()
    entities[ENTITY_KEY] = entities[ENTITY_KEY].astype(str)
    entities[TIMESTAMP_FIELD] = pd.to_datetime(entities[TIMESTAMP_FIELD], utc=True)
    keys = entities.drop_duplicates().reset_index(drop=True)
    joined = store.get_historical_features(entity_df=keys, features=FEATURE_REFS).to_df()
    joined[TIMESTAMP_FIELD] = pd.to_datetime(joined[TIMESTAMP_FIELD], utc=True)
    joined = joined.drop_duplicates([ENTITY_KEY, TIMESTAMP_FIELD])
    extra = [c for c in entity_df.columns if c not in (ENTITY_KEY, TIMESTAMP_FIELD)]
    out = entities.join(entity_df[extra]) if extra else entities
    return out.merge(joined[[ENTITY_KEY, TIMESTAMP_FIELD, *FEATURE_FIELDS]], on=[ENTITY_KEY, TIMESTAMP_FIELD], how="left")
