"""The service follows `bundles/current` without a restart: promotion, refusal of a bundle that does
not verify, rollback (library and CLI), a degraded start; and the real `bentoml serve` switching
under continuous load with zero errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import prometheus_client
import psutil
import pytest

from recsys_assets.export.bundle import _switch, current_version, promote, promotion_history, rollback
from recsys_assets.export.rollback import main as rollback_cli
from recsys_serving.bundle import MODEL_FILE, BundleRefused, read_manifest
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

from _service_harness import REPO, Server, wait_until
from test_bundle import _write, exported  # noqa: F401  (exported: the module's tiny ONNX export fixture)

INTERVAL_S = 0.1


def _recommender(**overrides: Any) -> tuple[Recommender, prometheus_client.CollectorRegistry]:
    registry = prometheus_client.CollectorRegistry()
    settings = ServingSettings.from_env(
        **{"feature_repo": str(REPO / "feature_repo"), "reload_interval_s": INTERVAL_S, **overrides}
    )
    return Recommender(settings, ServiceMetrics(registry=registry)), registry


def _sample(registry: prometheus_client.CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _ask(recommender: Recommender, **body: Any) -> Any:
    return asyncio.run(recommender.recommend(RecommendRequest(**body)))


def _feature_store_with(users: dict[str, list[str]]) -> None:
    """The real Feast SQLite online store under $RECSYS_HOME, with each user's history pushed."""
    from recsys_assets.data.user_features import apply_feature_repo
    from recsys_serving.feature_client import FeatureStoreClient, load_feature_store

    apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)
    client = FeatureStoreClient(REPO / "feature_repo")
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    for user, items in users.items():
        for n, item in enumerate(items):
            client.push_event(user, item, "view", start + timedelta(minutes=n))


def test_follows_a_promotion_and_never_serves_the_old_models_answers(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    _write(root, exported, "v1")
    _write(root, exported, "v2")
    promote(root, "v1")
    _feature_store_with({"u1": ["item-3", "item-4"]})
    recommender, registry = _recommender()
    try:
        health = recommender.health()
        assert health.follows_current and health.model_version == "v1" and health.loaded_at is not None
        first = _ask(recommender, user_id="u1", k=5)
        assert (first.model_version, first.reason, first.cached) == ("v1", "model", False)
        assert _ask(recommender, user_id="u1", k=5).cached is True

        promoted_at = datetime.now(timezone.utc)
        promote(root, "v2")
        wait_until(lambda: recommender.health().model_version == "v2", "the service serves v2")
        after = _ask(recommender, user_id="u1", k=5)
        assert after.model_version == "v2" and after.reason == "model"
        assert after.cached is False, "an answer cached from v1 must not be served by v2"
        assert _ask(recommender, user_id="u1", k=5).cached is True  # v2's own answer is cached

        health = recommender.health()
        assert health.loaded_at is not None and health.loaded_at >= promoted_at - timedelta(seconds=1)
        assert health.model_version == "v2" and health.last_refused is None
        assert health.status == "ok" and not health.degraded and health.reason is None
        assert {name: d.status for name, d in health.dependencies.items()} == {
            "model": "ok", "online_store": "ok", "event_log": "ok"}
        assert str(tmp_path) not in health.model_dump_json(), "health shows no internal paths"
        assert _sample(registry, "recsys_model_switches_total", outcome="switched") == 1
        assert _sample(registry, "recsys_model_switches_total", outcome="refused") == 0
        cpu = "CPUExecutionProvider"
        assert _sample(registry, "recsys_model_info", model_version="v2", provider=cpu) == 1
        assert _sample(registry, "recsys_model_info", model_version="v1", provider=cpu) == 0
        created = datetime.fromisoformat(read_manifest(root / "v2").created_at).timestamp()
        assert _sample(registry, "recsys_model_created_timestamp_seconds") == created
        loaded = _sample(registry, "recsys_model_loaded_timestamp_seconds")
        assert loaded is not None and loaded >= promoted_at.timestamp() - 1

        # every answer given is logged, the cached ones included, with the version that gave it
        assert recommender.answer_log is not None and recommender.answer_log.flush()
        lines = [json.loads(line) for line in recommender.answer_log.path.read_text().splitlines()]
        assert [(r["user_id"], r["model_version"]) for r in lines] == [("u1", "v1")] * 2 + [("u1", "v2")] * 2
    finally:
        recommender.close()


def test_refuses_a_bundle_that_does_not_verify_and_follows_rollbacks(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    for version in ("v1", "v2", "v3"):
        _write(root, exported, version)
    promote(root, "v1")
    promote(root, "v2")
    # v3 rots after it was written: one byte of its weights changes, so its checksum fails
    weights = root / "v3" / MODEL_FILE
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    recommender, registry = _recommender()
    try:
        assert recommender.model_version == "v2"
        _switch(root, "v3")  # the pointer names it (promote() itself would refuse it)
        wait_until(lambda: _sample(registry, "recsys_model_switches_total", outcome="refused") == 1, "v3 refused")
        health = recommender.health()
        assert health.model_version == "v2" and health.dependencies["model"].status == "ok"
        assert health.last_refused is not None and health.last_refused.version == "v3"
        assert "model.onnx sha256" in health.last_refused.reason
        assert str(tmp_path) not in health.model_dump_json(), "the refusal shows no internal paths"
        answer = _ask(recommender, user_id="x", k=3, recent_items=["item-5"])
        assert answer.model_version == "v2" and answer.reason == "model"
        time.sleep(10 * INTERVAL_S)
        assert _sample(registry, "recsys_model_switches_total", outcome="refused") == 1, "refused once, not in a loop"

        # the previous champion of v3 (never promoted) is v2, already served: nothing to switch
        assert rollback(root).version == "v2"
        # then one further back: v1, which the service follows
        record = rollback(root, reason="v2 regressed")
        assert (record.version, record.previous, record.reasons) == ("v1", "v2", ["v2 regressed"])
        wait_until(lambda: recommender.model_version == "v1", "the service follows the rollback to v1")
        assert _ask(recommender, user_id="x", k=3, recent_items=["item-5"]).model_version == "v1"
        assert _sample(registry, "recsys_model_switches_total", outcome="switched") == 1

        with pytest.raises(BundleRefused, match="sha256"):
            rollback(root, to="v3")
        assert current_version(root) == "v1"

        # the CLI (`make rollback`): refusals name the cause and change nothing
        assert rollback_cli(["--to", "v3"]) == 1
        assert "v3 does not verify" in capsys.readouterr().err
        assert rollback_cli(["--to", "v9"]) == 1
        assert "no bundle v9" in capsys.readouterr().err and current_version(root) == "v1"
        assert rollback_cli([]) == 1  # v1 was the first champion: nothing earlier
        assert "no earlier bundle" in capsys.readouterr().err
        assert rollback_cli(["--to", "v2", "--reason", "v1 is worse"]) == 0
        assert "v1 -> v2" in capsys.readouterr().out
        assert promotion_history(root)[-1].reasons == ["v1 is worse"]
        wait_until(lambda: recommender.model_version == "v2", "the service follows the CLI's rollback")
        assert recommender.health().last_refused.version == "v3"  # type: ignore[union-attr]
    finally:
        recommender.close()


def test_a_degraded_start_loads_the_first_bundle_that_verifies(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    empty, empty_registry = _recommender(feature_repo=str(tmp_path / "no_repo"))
    health = empty.health()
    assert health.degraded and health.model_version is None and health.follows_current
    assert health.status == "unavailable", "no model and no popularity list: answers are empty"
    assert health.last_refused is None  # nothing there is not a refusal
    assert _sample(empty_registry, "recsys_model_switches_total", outcome="refused") == 0
    empty.close()

    _write(root, exported, "v0")
    (root / "v0" / "vocabulary.json").chmod(0o644)
    (root / "v0" / "vocabulary.json").write_text("{}")  # rotted after promotion: the size check fails
    _switch(root, "v0")
    recommender, registry = _recommender(feature_repo=str(tmp_path / "no_repo"))
    try:
        health = recommender.health()
        assert health.degraded and health.model_version is None and "vocabulary.json" in (health.reason or "")
        assert health.status == "degraded", "the popularity list was salvaged: answers still come"
        assert health.last_refused is not None and health.last_refused.version == "v0"
        assert _sample(registry, "recsys_model_info", model_version="none", provider="none") == 1
        assert _ask(recommender, user_id="x", k=3, recent_items=["item-5"]).reason == "model_unavailable"
        time.sleep(10 * INTERVAL_S)
        assert _sample(registry, "recsys_model_switches_total", outcome="refused") == 1, "refused once, not in a loop"
        _write(root, exported, "v1")
        promote(root, "v1")
        wait_until(lambda: recommender.model_version == "v1", "the first promoted bundle that verifies is loaded")
        health = recommender.health()
        assert health.dependencies["model"].status == "ok" and health.model_version == "v1"
        # the model serves, but this test's feature repository does not exist: answers for stored users
        # are fallbacks, so the service is degraded, not ok
        assert health.status == "degraded" and health.dependencies["online_store"].status == "down"
        assert _ask(recommender, user_id="x", k=3, recent_items=["item-5"]).reason == "model"
        assert _sample(registry, "recsys_model_info", model_version="none", provider="none") == 0
        assert _sample(registry, "recsys_degraded") == 0
    finally:
        recommender.close()


def test_a_fixed_bundle_directory_or_interval_zero_is_not_followed(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    _write(root, exported, "v1")
    _write(root, exported, "v2")
    promote(root, "v1")
    fixed, _ = _recommender(bundle_path=str(root / "v1"))
    off, _ = _recommender(reload_interval_s=0)
    pointer, _ = _recommender(bundle_path=str(root / "current"))  # RECSYS_BUNDLE naming the pointer
    try:
        assert not fixed.health().follows_current and not off.health().follows_current
        assert pointer.health().follows_current
        promote(root, "v2")
        wait_until(lambda: pointer.model_version == "v2", "RECSYS_BUNDLE=<the pointer> follows it")
        assert fixed.reload_if_changed() is False and fixed.model_version == "v1"
        assert off.model_version == "v1"
    finally:
        for recommender in (fixed, off, pointer):
            recommender.close()


def test_real_server_switches_under_load_with_zero_errors(
    tmp_path: Path, exported: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bentoml serve` with two worker processes on `current`: client threads send /recommend without
    pause while the pointer is switched; every request succeeds and the answers move to the new
    version in the same processes."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    root = tmp_path / "bundles"
    _write(root, exported, "a")
    _write(root, exported, "b")
    promote(root, "a")
    _feature_store_with({})  # a healthy service: /readyz answers 200 only with its online store up

    server = Server("reload", tmp_path, {"RECSYS_RELOAD_INTERVAL_S": "0.5", "RECSYS_WORKERS": "2"})
    answers: list[tuple[str | None, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    resp = http.post("/recommend", json={"user_id": "load", "k": 3, "recent_items": ["item-3"]})
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code}: {resp.text[:200]}")
                    continue
                body = resp.json()
                answers.append((body["model_version"], body["reason"]))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]  # a connection each
    try:
        server.wait_ready(time.monotonic() + 180)
        workers = sorted(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True))
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answers) >= 20, "answers from bundle a", timeout=60)
        switched_at = len(answers)
        promote(root, "b")
        wait_until(lambda: len(answers) > switched_at + 40 and all(v == "b" for v, _ in answers[-40:]),
              "40 answers in a row from bundle b", timeout=60)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

        assert errors == []
        assert {v for v, _ in answers[:switched_at]} == {"a"}
        assert {reason for _, reason in answers} == {"model"}, "both bundles answer with the model"
        assert server.proc.poll() is None
        assert sorted(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)) == workers
        # each worker process switches itself; model_info{a} is 1 while any worker still serves a
        switched = ("recsys_model_switches_total", (("outcome", "switched"),))
        wait_until(lambda: server.metrics()[switched] == 2, "both workers switched", timeout=30)
        health = server.client.get("/healthz").json()
        assert health["model_version"] == "b" and health["follows_current"] and health["loaded_at"]
        metrics = server.metrics()
        cpu = "CPUExecutionProvider"
        assert metrics[("recsys_model_info", (("model_version", "b"), ("provider", cpu)))] == 1
        assert metrics[("recsys_model_info", (("model_version", "a"), ("provider", cpu)))] == 0
        assert metrics[("recsys_model_switches_total", (("outcome", "refused"),))] == 0
        created = datetime.fromisoformat(read_manifest(root / "b").created_at).timestamp()
        assert metrics[("recsys_model_created_timestamp_seconds", ())] == created
    finally:
        stop.set()
        server.stop()
    # each worker logged its answers (written on shutdown at the latest), both versions among them
    logged = [json.loads(line) for f in sorted((tmp_path / "events" / "answers").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert len({r["model_version"] for r in logged}) == 2 and len(logged) >= len(answers)
