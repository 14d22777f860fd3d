"""Stage: cleaned interactions -> Feast offline source (Parquet) -> Feast online store.

`user_sequence_features` writes point-in-time snapshots of every user's latest sequence as Parquet
under $RECSYS_HOME/features/ (the FileSource of feature_repo/): Feast's file offline store reads
Parquet natively, and serving/training never need to open the single-writer DuckDB warehouse.
`feast_online_store` applies feature_repo/ and loads every user's latest snapshot into the online
store (SQLite by default, Redis with RECSYS_FEAST_ONLINE_STORE=redis).
"""

# No `from __future__ import annotations`: Dagster 1.13 reads the `config` parameter's annotation
# unevaluated from the signature, so a string there is not recognised as a Config class.
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    Config,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from recsys_assets.assets.metadata import REPEATED_VIEW_RULE_METADATA, figure_markdown, table_markdown, table_metadata
from recsys_assets.config import REPO_ROOT, recsys_home
from recsys_assets.data.user_features import (
    FEATURE_FILE,
    Granularity,
    UserFeaturesConfig,
    apply_feature_repo,
    build_user_sequence_features,
    materialize_latest,
    materialize_with_feast,
)
from recsys_assets.io_manager import TableRef
from recsys_assets.resources import WarehouseResource
from recsys_serving.contract import TIMESTAMP_FIELD, RepeatedViewRule
from recsys_serving.feature_client import FeatureStoreClient, load_feature_store, resolve_online_store


def feature_repo_path() -> Path:
    """$RECSYS_FEATURE_REPO (the variable serving reads too), else feature_repo/ of this checkout."""
    return Path(os.environ.get("RECSYS_FEATURE_REPO") or REPO_ROOT / "feature_repo").resolve()


class UserSequenceFeaturesConfig(Config):
    max_len: int = Field(50, ge=1, le=4096, description="Latest events kept per user.")
    granularity: Granularity = Field(
        "day", description="Snapshot rows per user: 'event' (exact point in time), 'session' or 'day'."
    )


@asset(
    group_name="features",
    io_manager_key="artifact_io_manager",
    description="Point-in-time snapshots of each user's latest item ids + context (Parquet, Feast's batch source).",
)
def user_sequence_features(
    context: AssetExecutionContext,
    config: UserSequenceFeaturesConfig,
    warehouse: WarehouseResource,
    cleaned_interactions: TableRef,
) -> dict:
    settings = UserFeaturesConfig(max_len=config.max_len, granularity=config.granularity)
    out = recsys_home() / "features" / FEATURE_FILE
    with warehouse.connect() as con:
        stats = build_user_sequence_features(con, cleaned_interactions.table, out, settings)
    with duckdb.connect() as con:
        latest = con.sql(
            f"""SELECT user_id, {TIMESTAMP_FIELD}, item_ids, event_types, tod, devices, segment
                FROM read_parquet(?) QUALIFY row_number() OVER (PARTITION BY user_id
                    ORDER BY {TIMESTAMP_FIELD} DESC) = 1 LIMIT 8""",
            params=[str(out)],
        ).pl()
        lengths = con.sql(
            f"SELECT len(item_ids) AS n FROM read_parquet(?) QUALIFY row_number() OVER "
            f"(PARTITION BY user_id ORDER BY {TIMESTAMP_FIELD} DESC) = 1",
            params=[str(out)],
        ).pl()["n"]
        table = table_metadata(con, "read_parquet('{}')".format(str(out).replace("'", "''")))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths.to_list(), bins=min(50, settings.max_len))
    ax.set(xlabel=f"events in the latest sequence (max {settings.max_len})", ylabel="users", title="Online sequence lengths")
    context.log.info(f"{stats.rows:,} snapshots of {stats.users:,} users from {stats.events:,} events -> {out}")
    context.add_output_metadata(
        {
            "path": MetadataValue.path(str(out)),
            "rows": stats.rows,
            "users": stats.users,
            "events": stats.events,
            "snapshots_per_user": round(stats.rows / max(stats.users, 1), 2),
            "granularity": stats.granularity,
            "max_len": stats.max_len,
            "event_time_range": f"{stats.min_event_timestamp} .. {stats.max_event_timestamp}",
            "sequence_lengths": figure_markdown(fig, "lengths"),
            "latest_preview": table_markdown(latest),
            **table,
        }
    )
    rule = _cleaning_repeated_view_rule(context)
    return {**stats.model_dump(mode="json"), "repeated_view_rule": rule.tag(), "run_id": context.run.run_id}


def _cleaning_repeated_view_rule(context: AssetExecutionContext) -> RepeatedViewRule:
    """The repeated-view rule cleaned_interactions was last built with (the default where unrecorded)."""
    event = context.instance.get_latest_materialization_event(AssetKey("cleaned_interactions"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    recorded = metadata.get(REPEATED_VIEW_RULE_METADATA)
    return RepeatedViewRule.from_tag(str(recorded.value) if recorded is not None else None)


class FeastOnlineStoreConfig(Config):
    online_store: Literal["", "sqlite", "redis"] = Field(
        "", description="'sqlite' | 'redis'; empty = $RECSYS_FEAST_ONLINE_STORE or sqlite."
    )
    method: Literal["duckdb", "feast"] = Field(
        "duckdb",
        description="'duckdb': latest row per user computed out of core and streamed in; "
        "'feast': Feast's own materialize (Dask, in memory; small data).",
    )
    batch_size: int = Field(10_000, ge=1, description="Users written to the online store per batch.")
    keep_newer_online: bool = Field(True, description="Keep online records newer than the batch (pushed events).")


@asset(
    group_name="features",
    io_manager_key="artifact_io_manager",
    description="`feast apply` of feature_repo/ and materialization of every user's latest sequence online.",
)
def feast_online_store(
    context: AssetExecutionContext, config: FeastOnlineStoreConfig, user_sequence_features: dict
) -> dict:
    repo = feature_repo_path()
    kind = resolve_online_store(config.online_store or None)
    store = load_feature_store(repo, kind)
    max_len = int(user_sequence_features["max_len"])
    rule = RepeatedViewRule.from_tag(user_sequence_features.get("repeated_view_rule"))
    applied = apply_feature_repo(store, repo, max_len=max_len, repeated_view_rule=rule)
    context.log.info(f"feast apply ({kind}): {applied}")
    path = user_sequence_features["path"]
    if config.method == "duckdb":
        stats = materialize_latest(
            store, path, batch_size=config.batch_size, keep_newer_online=config.keep_newer_online
        )
    else:
        stats = materialize_with_feast(store, path)
    context.log.info(
        f"{stats.written:,} users written to the {kind} online store "
        f"({stats.expired:,} beyond the TTL, {stats.kept_newer_online:,} newer online)"
    )
    online = store.config.online_store
    context.add_output_metadata(
        {
            "online_store": kind,
            "online_location": str(getattr(online, "path", None) or getattr(online, "connection_string", "")),
            "users_in_source": stats.users_in_source,
            "users_written": stats.written,
            "users_beyond_ttl": stats.expired,
            "users_kept_newer_online": stats.kept_newer_online,
            "window": f"{stats.start} .. {stats.end}",
            "applied": MetadataValue.json(applied),
        }
    )
    return {
        "repo_path": str(repo),
        "online_store": kind,
        "feature_path": path,
        "method": config.method,
        "max_len": max_len,
        "repeated_view_rule": rule.tag(),
        **stats.model_dump(mode="json"),
        "run_id": context.run.run_id,
    }


@asset_check(
    asset=feast_online_store,
    description="For a sample of users, the online sequence equals the latest offline snapshot.",
)
def online_matches_offline(context: AssetCheckExecutionContext, feast_online_store: dict) -> AssetCheckResult:
    sample_size = 200
    with duckdb.connect() as con:
        expected = con.execute(
            f"""SELECT user_id, item_ids, event_types, tod, devices, last_event_ts_us, segment
                FROM read_parquet(?) WHERE {TIMESTAMP_FIELD} >= ?
                QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY {TIMESTAMP_FIELD} DESC) = 1
                ORDER BY hash(user_id) LIMIT {sample_size}""",
            [feast_online_store["feature_path"], datetime.fromisoformat(feast_online_store["start"])],
        ).fetchall()
    client = FeatureStoreClient(feast_online_store["repo_path"], online_store=feast_online_store["online_store"])
    online = client.get_user_sequences([row[0] for row in expected])
    mismatched = []
    for row, seq in zip(expected, online):
        user_id, items, types, tod, devices, us, segment = row
        # A newer online record (an event pushed since the batch) is expected to differ.
        if seq is not None and seq.last_event_ts_us is not None and seq.last_event_ts_us > us:
            continue
        if seq is None or (seq.item_ids, seq.event_types, seq.tod, seq.devices, seq.last_event_ts_us, seq.segment) != (
            items, types, tod, devices, us, segment
        ):
            mismatched.append(user_id)
    return AssetCheckResult(
        passed=not mismatched,
        metadata={"sampled_users": len(expected), "mismatched": len(mismatched), "examples": str(mismatched[:10])},
    )


assets = [user_sequence_features, feast_online_store]
asset_checks = [online_matches_offline]
