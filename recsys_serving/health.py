"""Health of the service's dependencies, checked off the request path.

`DependencyProbe` runs a check (the online store's cheap read) in a thread of its own and waits for
it at most `timeout_s`: a store that hangs is reported down after the timeout while the check may
still be running, and no second check starts until that one returns, so a hanging store costs one
thread, not one per probe. The Recommender calls `probe()` from its health thread once per
`RECSYS_HEALTH_PROBE_INTERVAL_S`; /healthz only reads `latest`, so no number of health requests
turns into load on the store, and the event loop never waits on it.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Callable

from recsys_serving.schemas import DependencyHealth

logger = logging.getLogger("recsys_serving")

# A check returns (ok, short detail for responses, full detail for the log or None).
Check = Callable[[], tuple[bool, str, str | None]]


def dependency(ok: bool, detail: str, checked_at: datetime | None = None) -> DependencyHealth:
    return DependencyHealth(
        status="ok" if ok else "down", detail=detail, checked_at=checked_at or datetime.now(timezone.utc)
    )


class DependencyProbe:
    def __init__(self, name: str, check: Check, timeout_s: float) -> None:
        self.name = name
        self._check = check
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._latest = dependency(False, "not checked yet")
        self._pending: threading.Thread | None = None  # a check that outlived its timeout

    @property
    def latest(self) -> DependencyHealth:
        with self._lock:
            return self._latest

    def probe(self, timeout_s: float | None = None) -> DependencyHealth:
        """Check once, blocking the caller (a background thread, or start-up) for at most `timeout_s`
        (default: the probe's timeout)."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        pending = self._pending
        if pending is not None and pending.is_alive():
            return self._record(False, self._late(self._timeout_s), None)
        result: list[tuple[bool, str, str | None]] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(self._check())
            except Exception as exc:  # noqa: BLE001 - a failing check is a down dependency, never a dead thread
                result.append((False, "the check failed", f"{type(exc).__name__}: {exc}"))
            finally:
                done.set()

        thread = threading.Thread(target=run, name=f"recsys-probe-{self.name}", daemon=True)
        thread.start()
        if not done.wait(timeout_s):
            self._pending = thread
            return self._record(False, self._late(timeout_s), None)
        self._pending = None
        return self._record(*result[0])

    @staticmethod
    def _late(timeout_s: float) -> str:
        return f"no answer within {timeout_s * 1000:.0f} ms"

    def _record(self, ok: bool, detail: str, log_detail: str | None) -> DependencyHealth:
        current = dependency(ok, detail)
        with self._lock:
            previous, self._latest = self._latest, current
        if previous.status != current.status or (not ok and previous.detail != detail):
            if ok:
                logger.info("%s is back: %s", self.name, detail)
            else:
                logger.warning("%s is down: %s%s", self.name, detail, f" ({log_detail})" if log_detail else "")
        return current
