"""The answer cache: whole answers per (user, request variant), bounded in bytes over all of them.

A cachetools `TTLCache` whose `maxsize` is a byte budget (`RECSYS_CACHE_MAX_BYTES`) and whose
`getsizeof` is each entry's estimated size, computed once when the entry is made: the answer's own
objects (item ids are the bundle's strings, shared, not counted), the key (user id, variant) and
what the TTLCache keeps per key. One entry per (user, variant), so neither many users nor many
variants of one user can grow it past the budget; least recently used entries go first.

Answers of users the feature store does not know (the popularity fallback, the same for all of
them in one variant) are kept once per variant under a shared key; per user only a marker (its
stamp) says "unknown in this variant", so a flood of random ids costs a marker each, not an answer.

Staleness: every entry holds the user's invalidation stamp (invalidation.SharedStamps, bumped by an
event on any worker of the host) from when it was computed; an entry whose stamp differs is dropped
on read.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from cachetools import TTLCache

from recsys_serving.invalidation import SharedStamps
from recsys_serving.schemas import MODEL_REASON, RecommendResponse, ScoredItem

Variant = tuple[object, ...]

# What TTLCache keeps per key beside the value: slots in its data, size and link maps, its TTL link
# object and the size int. An upper estimate; tests/test_answer_cache.py holds the whole entry
# estimate against tracemalloc's count.
CACHE_KEY_OVERHEAD = 320


class _Unknown:
    """A context value neither the model nor the popularity lists know (all such values give the
    same answer, so they share one variant)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN_VALUE = _Unknown()
_SHARED = None  # the user slot of shared entries' keys; user ids are non-empty strings


@dataclass(frozen=True, slots=True, eq=False)
class Answer:
    """A full ranked list (up to MAX_K items), sliced to k per request; what the cache holds.
    Compact: item ids (the bundle's own strings) and scores in a float array."""

    item_ids: tuple[str, ...]
    scores: array  # array("d"), parallel to item_ids
    model_version: str | None
    reason: str

    @classmethod
    def of(cls, items: Iterable[tuple[str, float]], model_version: str | None, reason: str) -> "Answer":
        pairs = list(items)
        return cls(
            item_ids=tuple(i for i, _ in pairs),
            scores=array("d", (s for _, s in pairs)),
            model_version=model_version,
            reason=reason,
        )

    @property
    def fallback(self) -> bool:
        return self.reason != MODEL_REASON

    @property
    def items(self) -> list[tuple[str, float]]:
        return list(zip(self.item_ids, self.scores))

    def response(self, k: int, cached: bool, target: str | None = None) -> RecommendResponse:
        return RecommendResponse(
            items=[ScoredItem(item_id=i, score=s) for i, s in zip(self.item_ids[:k], self.scores[:k])],
            model_version=self.model_version,
            fallback=self.fallback,
            reason=self.reason,  # type: ignore[arg-type]  # a FallbackReason value or "model", validated
            target=target,  # type: ignore[arg-type]  # a TargetName, validated
            cached=cached,
        )

    def nbytes(self) -> int:
        """The answer's own memory (its item id strings belong to the bundle)."""
        return sys.getsizeof(self) + sys.getsizeof(self.item_ids) + sys.getsizeof(self.scores)


@dataclass(frozen=True, slots=True, eq=False)
class _Entry:
    stamp: int  # the user's invalidation stamp when computed (0 for shared entries)
    answer: Answer | None  # None: a marker, the answer is under the variant's shared key
    nbytes: int


def _key_nbytes(user_id: str | None, variant: Variant) -> int:
    strings = sum(sys.getsizeof(v) for v in variant if isinstance(v, str))
    return sys.getsizeof((user_id, variant)) + sys.getsizeof(variant) + sys.getsizeof(user_id) + strings


_ENTRY_NBYTES = sys.getsizeof(_Entry(2**31, None, 0)) + sys.getsizeof(2**31)


class AnswerCache:
    """Thread-safe (cachetools caches are not: every access holds one lock)."""

    def __init__(self, max_bytes: int, ttl_s: float, stamps: SharedStamps) -> None:
        self.max_bytes = max_bytes
        self._cache: TTLCache[tuple[str | None, Variant], _Entry] = TTLCache(
            maxsize=max_bytes, ttl=ttl_s, getsizeof=lambda entry: entry.nbytes
        )
        self._lock = threading.Lock()
        self._stamps = stamps

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, user_id: str, variant: Variant) -> tuple[Answer | None, int]:
        """(cached answer or None, the user's current stamp to store a new answer under)."""
        stamp = self._stamps.get(user_id)
        if not self.enabled:
            return None, stamp
        key = (user_id, variant)
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None, stamp
            if entry.stamp != stamp:  # an event since (possibly on another worker): stale
                self._cache.pop(key, None)
                return None, stamp
            if entry.answer is not None:
                return entry.answer, stamp
            shared = self._cache.get((_SHARED, variant))
            return (shared.answer if shared is not None else None), stamp

    def put(self, user_id: str, variant: Variant, answer: Answer, stamp: int, shared: bool = False) -> None:
        """`shared`: the answer is the same for every user the store does not know (unknown_user)."""
        if not self.enabled:
            return
        with self._lock:
            if self._stamps.get(user_id) != stamp:
                return  # an event arrived while this answer was computed: it is already stale
            try:
                if shared:
                    shared_key = (_SHARED, variant)
                    if self._cache.get(shared_key) is None:
                        size = _ENTRY_NBYTES + answer.nbytes() + _key_nbytes(_SHARED, variant) + CACHE_KEY_OVERHEAD
                        self._cache[shared_key] = _Entry(0, answer, size)
                    size = _ENTRY_NBYTES + _key_nbytes(user_id, variant) + CACHE_KEY_OVERHEAD
                    self._cache[(user_id, variant)] = _Entry(stamp, None, size)
                else:
                    size = _ENTRY_NBYTES + answer.nbytes() + _key_nbytes(user_id, variant) + CACHE_KEY_OVERHEAD
                    self._cache[(user_id, variant)] = _Entry(stamp, answer, size)
            except ValueError:  # one entry larger than the whole budget: not cached
                return

    def invalidate(self, user_id: str) -> None:
        """Bump the user's stamp on every worker of the host: all its entries here and there are stale
        (they leave this cache when read, by their TTL, or when the budget needs the room)."""
        with self._lock:
            self._stamps.bump(user_id)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "entries": float(len(self._cache)),
                "bytes": float(self._cache.currsize),
                "max_bytes": float(self.max_bytes),
            }
