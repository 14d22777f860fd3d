"""The definitions that the stages share: one place, imported by training and serving alike.

Tokens, event types, time-of-day buckets, context and feature names, the sequence-length rule and the
repeated-view rule live here and nowhere else. Standard library only (no torch, no Dagster, no Feast),
so the service image and the training code can both import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, get_args

# -- Where the project writes ------------------------------------------------------------------

RECSYS_HOME_ENV = "RECSYS_HOME"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECSYS_HOME = REPO_ROOT / ".recsys"


def recsys_home_path() -> Path:
    """$RECSYS_HOME, else `.recsys/` in the repository (not created here)."""
    env = os.environ.get(RECSYS_HOME_ENV)
    return Path(env).expanduser().resolve() if env else DEFAULT_RECSYS_HOME


# Layout under $RECSYS_HOME that more than one stage reads or writes (paths relative to it).
BUNDLES_DIR = "bundles"  # bundles/<version>/, written once by the export stage
CURRENT_BUNDLE = "current"  # bundles/current: symlink to the served version, switched atomically
SERVED_EVENTS_DIR = "events/served"  # the service's durable event log, merged into raw_events
SERVED_ANSWERS_DIR = "events/answers"  # the service's log of what it recommended (prediction drift)
DRIFT_REPORTS_DIR = "reports/drift"  # reports/drift/<run id>/ (HTML + summary JSON), read by the sensor

# The BentoML service's name: `bentoml build` tags bentos with it.
SERVICE_NAME = "recsys_recommender"

# One line of the answer log (JSON lines): what the service answered, to whom, with which model.
ANSWER_LOG_FIELDS: tuple[str, ...] = ("ts", "user_id", "items", "model_version", "fallback_reason")

# Verdicts of the drift report; here (not in the Dagster metadata module) so the plain drift library can use them.
DriftVerdict = Literal["stable", "drift", "degradation", "drift_and_degradation", "no_reference"]
DRIFT_VERDICTS: tuple[str, ...] = get_args(DriftVerdict)
RETRAIN_VERDICTS: frozenset[str] = frozenset({"drift", "degradation", "drift_and_degradation"})


# -- Events ------------------------------------------------------------------------------------

# Events older than this are clock or parsing errors: the API refuses them (400) and cleaning
# quarantines them (`ancient_timestamp`). Naive UTC, as the warehouse stores timestamps.
EARLIEST_EVENT_TS = datetime(1990, 1, 1)

EventType = Literal["view", "cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

# Canonical columns of an event (what every source reader produces, and what the service's event
# log writes) in DuckDB types. `ts` is a naive TIMESTAMP holding UTC.
CANONICAL_COLUMNS: dict[str, str] = {
    "user_id": "VARCHAR",
    "item_id": "VARCHAR",
    "event_type": "VARCHAR",
    "ts": "TIMESTAMP",
    "session_id": "VARCHAR",
    "category": "VARCHAR",
    "device": "VARCHAR",
    "segment": "VARCHAR",
    "price": "DOUBLE",
}

# -- Tokens ------------------------------------------------------------------------------------

# 0 is padding, 1 is the mask, items start at 2 ordered by popularity
# (so a token's popularity rank is token - FIRST_ITEM_TOKEN).
PAD_TOKEN = 0
MASK_TOKEN = 1
FIRST_ITEM_TOKEN = 2
SPECIAL_TOKENS: dict[int, str] = {PAD_TOKEN: "[PAD]", MASK_TOKEN: "[MASK]"}

# Context tokens: 0 always means "unknown / not in the source", so absent context is a no-op.
UNKNOWN_CONTEXT_TOKEN = 0
EVENT_TYPE_TOKENS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}

# -- Time of day -------------------------------------------------------------------------------

TIME_OF_DAY_BUCKETS = 6  # tokens 1..6
HOURS_PER_TIME_OF_DAY_BUCKET = 24 // TIME_OF_DAY_BUCKETS


def time_of_day_token(hour: int) -> int:
    """Time-of-day token 1..6 of an hour of the day in UTC."""
    return hour // HOURS_PER_TIME_OF_DAY_BUCKET + 1


def time_of_day_token_of(ts: datetime) -> int:
    """Time-of-day token of a timestamp; naive timestamps are UTC, as everywhere in the project."""
    return time_of_day_token((ts if ts.tzinfo is None else ts.astimezone(timezone.utc)).hour)


def time_of_day_sql(ts_column: str) -> str:
    """The same bucketing as a DuckDB expression over a UTC TIMESTAMP column."""
    return f"(hour({ts_column}) // {HOURS_PER_TIME_OF_DAY_BUCKET} + 1)"


def valid_time_of_day_token(token: int) -> int:
    """`token` when it is a time-of-day token (or unknown), else unknown."""
    return token if 0 <= token <= TIME_OF_DAY_BUCKETS else UNKNOWN_CONTEXT_TOKEN


# -- Context and features ----------------------------------------------------------------------

# Per-position context fields: columns of tokenized_sequences, training batches, graph inputs.
CONTEXT_FIELDS: tuple[str, ...] = ("tod", "devices", "segments", "event_types")

# The Feast feature view that holds each user's latest sequence (feature_repo/user_sequences.py).
FEATURE_VIEW = "user_sequence"
PUSH_SOURCE = "user_sequence_push"
ENTITY_KEY = "user_id"
TIMESTAMP_FIELD = "event_timestamp"
SEQUENCE_FIELDS: tuple[str, ...] = ("item_ids", "event_types", "tod", "devices")
FEATURE_FIELDS: tuple[str, ...] = (*SEQUENCE_FIELDS, "last_event_ts_us", "segment")
# Tags the feature view is applied with, read back by serving.
MAX_LEN_TAG = "max_len"
REPEATED_VIEW_WINDOW_TAG = "repeated_view_window_s"

# -- Sequence length ---------------------------------------------------------------------------

DEFAULT_MAX_LEN = 50  # the model's longest input, the trailing [MASK] included


def history_length(max_len: int) -> int:
    """Events a model of input length `max_len` reads: all but the trailing [MASK]."""
    return max_len - 1


def sequence_length_mismatch(model_max_len: int, stored_events: int) -> str | None:
    """Why a feature store keeping `stored_events` events cannot feed a model of `model_max_len`, or None."""
    needed = history_length(model_max_len)
    if stored_events >= needed:
        return None
    return (
        f"the feature store keeps the latest {stored_events} events per user, but the model reads "
        f"{needed} (max_len {model_max_len} minus the [MASK]); materialize user_sequence_features with "
        f"max_len >= {needed} or train with max_len <= {stored_events + 1}"
    )


# -- Cleaning rules that serving applies the same way -------------------------------------------

DEFAULT_REPEATED_VIEW_WINDOW_S = 1800


@dataclass(frozen=True)
class RepeatedViewRule:
    """A view of the item viewed just before, within `window_s` seconds, adds nothing to a sequence.

    Cleaning quarantines such rows (reason `repeated_view`); serving leaves the online sequence as it
    is. `window_s=None` turns the rule off.
    """

    window_s: float | None = DEFAULT_REPEATED_VIEW_WINDOW_S

    def __post_init__(self) -> None:
        if self.window_s is not None and self.window_s < 0:
            raise ValueError(f"repeated_view_window_s must be >= 0 or None, got {self.window_s}")

    def is_repeated(
        self,
        prev_item: str | None,
        prev_type: str | None,
        prev_ts: datetime | None,
        item: str,
        event_type: str,
        ts: datetime,
    ) -> bool:
        if self.window_s is None or prev_ts is None or event_type != "view" or prev_type != "view":
            return False
        return prev_item == item and (ts - prev_ts).total_seconds() <= self.window_s

    def sql(self) -> str:
        """The rule as a DuckDB predicate over `prev_item`, `prev_type`, `prev_ts` of the same user."""
        if self.window_s is None:
            return "FALSE"
        return (
            "(event_type = 'view' AND prev_type = 'view' AND prev_item = item_id"
            f" AND epoch(ts) - epoch(prev_ts) <= {self.window_s:g})"
        )

    def tag(self) -> str:
        """The rule as a feature-view tag value ("off" or the window in seconds)."""
        return "off" if self.window_s is None else f"{self.window_s:g}"

    @classmethod
    def from_tag(cls, value: str | None) -> "RepeatedViewRule":
        """The rule a feature view was applied with; the default rule for an untagged view."""
        if value is None:
            return cls()
        return cls(None if value == "off" else float(value))
