"""Feast definitions: a user's latest event sequence, for BERT4Rec at inference time.

Item *ids* (strings) are stored, not tokens: tokens belong to one model version (each retrain
rebuilds the vocabulary) while ids are stable; serving maps ids to tokens with the vocabulary of
the bundle it loaded.

The batch source is the Parquet file written by the `user_sequence_features` asset: one row per
user per snapshot (see recsys_assets/data/user_features.py), `event_timestamp` = time of the
last event the snapshot contains, so a point-in-time join returns the sequence as of any time.

Paths follow $RECSYS_HOME at apply time (the feast_online_store asset re-applies on every run).
This module is loaded by `feast apply` and by recsys_serving.feature_client.load_definitions;
its names come from recsys_serving.contract (dependency-free), which serving reads with.
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Int64, String

from recsys_serving.contract import (
    DEFAULT_MAX_LEN,
    ENTITY_KEY,
    FEATURE_VIEW,
    MAX_LEN_TAG,
    PUSH_SOURCE,
    TIMESTAMP_FIELD,
    recsys_home_path,
)

SOURCE_PATH = str(recsys_home_path() / "features" / "user_sequence_features.parquet")
# A snapshot older than this (relative to the entity timestamp in historical joins, to the
# newest event in the data at materialization) is stale: the user is treated as cold start.
TTL = timedelta(days=int(os.environ.get("RECSYS_FEATURE_TTL_DAYS", "365")))

user = Entity(
    name="user",
    join_keys=[ENTITY_KEY],
    value_type=ValueType.STRING,
    description="A shopper, by the user_id of cleaned_interactions.",
)

user_sequence_source = FileSource(
    name="user_sequence_features",
    path=SOURCE_PATH,
    timestamp_field=TIMESTAMP_FIELD,
    description="Output of the user_sequence_features asset (Parquet).",
)

# Serving pushes the updated sequence here on every new event (POST /events): online only,
# the offline truth is rebuilt from cleaned_interactions by the retrain job.
user_sequence_push = PushSource(name=PUSH_SOURCE, batch_source=user_sequence_source)

user_sequence = FeatureView(
    name=FEATURE_VIEW,
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="item_ids", dtype=Array(String), description="Latest item ids, oldest first."),
        Field(name="event_types", dtype=Array(String), description="view | cart | purchase per position."),
        Field(name="tod", dtype=Array(Int64), description="Time-of-day token per position (UTC, recsys_serving.contract)."),
        Field(name="devices", dtype=Array(String), description="Device per position ('' when unknown)."),
        # Epoch microseconds, not UnixTimestamp (whole seconds in Feast): it versions the record, see
        # recsys_serving.feature_client.FeatureStoreClient.push_event.
        Field(name="last_event_ts_us", dtype=Int64, description="Time of the newest event, epoch microseconds UTC."),
        Field(name="segment", dtype=String, description="The user's latest known segment."),
    ],
    source=user_sequence_push,
    online=True,
    tags={"owner": "recsys", MAX_LEN_TAG: os.environ.get("RECSYS_FEATURE_MAX_LEN", str(DEFAULT_MAX_LEN))},
)
