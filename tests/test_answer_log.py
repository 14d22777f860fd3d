"""The answer log (prediction drift's input): one line per answer with exactly the contract's fields,
bounded by size rotation, and never a failed request when it cannot be written."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import prometheus_client
import pytest
from pydantic import ValidationError

from recsys_assets.export.bundle import promote
from recsys_serving.answer_log import AnswerLog
from recsys_serving.contract import ANSWER_LOG_FIELDS, SERVED_ANSWERS_DIR
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

from test_bundle import _write, exported  # noqa: F401  (exported: the module's tiny ONNX export fixture)


def _serving(home: Path, **overrides: Any) -> tuple[Recommender, prometheus_client.CollectorRegistry]:
    """A Recommender on $RECSYS_HOME's current bundle, without a feature store (answers use recent_items)."""
    registry = prometheus_client.CollectorRegistry()
    settings = ServingSettings.from_env(feature_repo=str(home / "no_repo"), reload_interval_s=0, **overrides)
    return Recommender(settings, ServiceMetrics(registry=registry)), registry


def _promote_v1(home: Path, exported: Any) -> None:
    _write(home / "bundles", exported, "v1")
    promote(home / "bundles", "v1")


def _ask(recommender: Recommender, **body: Any) -> Any:
    return asyncio.run(recommender.recommend(RecommendRequest(**body)))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_answer_with_exactly_the_contract_fields(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _promote_v1(tmp_path, exported)
    recommender, _ = _serving(tmp_path)
    try:
        answers = [
            _ask(recommender, user_id="u1", k=4, recent_items=["item-3", "item-4"]),
            _ask(recommender, user_id="u2", k=2, recent_items=["not-an-item"]),
            _ask(recommender, user_id="u3", k=3),  # no feature store
        ]
        assert [a.reason for a in answers] == ["model", "cold_start", "feature_store_unavailable"]
        assert recommender.answer_log is not None and recommender.answer_log.flush()
        path = recommender.answer_log.path
        assert path.parent == tmp_path / SERVED_ANSWERS_DIR and path.name.endswith(".jsonl")
        lines = _lines(path)
    finally:
        recommender.close()
    assert [tuple(line) for line in lines] == [ANSWER_LOG_FIELDS] * 3
    for line, answer, user in zip(lines, answers, ("u1", "u2", "u3")):
        ts = datetime.fromisoformat(line["ts"])
        assert ts.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - ts) < timedelta(minutes=5)
        assert line["user_id"] == user and line["model_version"] == "v1"
        assert line["items"] == [i.item_id for i in answer.items] and len(line["items"]) == len(answer.items)
    assert [line["fallback_reason"] for line in lines] == [None, "cold_start", "feature_store_unavailable"]
    # what the drift report will do: DuckDB reads every file of the directory as one table
    rows = duckdb.connect().execute(
        f"SELECT user_id, len(items), model_version, fallback_reason, ts FROM read_json('{path.parent}/*.jsonl') "
        "ORDER BY user_id"
    ).fetchall()
    assert [r[:4] for r in rows] == [("u1", 4, "v1", None), ("u2", 2, "v1", "cold_start"),
                                     ("u3", 3, "v1", "feature_store_unavailable")]

    monkeypatch.setenv("RECSYS_ANSWER_LOG", "false")
    off, _ = _serving(tmp_path)
    try:
        assert off.answer_log is None
        _ask(off, user_id="u4", k=2, recent_items=["item-3"])
    finally:
        off.close()
    assert "u4" not in {line["user_id"] for f in path.parent.glob("*.jsonl") for line in _lines(f)}


def test_rotation_bounds_the_files(tmp_path: Path) -> None:
    log = AnswerLog(tmp_path / "answers", max_bytes=2048, keep=3)
    try:
        for n in range(400):
            log.record(f"u{n:03d}", [f"item-{k}" for k in range(5)], "v1", None)
        assert log.flush()
    finally:
        log.close()
    files = sorted(p.name for p in (tmp_path / "answers").iterdir())
    stem = log.path.name.removesuffix(".jsonl")
    assert files == sorted([log.path.name, f"{stem}.1.jsonl", f"{stem}.2.jsonl"]), "the file written + keep-1 rotated"
    kept = {name: _lines(tmp_path / "answers" / name) for name in files}
    assert all((tmp_path / "answers" / name).stat().st_size <= 2048 for name in files)
    assert kept[log.path.name][-1]["user_id"] == "u399"  # the newest answers are in the file written
    assert kept[f"{stem}.2.jsonl"][-1]["user_id"] < kept[f"{stem}.1.jsonl"][0]["user_id"]  # .1 is the newer
    users = [line["user_id"] for name in (f"{stem}.2.jsonl", f"{stem}.1.jsonl", log.path.name) for line in kept[name]]
    assert users == sorted(users) and len(users) < 400 and users == [f"u{n:03d}" for n in range(400 - len(users), 400)]

    with pytest.raises(ValueError, match="keep must be >= 2"):
        AnswerLog(tmp_path / "x", keep=1)
    with pytest.raises(ValidationError, match="answer_log_keep"):
        ServingSettings.from_env({"RECSYS_ANSWER_LOG_KEEP": "1"})
    assert ServingSettings.from_env({"RECSYS_ANSWER_LOG_MAX_BYTES": "4096"}).answer_log_max_bytes == 4096


def test_the_directory_is_capped_across_restarts(tmp_path: Path) -> None:
    """Files left by earlier processes (other pids) count against the directory's cap and go oldest
    first, at start and at each rotation; the file this process writes is never deleted."""
    directory = tmp_path / "answers"
    directory.mkdir()
    for k in range(6):  # six earlier processes, 3 KB each, oldest first
        old = directory / f"answers-host-{1000 + k}.jsonl"
        old.write_text("x" * 3000)
        os.utime(old, (1_000_000 + k, 1_000_000 + k))
    log = AnswerLog(directory, max_bytes=2048, keep=2, max_total_bytes=10_000)
    try:
        assert sorted(p.name for p in directory.iterdir()) == [f"answers-host-{1000 + k}.jsonl" for k in (3, 4, 5)]
        for n in range(200):
            log.record(f"u{n:03d}", [f"item-{k}" for k in range(5)], "v1", None)
        assert log.flush()
    finally:
        log.close()
    total = sum(p.stat().st_size for p in directory.iterdir())
    assert total <= 10_000 + 2048 and log.path.exists()  # the cap, give or take the file being written
    assert _lines(log.path)[-1]["user_id"] == "u199"


def test_an_unwritable_log_never_fails_a_request(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    # the directory is a regular file (a volume that went away; root ignores permission bits)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("x")
    _promote_v1(tmp_path, exported)
    recommender, registry = _serving(tmp_path, answer_log_dir=str(blocked / "answers"))
    try:
        for n in range(5):
            assert _ask(recommender, user_id=f"u{n}", k=3, recent_items=["item-3"]).reason == "model"
        assert recommender.answer_log is not None and recommender.answer_log.flush()
        assert registry.get_sample_value("recsys_answer_log_dropped_total", {"reason": "write_error"}) == 5
    finally:
        recommender.close()

    # a full disk: the log file is /dev/full (every write fails with ENOSPC); then the disk is back
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    directory = tmp_path / "answers-full"
    recommender, registry = _serving(tmp_path, answer_log_dir=str(directory))
    try:
        log = recommender.answer_log
        assert log is not None
        directory.mkdir()
        os.symlink("/dev/full", log.path)
        for n in range(3):
            assert _ask(recommender, user_id=f"full{n}", k=3, recent_items=["item-3"]).reason == "model"
        assert log.flush() and log.errors == 3
        assert registry.get_sample_value("recsys_answer_log_dropped_total", {"reason": "write_error"}) == 3
        log.path.unlink()
        assert _ask(recommender, user_id="back", k=3, recent_items=["item-3"]).reason == "model"
        assert log.flush() and [line["user_id"] for line in _lines(log.path)] == ["back"]
    finally:
        recommender.close()


def test_a_stuck_writer_drops_answers_instead_of_blocking(tmp_path: Path) -> None:
    """The log file is a FIFO nobody reads (a hung volume): the writer thread blocks opening it, the
    bounded queue fills, and further answers are dropped and counted at once."""
    drops: list[str] = []
    directory = tmp_path / "answers"
    directory.mkdir()
    log = AnswerLog(directory, queue_size=2, on_drop=drops.append)
    os.mkfifo(log.path)
    log.record("first", ["item-1"], "v1", None)
    deadline = time.monotonic() + 10
    while log.queued and time.monotonic() < deadline:  # the writer took it and hangs in open()
        time.sleep(0.01)
    started = time.perf_counter()
    for n in range(9):
        log.record(f"u{n}", ["item-1"], "v1", None)
    assert time.perf_counter() - started < 0.5, "record() must never wait for the writer"
    assert drops == ["queue_full"] * 7 and log.queued == 2
    reader = os.open(log.path, os.O_RDONLY | os.O_NONBLOCK)  # the volume is back: the writer goes on
    try:
        assert log.flush()
        log.close()
        written = os.read(reader, 65536).decode().splitlines()
    finally:
        os.close(reader)
    assert [json.loads(line)["user_id"] for line in written] == ["first", "u0", "u1"]
