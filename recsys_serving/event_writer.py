"""The write path of POST /events: one thread per worker process that commits events in batches.

A request hands its event to the queue and waits for its receipt. The thread takes whatever has
queued up (no waiting for a batch to fill: under light load a batch is one event) and, per batch:

1. reads the users' current sequences from the online store (one read; their segment goes into the log);
2. appends the events whose id was never logged to the durable log, one write and one fsync
   (`EventLog.append_new`); a retried id is answered as a duplicate and applied nowhere;
3. appends the new events to the users' sequences with one online write (`push_events`);
4. invalidates those users' cached answers, then resolves every request of the batch.

So the acknowledgement still follows the fsync, but one fsync, one store read and one store write
serve the whole batch, off the event loop, on a store connection of the writer's own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from recsys_serving.event_log import EVENT_ID_FIELD, EventLog
from recsys_serving.feature_client import FeatureStoreClient, FeatureStoreUnavailable, PushedEvent, UserSequence

logger = logging.getLogger("recsys_serving")

MAX_BATCH = 256  # events per commit: bounds one batch's latency and the size of its SQL statements


class EventLogUnavailable(RuntimeError):
    """The durable event log cannot be written; the event is not accepted (HTTP 503)."""


class EventQueueFull(RuntimeError):
    """More events are waiting than the writer may queue; the client retries later (HTTP 503)."""


@dataclass(frozen=True)
class PendingEvent:
    event_id: str
    record: dict[str, Any]  # canonical record without the segment, which the writer reads from the store
    push: PushedEvent


@dataclass(frozen=True)
class EventReceipt:
    event_id: str
    duplicate: bool  # an event with this id was logged before: nothing was applied again
    feature_store_updated: bool
    sequence_length: int | None
    store_error: str | None  # why the online store was not updated (the full text; responses show a code)


class EventWriter:
    def __init__(
        self,
        event_log: EventLog,
        client: Callable[[], FeatureStoreClient],
        on_applied: Callable[[list[str]], None],
        max_queue: int,
    ) -> None:
        """`client()`: the writer's feature store client (raises FeatureStoreUnavailable while there is
        none); `on_applied(user_ids)`: called after the online write, to invalidate cached answers."""
        self.event_log = event_log
        self._client = client
        self._on_applied = on_applied
        self._queue: queue.Queue[tuple[PendingEvent, Future[EventReceipt]] | None] = queue.Queue(max_queue)
        self.log_error: str | None = None  # the last failure to write the log; None after a success
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="recsys-event-writer", daemon=True)
        self._thread.start()

    def submit(self, event: PendingEvent) -> Future[EventReceipt]:
        """Queue one event; the future gets its receipt, or EventLogUnavailable. Raises EventQueueFull."""
        if self._closed:
            raise EventLogUnavailable("the service is shutting down")
        future: Future[EventReceipt] = Future()
        try:
            self._queue.put_nowait((event, future))
        except queue.Full:
            raise EventQueueFull(f"{self._queue.maxsize} events are waiting to be logged") from None
        return future

    def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) == MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._commit(batch)
                except Exception as exc:  # noqa: BLE001 - the thread must outlive any one batch
                    logger.exception("event batch failed")
                    for _, future in batch:
                        _settle(future, error=EventLogUnavailable(f"{type(exc).__name__}"))
            if item is None:
                return

    def _commit(self, batch: list[tuple[PendingEvent, Future[EventReceipt]]]) -> None:
        events = [event for event, _ in batch]
        try:
            with self.event_log.exclusive():  # read, log, update: one batch of this host at a time
                fresh, sequences, store_error = self._log_and_apply(events)
        except OSError as exc:  # disk full, read-only volume: nothing of the batch is acknowledged
            self.log_error = f"{type(exc).__name__}: {exc}"
            logger.error("the event log %s cannot be written: %s", self.event_log.directory, exc)
            for _, future in batch:
                _settle(future, error=EventLogUnavailable("the event log cannot be written"))
            return
        self.log_error = None
        new = [event.push for event, is_new in zip(events, fresh) if is_new]
        if new:
            self._on_applied(list(dict.fromkeys(e.user_id for e in new)))
        if store_error is not None and new:
            logger.warning("%d event(s) logged but the feature store was not updated: %s", len(new), store_error)

        applied = iter(sequences)
        for (event, future), is_new in zip(batch, fresh):
            sequence = next(applied, None) if is_new else None
            _settle(
                future,
                EventReceipt(
                    event_id=event.event_id,
                    duplicate=not is_new,
                    feature_store_updated=sequence is not None,
                    sequence_length=len(sequence) if sequence is not None else None,
                    store_error=store_error if is_new else None,
                ),
            )

    def _log_and_apply(self, events: list[PendingEvent]) -> tuple[list[bool], list[UserSequence], str | None]:
        """-> (per event: newly logged, the sequences after the new events, why the store was not updated)."""
        store_error: str | None = None
        current: dict[str, UserSequence | None] = {}
        client: FeatureStoreClient | None = None
        try:
            client = self._client()
            users = list(dict.fromkeys(e.push.user_id for e in events))
            current = dict(zip(users, client.get_user_sequences(users)))
        except FeatureStoreUnavailable as exc:
            store_error = str(exc)
        records = [
            {
                EVENT_ID_FIELD: e.event_id,
                **e.record,
                "segment": stored.segment if (stored := current.get(e.push.user_id)) else None,
            }
            for e in events
        ]
        fresh = self.event_log.append_new(records)
        new = [e.push for e, is_new in zip(events, fresh) if is_new]
        sequences: list[UserSequence] = []
        if new and store_error is None and client is not None:
            try:
                sequences = client.push_events(new, current=current)
            except Exception as exc:  # noqa: BLE001 - logged already: whatever the store raised, commit the ids
                store_error = f"{type(exc).__name__}: {exc}"
        return fresh, sequences, store_error


def _settle(future: Future[EventReceipt], result: EventReceipt | None = None, error: Exception | None = None) -> None:
    """Resolve a request's future unless it was cancelled (the client went away; the event stands)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass
