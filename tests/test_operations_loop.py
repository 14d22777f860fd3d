"""The operations loop end to end, through the code location's own jobs and sensor in a real Dagster
instance, with the real service (`bentoml serve`) following the promoted bundle:

1. retrain_job on the generator's base window promotes a first champion; the service serves it.
2. An unshifted following period: drift_job reports `stable` and the drift sensor requests nothing.
3. A shifted period (new trending items, another device and category mix): drift_job reports drift
   and the sensor requests exactly one retrain_job run, once.
4. That retrain scores the champion's bundle on the same current test data, beats it and is promoted;
   the running service answers with the new version without a restart (same process).
5. A deliberately worse challenger (one training step) is not promoted: `current` and the service's
   answers stay on the previous version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, instance_for_test

from recsys_assets.automation import drift_retrain_sensor
from recsys_assets.export.bundle import current_version
from recsys_serving.contract import BUNDLES_DIR

from _service_harness import Server

BASE = {"synthetic_users": 1200, "synthetic_items": 300, "synthetic_seed": 3}
UNSHIFTED = [{"days": 14}]
SHIFTED = [
    {"days": 14},
    {"days": 14, "new_items": 40, "new_item_share": 0.35, "popularity_rotation": 0.5, "category_rotation": 0.5,
     "device_mix": {"desktop": 0.85, "mobile": 0.05, "tablet": 0.05, "app": 0.05}},
]
TRAINING = {"preset": "synthetic", "hidden": 32, "layers": 1, "heads": 2, "max_len": 12, "epochs": 4, "patience": 2}


def _run_config(periods: list[dict[str, Any]], training: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = {**BASE, "synthetic_periods_json": json.dumps(periods)}
    ops: dict[str, Any] = {"raw_events": {"config": raw}}
    if training is not None:
        ops.update({
            "bert4rec_model": {"config": training},
            "baselines": {"config": {"n_bootstrap": 20}},
            "evaluation_report": {"config": {"n_bootstrap": 20}},
            "onnx_model": {"config": {"parity_sequences": 300, "min_parity_sequences": 200}},
            "tensorrt_engine": {"config": {"parity_sequences": 300}},
            "model_bundle": {"config": {"popularity_min_group_events": 10}},
            "user_sequence_features": {"config": {"max_len": 20}},
        })
    return {"ops": ops}


def _execute(instance: DagsterInstance, job_name: str, run_config: dict[str, Any], tags: dict[str, str] | None = None):
    from recsys_assets.definitions import defs

    result = defs.resolve_job_def(job_name).execute_in_process(
        run_config=run_config, instance=instance, tags=tags or {}, raise_on_error=False
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def _sensor(instance: DagsterInstance, cursor: str | None) -> SensorResult:
    result = drift_retrain_sensor(build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, SensorResult)
    return result


def _served_version(server: Server) -> str | None:
    return server.recommend(user_id="u1", k=5).get("model_version")


def _wait_for_version(server: Server, version: str, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.client.get("/healthz").json().get("model_version") == version and _served_version(server) == version:
            return time.monotonic() - started
        time.sleep(0.3)
    raise AssertionError(f"the service still serves {_served_version(server)}, not {version}")


@pytest.fixture
def loop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, DagsterInstance]]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    # The first champion is minutes old: no cool-down here (tests/test_automation.py pins the cool-down).
    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "0")
    for name in ("RECSYS_EVENTS_PATH", "RECSYS_EVENTS_FORMAT", "RECSYS_SYNTHETIC_PERIODS", "RECSYS_PUSHGATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    with instance_for_test() as instance:
        yield tmp_path, instance


def test_drift_retrains_promotes_a_better_challenger_and_the_service_follows(
    loop_home: tuple[Path, DagsterInstance],
) -> None:
    home, instance = loop_home
    bundles = home / BUNDLES_DIR

    # 1. the first champion, served
    first = _execute(instance, "retrain_job", _run_config([], TRAINING))
    champion = first.output_for_node("model_bundle")
    assert champion["promoted"] and current_version(bundles) == champion["version"]
    server = Server("loop", home, {"RECSYS_RELOAD_INTERVAL_S": "0.5", "RECSYS_CACHE_TTL_S": "0.001"})
    try:
        server.wait_ready(time.monotonic() + 120)
        pid = server.proc.pid
        assert _served_version(server) == champion["version"]

        # 2. an unshifted period: stable, nothing requested
        _execute(instance, "drift_job", _run_config(UNSHIFTED))
        stable = _sensor(instance, None)
        assert not stable.run_requests, stable
        assert "stable" in (stable.skip_reason.skip_message if stable.skip_reason else "")

        # 3. a shifted period: drift, exactly one retrain, once
        drift_run = _execute(instance, "drift_job", _run_config(SHIFTED))
        verdict = drift_run.asset_materializations_for_node("drift_report")[0].metadata["verdict"].value
        assert verdict in ("drift", "drift_and_degradation")
        drifted = _sensor(instance, stable.cursor)
        assert len(drifted.run_requests) == 1
        request = drifted.run_requests[0]
        assert _sensor(instance, drifted.cursor).run_requests == []  # the same report never asks twice

        # 4. the requested retrain beats the champion on the same current data and is served
        retrain = _execute(instance, "retrain_job", _run_config(SHIFTED, TRAINING), tags=dict(request.tags))
        report = retrain.output_for_node("model_bundle")
        gate = report["gate"]
        assert report["promoted"], gate["reasons"]
        assert gate["champion"] == champion["version"]
        assert gate["challenger_value"] > gate["champion_value"], gate
        switch_s = _wait_for_version(server, report["version"])
        print(f"service switched to {report['version']} {switch_s:.1f}s after the promotion")

        # 5. a challenger trained for one step is refused; the service keeps the version it serves
        worse = _execute(
            instance, "retrain_job",
            _run_config(SHIFTED, {**TRAINING, "epochs": 1, "train_overrides_json": json.dumps({"max_steps": 1})}),
        )
        refused = worse.output_for_node("model_bundle")
        assert not refused["promoted"] and current_version(bundles) == report["version"]
        time.sleep(1.5)  # three reload intervals
        assert _served_version(server) == report["version"]
        assert server.proc.pid == pid and server.proc.poll() is None  # never restarted
    finally:
        server.stop()
