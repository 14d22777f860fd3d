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

# -- Prediction target -------------------------------------------------------------------------

# What a model predicts. next_item: the next event of any type (every position is a target).
# next_purchase: the next event of one of `event_types` (default: purchases); every event is still an
# input, with its type token. Training (which positions are labels), the split (which item is held
# out), the baselines, evaluation, the gate and serving all read it from here.
TargetName = Literal["next_item", "next_purchase"]
TARGET_NAMES: tuple[str, ...] = get_args(TargetName)
DEFAULT_TARGET: TargetName = "next_item"
DEFAULT_PURCHASE_TARGET_TYPES: tuple[str, ...] = ("purchase",)


@dataclass(frozen=True)
class PredictionTarget:
    """Which events are targets. `event_types` is empty for next_item (every event)."""

    name: TargetName = DEFAULT_TARGET
    event_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in TARGET_NAMES:
            raise ValueError(f"target must be one of {TARGET_NAMES}, got {self.name!r}")
        types = tuple(self.event_types)
        if self.name == "next_item" and types and set(types) != set(EVENT_TYPES):
            raise ValueError("next_item predicts every event; name event_types only with next_purchase")
        if self.name == "next_purchase":
            types = types or DEFAULT_PURCHASE_TARGET_TYPES
            unknown = sorted(set(types) - set(EVENT_TYPES))
            if unknown:
                raise ValueError(f"target event types {unknown} are not event types {EVENT_TYPES}")
        else:
            types = ()
        # canonical: EVENT_TYPES order, no repeats, so equal targets compare and serialise equal
        object.__setattr__(self, "event_types", tuple(t for t in EVENT_TYPES if t in types))

    @property
    def every_event(self) -> bool:
        return self.name == "next_item"

    @property
    def removes_history(self) -> bool:
        """Whether the items a user already interacted with are left out of answers (and of the
        ranking in evaluation, the target excepted). next_item: yes, the next thing is usually new.
        next_purchase: no, a shopper mostly buys what they viewed or carted."""
        return self.every_event

    @property
    def event_type_tokens(self) -> tuple[int, ...]:
        """The event-type tokens of target events (every known type for next_item)."""
        return tuple(EVENT_TYPE_TOKENS[t] for t in (EVENT_TYPES if self.every_event else self.event_types))

    def label(self) -> str:
        return self.name if self.every_event else f"{self.name} ({', '.join(self.event_types)})"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "event_types": list(self.event_types)}

    @classmethod
    def from_dict(cls, raw: "dict[str, object] | None") -> "PredictionTarget":
        """The target a model, bundle or report recorded; next_item for those written before targets existed."""
        if not raw:
            return cls()
        return cls(str(raw.get("name", DEFAULT_TARGET)), tuple(raw.get("event_types") or ()))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, name: str, event_types: "str | list[str] | tuple[str, ...]" = ()) -> "PredictionTarget":
        """From settings: a name and event types as a list or a comma-separated string."""
        if isinstance(event_types, str):
            event_types = tuple(t.strip() for t in event_types.split(",") if t.strip())
        return cls(name.strip() or DEFAULT_TARGET, tuple(event_types))  # type: ignore[arg-type]


TARGET_ENV = "RECSYS_TARGET"
TARGET_EVENT_TYPES_ENV = "RECSYS_TARGET_EVENT_TYPES"


def target_from_env(environ: "dict[str, str] | None" = None) -> PredictionTarget:
    """$RECSYS_TARGET (next_item | next_purchase) and $RECSYS_TARGET_EVENT_TYPES (e.g. cart,purchase)."""
    env = os.environ if environ is None else environ
    return PredictionTarget.parse(env.get(TARGET_ENV, ""), env.get(TARGET_EVENT_TYPES_ENV, ""))


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
