"""The durable event log and its id index: each event id logged once, across processes and crashes."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from recsys_serving.event_log import EVENT_ID_FIELD, EventLog, canonical_record


def _record(event_id: str, item: str = "i1") -> dict:
    return {EVENT_ID_FIELD: event_id, **canonical_record("u1", item, "view", datetime.now(timezone.utc))}


def _lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("served-*.jsonl")) for line in f.read_text().splitlines()]


def test_duplicates_in_a_batch_and_across_batches_are_logged_once(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    assert log.append_new([_record("a"), _record("b"), _record("a", "i2")]) == [True, True, False]
    assert log.append_new([_record("b"), _record("c")]) == [False, True]
    log.close()
    assert [(r[EVENT_ID_FIELD], r["item_id"]) for r in _lines(tmp_path)] == [("a", "i1"), ("b", "i1"), ("c", "i1")]
    reopened = EventLog(tmp_path)  # a restart remembers
    assert reopened.append_new([_record("a"), _record("d")]) == [False, True]
    reopened.close()


def _worker(directory: str, start: int, results: "multiprocessing.Queue[list[bool]]") -> None:
    log = EventLog(Path(directory))
    fresh: list[bool] = []
    for n in range(start, start + 200):  # overlapping ranges: ids 100..199 are sent by both
        fresh += log.append_new([_record(f"e{n}")])
    log.close()
    results.put(fresh)


def test_two_processes_share_the_index(tmp_path: Path) -> None:
    results: multiprocessing.Queue[list[bool]] = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_worker, args=(str(tmp_path), s, results)) for s in (0, 100)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sum(map(sum, outcomes)) == 300  # 300 distinct ids, each logged by exactly one of them
    ids = [r[EVENT_ID_FIELD] for r in _lines(tmp_path)]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert len(list(tmp_path.glob("served-*.jsonl"))) == 2  # one file per process


def test_lines_logged_but_not_indexed_are_indexed_at_start(tmp_path: Path) -> None:
    """A crash between the log's fsync and the index's commit: the next start indexes those lines, and
    a torn last line is ended before the file is appended to again."""
    log = EventLog(tmp_path)
    log.append_new([_record("a")])
    path = log.path
    log.close()
    assert path is not None
    with open(path, "a") as f:  # what the crashed process had fsync-ed without indexing, then a torn line
        f.write(json.dumps(_record("b")) + "\n" + '{"event_id": "c", "user')
    restarted = EventLog(tmp_path)
    assert restarted.append_new([_record("b"), _record("c")]) == [False, True]
    restarted.close()
    if restarted.path == path:  # the same pid: the torn line was ended first
        assert path.read_text().count("\n") == 4
    ids = []
    for f in tmp_path.glob("served-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                ids.append(json.loads(line)[EVENT_ID_FIELD])
            except json.JSONDecodeError:
                continue  # the torn line
    assert sorted(ids) == ["a", "b", "c"]


def test_an_unwritable_directory_refuses_and_recovers(tmp_path: Path) -> None:
    target = tmp_path / "served"
    target.write_text("not a directory")
    log = EventLog(target)  # starting never fails
    with pytest.raises(OSError):
        log.append_new([_record("a")])
    os.remove(target)
    assert log.append_new([_record("a")]) == [True]
    log.close()
