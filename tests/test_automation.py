"""Automation of the code location, evaluated against real temporary Dagster instances: the drift sensor
(one retrain per drift report, cool-down, stable verdicts), the schedules' ticks, the run-failure alert
POSTed to a real local HTTP server, and `make run`'s execution tied to a workspace code location."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetMaterialization,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunsFilter,
    ScheduleDefinition,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    job,
    op,
)
from dagster._core.storage.tags import REPOSITORY_LABEL_TAG
from dagster._utils.schedules import cron_string_iterator

from recsys_assets import automation
from recsys_assets.assets.metadata import DRIFT_VERDICT_METADATA
from recsys_assets.automation import AutomationSettings, drift_retrain_sensor, run_failure_alert

UTC = timezone.utc


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RETRAIN_COOLDOWN_H", "ALERT_WEBHOOK_URL", "ALERT_WEBHOOK_TIMEOUT_S", "DAGSTER_UI_URL",
                 "RETRAIN_CRON", "DRIFT_CRON", "SCHEDULE_TIMEZONE"):
        monkeypatch.delenv(f"RECSYS_{name}", raising=False)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    """Dagster's in-memory instance: real run and event-log storage, without a directory's migrations."""
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _report(instance: DagsterInstance, verdict: str | None) -> int:
    """A real drift_report materialization in the instance's event log; returns its storage id."""
    metadata = {} if verdict is None else {DRIFT_VERDICT_METADATA: verdict}
    instance.report_runless_asset_event(AssetMaterialization(automation.DRIFT_REPORT, metadata=metadata))
    records = instance.fetch_materializations(automation.DRIFT_REPORT, limit=1).records
    return records[0].storage_id


def _tick(instance: DagsterInstance, cursor: str | None = None):
    return drift_retrain_sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=cursor))


@op
def _noop() -> None:
    pass


@job(name=automation.RETRAIN_JOB)
def _retrain_stand_in() -> None:
    """A job named retrain_job: its real run is what the cool-down looks up in the instance."""
    _noop()


# --------------------------------------------------------------------------- drift sensor


def test_drift_requests_exactly_one_retrain_per_report(instance: DagsterInstance) -> None:
    assert drift_retrain_sensor.job_name == automation.RETRAIN_JOB
    assert drift_retrain_sensor.default_status == DefaultSensorStatus.RUNNING
    storage_id = _report(instance, "drift")

    first = _tick(instance)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert request.run_key == f"drift_report:{storage_id}"
    assert request.tags[automation.DRIFT_VERDICT_TAG] == "drift"
    assert request.tags[automation.DRIFT_REPORT_STORAGE_TAG] == str(storage_id)
    assert automation.DRIFT_REPORT_RUN_TAG in request.tags
    assert first.cursor == str(storage_id)

    # Re-evaluated from the same cursor (a retried tick): the same run key, which Dagster runs once.
    assert [r.run_key for r in _tick(instance).run_requests] == [request.run_key]
    # From the advanced cursor: nothing new, nothing requested.
    again = _tick(instance, first.cursor)
    assert not again.run_requests and "no new drift_report" in str(again.skip_message)

    # A later report gets its own key; only the newest of several unseen reports is considered.
    _report(instance, "stable")
    newest = _report(instance, "drift_and_degradation")
    later = _tick(instance, first.cursor)
    assert [r.run_key for r in later.run_requests] == [f"drift_report:{newest}"]
    assert later.run_requests[0].tags[automation.DRIFT_VERDICT_TAG] == "drift_and_degradation"


@pytest.mark.parametrize("verdict", ["stable", "no_reference"])
def test_verdicts_that_need_no_retrain_are_skipped(instance: DagsterInstance, verdict: str) -> None:
    storage_id = _report(instance, verdict)
    data = _tick(instance)
    assert not data.run_requests
    assert f"verdict {verdict!r}, no retrain needed" in str(data.skip_message)
    assert data.cursor == str(storage_id)  # consumed: the next tick does not look at it again


@pytest.mark.parametrize("verdict", [None, "drifted-ish"])
def test_a_report_without_a_valid_verdict_is_skipped_with_the_reason(instance: DagsterInstance, verdict: str | None) -> None:
    _report(instance, verdict)
    data = _tick(instance)
    assert not data.run_requests
    assert f"no valid {DRIFT_VERDICT_METADATA!r} metadata ({verdict!r})" in str(data.skip_message)


def test_cooldown_skips_drift_after_a_recent_retrain(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    retrain = _retrain_stand_in.execute_in_process(instance=instance)
    assert retrain.success
    _report(instance, "degradation")

    data = _tick(instance)
    assert not data.run_requests
    message = str(data.skip_message)
    assert retrain.run_id in message and "within the 24 h cool-down (RECSYS_RETRAIN_COOLDOWN_H)" in message

    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "0")  # no cool-down: the same report retrains
    assert len(_tick(instance).run_requests) == 1

    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "2")
    record = instance.fetch_materializations(automation.DRIFT_REPORT, limit=1).records[0]
    assert isinstance(automation.retrain_decision(instance, record, 2.0), automation.SkipReason)
    # Three hours later the same retrain is outside a 2 h cool-down.
    later = automation.retrain_decision(instance, record, 2.0, now=time.time() + 3 * 3600)
    assert isinstance(later, automation.RunRequest)


def test_a_retrain_after_the_report_already_answers_it(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "0")
    _report(instance, "drift")
    retrain = _retrain_stand_in.execute_in_process(instance=instance)
    data = _tick(instance)
    assert not data.run_requests
    assert f"{automation.RETRAIN_JOB} run {retrain.run_id} (SUCCESS) was created after it" in str(data.skip_message)


def test_bad_cooldown_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "-1")
    with pytest.raises(ValueError, match="RECSYS_RETRAIN_COOLDOWN_H: Input should be greater than or equal to 0"):
        automation.load_settings()
    monkeypatch.setenv("RECSYS_RETRAIN_COOLDOWN_H", "1")
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", "hooks.example.com/recsys")
    with pytest.raises(ValueError, match="RECSYS_ALERT_WEBHOOK_URL: "):
        automation.load_settings()


# --------------------------------------------------------------------------- schedules


def _schedule(name: str) -> ScheduleDefinition:
    """As the code location builds it when it loads, here from the default settings."""
    return next(s for s in automation.build_schedules(AutomationSettings()) if s.name == name)


def test_weekly_retrain_ticks_monday_0300_utc(instance: DagsterInstance) -> None:
    weekly = _schedule("weekly_retrain_schedule")
    assert weekly.job_name == automation.RETRAIN_JOB
    assert weekly.default_status == DefaultScheduleStatus.RUNNING
    ticks = cron_string_iterator(datetime(2025, 1, 4, 12, tzinfo=UTC).timestamp(), weekly.cron_schedule, weekly.execution_timezone)
    assert [next(ticks) for _ in range(2)] == [datetime(2025, 1, 6, 3, tzinfo=UTC), datetime(2025, 1, 13, 3, tzinfo=UTC)]
    context = build_schedule_context(instance, scheduled_execution_time=datetime(2025, 1, 6, 3, tzinfo=UTC))
    data = weekly.evaluate_tick(context)
    assert len(data.run_requests) == 1 and data.run_requests[0].tags[automation.TRIGGER_TAG] == "schedule"


def test_daily_drift_schedule_runs_drift_job(instance: DagsterInstance) -> None:
    daily = _schedule("daily_drift_schedule")
    assert daily.job_name == automation.DRIFT_JOB and daily.default_status == DefaultScheduleStatus.RUNNING
    ticks = cron_string_iterator(datetime(2025, 1, 6, 2, 30, tzinfo=UTC).timestamp(), daily.cron_schedule, daily.execution_timezone)
    assert next(ticks) == datetime(2025, 1, 7, 2, tzinfo=UTC)
    data = daily.evaluate_tick(build_schedule_context(instance, scheduled_execution_time=datetime(2025, 1, 7, 2, tzinfo=UTC)))
    assert len(data.run_requests) == 1


def test_daily_new_items_schedule_runs_new_items_job(instance: DagsterInstance) -> None:
    daily = _schedule("daily_new_items_schedule")
    assert daily.job_name == automation.NEW_ITEMS_JOB and daily.default_status == DefaultScheduleStatus.RUNNING
    ticks = cron_string_iterator(datetime(2025, 1, 6, 2, 30, tzinfo=UTC).timestamp(), daily.cron_schedule, daily.execution_timezone)
    assert next(ticks) == datetime(2025, 1, 6, 4, tzinfo=UTC)  # after the daily drift check
    data = daily.evaluate_tick(build_schedule_context(instance, scheduled_execution_time=datetime(2025, 1, 6, 4, tzinfo=UTC)))
    assert len(data.run_requests) == 1


def test_schedules_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_RETRAIN_CRON", "30 4 * * 0")
    monkeypatch.setenv("RECSYS_SCHEDULE_TIMEZONE", "Europe/Berlin")
    weekly = _schedule("weekly_retrain_schedule")
    assert (weekly.cron_schedule, weekly.execution_timezone) == ("30 4 * * 0", "Europe/Berlin")
    monkeypatch.setenv("RECSYS_RETRAIN_CRON", "every monday")
    with pytest.raises(ValueError, match="RECSYS_RETRAIN_CRON: Value error, 'every monday' is not a cron string"):
        automation.load_settings()
    monkeypatch.setenv("RECSYS_RETRAIN_CRON", "0 3 * * 1")
    monkeypatch.setenv("RECSYS_SCHEDULE_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValueError, match="RECSYS_SCHEDULE_TIMEZONE: .*not an IANA time zone"):
        automation.load_settings()


# --------------------------------------------------------------------------- run-failure alert


class _Webhook:
    """A real HTTP server on a free localhost port that records the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers["Content-Length"])
                webhook.bodies.append(json.loads(self.rfile.read(length)))
                time.sleep(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/recsys"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@op
def _load_events() -> None:
    raise ValueError("events file has no user_id column")


@job
def failing_job() -> None:
    _load_events()


def _failure_context(instance: DagsterInstance):
    result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    assert isinstance(run, DagsterRun)
    records = instance.get_records_for_run(result.run_id, of_type=DagsterEventType.RUN_FAILURE).records
    event = records[0].event_log_entry.dagster_event
    assert event is not None
    return run, build_run_status_sensor_context(
        sensor_name=run_failure_alert.name, dagster_instance=instance, dagster_run=run, dagster_event=event
    ).for_run_failure()


def test_run_failure_is_posted_to_the_webhook(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_failure_alert.default_status == DefaultSensorStatus.RUNNING
    run, context = _failure_context(instance)
    with _Webhook() as hook:
        monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", hook.url)
        monkeypatch.setenv("RECSYS_DAGSTER_UI_URL", "http://dagster.internal:3000/")
        run_failure_alert(context)
    assert len(hook.bodies) == 1
    body = hook.bodies[0]
    assert body["job"] == "failing_job" and body["run_id"] == run.run_id and body["status"] == "FAILURE"
    assert body["error"] == "_load_events: ValueError: events file has no user_id column"
    assert body["run_url"] == f"http://dagster.internal:3000/runs/{run.run_id}"
    assert body["run_url"] in body["text"] and "failing_job" in body["text"]


def test_no_webhook_configured_posts_nothing_and_does_not_raise(instance: DagsterInstance) -> None:
    _, context = _failure_context(instance)
    with _Webhook() as hook:
        run_failure_alert(context)
    assert hook.bodies == []


def test_a_failing_webhook_never_raises(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    _, context = _failure_context(instance)
    with _Webhook(status=500) as refusing:
        monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", refusing.url)
        run_failure_alert(context)  # logged as a warning
        assert len(refusing.bodies) == 1
        assert "500" in str(automation.post_alert(refusing.url, {"x": 1}, 2.0))
    with _Webhook(delay_s=3.0) as slow:
        started = time.monotonic()
        why = automation.post_alert(slow.url, {"x": 1}, 0.3)
        assert why and "Timeout" in why and time.monotonic() - started < 2.5
    # Nothing listens there any more.
    assert "ConnectError" in str(automation.post_alert(refusing.url, {"x": 1}, 2.0))


# --------------------------------------------------------------------------- make run


TINY_LOCATION = '''
from dagster import Definitions, job, op


@op
def hello() -> int:
    return 1


@job
def tiny_job() -> None:
    hello()


defs = Definitions(jobs=[tiny_job])
'''


@pytest.mark.timeout(180)
def test_execute_in_code_location_ties_the_run_to_the_location(tmp_path: Path) -> None:
    (tmp_path / "tiny_defs.py").write_text(TINY_LOCATION)
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_file:\n      relative_path: tiny_defs.py\n      location_name: tiny\n"
        f"      working_directory: {tmp_path}\n"
    )
    with instance_for_test() as instance:  # on disk, as the code server reads the instance too
        _execute_tiny_job(instance, workspace)


def _execute_tiny_job(instance: DagsterInstance, workspace: Path) -> None:
    run = automation.execute_in_code_location(instance, "tiny_job", workspace, "tiny", tags={"recsys/trigger": "test"})
    assert run.status.value == "SUCCESS"
    assert run.remote_job_origin is not None
    assert run.remote_job_origin.location_name == "tiny" and run.remote_job_origin.job_name == "tiny_job"
    assert run.tags["recsys/trigger"] == "test"
    # The UI lists a job's runs by job name and this label of the code location: the query it makes.
    listed = instance.get_runs(RunsFilter(job_name="tiny_job", tags={REPOSITORY_LABEL_TAG: "__repository__@tiny"}))
    assert [r.run_id for r in listed] == [run.run_id]
