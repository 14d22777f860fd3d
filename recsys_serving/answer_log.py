"""The answer log: one JSON line per recommendation the service gave, for prediction-drift reports.

Each line holds exactly `recsys_serving.contract.ANSWER_LOG_FIELDS`::

    {"ts": "2025-01-31T12:00:00.123+00:00", "user_id": "u1", "items": ["i3", "i9"],
     "model_version": "20250131T110000Z-1a2b3c4d", "fallback_reason": null}

Files: ``<dir>/answers-<host>-<pid>.jsonl``, one per process (workers never interleave bytes),
rotated by size with the standard library's RotatingFileHandler: the file written now plus
``answers-<host>-<pid>.<n>.jsonl`` for n = 1 (newest) .. keep-1, so every file ends in `.jsonl`
and a reader globs ``*.jsonl``. The directory as a whole is capped too (`max_total_bytes`): files
of earlier processes, left by restarts, are deleted oldest first at start and at each rotation.

Off the request path: a request only puts a tuple on a bounded queue (`put_nowait`); a
QueueListener thread encodes the JSON and writes. Logging never fails or slows a request: a full
queue or a failing write (disk full, directory gone) drops the answer and counts it (`on_drop`,
the service's `recsys_answer_log_dropped_total{reason}`); writing resumes once the disk is back.
A write cut by a full disk can leave one partial line: readers skip malformed lines.
"""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import os
import queue
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, cast

from recsys_serving.contract import ANSWER_LOG_FIELDS

logger = logging.getLogger("recsys_serving")

FILE_PREFIX = "answers"
DEFAULT_QUEUE_SIZE = 10_000  # answers waiting for the writer thread; beyond it they are dropped
ERROR_LOG_INTERVAL_S = 60.0  # at most one warning a minute while the log cannot be written
_INSTANCES = itertools.count(1)  # more than one log per process (tests, scripts) gets its own file

# A queued answer: (time.time(), user_id, item ids, model_version, fallback_reason).
QueuedAnswer = tuple[float, str, Sequence[str], str | None, str | None]


def _rotated_name(default: str) -> str:
    """RotatingFileHandler's `<file>.jsonl.<n>` -> `<file>.<n>.jsonl` (still matched by *.jsonl)."""
    stem, _, n = default.rpartition(".")
    return f"{stem.removesuffix('.jsonl')}.{n}.jsonl"


def answer_line(item: QueuedAnswer) -> str:
    ts, user_id, items, model_version, fallback_reason = item
    values = (
        datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds"),
        user_id,
        list(items),
        model_version,
        fallback_reason,
    )
    return json.dumps(dict(zip(ANSWER_LOG_FIELDS, values)), ensure_ascii=False)


def prune_directory(directory: Path, max_total_bytes: int, spare: Path | None = None) -> list[Path]:
    """Delete the oldest answer files of `directory` until they hold at most `max_total_bytes`.

    Rotation bounds one process's files; this bounds the directory across restarts, whose files
    carry other pids. Oldest first by modification time, so the files live workers write now go
    last; `spare` (this process's current file) is never deleted."""
    try:
        files = [(f.stat().st_mtime, f.stat().st_size, f) for f in directory.glob(f"{FILE_PREFIX}-*.jsonl")]
    except OSError:  # the directory went away or cannot be read: nothing to prune
        return []
    files.sort()
    total = sum(size for _, size, _ in files)
    deleted: list[Path] = []
    for _, size, path in files:
        if total <= max_total_bytes:
            break
        if spare is not None and path == spare:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """Rotation as the standard library does it; errors are counted instead of printed."""

    def __init__(self, path: Path, max_bytes: int, keep: int, on_error: Callable[[BaseException | None], None],
                 max_total_bytes: int | None = None) -> None:
        # delay: the file is opened at the first answer, so an unwritable directory never stops start-up
        super().__init__(path, maxBytes=max_bytes, backupCount=keep - 1, encoding="utf-8", delay=True)
        self.namer = _rotated_name
        self._on_error = on_error
        self._max_total_bytes = max_total_bytes

    def doRollover(self) -> None:
        super().doRollover()
        if self._max_total_bytes is not None:
            prune_directory(Path(self.baseFilename).parent, self._max_total_bytes, spare=Path(self.baseFilename))

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)  # recreated if it went away
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        # The stream may hold part of a line: drop it; the next answer reopens the file.
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is not None:
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self._on_error(sys.exc_info()[1])


class _Listener(logging.handlers.QueueListener):
    def prepare(self, record: Any) -> logging.LogRecord:
        # On the writer thread: the request path only queued a tuple.
        return logging.makeLogRecord({"msg": answer_line(record), "levelno": logging.INFO})

    def handle(self, record: Any) -> None:
        try:
            super().handle(record)
        except Exception:  # noqa: BLE001 - the writer thread must outlive any bad record
            logger.exception("answer log: a record could not be written")

    def stop(self) -> None:
        self.stop_within(10.0)

    def stop_within(self, timeout: float) -> bool:
        """Write what is queued, then end the thread; bounded, unlike the base class's (a full queue
        or a stuck disk must not hang shutdown). False when the thread is still stuck in a write."""
        if self._thread is None:
            return True
        try:
            cast("queue.Queue[Any]", self.queue).put(None, timeout=timeout)  # None: the base class's sentinel
        except queue.Full:
            pass
        self._thread.join(timeout)
        finished = not self._thread.is_alive()
        self._thread = None
        return finished


class AnswerLog:
    """Thread-safe, non-blocking appender of answers (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 64 * 1024 * 1024,
        keep: int = 8,
        on_drop: Callable[[str], None] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_total_bytes: int | None = None,
    ) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (the file written and at least one rotated), got {keep}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.directory = Path(directory)
        host = socket.gethostname().split(".")[0] or "host"
        instance = next(_INSTANCES)
        suffix = "" if instance == 1 else f"-{instance}"
        self.path = self.directory / f"{FILE_PREFIX}-{host}-{os.getpid()}{suffix}.jsonl"
        self._on_drop = on_drop or (lambda reason: None)
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._errors = 0
        self._warned_at = -ERROR_LOG_INTERVAL_S
        self._closed = False
        if max_total_bytes is not None:  # files of earlier processes (restarts) count too
            prune_directory(self.directory, max_total_bytes, spare=self.path)
        self._handler = _RotatingFile(self.path, max_bytes, keep, self._write_failed, max_total_bytes)
        self._listener = _Listener(self._queue, self._handler)
        self._listener.start()

    @property
    def queued(self) -> int:
        """Answers waiting for the writer thread."""
        return self._queue.qsize()

    @property
    def errors(self) -> int:
        """Answers whose write failed so far."""
        return self._errors

    def record(
        self, user_id: str, items: Sequence[str], model_version: str | None, fallback_reason: str | None
    ) -> None:
        """Queue one answer; never blocks, never raises."""
        if self._closed:
            return
        try:
            self._queue.put_nowait((time.time(), user_id, items, model_version, fallback_reason))
        except queue.Full:
            self._on_drop("queue_full")

    def _write_failed(self, exc: BaseException | None) -> None:
        self._errors += 1
        self._on_drop("write_error")
        now = time.monotonic()
        if now - self._warned_at >= ERROR_LOG_INTERVAL_S:
            self._warned_at = now
            logger.warning(
                "the answer log %s cannot be written (%s); answers are dropped until it can (%d so far)",
                self.path, exc, self._errors,
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued answer has been written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener.stop_within(10.0):  # queued answers are written first
            self._handler.close()  # (a writer stuck in a write holds the handler's lock: leave it)
