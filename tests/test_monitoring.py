"""Monitoring (deploy/monitoring/): Prometheus config and alert rules checked and unit-tested by
promtool, Alertmanager routes by amtool, the generated Grafana dashboard, the Pushgateway client, and
a real Prometheus scraping the real service and a real Pushgateway.

The binaries come from Debian's prometheus, prometheus-pushgateway and prometheus-alertmanager
packages (`make system-deps`); a test that needs one skips when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import httpx
import promql_parser
import pytest
import torch
import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from recsys_assets.monitoring import pushgateway as pg

from _service_harness import ITEMS, MAX_LEN, N_ITEMS, REPO, Server, free_port

MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "recsys.rules.yml"
RULE_TESTS = MONITORING / "tests" / "rules.test.yml"
ALERTMANAGER_YML = MONITORING / "alertmanager.yml"
DASHBOARD_SCRIPT = MONITORING / "grafana" / "build_dashboard.py"
DASHBOARD_JSON = MONITORING / "grafana" / "recsys-dashboard.json"
RETRAIN_JOB = "retrain_job"

BINARIES = {  # binary -> Debian package
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-pushgateway": "prometheus-pushgateway",
    "amtool": "prometheus-alertmanager",
}

SUMMARY: dict[str, Any] = {
    "verdict": "drift_and_degradation",
    "share_drifted": 0.5,
    "signals": {
        "item_popularity": {"statistic": 0.31, "threshold": 0.1, "drifted": True},
        "session_length": {"statistic": 0.02, "threshold": 0.1, "drifted": False},
    },
    "performance": {"drop": 0.12},
}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH (install it: apt-get install -y {BINARIES[name]}, or make system-deps)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy (that value is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


# -- promtool and amtool on the committed files ---------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = binary("promtool")
    config = run(promtool, "check", "config", str(PROMETHEUS_YML))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout  # the rule_files glob resolves next to the config
    rules = run(promtool, "check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run(binary("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_annotations_and_a_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 8
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for test in tests for check in test.get("alert_rule_test", [])]
    for alert in alerts:
        mine = [check for check in checks if check["alertname"] == alert["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{alert['alert']} is never tested firing"
        assert any(not check["exp_alerts"] for check in mine), f"{alert['alert']} is never tested clear"


def test_alertmanager_config_routes_by_severity() -> None:
    amtool = binary("amtool")
    check = run(amtool, "check-config", str(ALERTMANAGER_YML))
    assert check.returncode == 0, check.stdout + check.stderr
    for labels, receiver in [("severity=critical", "recsys-oncall"), ("severity=warning", "recsys-team"),
                             ("severity=info", "recsys-team")]:
        route = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
                    f"--verify.receivers={receiver}", "alertname=RecsysServiceDown", labels)
        assert route.returncode == 0, f"{labels}: {route.stdout}{route.stderr}"


# -- the Grafana dashboard ------------------------------------------------------------------------


def dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_what_the_script_generates(tmp_path: Path) -> None:
    module = dashboard_module()
    assert DASHBOARD_JSON.read_text() == module.render(), \
        "recsys-dashboard.json is stale: run .venv/bin/python deploy/monitoring/grafana/build_dashboard.py"
    stale = tmp_path / "dashboard.json"
    stale.write_text(DASHBOARD_JSON.read_text().replace("Model age", "Model years"))
    assert module.main(["--check", "--out", str(stale)]) == 1
    assert module.main(["--check"]) == 0


def test_dashboard_parses_as_a_grafana_dashboard() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()  # lets from_json decode panel options and Prometheus queries by type
    raw = json.loads(DASHBOARD_JSON.read_text())
    parsed = Dashboard.from_json(raw)
    assert json.loads(json.dumps(parsed, cls=JSONEncoder)) == raw, "the SDK's model does not round-trip the JSON"
    panels = parsed.panels or []
    assert len({p.id_val for p in panels}) == len(panels), "panel ids must be unique"
    titles = {p.title for p in panels if isinstance(p, Panel)}
    for wanted in ("Request rate by outcome", "/recommend latency p50 / p95 / p99", "Fallbacks by reason",
                   "Cache hit rate", "Model version", "Model age", "Drift statistic by signal", "Retrain status"):
        assert wanted in titles
    rows = [p.title for p in panels if isinstance(p, RowPanel)]
    assert rows == ["Traffic and latency", "Fallbacks and cache", "Model", "Drift", "Retraining"]
    for panel in panels:
        if isinstance(panel, Panel):
            assert panel.targets, panel.title
            assert all(isinstance(t, Dataquery) and t.datasource.uid == "${datasource}" for t in panel.targets)


# -- the Pushgateway client without a gateway -----------------------------------------------------


def test_push_without_url_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg.PUSHGATEWAY_URL_ENV, raising=False)
    assert pg.push_drift(SUMMARY) is False
    assert pg.push_pipeline_outcome(RETRAIN_JOB, True) is False
    monkeypatch.setenv(pg.PUSHGATEWAY_URL_ENV, "  ")
    assert pg.push_drift(SUMMARY) is False


def test_push_to_unreachable_gateway_warns_and_returns_false(caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(pg.PUSHGATEWAY_URL_ENV, url)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=pg.__name__):
        assert pg.push_drift(SUMMARY) is False
        assert pg.push_pipeline_outcome(RETRAIN_JOB, False, url="not a url at all") is False
    assert time.monotonic() - started < pg.PUSH_TIMEOUT_S
    messages = [r.getMessage() for r in caplog.records]
    assert any(url in m and pg.DRIFT_GROUP in m for m in messages), messages
    assert any("not a url at all" in m for m in messages), messages


def test_malformed_drift_summary_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="verdict"):
        pg.push_drift({"share_drifted": 0.2})
    with pytest.raises(ValueError, match="drifted"):
        pg.push_drift({"verdict": "drift", "signals": {"item_popularity": {"statistic": 0.3}}})
    with pytest.raises(ValueError, match="share_drifted"):
        pg.push_drift({"verdict": "drift", "share_drifted": 1.5})
    with pytest.raises(ValueError, match="verdict"):
        pg.push_drift({"verdict": "drifty"})
    with pytest.raises(ValueError, match="mapping"):
        pg.push_drift(["drift"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job"):
        pg.push_pipeline_outcome("", True)


def test_minimal_summary_pushes_only_what_it_has() -> None:
    text = generate_latest(pg.drift_registry({"verdict": "stable"}, at=1234.0)).decode()
    values = {(name, tuple(labels.items())): value for name, labels, value in samples(text)}
    assert values == {
        (pg.DRIFT_DETECTED, ()): 0.0,
        (pg.DRIFT_DEGRADED, ()): 0.0,
        (pg.DRIFT_VERDICT, (("verdict", "stable"),)): 1.0,
        (pg.DRIFT_REPORT_TIMESTAMP, ()): 1234.0,
    }
    text = generate_latest(pg.drift_registry(SUMMARY)).decode()
    values = {(name, tuple(labels.items())): value for name, labels, value in samples(text)}
    assert values[(pg.DRIFT_DETECTED, ())] == 1.0 and values[(pg.DRIFT_DEGRADED, ())] == 1.0
    assert values[(pg.DRIFT_SIGNAL_DRIFTED, (("signal", "session_length"),))] == 0.0
    assert values[(pg.DRIFT_SIGNAL_STATISTIC, (("signal", "item_popularity"),))] == pytest.approx(0.31)
    assert values[(pg.DRIFT_PERFORMANCE_DROP, ())] == pytest.approx(0.12)


def test_the_drift_reports_own_summary_is_accepted() -> None:
    from recsys_assets.monitoring.drift import DriftSummary, PerformanceSummary, SignalResult

    summary = DriftSummary(
        verdict="degradation", reasons=["ndcg dropped"], created_at="2026-03-01T12:00:00+00:00", share_drifted=0.0,
        signals={"event_type": SignalResult(unit="events", kind="data", statistic=0.01, threshold=0.1, evaluated=True),
                 "device": SignalResult(unit="events", kind="data", note="column absent")},  # not judged
        performance=PerformanceSummary(metric="ndcg@10", drop=0.25, threshold=0.1, degraded=True),
    )
    text = generate_latest(pg.drift_registry(summary)).decode()
    values = {(name, tuple(labels.items())): value for name, labels, value in samples(text)}
    assert values[(pg.DRIFT_DETECTED, ())] == 0.0 and values[(pg.DRIFT_DEGRADED, ())] == 1.0
    assert values[(pg.DRIFT_REPORT_TIMESTAMP, ())] == 1772366400.0  # its created_at, not the push time
    assert values[(pg.DRIFT_SIGNAL_DRIFTED, (("signal", "event_type"),))] == 0.0
    assert not any(labels == (("signal", "device"),) for _, labels in values), "an unjudged signal is not pushed"
    assert values[(pg.DRIFT_PERFORMANCE_DROP, ())] == 0.25


# -- a real Pushgateway, a real Prometheus, the real service ---------------------------------------


class Daemon:
    """A monitoring binary on a free localhost port, in its own process group, stopped at teardown."""

    def __init__(self, name: str, cmd: list[str], url: str, log: Path) -> None:
        self.name, self.url, self.log = name, url, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, f"{self.name} to be ready", timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = binary("prometheus-pushgateway")
    port = free_port()
    work = tmp_path_factory.mktemp("pushgateway")
    # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: each test gateway
    # gets its own file, so no state leaks between runs (or into a system gateway).
    cmd = [exe, f"--web.listen-address=127.0.0.1:{port}", f"--persistence.file={work / 'pushgateway.data'}"]
    daemon = Daemon("pushgateway", cmd, f"http://127.0.0.1:{port}", work / "pushgateway.log")
    try:
        daemon.wait_ready()
        yield daemon.url
    finally:
        daemon.stop()


def gateway_samples(url: str, job: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What the gateway holds for the group `job` (its own push_time_seconds left out)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (name, tuple(sorted((k, v) for k, v in labels.items() if k not in ("job", "instance")))): value
        for name, labels, value in samples(text)
        if labels.get("job") == job and not name.startswith("push_")
    }


def test_pipeline_outcomes_keep_the_other_timestamp(gateway: str) -> None:
    job = "test_pipeline_job"
    assert pg.push_pipeline_outcome(job, True, url=gateway, at=100.0) is True
    assert pg.push_pipeline_outcome(job, False, url=gateway, at=200.0) is True
    assert gateway_samples(gateway, job) == {(pg.PIPELINE_LAST_SUCCESS, ()): 100.0, (pg.PIPELINE_LAST_FAILURE, ()): 200.0}
    assert pg.push_pipeline_outcome(job, True, url=gateway, at=300.0) is True
    assert gateway_samples(gateway, job) == {(pg.PIPELINE_LAST_SUCCESS, ()): 300.0, (pg.PIPELINE_LAST_FAILURE, ()): 200.0}


def test_drift_push_replaces_the_previous_report(gateway: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg.PUSHGATEWAY_URL_ENV, gateway.removeprefix("http://"))  # host:port works too
    assert pg.push_drift(SUMMARY, at=1000.0) is True
    first = gateway_samples(gateway, pg.DRIFT_GROUP)
    assert first[(pg.DRIFT_SIGNAL_DRIFTED, (("signal", "session_length"),))] == 0.0
    assert first[(pg.DRIFT_VERDICT, (("verdict", "drift_and_degradation"),))] == 1.0
    assert pg.push_drift({"verdict": "stable", "signals": {"item_popularity": {"drifted": False}}}, at=2000.0)
    assert gateway_samples(gateway, pg.DRIFT_GROUP) == {
        (pg.DRIFT_DETECTED, ()): 0.0,
        (pg.DRIFT_DEGRADED, ()): 0.0,
        (pg.DRIFT_VERDICT, (("verdict", "stable"),)): 1.0,
        (pg.DRIFT_SIGNAL_DRIFTED, (("signal", "item_popularity"),)): 0.0,
        (pg.DRIFT_REPORT_TIMESTAMP, ()): 2000.0,
    }


@dataclass
class Stack:
    server: Server
    prometheus: str
    gateway: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        alerts = httpx.get(f"{self.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


def prometheus_config(service: str, gateway: str, rules_dir: Path) -> dict[str, Any]:
    """The committed prometheus.yml, pointed at the test's ports, scraping and evaluating every second."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules_dir / pattern) for pattern in config["rule_files"]]
    del config["alerting"]  # no Alertmanager here: alerts are read from Prometheus's API
    targets = {"recsys": service, "pushgateway": gateway}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


@pytest.fixture(scope="module")
def stack(gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    exe = binary("prometheus")
    home = tmp_path_factory.mktemp("monitoring_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HOME", str(home))
        from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig
        from recsys_assets.export.bundle import export_bundle, promote

        torch.manual_seed(0)  # an untrained network: what is measured here is the service, not the model
        config = BERT4RecConfig(vocab_size=N_ITEMS + 2, hidden=16, layers=1, heads=2, max_len=MAX_LEN, dropout=0.0)
        popularity = {"global": [{"item_id": i, "score": float(N_ITEMS - r)} for r, i in enumerate(reversed(ITEMS))],
                      "groups": []}
        vocabulary = {"items": ITEMS, "categories": ["c0"] * N_ITEMS, "context": {}}
        export_bundle(home / "bundles", BERT4Rec(config).eval(), config, vocabulary, popularity, home / "work",
                      contexts=[], metrics={"models": {}}, version="monitored")
        promote(home / "bundles", "monitored")
        # the online store's registry: without it the service is degraded, and not ready
        from recsys_assets.data.user_features import apply_feature_repo
        from recsys_serving.feature_client import load_feature_store

        apply_feature_repo(load_feature_store(REPO / "feature_repo"), REPO / "feature_repo", max_len=20)
    server = Server("monitored", home, {})
    port = free_port()
    config_file = home / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{server.port}",
                                                            gateway.removeprefix("http://"), MONITORING)))
    prometheus = Daemon("prometheus", [exe, f"--config.file={config_file}", f"--storage.tsdb.path={home / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"],
                        f"http://127.0.0.1:{port}", home / "prometheus.log")
    try:
        prometheus.wait_ready()
        server.wait_ready(time.monotonic() + 180)
        yield Stack(server, prometheus.url, gateway)
    finally:
        prometheus.stop()
        server.stop()


def test_prometheus_scrapes_the_service(stack: Stack) -> None:
    wait_for(lambda: stack.value('up{job="recsys"}') == 1.0, "the first scrape of the service")
    for n in range(5):
        stack.server.recommend(user_id=f"shopper{n}", k=3, recent_items=["i3", "i4"])
    stack.server.recommend(user_id="nobody", k=3)  # no feature store here: a fallback

    total = 'sum(recsys_requests_total{job="recsys", endpoint="recommend"})'
    wait_for(lambda: (stack.value(total) or 0) >= 6, "the requests in Prometheus")
    assert stack.value('recsys_requests_total{job="recsys", endpoint="recommend", outcome="model"}') == 5.0
    assert stack.value('recsys_model_info{job="recsys", model_version="monitored"}') == 1.0
    # the recording rules run on the real series: a p99 between the fastest and the slowest bucket
    p99 = wait_for(lambda: stack.value('recsys:request_latency_seconds:p99_5m{endpoint="recommend"}'),
                   "the p99 recording rule")
    assert 0 < p99 <= 2.5
    assert stack.firing("RecsysServiceDown") == [] and stack.firing("RecsysServiceDegraded") == []


def test_pushed_drift_reaches_prometheus_and_fires_its_alert(stack: Stack) -> None:
    assert pg.push_drift(SUMMARY, url=stack.gateway) is True
    drifted = f'{pg.DRIFT_SIGNAL_DRIFTED}{{job="{pg.DRIFT_GROUP}", signal="item_popularity"}}'
    wait_for(lambda: stack.value(drifted) == 1.0, "the pushed drift gauges in Prometheus")
    assert stack.value(f'{pg.DRIFT_DETECTED}{{job="{pg.DRIFT_GROUP}"}}') == 1.0
    assert stack.value(pg.DRIFT_SHARE) == 0.5
    wait_for(lambda: stack.firing("RecsysDriftDetected"), "RecsysDriftDetected to fire")
    assert pg.push_drift({"verdict": "stable"}, url=stack.gateway) is True
    wait_for(lambda: not stack.firing("RecsysDriftDetected"), "RecsysDriftDetected to clear")


def test_retrain_failure_fires_until_the_next_success(stack: Stack) -> None:
    # the alert matches job="retrain_job": it fires only if the scrape keeps the pushed job label
    assert pg.push_pipeline_outcome(RETRAIN_JOB, False, url=stack.gateway) is True
    alerts = wait_for(lambda: stack.firing("RecsysRetrainFailed"), "RecsysRetrainFailed to fire")
    assert alerts[0]["labels"]["job"] == RETRAIN_JOB and alerts[0]["labels"]["severity"] == "critical"
    time.sleep(1.1)  # the success must be a later second than the failure
    assert pg.push_pipeline_outcome(RETRAIN_JOB, True, url=stack.gateway) is True
    wait_for(lambda: not stack.firing("RecsysRetrainFailed"), "RecsysRetrainFailed to clear")


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (the parser walks every selector, ranges included)."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_every_metric_name_in_rules_and_dashboard_is_exported(stack: Stack) -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    # Grafana substitutes $__rate_interval before Prometheus sees a query; the parser needs a duration
    exprs = [rule["expr"] for rule in rules] + [
        e.replace("$__rate_interval", "5m") for e in dashboard_module().expressions(json.loads(DASHBOARD_JSON.read_text()))
    ]
    used = set().union(*(metric_names(e) for e in exprs)) - recorded - {"up"}
    assert {"recsys_request_latency_seconds_bucket", pg.DRIFT_DETECTED, pg.PIPELINE_LAST_FAILURE} <= used

    stack.server.recommend(user_id="nobody", k=3)  # BentoML's own series appear with the first request
    served = {name for name, _ in stack.server.metrics()}
    assert pg.push_drift(SUMMARY, url=stack.gateway)
    assert pg.push_pipeline_outcome(RETRAIN_JOB, False, url=stack.gateway)
    assert pg.push_pipeline_outcome(RETRAIN_JOB, True, url=stack.gateway)
    pushed = {name for group in (pg.DRIFT_GROUP, RETRAIN_JOB) for name, _ in gateway_samples(stack.gateway, group)}
    missing = used - served - pushed
    assert not missing, f"used in rules or dashboard but exported by neither the service nor pushgateway.py: {sorted(missing)}"


def test_run_status_sensors_push_outcomes(gateway: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Dagster run sensors feed RecsysRetrainFailed: a failed run pushes its failure time and a
    later successful run of the same job its success time, to the real gateway."""
    from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context, job, op

    from recsys_assets.automation import run_failure_alert, run_success_metrics

    outcome = {"fail": True}

    @op
    def step() -> None:
        if outcome["fail"]:
            raise RuntimeError("deliberate failure")

    @job(name="sensor_push_job")
    def sensor_push_job() -> None:
        step()

    monkeypatch.setenv(pg.PUSHGATEWAY_URL_ENV, gateway)
    monkeypatch.delenv("RECSYS_ALERT_WEBHOOK_URL", raising=False)
    with DagsterInstance.ephemeral() as instance:
        def context_for(run_id: str, kind: DagsterEventType) -> Any:
            run = instance.get_run_by_id(run_id)
            event = instance.get_records_for_run(run_id, of_type=kind).records[0].event_log_entry.dagster_event
            return build_run_status_sensor_context(
                sensor_name="sensor_push_job_status", dagster_instance=instance, dagster_run=run, dagster_event=event
            )

        failed = sensor_push_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not failed.success
        run_failure_alert(context_for(failed.run_id, DagsterEventType.RUN_FAILURE).for_run_failure())
        pushed = gateway_samples(gateway, "sensor_push_job")
        assert set(pushed) == {(pg.PIPELINE_LAST_FAILURE, ())} and pushed[(pg.PIPELINE_LAST_FAILURE, ())] > 0

        outcome["fail"] = False
        succeeded = sensor_push_job.execute_in_process(instance=instance)
        run_success_metrics(context_for(succeeded.run_id, DagsterEventType.RUN_SUCCESS))
        pushed_after = gateway_samples(gateway, "sensor_push_job")
        assert pushed_after[(pg.PIPELINE_LAST_FAILURE, ())] == pushed[(pg.PIPELINE_LAST_FAILURE, ())]
        assert pushed_after[(pg.PIPELINE_LAST_SUCCESS, ())] >= pushed[(pg.PIPELINE_LAST_FAILURE, ())]
