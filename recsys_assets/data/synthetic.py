"""Synthetic e-commerce event logs: the project's embedded default data and its scale benchmark input.

The generator writes chunk files `events-00000.csv.gz` (or `.parquet`) in the canonical schema
(`schema.CANONICAL_COLUMNS`, in that order). What it plants, so that every stage has something real
to find:

- a catalogue of items in categories, with Zipf-like popularity inside each category and across
  categories, and a log-normal price per item;
- users in segments (new / regular / vip / lapsed) that differ in activity, funnel rates and the
  part of the time window they are active in; each user prefers a few categories and mostly uses
  one device;
- sessions whose start hour follows a per-device diurnal traffic curve; inside a session a
  view -> cart -> purchase funnel;
- sequential structure: every item has three likely successors (the next item of its series, an
  accessory from a complementary category, an "also viewed" item of its own category); the next
  view follows one of them with probability `pattern_strength`, an accessory is favoured right
  after a purchase, so a sequence model and even a last-item transition baseline beat popularity;
- noise at configurable rates: bot users (huge volume, several events per second, random items),
  exact duplicate rows, malformed rows (CSV only), null ids, unknown event types, timestamps in
  the future. `GenerationSummary.noise` counts every injected row;
- optionally, following periods (`following_periods`, one `PeriodShift` each): the days after the
  window, written as `events-pNN-<chunk>.csv.gz|parquet` next to the base chunks. The same users
  (who keep segment, bot status, activity, preferred categories and primary device), catalogue and
  successors; fresh draws of everything else (the persona is replayed from the base draws). Unshifted,
  a period is the same process as the base window (the same events per user, squeezed into its
  days), so a drift monitor must find nothing; its shifts plant drift: trending items outside the
  catalogue, another device mix, rotated category or item popularity, more or fewer events per user.

Everything is vectorized numpy per chunk of users (the only Python loop runs over positions in a
user's history, each step handling all users of the chunk at once), so memory is bounded by
`chunk_users` whatever the total size. The output is a pure function of the config: the same
config gives byte-identical files, with any number of `workers`.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recsys_serving.contract import CANONICAL_COLUMNS, EVENT_TYPES

# Event types a broken client might send; the cleaning stage quarantines them as unknown.
UNKNOWN_EVENT_TYPES: tuple[str, ...] = ("wishlist", "remove_from_cart", "share", "compare")
# Unparsable values of malformed CSV rows (clearly invalid for any reader, never an empty field).
BAD_TIMESTAMPS: tuple[str, ...] = ("2025-13-45 25:61:00", "not-a-timestamp", "31/02/2025 10:00")
BAD_PRICES: tuple[str, ...] = ("abc", "9.99.9", "$19.99")
NOISE_KINDS: tuple[str, ...] = (
    "bot_users",
    "bot",
    "duplicate",
    "malformed",
    "null_id",
    "unknown_event_type",
    "future_timestamp",
)
CHUNK_FILE = re.compile(r"^events-(p\d{2}-)?\d{5}\.(csv\.gz|parquet)$")  # base chunks, then pNN-: periods
_SUCCESSORS = 3  # series next, accessory, also viewed
_USER_KEY = np.int64(1) << 40  # separates users in one int64 key (timestamps stay far below 2**40)


class SegmentProfile(BaseModel):
    """How the users of one customer segment behave."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(gt=0, description="Relative share of users in this segment.")
    activity: float = Field(gt=0, description="Multiplier of a user's expected number of events.")
    cart_multiplier: float = Field(1.0, ge=0, description="Multiplier of `cart_rate`.")
    purchase_multiplier: float = Field(1.0, ge=0, description="Multiplier of `purchase_rate`.")
    active_from: float = Field(0.0, ge=0, le=1, description="Start of the segment's activity, fraction of the window.")
    active_to: float = Field(1.0, ge=0, le=1, description="End of the segment's activity, fraction of the window.")
    device_mix: dict[str, float] = Field(description="Relative probability of each device as the primary device.")

    @model_validator(mode="after")
    def _check(self) -> SegmentProfile:
        if self.active_to <= self.active_from:
            raise ValueError(f"active_to ({self.active_to}) must be after active_from ({self.active_from})")
        if not self.device_mix or any(w < 0 for w in self.device_mix.values()) or sum(self.device_mix.values()) <= 0:
            raise ValueError(f"device_mix needs non-negative weights with a positive sum, got {self.device_mix}")
        return self


class DeviceProfile(BaseModel):
    """The diurnal traffic curve of a device: a floor plus Gaussian bumps around peak hours (UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peaks: list[tuple[float, float, float]] = Field(
        description="(hour of the peak 0-24, width in hours, weight) of each bump of traffic."
    )
    floor: float = Field(0.05, ge=0, description="Traffic at any hour relative to a peak of weight 1.")

    @model_validator(mode="after")
    def _check(self) -> DeviceProfile:
        for hour, width, weight in self.peaks:
            if not (0 <= hour <= 24 and width > 0 and weight >= 0):
                raise ValueError(f"a peak needs 0 <= hour <= 24, width > 0, weight >= 0; got {(hour, width, weight)}")
        if self.floor == 0 and not any(w > 0 for _, _, w in self.peaks):
            raise ValueError("a device needs some traffic: a positive floor or a peak of positive weight")
        return self

    def hour_weights(self) -> np.ndarray:
        centers = np.arange(24) + 0.5
        weights = np.full(24, self.floor)
        for hour, width, weight in self.peaks:
            dist = np.abs(centers - hour)
            dist = np.minimum(dist, 24 - dist)  # the day wraps around midnight
            weights += weight * np.exp(-0.5 * (dist / width) ** 2)
        return weights / weights.sum()


def _default_segments() -> dict[str, SegmentProfile]:
    return {
        "new": SegmentProfile(
            share=0.25, activity=0.55, cart_multiplier=0.7, purchase_multiplier=0.7, active_from=0.55,
            device_mix={"mobile": 0.55, "desktop": 0.25, "tablet": 0.1, "app": 0.1},
        ),
        "regular": SegmentProfile(
            share=0.55, activity=1.0,
            device_mix={"mobile": 0.4, "desktop": 0.3, "tablet": 0.1, "app": 0.2},
        ),
        "vip": SegmentProfile(
            share=0.08, activity=2.2, cart_multiplier=1.8, purchase_multiplier=1.5,
            device_mix={"mobile": 0.25, "desktop": 0.25, "tablet": 0.05, "app": 0.45},
        ),
        "lapsed": SegmentProfile(
            share=0.12, activity=0.7, cart_multiplier=0.8, active_to=0.5,
            device_mix={"mobile": 0.4, "desktop": 0.4, "tablet": 0.15, "app": 0.05},
        ),
    }


class PeriodShift(BaseModel):
    """A period that follows the base window (or the previous period): `days` long, the same process
    as the base window unless one of the shifts below is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: int = Field(14, ge=1, le=3650, description="Length of the period in days.")
    new_items: int = Field(
        0, ge=0, le=10_000_000,
        description="Trending items outside the base catalogue (ids after it; each period has its own).",
    )
    new_item_share: float = Field(
        0.0, ge=0, lt=1, description="Share of fresh views (those not following a successor) that pick a new item."
    )
    device_mix: dict[str, float] | None = Field(
        None, description="Primary-device mix of every segment in the period (default: each segment's own)."
    )
    category_rotation: float = Field(
        0.0, ge=0, lt=1,
        description="Rotate category popularity by this fraction of the categories (the top ones lose their traffic).",
    )
    popularity_rotation: float = Field(
        0.0, ge=0, lt=1, description="Rotate item popularity ranks inside each category by this fraction of its size."
    )
    activity: float = Field(1.0, gt=0, le=100, description="Multiplier of the events per user.")

    @model_validator(mode="after")
    def _check(self) -> PeriodShift:
        if (self.new_items > 0) != (self.new_item_share > 0):
            raise ValueError(
                f"new_items ({self.new_items}) and new_item_share ({self.new_item_share}) must be set together"
            )
        if self.device_mix is not None and (
            not self.device_mix or any(w < 0 for w in self.device_mix.values()) or sum(self.device_mix.values()) <= 0
        ):
            raise ValueError(f"device_mix needs non-negative weights with a positive sum, got {self.device_mix}")
        return self


def _default_devices() -> dict[str, DeviceProfile]:
    return {
        # Commute, lunch break and the evening couch.
        "mobile": DeviceProfile(peaks=[(8.0, 1.2, 0.6), (12.5, 1.0, 0.5), (20.5, 2.0, 1.0)]),
        # Office hours.
        "desktop": DeviceProfile(peaks=[(11.0, 2.5, 1.0), (15.0, 2.0, 0.8)], floor=0.03),
        "tablet": DeviceProfile(peaks=[(19.5, 2.0, 1.0), (9.0, 1.5, 0.3)]),
        # Late evening and lunch.
        "app": DeviceProfile(peaks=[(21.5, 1.5, 1.0), (13.0, 1.0, 0.4)], floor=0.08),
    }


class SyntheticConfig(BaseModel):
    """Everything the generator does; the output is a pure function of this config."""

    model_config = ConfigDict(extra="forbid")

    # Size and output.
    n_users: int = Field(gt=0, description="Users, bots included.")
    n_items: int = Field(gt=0, description="Items of the catalogue.")
    n_categories: int = Field(gt=0, description="Item categories (at most n_items).")
    events_per_user_mean: float = Field(gt=0, description="Mean events of a human user, funnel included, before noise.")
    seed: int = Field(7, ge=0, description="Same seed, same files.")
    output_format: Literal["csv", "parquet"] = Field("csv", description="gzip CSV or Parquet chunk files.")
    chunk_users: int = Field(
        50_000, gt=0, le=1_000_000,
        description="Users per chunk file; bounds memory (roughly 200 bytes x events of one chunk per worker). "
        "Part of the data's identity: another value gives other (equally valid) data.",
    )
    workers: int = Field(1, ge=1, le=64, description="Processes writing chunks in parallel (output is identical).")
    # Time.
    start: datetime = Field(datetime(2025, 9, 1), description="Start of the event window (naive UTC).")
    end: datetime = Field(datetime(2025, 12, 1), description="End of the event window (naive UTC).")
    # Catalogue.
    item_popularity_exponent: float = Field(1.2, gt=0, description="Zipf exponent of item popularity in a category.")
    category_popularity_exponent: float = Field(1.0, ge=0, description="Zipf exponent of category popularity.")
    price_median: float = Field(25.0, gt=0, description="Median item price.")
    # Users and sessions.
    segments: dict[str, SegmentProfile] = Field(default_factory=_default_segments)
    devices: dict[str, DeviceProfile] = Field(default_factory=_default_devices)
    device_loyalty: float = Field(0.8, ge=0, le=1, description="P(a session uses the user's primary device).")
    preferred_categories: int = Field(3, ge=1, description="Categories a user prefers.")
    category_loyalty: float = Field(0.8, ge=0, le=1, description="P(a fresh view is in a preferred category).")
    activity_dispersion: float = Field(0.5, ge=0, description="Log-normal sigma of user activity.")
    max_views_per_user: int = Field(600, ge=1, le=30_000, description="Cap on a human user's views.")
    session_views_mean: float = Field(6.0, ge=1, description="Mean views per session (geometric).")
    view_gap_seconds_mean: float = Field(45.0, gt=0, description="Mean seconds between views of a session.")
    session_gap_min_seconds: int = Field(1800, ge=0, description="Minimum inactivity between sessions.")
    cart_rate: float = Field(0.1, ge=0, le=1, description="P(cart | view) before segment multipliers.")
    purchase_rate: float = Field(0.35, ge=0, le=1, description="P(purchase | cart) before segment multipliers.")
    # Planted sequential structure.
    pattern_strength: float = Field(0.6, ge=0, le=1, description="P(a view in a session follows a successor of the previous item).")
    cross_session_strength: float = Field(0.3, ge=0, le=1, description="Same for the first view of a later session.")
    successor_weights: tuple[float, float, float] = Field(
        (0.6, 0.25, 0.15), description="Choice among successors: series next, accessory, also viewed."
    )
    accessory_after_purchase: float = Field(0.7, ge=0, le=1, description="P(the successor is the accessory) after a purchase.")
    revisit_rate: float = Field(0.02, ge=0, le=1, description="P(a view reloads the item viewed just before).")
    # Noise. Row-level rates are fractions of all rows of a chunk (bots included), mutually exclusive.
    bot_user_rate: float = Field(0.002, ge=0, le=1, description="Fraction of users that are bots.")
    bot_events_mean: float = Field(800.0, ge=1, description="Mean events of a bot.")
    bot_events_per_minute: float = Field(180.0, gt=0, description="Mean event rate of a bot.")
    duplicate_rate: float = Field(0.005, ge=0, le=1, description="Fraction of rows written twice in a row.")
    malformed_rate: float = Field(0.002, ge=0, le=1, description="Fraction of malformed rows (CSV only).")
    null_id_rate: float = Field(0.002, ge=0, le=1, description="Fraction of rows with an empty user or item id.")
    unknown_type_rate: float = Field(0.003, ge=0, le=1, description="Fraction of rows with an unknown event type.")
    future_ts_rate: float = Field(0.001, ge=0, le=1, description="Fraction of rows with a timestamp in the future.")
    future_ts_days: tuple[int, int] = Field(
        (3650, 18250), description="Days after `end` of future timestamps (decades: future for any clock)."
    )
    # Encoding.
    csv_compresslevel: int = Field(6, ge=1, le=9, description="gzip level of CSV chunks.")
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet codec.")
    # Data after the window.
    following_periods: list[PeriodShift] = Field(
        default_factory=list, description="Periods written after `end`, one after the other (see PeriodShift)."
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.n_categories > self.n_items:
            raise ValueError(f"n_categories ({self.n_categories}) must not exceed n_items ({self.n_items})")
        if self.preferred_categories > self.n_categories:
            raise ValueError(
                f"preferred_categories ({self.preferred_categories}) must not exceed n_categories ({self.n_categories})"
            )
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if (self.end - self.start).days < 1:
            raise ValueError("the time window must span at least one day")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are naive UTC datetimes (no tzinfo)")
        if self.output_format == "parquet" and self.malformed_rate > 0:
            raise ValueError("malformed_rate must be 0 for parquet output: a typed column cannot hold a malformed row")
        row_noise = self.malformed_rate + self.null_id_rate + self.unknown_type_rate + self.future_ts_rate
        if row_noise + self.duplicate_rate >= 1:
            raise ValueError(f"row-level noise rates sum to {row_noise + self.duplicate_rate:.3f}; they must stay below 1")
        if min(self.successor_weights) < 0 or sum(self.successor_weights) <= 0:
            raise ValueError(f"successor_weights must be non-negative with a positive sum, got {self.successor_weights}")
        lo, hi = self.future_ts_days
        if not 1 <= lo <= hi:
            raise ValueError(f"future_ts_days must be (low, high) with 1 <= low <= high, got {self.future_ts_days}")
        if not self.segments or not self.devices:
            raise ValueError("segments and devices must not be empty")
        for name, seg in self.segments.items():
            unknown = sorted(set(seg.device_mix) - set(self.devices))
            if unknown:
                raise ValueError(f"segment {name!r} names devices {unknown} that are not in devices {sorted(self.devices)}")
        for k, period in enumerate(self.following_periods, start=1):
            unknown = sorted(set(period.device_mix or {}) - set(self.devices))
            if unknown:
                raise ValueError(f"following period {k} names devices {unknown} that are not in devices {sorted(self.devices)}")
        return self

    def period_window(self, period: int) -> tuple[datetime, datetime]:
        """(start, end) of following period `period` (1-based): right after the previous one."""
        if not 1 <= period <= len(self.following_periods):
            raise ValueError(f"period {period} is not one of the {len(self.following_periods)} following periods")
        start = self.end + timedelta(days=sum(p.days for p in self.following_periods[: period - 1]))
        return start, start + timedelta(days=self.following_periods[period - 1].days)

    def period_config(self, period: int) -> SyntheticConfig:
        """The config that generates following period `period`: the base process over the period's days."""
        shift = self.following_periods[period - 1]
        start, end = self.period_window(period)
        segments = {
            name: seg.model_copy(update={"device_mix": dict(shift.device_mix)}) if shift.device_mix else seg
            for name, seg in self.segments.items()
        }
        return SyntheticConfig.model_validate(
            {
                **self.model_dump(),
                "start": start,
                "end": end,
                "events_per_user_mean": self.events_per_user_mean * shift.activity,
                "segments": {k: v.model_dump() for k, v in segments.items()},
                "following_periods": [],
            }
        )

    @property
    def n_chunks(self) -> int:
        return -(-self.n_users // self.chunk_users)

    @property
    def expected_events(self) -> float:
        """Rows the config should produce on average (noise included), for progress bars and sizing."""
        activity = 1.0 + sum(p.activity for p in self.following_periods)
        humans = self.n_users * (1 - self.bot_user_rate) * self.events_per_user_mean * activity
        bots = self.n_users * self.bot_user_rate * self.bot_events_mean * (1 + len(self.following_periods))
        return (humans + bots) * (1 + self.duplicate_rate)


class PeriodSummary(BaseModel):
    start: datetime
    end: datetime
    events: int = Field(description="Rows written for the period, noise included.")
    new_items: int = Field(description="The period's trending items outside the catalogue.")
    new_item_ids: tuple[str, str] | None = Field(description="First and last id of those items (consecutive numbers).")


class GenerationSummary(BaseModel):
    files: list[str]
    events: int = Field(description="Rows written, noise included.")
    users: int
    items: int
    noise: dict[str, int] = Field(description="Injected noise: bot users, and rows of each kind (see NOISE_KINDS).")
    seconds: float
    periods: list[PeriodSummary] = Field(default_factory=list, description="The following periods, in order.")


# The embedded default data of `make run`: small enough that the whole asset graph, BERT4Rec training
# on 2 CPU cores included, takes minutes; a little of every kind of noise for the cleaning stage.
DEFAULT_CONFIG = SyntheticConfig(
    n_users=6_000,
    n_items=2_000,
    n_categories=50,
    events_per_user_mean=25.0,
    seed=7,
    output_format="csv",
    chunk_users=2_000,
)


# ----------------------------------------------------------------------------------------------
# Catalogue
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    item_category: np.ndarray  # int32 [n_items]; items of a category are contiguous, most popular first
    cat_offset: np.ndarray  # int64 [n_categories]: first item of each category
    cat_size: np.ndarray  # int64 [n_categories]
    cat_cdf: np.ndarray  # float64: cumulative category popularity
    successors: np.ndarray  # int32 [n_items * 3]: series next, accessory, also viewed
    price: np.ndarray  # float64 [n_items]
    item_ids: pa.Array  # string [n_items]
    category_names: pa.Array  # string [n_categories]
    # Shifts of a following period (none in the base window): fresh draws of rank r in category c
    # take rank (r + rank_shift[c]) mod its size; a share of them goes to the items from `first_new` on.
    rank_shift: np.ndarray | None = None  # int64 [n_categories]
    category_shift: int = 0  # category c takes the popularity (and the fans) of category c - category_shift
    first_new: int = 0
    n_new: int = 0
    new_share: float = 0.0


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def _categorical(rng: np.random.Generator, cdf: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _power_law_rank(u: np.ndarray, n: np.ndarray, exponent: float) -> np.ndarray:
    """Rank in [0, n) with P(rank = r) ~ (r + 1)^-exponent, by inverting the continuous power law
    on [1, n + 1): closed form, so it is vectorized and needs no per-category tables."""
    n = np.asarray(n, dtype=np.float64)
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(n + 1.0, u)
    else:
        a = 1.0 - exponent
        x = np.power(1.0 + u * (np.power(n + 1.0, a) - 1.0), 1.0 / a)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n.astype(np.int64) - 1)


def _string_ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def _build_catalog(cfg: SyntheticConfig) -> _Catalog:
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_cat = cfg.n_items, cfg.n_categories
    cat_weights = np.arange(1, n_cat + 1, dtype=np.float64) ** -cfg.category_popularity_exponent
    # Sizes loosely follow popularity (big categories are popular) with noise; every category has an item.
    size_weights = np.sqrt(cat_weights) * rng.lognormal(0.0, 0.5, n_cat)
    cat_size = 1 + rng.multinomial(n_items - n_cat, size_weights / size_weights.sum()).astype(np.int64)
    cat_offset = np.cumsum(cat_size) - cat_size
    item_category = np.repeat(np.arange(n_cat, dtype=np.int32), cat_size)
    rank = np.arange(n_items, dtype=np.int64) - cat_offset[item_category]

    successors = np.empty((n_items, _SUCCESSORS), dtype=np.int32)
    # Series: a random cyclic order of each category's items; an item's successor is the next one.
    order = np.lexsort((rng.random(n_items), item_category))  # blocks stay in place, shuffled inside
    nxt = np.arange(1, n_items + 1)
    last = cat_offset + cat_size - 1
    nxt[last] = cat_offset
    successors[order, 0] = order[nxt]
    # Accessory: a popular-ish item of a complementary category (another one when there is one).
    comp = (np.arange(n_cat) + 1 + rng.integers(0, max(n_cat - 1, 1), n_cat)) % n_cat if n_cat > 1 else np.zeros(1, int)
    item_comp = comp[item_category]
    successors[:, 1] = cat_offset[item_comp] + _power_law_rank(
        rng.random(n_items), cat_size[item_comp], cfg.item_popularity_exponent
    )
    # Also viewed: a popular-ish other item of the same category (the series next when it draws itself).
    also = cat_offset[item_category] + _power_law_rank(
        rng.random(n_items), cat_size[item_category], cfg.item_popularity_exponent
    )
    successors[:, 2] = np.where(also == np.arange(n_items), successors[:, 0], also)

    cat_price = cfg.price_median * rng.lognormal(0.0, 0.8, n_cat)
    price = np.maximum(np.round(cat_price[item_category] * rng.lognormal(0.0, 0.4, n_items), 2), 0.5)
    # Popular items are discounted a little: a mild, learnable price/popularity relation.
    price = np.round(price * (1.0 - 0.15 * np.exp(-rank / 20.0)), 2)
    item_codes = rng.permutation(n_items) + 1  # ids do not reveal popularity
    cat_codes = rng.permutation(n_cat) + 1
    return _Catalog(
        item_category=item_category,
        cat_offset=cat_offset,
        cat_size=cat_size,
        cat_cdf=_cdf(cat_weights),
        successors=successors.reshape(-1),
        price=price,
        item_ids=_string_ids("i", item_codes),
        category_names=_string_ids("c", cat_codes),
    )


def _period_catalog(cfg: SyntheticConfig, period: int) -> _Catalog:
    """The base catalogue as following period `period` sees it: rotated popularity and its own
    trending items appended after the base items (ids continue after earlier periods' new items)."""
    base = _build_catalog(cfg)
    shift = cfg.following_periods[period - 1]
    rng = np.random.default_rng([cfg.seed, 0, period])
    n_items, n_cat = cfg.n_items, cfg.n_categories
    cat_weights = np.arange(1, n_cat + 1, dtype=np.float64) ** -cfg.category_popularity_exponent
    category_shift = int(round(shift.category_rotation * n_cat)) % n_cat
    cat_cdf = _cdf(np.roll(cat_weights, category_shift))
    rank_shift = np.round(shift.popularity_rotation * base.cat_size).astype(np.int64) % base.cat_size
    n_new = shift.new_items
    if n_new == 0:
        return replace(base, cat_cdf=cat_cdf, rank_shift=rank_shift, category_shift=category_shift)
    new = np.arange(n_items, n_items + n_new)
    new_cat = _categorical(rng, cat_cdf, n_new).astype(np.int32)
    successors = np.empty((n_new, _SUCCESSORS), dtype=np.int32)
    successors[:, 0] = n_items + (new - n_items + 1) % n_new  # trending items come as a series
    other = _categorical(rng, cat_cdf, n_new)
    for slot, cats in ((1, other), (2, new_cat)):  # accessory elsewhere, also viewed in its own category
        successors[:, slot] = base.cat_offset[cats] + _power_law_rank(
            rng.random(n_new), base.cat_size[cats], cfg.item_popularity_exponent
        )
    # Priced like a random item of the same category.
    peer = base.cat_offset[new_cat] + rng.integers(0, base.cat_size[new_cat])
    price = np.maximum(np.round(base.price[peer] * rng.lognormal(0.0, 0.2, n_new), 2), 0.5)
    first_code = n_items + 1 + sum(p.new_items for p in cfg.following_periods[: period - 1])
    return replace(
        base,
        item_category=np.concatenate([base.item_category, new_cat]),
        cat_cdf=cat_cdf,
        successors=np.concatenate([base.successors, successors.reshape(-1)]),
        price=np.concatenate([base.price, price]),
        item_ids=pa.concat_arrays([base.item_ids, _string_ids("i", np.arange(first_code, first_code + n_new))]),
        rank_shift=rank_shift,
        category_shift=category_shift,
        first_new=n_items,
        n_new=n_new,
        new_share=shift.new_item_share,
    )


# ----------------------------------------------------------------------------------------------
# Events of one chunk of users
# ----------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Columns of a chunk's rows as codes; turned into strings only when written."""

    user: np.ndarray  # int64 chunk-local user
    item: np.ndarray  # int64 item index
    etype: np.ndarray  # int8: index into EVENT_TYPES + UNKNOWN_EVENT_TYPES
    ts: np.ndarray  # int64 epoch seconds
    session: np.ndarray  # int64 session number within the user
    device: np.ndarray  # int8
    segment: np.ndarray  # int8

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Rows.__dataclass_fields__))

    def take(self, index: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f)[index] for f in _Rows.__dataclass_fields__))


def _epoch(dt: datetime) -> int:
    return int(dt.replace(tzinfo=timezone.utc).timestamp())


def _grouped_exclusive_cumsum(values: np.ndarray, group_start: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """Sum of the earlier values of the same group (groups are contiguous runs)."""
    before = np.cumsum(values) - values
    return before - before[group_start][group_of]


@dataclass
class _Persona:
    """What a human user keeps from one period to the next (drawn in the base window)."""

    activity: np.ndarray  # float64 [n]: log-normal multiplier of the user's events
    preferred: np.ndarray  # int64 [n, preferred_categories]
    primary: np.ndarray  # int64 [n]: primary device


def _human_rows(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    cat: _Catalog,
    users: np.ndarray,
    seg: np.ndarray,
    persona: _Persona | None = None,
    keep_device: bool = True,
    drawn: dict[str, np.ndarray] | None = None,
) -> _Rows:
    """Events of human `users`. A following period passes the base window's `persona` (the primary
    device only when `keep_device`: another device mix draws it afresh); `drawn`, if given, receives
    the persona this call drew."""
    seg_names = list(cfg.segments)
    profiles = [cfg.segments[s] for s in seg_names]
    dev_names = list(cfg.devices)
    share = np.array([p.share for p in profiles])
    activity = np.array([p.activity for p in profiles])
    cart_p = np.clip(cfg.cart_rate * np.array([p.cart_multiplier for p in profiles]), 0, 1)
    buy_p = np.clip(cfg.purchase_rate * np.array([p.purchase_multiplier for p in profiles]), 0, 1)
    # Views per user so that events (views + carts + purchases) average events_per_user_mean.
    views_weight = share * activity
    events_per_view = float((views_weight * (1 + cart_p * (1 + buy_p))).sum() / views_weight.sum())
    base_views = cfg.events_per_user_mean / events_per_view / float((share * activity).sum() / share.sum())

    n = len(users)
    sigma = cfg.activity_dispersion
    user_activity = persona.activity if persona is not None else rng.lognormal(-0.5 * sigma**2, sigma, n)
    expected = base_views * activity[seg] * user_activity
    views = np.minimum(1 + rng.poisson(np.maximum(expected - 1.0, 0.0)), cfg.max_views_per_user)
    total = int(views.sum())
    first = np.cumsum(views) - views
    owner = np.repeat(np.arange(n), views)  # index into `users`
    pos = (np.arange(total) - first[owner]).astype(np.int16)

    new_session = (pos == 0) | (rng.random(total) < 1.0 / cfg.session_views_mean)
    session_of = np.cumsum(new_session) - 1
    session_first = np.flatnonzero(new_session)
    n_sessions = len(session_first)
    session_owner = owner[session_first]
    session_no = _grouped_exclusive_cumsum(new_session.astype(np.int64), first, owner)[session_first]

    owner_seg = seg[owner]
    cart = rng.random(total) < cart_p[owner_seg]
    purchase = cart & (rng.random(total) < buy_p[owner_seg])

    # Fresh draws: a preferred category (most of the time) or any category by popularity, then an
    # item of it by within-category popularity.
    k = cfg.preferred_categories
    if persona is not None:  # tastes move with a rotation of category popularity
        preferred = (persona.preferred + cat.category_shift) % cfg.n_categories
    else:
        preferred = _categorical(rng, cat.cat_cdf, (n, k))
    which = _categorical(rng, _cdf(1.0 / np.arange(1, k + 1)), total)
    loyal = rng.random(total) < cfg.category_loyalty
    fresh_cat = np.where(loyal, preferred[owner, which], _categorical(rng, cat.cat_cdf, total))
    rank = _power_law_rank(rng.random(total), cat.cat_size[fresh_cat], cfg.item_popularity_exponent)
    if cat.rank_shift is not None:
        rank = (rank + cat.rank_shift[fresh_cat]) % cat.cat_size[fresh_cat]
    item = cat.cat_offset[fresh_cat] + rank
    if cat.n_new:  # only in a shifted period: the base window's draws stay as they are
        trending = np.flatnonzero(rng.random(total) < cat.new_share)
        item[trending] = cat.first_new + _power_law_rank(
            rng.random(len(trending)), np.full(len(trending), cat.n_new), cfg.item_popularity_exponent
        )

    # Planted structure: follow a successor of the previous item, or reload it.
    follow_p = np.where(new_session, cfg.cross_session_strength, cfg.pattern_strength)
    follow = (pos > 0) & (rng.random(total) < follow_p)
    revisit = (pos > 0) & ~new_session & ~follow & (rng.random(total) < cfg.revisit_rate)
    slot = _categorical(rng, _cdf(np.array(cfg.successor_weights)), total)
    after_purchase = np.zeros(total, dtype=bool)
    after_purchase[1:] = purchase[:-1] & (pos[1:] > 0)
    slot = np.where(after_purchase & (rng.random(total) < cfg.accessory_after_purchase), 1, slot)
    dependent = np.flatnonzero(follow | revisit)
    # Positions in ascending order (stable radix sort on int16): a step only needs the previous one.
    dependent = dependent[np.argsort(pos[dependent], kind="stable")]
    bounds = np.searchsorted(pos[dependent], np.arange(1, int(pos.max(initial=0)) + 2))
    successor_index = slot.astype(np.int64)
    for step in range(len(bounds) - 1):  # one step per position in a history, all users at once
        at = dependent[bounds[step] : bounds[step + 1]]
        if len(at) == 0:
            continue
        prev = item[at - 1]
        item[at] = np.where(follow[at], cat.successors[prev * _SUCCESSORS + successor_index[at]], prev)

    # Time: dwell after each view covers its funnel steps, so a session's events never interleave.
    browse = 1 + np.floor(rng.exponential(cfg.view_gap_seconds_mean, total)).astype(np.int64)
    cart_delay = rng.integers(5, 90, total)
    buy_delay = rng.integers(20, 300, total)
    dwell = browse + cart * cart_delay + purchase * buy_delay
    offset = _grouped_exclusive_cumsum(dwell, session_first, session_of)
    duration = np.add.reduceat(dwell, session_first)

    # Sessions: a device (mostly the primary one), a day in the segment's active span and an hour
    # from that device's diurnal curve; then sorted per user and pushed apart so none overlap.
    dev_mix = np.array([[p.device_mix.get(d, 0.0) for d in dev_names] for p in profiles])
    dev_cdf = np.cumsum(dev_mix / dev_mix.sum(axis=1, keepdims=True), axis=1)
    dev_cdf[:, -1] = 1.0
    user_seg = seg
    if persona is not None and keep_device:
        primary = persona.primary
    else:
        primary = (rng.random(n)[:, None] >= dev_cdf[user_seg]).sum(axis=1)
    if drawn is not None:
        drawn.update(activity=user_activity, preferred=preferred, primary=primary)
    s_seg = user_seg[session_owner]
    other = (rng.random(n_sessions)[:, None] >= dev_cdf[s_seg]).sum(axis=1)
    s_dev = np.where(rng.random(n_sessions) < cfg.device_loyalty, primary[session_owner], other).astype(np.int8)
    hour_cdf = np.concatenate([_cdf(cfg.devices[d].hour_weights()) + i for i, d in enumerate(dev_names)])
    hour = np.searchsorted(hour_cdf, s_dev + rng.random(n_sessions), side="right") - 24 * s_dev.astype(np.int64)
    hour = np.clip(hour, 0, 23)
    t0 = _epoch(cfg.start)
    days = (cfg.end - cfg.start).days
    lo = np.array([p.active_from for p in profiles])[s_seg] * days
    hi = np.array([p.active_to for p in profiles])[s_seg] * days
    day = np.floor(lo + rng.random(n_sessions) * (hi - lo)).astype(np.int64)
    rel = day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n_sessions)
    order = np.argsort(session_owner.astype(np.int64) * _USER_KEY + rel, kind="stable")
    rel, s_dev = rel[order], s_dev[order]
    session_user_first = np.searchsorted(session_owner, np.arange(n))  # sessions are grouped by user
    gap = duration + cfg.session_gap_min_seconds
    pushed = _grouped_exclusive_cumsum(gap, session_user_first, session_owner)
    key = session_owner.astype(np.int64) * _USER_KEY
    start = pushed + np.maximum.accumulate(rel - pushed + key) - key + t0
    # Pushing sessions apart can run past `end`: move such a user's timeline back (as far as `start` allows).
    last = np.append(session_user_first[1:], n_sessions) - 1
    over = start[last] + duration[last] - _epoch(cfg.end)
    room = np.maximum(start[session_user_first] - t0, 0)
    start -= np.clip(over, 0, room)[session_owner]

    view_ts = start[session_of] + offset
    reps = 1 + cart.astype(np.int64) + purchase
    view_of = np.repeat(np.arange(total), reps)
    step = (np.arange(len(view_of)) - np.repeat(np.cumsum(reps) - reps, reps)).astype(np.int8)
    ts = view_ts[view_of] + (step >= 1) * cart_delay[view_of] + (step >= 2) * buy_delay[view_of]
    return _Rows(
        user=users[owner[view_of]],
        item=item[view_of],
        etype=step,  # 0 view, 1 cart, 2 purchase: the funnel order is EVENT_TYPES order
        ts=ts,
        session=session_no[session_of[view_of]],
        device=s_dev[session_of[view_of]],
        segment=owner_seg[view_of].astype(np.int8),
    )


def _bot_rows(rng: np.random.Generator, cfg: SyntheticConfig, users: np.ndarray, seg_code: int, dev_code: int) -> _Rows:
    n = len(users)
    counts = 1 + rng.poisson(cfg.bot_events_mean - 1, n)
    total = int(counts.sum())
    owner = np.repeat(np.arange(n), counts)
    first = np.cumsum(counts) - counts
    span = max(int((cfg.end - cfg.start).total_seconds()) - 86_400, 1)
    begin = _epoch(cfg.start) + rng.integers(0, span, n)
    gaps = rng.exponential(60.0 / cfg.bot_events_per_minute, total)
    before = np.cumsum(gaps) - gaps
    elapsed = np.floor(before - before[first][owner]).astype(np.int64)  # first event at `begin`
    return _Rows(
        user=users[owner],
        item=rng.integers(0, cfg.n_items, total),  # scraping: uniform over the catalogue
        etype=np.where(rng.random(total) < 0.03, 1, 0).astype(np.int8),
        ts=begin[owner] + elapsed,
        session=elapsed // 1800,
        device=np.full(total, dev_code, dtype=np.int8),
        segment=np.full(total, seg_code, dtype=np.int8),
    )


@dataclass
class _Noise:
    null_user: np.ndarray
    null_item: np.ndarray
    malformed: np.ndarray  # int8: -1 none, 0 field count, 1 timestamp, 2 price


def _users(cfg: SyntheticConfig, chunk: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The chunk's random stream after drawing who its users are: segment and bot or not."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    n = min(cfg.chunk_users, cfg.n_users - chunk * cfg.chunk_users)
    seg = _categorical(rng, _cdf(np.array([cfg.segments[s].share for s in cfg.segments])), n)
    is_bot = rng.random(n) < cfg.bot_user_rate
    return rng, seg, is_bot


def _base_persona(cfg: SyntheticConfig, cat: _Catalog, chunk: int) -> _Persona:
    """The chunk's human users as the base window drew them (replays the base window's draws)."""
    rng, seg, is_bot = _users(cfg, chunk)
    humans = np.flatnonzero(~is_bot)
    drawn: dict[str, np.ndarray] = {}
    if len(humans):
        _human_rows(rng, cfg, cat, humans, seg[humans], drawn=drawn)
    else:
        drawn = {"activity": np.ones(0), "preferred": np.zeros((0, cfg.preferred_categories), int), "primary": np.zeros(0, int)}
    return _Persona(**drawn)


def _chunk(
    cfg: SyntheticConfig, cat: _Catalog, chunk: int, period: int = 0, persona: _Persona | None = None,
    keep_device: bool = True,
) -> tuple[_Rows, _Noise, dict[str, int]]:
    rng, seg, is_bot = _users(cfg, chunk)
    if period:  # the same users (segment, bot, persona); every other draw is the period's own
        rng = np.random.default_rng([cfg.seed, 1, chunk, period])
    seg_names = list(cfg.segments)
    humans, bots = np.flatnonzero(~is_bot), np.flatnonzero(is_bot)
    parts = []
    if len(humans):
        parts.append(_human_rows(rng, cfg, cat, humans, seg[humans], persona, keep_device))
    if len(bots):
        bot_seg = seg_names.index("new") if "new" in seg_names else 0
        bot_dev = list(cfg.devices).index("desktop") if "desktop" in cfg.devices else 0
        parts.append(_bot_rows(rng, cfg, bots, bot_seg, bot_dev))
    rows = _Rows.concat(parts)
    n_bot_rows = len(rows.ts) - (len(parts[0].ts) if len(humans) else 0)
    rows = rows.take(np.argsort(rows.ts, kind="stable"))  # a log is written in time order

    m = len(rows.ts)
    u = rng.random(m)
    edges = np.cumsum([cfg.null_id_rate, cfg.unknown_type_rate, cfg.future_ts_rate, cfg.malformed_rate])
    kind = np.searchsorted(edges, u, side="right")  # 0 null id, 1 unknown type, 2 future, 3 malformed, 4 clean
    null_id = kind == 0
    null_user = null_id & (rng.random(m) < 0.5)
    null_item = null_id & ~null_user
    unknown = kind == 1
    rows.etype[unknown] = len(EVENT_TYPES) + rng.integers(0, len(UNKNOWN_EVENT_TYPES), int(unknown.sum()))
    future = kind == 2
    lo, hi = cfg.future_ts_days
    rows.ts[future] = (
        _epoch(cfg.end) + rng.integers(lo, hi + 1, int(future.sum())) * 86_400 + rng.integers(0, 86_400, int(future.sum()))
    )
    malformed = np.where(kind == 3, rng.integers(0, 3, m), -1).astype(np.int8)
    # Duplicates are copies of otherwise clean rows, written right after them.
    dup_p = min(cfg.duplicate_rate / max(1.0 - edges[-1], 1e-12), 1.0)
    dup = (kind == 4) & (rng.random(m) < dup_p)
    if dup.any():
        again = np.repeat(np.arange(m), 1 + dup.astype(np.int64))
        rows = rows.take(again)
        null_user, null_item, malformed = null_user[again], null_item[again], malformed[again]
    counts = {
        "bot_users": int(len(bots)),
        "bot": int(n_bot_rows),
        "duplicate": int(dup.sum()),
        "malformed": int((malformed >= 0).sum()),
        "null_id": int(null_id.sum()),
        "unknown_event_type": int(unknown.sum()),
        "future_timestamp": int(future.sum()),
    }
    return rows, _Noise(null_user, null_item, malformed), counts


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _columns(cfg: SyntheticConfig, cat: _Catalog, chunk: int, rows: _Rows, noise: _Noise) -> dict[str, pa.Array]:
    first_user = chunk * cfg.chunk_users + 1  # ids are 1-based: u1 .. u<n_users>
    n_local = min(cfg.chunk_users, cfg.n_users - chunk * cfg.chunk_users)
    user_names = _string_ids("u", np.arange(first_user, first_user + n_local))
    user_ids = user_names.take(pa.array(rows.user, mask=noise.null_user))
    session_ids = pc.binary_join_element_wise(
        "s", pc.cast(pa.array(rows.user + first_user), pa.string()), "-",
        pc.cast(pa.array(rows.session), pa.string()), "",
    )
    return {
        "user_id": user_ids,
        "item_id": cat.item_ids.take(pa.array(rows.item, mask=noise.null_item)),
        "event_type": pa.array(EVENT_TYPES + UNKNOWN_EVENT_TYPES).take(pa.array(rows.etype)),
        "ts": pa.array(rows.ts * 1_000_000, type=pa.timestamp("us")),
        "session_id": session_ids,
        "category": cat.category_names.take(pa.array(cat.item_category[rows.item])),
        "device": pa.array(list(cfg.devices)).take(pa.array(rows.device)),
        "segment": pa.array(list(cfg.segments)).take(pa.array(rows.segment)),
        "price": pa.array(cat.price[rows.item]),
    }


def _write_parquet(path: Path, cfg: SyntheticConfig, columns: dict[str, pa.Array]) -> None:
    # Dictionary pages only where they pay off: ids of sessions (and prices) are near-unique per chunk.
    pq.write_table(
        pa.table(columns),
        path,
        compression=cfg.parquet_compression,
        use_dictionary=["user_id", "item_id", "event_type", "category", "device", "segment"],
        row_group_size=1 << 20,
    )


def _write_csv(
    path: Path, cfg: SyntheticConfig, columns: dict[str, pa.Array], noise: _Noise, seed: int | list[int]
) -> None:
    # Built by hand (one joined string per row) because a CSV writer cannot emit the malformed rows.
    rng = np.random.default_rng(seed)
    text = dict(columns)
    text["ts"] = pc.strftime(pc.cast(columns["ts"], pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
    text["price"] = pc.cast(columns["price"], pa.string())
    m = len(noise.malformed)
    for kind, name, values in ((1, "ts", BAD_TIMESTAMPS), (2, "price", BAD_PRICES)):
        mask = noise.malformed == kind
        if mask.any():
            bad = pa.array(values).take(pa.array(rng.integers(0, len(values), m)))
            text[name] = pc.if_else(pa.array(mask), bad, text[name])
    fields = [text[c] for c in CANONICAL_COLUMNS]
    lines = pc.binary_join_element_wise(*fields, ",", null_handling="replace", null_replacement="")
    wrong_count = noise.malformed == 0
    if wrong_count.any():
        # Half truncated to the first 5 fields (a cut-off write), half with a trailing extra field.
        short = pc.binary_join_element_wise(*fields[:5], ",", null_handling="replace", null_replacement="")
        long = pc.binary_join_element_wise(lines, "extra", ",")
        pick = pa.array(rng.random(m) < 0.5)
        lines = pc.if_else(pa.array(wrong_count), pc.if_else(pick, short, long), lines)
    lines = pc.cast(lines, pa.large_string())
    body = pc.binary_join(
        pa.LargeListArray.from_arrays(pa.array([0, len(lines)], type=pa.int64()), lines),
        pa.scalar("\n", pa.large_string()),
    )[0].as_buffer()
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=cfg.csv_compresslevel, mtime=0
    ) as out:  # mtime=0 and no file name in the header: identical bytes for identical data
        out.write((",".join(CANONICAL_COLUMNS) + "\n").encode())
        out.write(memoryview(body))
        if len(lines):
            out.write(b"\n")


def chunk_file_name(chunk: int, output_format: str, period: int = 0) -> str:
    """`events-<chunk>` for the base window, `events-p<period>-<chunk>` for a following period."""
    prefix = f"events-p{period:02d}-" if period else "events-"
    return f"{prefix}{chunk:05d}.{'csv.gz' if output_format == 'csv' else 'parquet'}"


_WORKER_CATALOG: dict[tuple[str, int], _Catalog] = {}


def _catalog_for(cfg: SyntheticConfig, period: int = 0) -> _Catalog:
    key = (cfg.model_dump_json(), period)
    if key not in _WORKER_CATALOG:
        for old in [k for k in _WORKER_CATALOG if k[0] != key[0] or (k[1] and period)]:
            del _WORKER_CATALOG[old]  # bounded memory: the base catalogue and at most one period's
        _WORKER_CATALOG[key] = _period_catalog(cfg, period) if period else _build_catalog(cfg)
    return _WORKER_CATALOG[key]


def _write_chunk(cfg: SyntheticConfig, out_dir: Path, chunk: int, period: int = 0) -> tuple[str, int, dict[str, int]]:
    cat = _catalog_for(cfg, period)
    gen = cfg.period_config(period) if period else cfg
    persona = _base_persona(cfg, _catalog_for(cfg), chunk) if period else None
    keep_device = not (period and cfg.following_periods[period - 1].device_mix)
    rows, noise, counts = _chunk(gen, cat, chunk, period, persona, keep_device)
    columns = _columns(gen, cat, chunk, rows, noise)
    final = out_dir / chunk_file_name(chunk, cfg.output_format, period)
    tmp = final.with_name(f".{final.name}.tmp")
    if cfg.output_format == "parquet":
        _write_parquet(tmp, cfg, columns)
    else:
        seed = [cfg.seed, 2, chunk, period] if period else cfg.seed * 1_000_003 + chunk
        _write_csv(tmp, cfg, columns, noise, seed=seed)
    tmp.replace(final)  # a reader never sees half a chunk
    return str(final), len(rows.ts), counts


def generate_events(
    out_dir: Path,
    config: SyntheticConfig,
    progress: Callable[[int], None] | None = None,
) -> GenerationSummary:
    """Write the chunk files of `config` into `out_dir` and return what was written.

    `out_dir` is the generator's: chunk files already there (`events-NNNNN.csv.gz|parquet`, and
    `events-pNN-NNNNN...` of following periods) are replaced, other files are left alone. `progress`,
    if given, is called with the rows of each finished chunk. The base chunks do not depend on
    `following_periods`: adding periods to a config leaves its base files byte-identical.
    """
    started = time.perf_counter()
    cfg = SyntheticConfig.model_validate(config.model_dump())  # re-validate: model_copy(update=) does not
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if CHUNK_FILE.match(old.name) or (old.name.startswith(".events-") and old.name.endswith(".tmp")):
            old.unlink()

    files: list[str] = []
    events = 0
    period_events = [0] * (1 + len(cfg.following_periods))
    noise = dict.fromkeys(NOISE_KINDS, 0)

    def collect(result: tuple[str, int, dict[str, int]], period: int) -> None:
        nonlocal events
        path, rows, counts = result
        files.append(path)
        events += rows
        period_events[period] += rows
        for name, value in counts.items():
            noise[name] += value
        if progress is not None:
            progress(rows)

    tasks = [(chunk, period) for period in range(1 + len(cfg.following_periods)) for chunk in range(cfg.n_chunks)]
    chunks, periods = [t[0] for t in tasks], [t[1] for t in tasks]
    if cfg.workers == 1 or len(tasks) == 1:
        for chunk, period in tasks:
            collect(_write_chunk(cfg, out_dir, chunk, period), period)
    else:
        # spawn, not fork: the caller may hold threads (DuckDB, Dagster) that a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(tasks)), mp_context=context) as pool:
            results = pool.map(_write_chunk, [cfg] * len(tasks), [out_dir] * len(tasks), chunks, periods)
            for result, period in zip(results, periods):
                collect(result, period)
    summaries = []
    first_code = cfg.n_items + 1
    for k, shift in enumerate(cfg.following_periods, start=1):
        start, end = cfg.period_window(k)
        ids = (f"i{first_code}", f"i{first_code + shift.new_items - 1}") if shift.new_items else None
        summaries.append(
            PeriodSummary(start=start, end=end, events=period_events[k], new_items=shift.new_items, new_item_ids=ids)
        )
        first_code += shift.new_items
    return GenerationSummary(
        files=files,
        events=events,
        users=cfg.n_users,
        items=cfg.n_items,
        noise=noise,
        seconds=round(time.perf_counter() - started, 3),
        periods=summaries,
    )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

_CLI_FIELDS: dict[str, tuple[str, type]] = {
    "users": ("n_users", int),
    "items": ("n_items", int),
    "categories": ("n_categories", int),
    "events_per_user": ("events_per_user_mean", float),
    "seed": ("seed", int),
    "format": ("output_format", str),
    "chunk_users": ("chunk_users", int),
    "workers": ("workers", int),
    "bot_user_rate": ("bot_user_rate", float),
    "duplicate_rate": ("duplicate_rate", float),
    "malformed_rate": ("malformed_rate", float),
    "null_id_rate": ("null_id_rate", float),
    "unknown_type_rate": ("unknown_type_rate", float),
    "future_ts_rate": ("future_ts_rate", float),
    "pattern_strength": ("pattern_strength", float),
}
# Options of one following period (PeriodShift fields); --following-days alone adds an unshifted one.
_PERIOD_FIELDS: dict[str, tuple[str, type]] = {
    "following_days": ("days", int),
    "new_items": ("new_items", int),
    "new_item_share": ("new_item_share", float),
    "device_mix": ("device_mix", str),
    "category_rotation": ("category_rotation", float),
    "popularity_rotation": ("popularity_rotation", float),
    "activity": ("activity", float),
}


def _device_mix(text: str) -> dict[str, float]:
    """`mobile=0.7,desktop=0.3` -> {"mobile": 0.7, "desktop": 0.3}."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--device-mix expects device=weight pairs separated by commas, got {part!r}") from None
        if not sep or not name.strip():
            raise ValueError(f"--device-mix expects device=weight pairs separated by commas, got {part!r}")
    return mix


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """DEFAULT_CONFIG with the options given on the command line (or in --config JSON) applied."""
    base = DEFAULT_CONFIG.model_dump()
    if args.config:
        base.update(SyntheticConfig.model_validate_json(Path(args.config).read_text()).model_dump())
    updates = {field: getattr(args, opt) for opt, (field, _) in _CLI_FIELDS.items() if getattr(args, opt) is not None}
    if args.items is not None and args.categories is None and not args.config:
        # Keep the default items per category when only the catalogue size is given.
        updates["n_categories"] = max(1, round(args.items * DEFAULT_CONFIG.n_categories / DEFAULT_CONFIG.n_items))
    if updates.get("output_format") == "parquet" and args.malformed_rate is None:
        updates["malformed_rate"] = 0.0  # malformed rows exist only in CSV
    shift = {field: getattr(args, opt) for opt, (field, _) in _PERIOD_FIELDS.items() if getattr(args, opt) is not None}
    if shift:
        if "device_mix" in shift:
            shift["device_mix"] = _device_mix(shift["device_mix"])
        updates["following_periods"] = [*base.get("following_periods", []), PeriodShift.model_validate(shift).model_dump()]
    return SyntheticConfig.model_validate({**base, **updates})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-generate",
        description="Write a synthetic e-commerce event log (chunk files in the canonical schema).",
    )
    parser.add_argument("--out", type=Path, required=True, help="Output directory (its chunk files are replaced).")
    parser.add_argument("--config", type=str, default=None, help="JSON file with a full SyntheticConfig.")
    for opt, (field, kind) in _CLI_FIELDS.items():
        help_text = SyntheticConfig.model_fields[field].description or field
        flag = "--" + opt.replace("_", "-")
        if opt == "format":
            parser.add_argument(flag, dest=opt, choices=["csv", "parquet"], default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=opt, type=kind, default=None, help=f"{help_text} (default: DEFAULT_CONFIG)")
    period = parser.add_argument_group(
        "following period", "Adds one period after the window (after those of --config); any of these options adds it."
    )
    for opt, (field, kind) in _PERIOD_FIELDS.items():
        default = PeriodShift.model_fields[field].default
        help_text = f"{PeriodShift.model_fields[field].description} (default: {default})"
        if opt == "device_mix":
            help_text = "Primary-device mix of every segment in the period, e.g. mobile=0.8,desktop=0.2."
        period.add_argument("--" + opt.replace("_", "-"), dest=opt, type=kind, default=None, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # pydantic's ValidationError is a ValueError: name the bad option, no traceback
        sys.exit(f"recsys-generate: invalid configuration:\n{err}")
    total_chunks = cfg.n_chunks * (1 + len(cfg.following_periods))
    with tqdm(total=total_chunks, unit="chunk", desc="generating", file=sys.stderr) as bar:
        rows_done = 0

        def advance(rows: int) -> None:
            nonlocal rows_done
            rows_done += rows
            bar.set_postfix(events=f"{rows_done:,}")
            bar.update(1)

        summary = generate_events(args.out, cfg, progress=advance)
    rate = summary.events / max(summary.seconds, 1e-9)
    print(
        f"wrote {summary.events:,} events of {summary.users:,} users in {len(summary.files)} files "
        f"to {args.out} in {summary.seconds:.1f}s ({rate:,.0f} events/s); noise: {summary.noise}"
    )
    for k, period in enumerate(summary.periods, start=1):
        new = f", new items {period.new_item_ids[0]}..{period.new_item_ids[1]}" if period.new_item_ids else ""
        print(f"following period {k}: {period.start} .. {period.end}, {period.events:,} events{new}")


__all__ = [
    "DEFAULT_CONFIG",
    "NOISE_KINDS",
    "UNKNOWN_EVENT_TYPES",
    "DeviceProfile",
    "GenerationSummary",
    "PeriodShift",
    "PeriodSummary",
    "SegmentProfile",
    "SyntheticConfig",
    "chunk_file_name",
    "config_from_args",
    "generate_events",
    "main",
]

if __name__ == "__main__":
    main()
