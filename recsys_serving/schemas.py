"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused with a 400)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator

from recsys_serving.contract import EARLIEST_EVENT_TS, EventType

MAX_K = 100
MAX_RECENT_ITEMS = 500  # a cap on the request body; the model only reads its latest max_len-1
CLOCK_SKEW = timedelta(minutes=5)

MAX_PRICE = 1e9  # beyond any shop's price: a unit or parsing error
# No control characters (NUL, newlines, ...): ids end up in logs, files and SQL of the next retrain.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
Identifier = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256, pattern=PRINTABLE)]
ContextValue = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=PRINTABLE)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=256)


class RequestContext(_Strict):
    """What is known about the request itself; it fills the model's [MASK] position."""

    device: ContextValue | None = Field(None, description="e.g. mobile, desktop, app")
    segment: ContextValue | None = Field(None, description="overrides the user's stored segment")
    ts: datetime | None = Field(None, description="request time (UTC if naive); default now")

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


class FallbackReason(str, Enum):
    """Why an answer did not come from the model (`reason` of the response)."""

    UNKNOWN_USER = "unknown_user"  # the feature store has no sequence for the user
    COLD_START = "cold_start"  # a history, but none of its items is in the model's vocabulary
    FEATURE_STORE_UNAVAILABLE = "feature_store_unavailable"
    MODEL_ERROR = "model_error"
    MODEL_TIMEOUT = "model_timeout"
    MODEL_UNAVAILABLE = "model_unavailable"  # no bundle, or the bundle was refused


MODEL_REASON = "model"


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str | None
    fallback: bool
    reason: str = Field(description="'model', or the FallbackReason of a fallback answer")
    cached: bool = False


class EventRequest(_Strict):
    user_id: Identifier
    item_id: Identifier
    event_type: EventType
    ts: datetime | None = Field(None, description="event time (UTC if naive); default now")
    device: ContextValue | None = None
    session_id: Identifier | None = None
    price: float | None = Field(None, ge=0, le=MAX_PRICE, allow_inf_nan=False)

    @field_validator("ts")
    @classmethod
    def _plausible(cls, ts: datetime | None) -> datetime | None:
        return None if ts is None else plausible_ts(ts)


class EventResponse(BaseModel):
    accepted: bool
    logged_to: str = Field(description="event log file the event was appended to (fsync-ed)")
    feature_store_updated: bool
    sequence_length: int | None
    reason: str = Field(description="'ok', or why the feature store could not be updated")


class RefusedBundle(BaseModel):
    """A bundle the service would not serve (it failed to load, verify or warm up)."""

    version: str = Field(description="its directory name under bundles/")
    path: str
    reason: str
    at: datetime


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    degraded: bool
    reason: str | None
    model_version: str | None
    bundle_path: str
    providers: list[str]
    cache: dict[str, float]
    loaded_at: datetime | None = Field(None, description="when the served bundle was loaded (UTC)")
    follows_current: bool = Field(False, description="whether a switch of bundles/current is followed")
    last_refused: RefusedBundle | None = Field(None, description="the latest bundle refused by this process")
