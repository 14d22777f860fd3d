"""The durable log of events received by POST /events; the next training run ingests it.

Append-only JSON lines: the event's id (`event_id`, the client's or one the service assigned) and
the canonical event schema (recsys_serving.contract.CANONICAL_COLUMNS), one file per UTC day and
process: ``<dir>/served-<YYYYMMDD>-<host>-<pid>.jsonl``. One file per process means concurrent
workers never interleave bytes within a line. A batch of records is written with one ``write`` on
an O_APPEND descriptor and ``fsync``-ed before the API answers, so an acknowledged event survives a
crash; one fsync per batch, not per event, is what makes events cheap under load (group commit).

Idempotency: `event_ids.sqlite` beside the files indexes the ids logged (by every worker of the
host: a lock on `event_ids.lock` serializes their batches), so a retried event is logged once. The log is
the truth and the index is derived from it: the index is committed after the log's fsync, and on
start-up the lines it lacks (a crash between the two) are indexed from the files. The ingest stage
(``recsys_assets.data.served_events.append_served_events``) also keeps one line per event id, for
logs written on different hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from recsys_serving.contract import CANONICAL_COLUMNS

CANONICAL_FIELDS: tuple[str, ...] = tuple(CANONICAL_COLUMNS)
EVENT_ID_FIELD = "event_id"
LOGGED_FIELDS: tuple[str, ...] = (EVENT_ID_FIELD, *CANONICAL_FIELDS)
LOG_GLOB = "served-*.jsonl"
INDEX_FILE = "event_ids.sqlite"
LOCK_FILE = "event_ids.lock"
_SQL_VARIABLES = 500  # ids per IN (...) query, below SQLite's limit on bound parameters


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
    """Thread-safe appender of record batches with their id index; a new file when the UTC day changes."""

    def __init__(self, directory: Path, id_retention: timedelta = timedelta(days=7)) -> None:
        """Opens nothing yet: a log that cannot be written (a missing volume) refuses events, with the
        reason, until it can, instead of keeping the service from starting."""
        self.directory = Path(directory)
        self.id_retention = id_retention
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: str | None = None
        self._path: Path | None = None
        self._host = socket.gethostname().split(".")[0] or "host"
        self._index: sqlite3.Connection | None = None
        self._host_lock: int | None = None
        self._pruned_at = 0.0

    def _open_host_lock(self) -> int:
        if self._host_lock is not None and os.fstat(self._host_lock).st_nlink > 0:
            return self._host_lock
        if self._host_lock is not None:  # the volume went away and came back: lock the new file
            os.close(self._host_lock)
            self._host_lock = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._host_lock = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        return self._host_lock

    def _open_index(self) -> sqlite3.Connection:
        if self._index is not None and not (self.directory / INDEX_FILE).exists():  # the volume went away
            self._index.close()
            self._index = None
        if self._index is not None:
            return self._index
        self.directory.mkdir(parents=True, exist_ok=True)
        # autocommit mode: the transactions are the explicit BEGIN IMMEDIATE ... COMMIT of _transaction
        index = sqlite3.connect(self.directory / INDEX_FILE, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            index.execute("PRAGMA journal_mode=WAL")  # the log is the durable copy; see the module docstring
            index.execute("PRAGMA synchronous=NORMAL")
            index.executescript(
                """CREATE TABLE IF NOT EXISTS event_ids (event_id TEXT PRIMARY KEY, logged_at REAL NOT NULL);
                   CREATE INDEX IF NOT EXISTS event_ids_by_time ON event_ids (logged_at);
                   CREATE TABLE IF NOT EXISTS indexed_files (name TEXT PRIMARY KEY, bytes INTEGER NOT NULL);"""
            )
            self._index = index
            self._transaction(self._reconcile)
        except BaseException:
            self._index = None
            index.close()
            raise
        return index

    @property
    def path(self) -> Path | None:
        return self._path

    def _open_for(self, day: str) -> int:
        if self._fd is not None and self._day == day and os.fstat(self._fd).st_nlink > 0:
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
        elif _ends_mid_line(path):  # a reused pid's file cut short by a crash: end the torn line
            os.write(self._fd, b"\n")
        self._day, self._path = day, path
        return self._fd

    def _transaction(self, body: Any) -> Any:
        """`body()` inside one write transaction of the index (SQLite's lock: one worker at a time)."""
        assert self._index is not None
        self._index.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            self._index.execute("ROLLBACK")
            raise
        self._index.execute("COMMIT")
        return result

    def _known(self, ids: Sequence[str]) -> set[str]:
        assert self._index is not None
        known: set[str] = set()
        for start in range(0, len(ids), _SQL_VARIABLES):
            chunk = ids[start : start + _SQL_VARIABLES]
            rows = self._index.execute(
                f"SELECT event_id FROM event_ids WHERE event_id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            known.update(row[0] for row in rows)
        return known

    def _remember(self, ids: Sequence[str], path: Path, size: int) -> None:
        assert self._index is not None
        now = time.time()
        self._index.executemany(
            "INSERT OR IGNORE INTO event_ids (event_id, logged_at) VALUES (?, ?)", [(i, now) for i in ids]
        )
        self._index.execute(
            "INSERT INTO indexed_files (name, bytes) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET bytes = excluded.bytes",
            (path.name, size),
        )

    def _reconcile(self) -> None:
        """Index the lines of every log file past what the index has (a crash after a log fsync)."""
        assert self._index is not None
        indexed = dict(self._index.execute("SELECT name, bytes FROM indexed_files").fetchall())
        for path in sorted(self.directory.glob(LOG_GLOB)):
            done = indexed.get(path.name, 0)
            size = path.stat().st_size
            if size <= done:
                continue
            with open(path, "rb") as f:
                f.seek(done)
                tail = f.read(size - done)
            complete = tail[: tail.rfind(b"\n") + 1]  # a torn last line is not an event
            ids = []
            for line in complete.splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    event_id = json.loads(line).get(EVENT_ID_FIELD)
                    if isinstance(event_id, str):
                        ids.append(event_id)
            self._remember(ids, path, done + len(complete))
        self._prune()

    def _prune(self) -> None:
        """Forget ids older than `id_retention` (at most hourly): a retry comes within minutes, and the
        ingest stage keeps one line per id whatever the index forgot."""
        assert self._index is not None
        now = time.time()
        if now - self._pruned_at >= 3600:
            self._index.execute("DELETE FROM event_ids WHERE logged_at < ?", (now - self.id_retention.total_seconds(),))
            self._pruned_at = now

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One batch at a time on this host's log, across worker processes (the index's write lock), so
        that what a batch does inside (read the users' sequences, log, update them) is atomic per host;
        committed on exit. Raises OSError when the log or its index cannot be opened."""
        with self._lock:
            # A blocking flock, not SQLite's lock alone: a worker that finds SQLite's lock taken polls
            # it with sleeps of 1 to 100 ms, where a flock waiter wakes as soon as the lock is free.
            host_lock = self._open_host_lock()
            fcntl.flock(host_lock, fcntl.LOCK_EX)
            try:
                try:
                    index = self._open_index()
                    index.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:  # the index's disk: as unwritable as the log's for the client
                    raise OSError(f"event id index: {exc}") from exc
                try:
                    yield
                except BaseException:
                    index.execute("ROLLBACK")
                    raise
                try:
                    index.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise OSError(f"event id index: {exc}") from exc
            finally:
                fcntl.flock(host_lock, fcntl.LOCK_UN)

    def append_new(self, records: Sequence[dict[str, Any]]) -> list[bool]:
        """Write the records whose event id was never logged, durably, in one write and one fsync
        (inside `exclusive()`, else in a transaction of its own); returns per record whether it was
        written (False: a duplicate of a logged one or of an earlier record of the batch). Raises
        OSError when the log cannot be written (nothing acknowledged)."""
        if not self._lock.locked():
            with self.exclusive():
                return self.append_new(records)
        for record in records:
            missing = [f for f in LOGGED_FIELDS if f not in record]
            if missing:
                raise ValueError(f"event record lacks field(s) {missing}")
        ids = [str(r[EVENT_ID_FIELD]) for r in records]
        try:
            known = self._known(list(dict.fromkeys(ids)))
        except sqlite3.Error as exc:
            raise OSError(f"event id index: {exc}") from exc
        fresh: list[bool] = []
        lines: list[bytes] = []
        for event_id, record in zip(ids, records):
            new = event_id not in known
            fresh.append(new)
            if new:
                known.add(event_id)
                lines.append((json.dumps({f: record[f] for f in LOGGED_FIELDS}, ensure_ascii=False) + "\n").encode())
        if lines:
            fd = self._open_for(datetime.now(timezone.utc).strftime("%Y%m%d"))
            view = memoryview(b"".join(lines))
            while view:  # a regular-file write is rarely short, but never assume
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            assert self._path is not None
            try:
                self._remember([i for i, new in zip(ids, fresh) if new], self._path, os.fstat(fd).st_size)
                self._prune()
            except sqlite3.Error as exc:  # logged but not indexed: the next start-up indexes the lines
                raise OSError(f"event id index: {exc}") from exc
        return fresh

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._index is not None:
                self._index.close()
                self._index = None
            if self._host_lock is not None:
                os.close(self._host_lock)
                self._host_lock = None


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
