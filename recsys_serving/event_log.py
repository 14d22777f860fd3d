"""The durable log of events received by POST /events; the next training run ingests it.

Append-only JSON lines in the canonical event schema (recsys_serving.contract.CANONICAL_COLUMNS),
one file per UTC day and process: ``<dir>/served-<YYYYMMDD>-<host>-<pid>.jsonl``. One file per
process means concurrent workers never interleave bytes within a line. Every record is written
with a single ``write`` on an O_APPEND descriptor and ``fsync``-ed before the API answers, so an
acknowledged event survives a crash (fsync per write: events are few next to recommendations, and
a 2xx means "on disk"). The ingest stage reads the files with
``recsys_assets.data.served_events.append_served_events`` (DuckDB ``read_json``, newline-delimited).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from recsys_serving.contract import CANONICAL_COLUMNS

CANONICAL_FIELDS: tuple[str, ...] = tuple(CANONICAL_COLUMNS)


def canonical_record(
    user_id: str,
    item_id: str,
    event_type: str,
    ts: datetime,
    session_id: str | None = None,
    category: str | None = None,
    device: str | None = None,
    segment: str | None = None,
    price: float | None = None,
) -> dict[str, Any]:
    """One event in the canonical schema; `ts` is written as naive UTC ISO-8601 (a DuckDB TIMESTAMP)."""
    utc = ts.astimezone(timezone.utc) if ts.tzinfo is not None else ts
    return {
        "user_id": user_id,
        "item_id": item_id,
        "event_type": event_type,
        "ts": utc.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"),
        "session_id": session_id,
        "category": category,
        "device": device,
        "segment": segment,
        "price": price,
    }


class EventLog:
    """Thread-safe appender; reopens a new file when the UTC day changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: str | None = None
        self._path: Path | None = None
        self._host = socket.gethostname().split(".")[0] or "host"

    @property
    def path(self) -> Path | None:
        return self._path

    def _open_for(self, day: str) -> int:
        if self._fd is not None and self._day == day:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
        path = self.directory / f"served-{day}-{self._host}-{os.getpid()}.jsonl"
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # the new directory entry must be durable too, not only the bytes
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._day, self._path = day, path
        return self._fd

    def append(self, record: dict[str, Any]) -> Path:
        """Write one record durably; returns the file it went to."""
        missing = [f for f in CANONICAL_FIELDS if f not in record]
        if missing:
            raise ValueError(f"event record lacks canonical field(s) {missing}")
        line = (json.dumps({f: record[f] for f in CANONICAL_FIELDS}, ensure_ascii=False) + "\n").encode()
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        with self._lock:
            fd = self._open_for(day)
            view = memoryview(line)
            while view:  # a regular-file write is rarely short, but never assume
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            assert self._path is not None
            return self._path

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
