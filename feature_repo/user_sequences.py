"""Feast definitions: a user's latest event sequence, for BERT4Rec at inference time.

Item *ids* (strings) are stored, not tokens: tokens belong to one model version (each retrain
rebuilds the vocabulary) while ids are stable; serving maps ids to tokens with the vocabulary of
the bundle it loaded.

The batch source is the Parquet file written by the `user_sequence_features` asset: one row per
user per snapshot (see recsys_assets/data/user_features.py), `event_timestamp` = time of the
last event the snapshot contains, so a point-in-time join returns the sequence as of any time.

Paths follow $RECSYS_HOME at apply time (the feast_online_store asset re-applies on every run).
This module is loaded by `feast apply` and by recsys_serving.feature_client.load_definitions;
names below are the contract with recsys_serving.feature_client.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Int64, String

# Same default as recsys_assets.config.recsys_home (this file must not import the project).
_HOME = Path(os.environ.get("RECSYS_HOME") or Path(__file__).resolve().parent.parent / ".recsys")
SOURCE_PATH = str(_HOME.expanduser().resolve() / "features" / "user_sequence_features.parquet")
# A snapshot older than this (relative to the entity timestamp in historical joins, to the
# newest event in the data at materialization) is stale: the user is treated as cold start.
TTL = timedelta(days=int(os.environ.get("RECSYS_FEATURE_TTL_DAYS", "365")))

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper, by the user_id of cleaned_interactions.",
)

user_sequence_source = FileSource(
    name="user_sequence_features",
    path=SOURCE_PATH,
    timestamp_field="event_timestamp",
    description="Output of the user_sequence_features asset (Parquet).",
)

# Serving pushes the updated sequence here on every new event (POST /events): online only,
# the offline truth is rebuilt from cleaned_interactions by the retrain job.
user_sequence_push = PushSource(name="user_sequence_push", batch_source=user_sequence_source)

user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="item_ids", dtype=Array(String), description="Latest item ids, oldest first."),
        Field(name="event_types", dtype=Array(String), description="view | cart | purchase per position."),
        Field(name="tod", dtype=Array(Int64), description="Time-of-day bucket per position: hour // 4 + 1 (UTC)."),
        Field(name="devices", dtype=Array(String), description="Device per position ('' when unknown)."),
        # Epoch microseconds, not UnixTimestamp (whole seconds in Feast): it versions the record, see
        # recsys_serving.feature_client.FeatureStoreClient.push_event.
        Field(name="last_event_ts_us", dtype=Int64, description="Time of the newest event, epoch microseconds UTC."),
        Field(name="segment", dtype=String, description="The user's latest known segment."),
    ],
    source=user_sequence_push,
    online=True,
    tags={"owner": "recsys", "max_len": os.environ.get("RECSYS_FEATURE_MAX_LEN", "50")},
)
