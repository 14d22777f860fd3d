"""Per-user invalidation stamps shared by every worker process on a host.

Each worker keeps its own answer cache (cachetools, in process); POST /events may land on any
worker, so "invalidate this user" has to reach the others. Written by hand because cachetools has no
cross-process invalidation and a Redis round trip per request would cost more than the cache saves:
a memory-mapped array of counters indexed by a hash of the user id. An event bumps the user's
counter; a cached answer is used only while the counter still has the value it had when the answer
was computed. Two users sharing a slot only cost each other a cache miss, never a stale answer, and
two workers bumping the same slot at once still change it, which is all a reader checks.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

DEFAULT_SLOTS = 1 << 20  # 4 MiB of uint32


class SharedStamps:
    def __init__(self, path: Path, slots: int = DEFAULT_SLOTS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = slots * np.dtype(np.uint32).itemsize
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # idempotent when another worker already sized it
        finally:
            os.close(fd)
        self.path = path
        self.slots = slots
        self._counters = np.memmap(path, dtype=np.uint32, mode="r+", shape=(slots,))

    def _slot(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode("utf-8")) % self.slots

    def get(self, user_id: str) -> int:
        return int(self._counters[self._slot(user_id)])

    def bump(self, user_id: str) -> int:
        slot = self._slot(user_id)
        value = (int(self._counters[slot]) + 1) & 0xFFFFFFFF
        self._counters[slot] = value
        return value
