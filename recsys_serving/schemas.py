"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused with a 400)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator

from recsys_serving.contract import EARLIEST_EVENT_TS, EventType, TargetName

MAX_K = 100
MAX_RECENT_ITEMS = 500  # a cap on the request body; the model only reads its latest max_len-1
CLOCK_SKEW = timedelta(minutes=5)

MAX_PRICE = 1e9  # beyond any shop's price: a unit or parsing error
# No control characters (NUL, newlines, ...): ids end up in logs, files and SQL of the next retrain.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"  # UUIDs, ULIDs, "<order>-<line>": nothing to escape anywhere
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256, pattern=PRINTABLE)]
ContextValue = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=PRINTABLE)]
# An ISO-8601 date-time string: strict, so that a number (epoch seconds or milliseconds? the API
# cannot know) or a bare date is refused instead of guessed.
Timestamp = Annotated[datetime, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=256)


class RequestContext(_Strict):
    """What is known about the request itself; it fills the model's [MASK] position."""

    device: ContextValue | None = Field(None, description="e.g. mobile, desktop, app")
    segment: ContextValue | None = Field(None, description="overrides the user's stored segment")
    ts: Timestamp | None = Field(None, description="request time (UTC if naive); default now")

    @field_validator("ts")
    @classmethod
    def _plausible(cls, ts: datetime | None) -> datetime | None:
        return None if ts is None else plausible_ts(ts)


def plausible_ts(ts: datetime) -> datetime:
    """`ts` in UTC, if it lies between EARLIEST_EVENT_TS and now + CLOCK_SKEW; else a ValueError."""
    utc = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
    if utc > datetime.now(timezone.utc) + CLOCK_SKEW:
        raise ValueError("ts is in the future")
    if utc < EARLIEST_EVENT_TS.replace(tzinfo=timezone.utc):
        raise ValueError(f"ts is before {EARLIEST_EVENT_TS:%Y-%m-%d}")
    return utc


class RecommendRequest(_Strict):
    user_id: Identifier
    k: Annotated[int, Strict()] = Field(10, ge=1, le=MAX_K, description=f"number of items, 1..{MAX_K} (a JSON integer)")
    recent_items: list[Identifier] | None = Field(
        None,
        max_length=MAX_RECENT_ITEMS,
        description="history override (oldest first); replaces the feature store's sequence",
    )
    context: RequestContext | None = None
    target: TargetName | None = Field(
        None,
        description="what to predict: next_item (any next event) or next_purchase (the next purchase). The "
        "served model predicts one target (Health.target); asking for another is refused with a 409. "
        "Default: the served model's",
    )


class FallbackReason(str, Enum):
    """Why an answer did not come from the model (`reason` of the response)."""

    UNKNOWN_USER = "unknown_user"  # the feature store has no sequence for the user
    COLD_START = "cold_start"  # a history, but none of its items is in the model's vocabulary
    FEATURE_STORE_UNAVAILABLE = "feature_store_unavailable"
    MODEL_ERROR = "model_error"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_UNAVAILABLE = "model_unavailable"  # no bundle, or the bundle was refused


ModelReason = Literal["model"]
MODEL_REASON: str = get_args(ModelReason)[0]


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    # every field is in every answer, so the published schema lists them all as required
    model_config = ConfigDict(json_schema_serialization_defaults_required=True, use_enum_values=True)

    items: list[ScoredItem] = Field(description="best first; fewer than k when the lists ran short")
    model_version: str | None = Field(description="the bundle that answered (fallbacks too); null when none is loaded")
    fallback: bool = Field(description="true when popularity answered instead of the model")
    reason: ModelReason | FallbackReason = Field(description="'model', or why the model did not answer")
    target: TargetName | None = Field(
        None, description="what the answering bundle predicts (fallbacks too); null when none is loaded"
    )
    cached: bool = False


class ErrorBody(BaseModel):
    """Body of every error answer but a 400 and the router's 405 (text): the edge's, BentoML's 500/503/504."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what was wrong, in one sentence (no internal paths or exception texts)")


class ValidationIssue(BaseModel):
    """One pydantic error (`ValidationError.errors()` without input and context), as BentoML returns it."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="pydantic's error type: missing, extra_forbidden, json_invalid, value_error, ...")
    loc: list[str | int] = Field(description="where in the body: field names and list indices; [] = the body itself")
    msg: str
    url: str | None = Field(None, description="pydantic's page about the error type (absent for custom errors)")


class ValidationErrorBody(BaseModel):
    """Body of a 400: BentoML's answer to a body that is not valid JSON or does not fit the request model."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="e.g. '2 validation error for RecommendRequestIODescriptor'")
    detail: list[ValidationIssue] = Field(min_length=1)


class EventRequest(_Strict):
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=EVENT_ID_PATTERN)] | None = Field(
        None,
        description="the client's id of the event, e.g. a UUID; a retry with the same id is not applied twice. "
        "Default: the service assigns one (returned), and a retry cannot be told from a new event",
    )
    user_id: Identifier
    item_id: Identifier
    event_type: EventType
    ts: Timestamp | None = Field(None, description="event time (UTC if naive); default now")
    device: ContextValue | None = None
    session_id: Identifier | None = None
    price: Annotated[float, Strict()] | None = Field(
        None, ge=0, le=MAX_PRICE, allow_inf_nan=False, description="a JSON number (strings and booleans are refused)"
    )

    @field_validator("ts")
    @classmethod
    def _plausible(cls, ts: datetime | None) -> datetime | None:
        return None if ts is None else plausible_ts(ts)


class EventOutcome(str, Enum):
    """`reason` of an event's receipt."""

    OK = "ok"
    DUPLICATE = "duplicate"  # this event id was accepted before: nothing was applied again
    FEATURE_STORE_UNAVAILABLE = "feature_store_unavailable"  # logged; the sequence follows at the next materialization


class EventResponse(BaseModel):
    event_id: str = Field(description="the client's event_id, else the one the service assigned")
    accepted: bool = Field(description="always true: an event that was not accepted gets an error status")
    duplicate: bool = Field(description="an event with this id had been accepted before; nothing was applied again")
    durable: bool = Field(description="the event is in the fsync-ed event log, which the next training run reads")
    feature_store_updated: bool = Field(description="the user's online sequence includes the event")
    sequence_length: int | None = Field(description="length of the user's online sequence after the event")
    reason: EventOutcome


class RefusedBundle(BaseModel):
    """A bundle the service would not serve (it failed to load, verify or warm up)."""

    version: str = Field(description="its directory name under bundles/")
    reason: str = Field(description="why, in one line without paths or exception texts (the log has the detail)")
    at: datetime


DEPENDENCIES: tuple[str, ...] = ("model", "online_store", "event_log")


class DependencyHealth(BaseModel):
    status: Literal["ok", "down"]
    detail: str = Field(description="a short sentence; no paths or exception texts")
    checked_at: datetime = Field(description="when this was last checked (UTC)")


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="ok: the model serves, the online store answers, the event log is writable; degraded: "
        "answers still come (popularity fallback) but a dependency is down; unavailable: no model and no "
        "popularity list, so answers are empty"
    )
    degraded: bool = Field(description="status is not ok")
    reason: str | None = Field(description="why the status is not ok, in one line; None when ok")
    dependencies: dict[str, DependencyHealth] = Field(description=f"one entry each: {', '.join(DEPENDENCIES)}")
    model_version: str | None
    target: TargetName | None = Field(None, description="what the served model predicts; null when none is loaded")
    signed: bool = Field(description="the served bundle's signature verified with a configured public key")
    signing_key: str | None = Field(None, description="key id of the public key that verified it")
    providers: list[str]
    cache: dict[str, float] = Field(description="entries, bytes, max_bytes, hit_ratio of this process's answer cache")
    loaded_at: datetime | None = Field(None, description="when the served bundle was loaded (UTC)")
    follows_current: bool = Field(False, description="whether a switch of bundles/current is followed")
    last_refused: RefusedBundle | None = Field(None, description="the latest bundle refused by this process")
