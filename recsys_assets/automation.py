"""Automation of the code location: drift_job, the schedules, the drift sensor that asks for a retrain
and the run-failure alert; plus `execute_in_code_location`, which `make run` uses so that its run
belongs to the workspace's code location like a run launched from the UI.

retrain_job itself is defined in recsys_assets/definitions.py (sensors and schedules here target it by
name, so this module does not import the Definitions). README.md, section "Automation", documents the
defaults and the environment variables. No `from __future__ import annotations`: Dagster inspects
the decorated functions' annotations at import time.
"""

import argparse
import sys
import time
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    EventLogRecord,
    RunFailureSensorContext,
    RunStatusSensorContext,
    RunRecord,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    run_status_sensor,
    sensor,
)
from dagster._utils.error import SerializableErrorInfo
from pydantic import AnyHttpUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys_assets.assets.metadata import DRIFT_VERDICT_METADATA
from recsys_assets.config import REPO_ROOT
from recsys_assets.monitoring.pushgateway import push_pipeline_outcome
from recsys_serving.contract import DRIFT_VERDICTS, RETRAIN_VERDICTS

RETRAIN_JOB = "retrain_job"
DRIFT_JOB = "drift_job"
NEW_ITEMS_JOB = "new_items_job"
CODE_LOCATION = "recsys"  # the location name in workspace.yaml
DRIFT_REPORT = AssetKey("drift_report")
CLEANED_INTERACTIONS = AssetKey("cleaned_interactions")
QUARANTINED_EVENTS = AssetKey("quarantined_events")
NEW_ITEM_BUNDLE = AssetKey("new_item_bundle")

# Tags on the runs that automation requests (Dagster reserves the `dagster/` prefix).
TRIGGER_TAG = "recsys/trigger"
DRIFT_REPORT_RUN_TAG = "recsys/drift_report_run_id"
DRIFT_REPORT_STORAGE_TAG = "recsys/drift_report_storage_id"
DRIFT_VERDICT_TAG = "recsys/drift_verdict"


class AutomationSettings(BaseSettings):
    """Field `x` is read from `RECSYS_X`. The schedules read theirs when the code location loads;
    the sensors re-read the rest at each tick."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", env_ignore_empty=True, extra="ignore")

    retrain_cron: str = Field(default="0 3 * * 1", description="weekly retrain_job: Monday 03:00")
    drift_cron: str = Field(default="0 2 * * *", description="daily drift_job: 02:00")
    new_items_cron: str = Field(default="0 4 * * *", description="daily new_items_job: 04:00")
    schedule_timezone: str = Field(default="UTC", description="IANA time zone of the crons")
    retrain_cooldown_h: float = Field(default=24.0, ge=0, description="hours after a retrain_job run during which drift does not retrain (0: never wait)")
    alert_webhook_url: AnyHttpUrl | None = Field(default=None, description="where run failures are POSTed as JSON")
    alert_webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    dagster_ui_url: AnyHttpUrl = Field(default=AnyHttpUrl("http://127.0.0.1:3000"), description="base of the run links in alerts")

    @field_validator("retrain_cron", "drift_cron", "new_items_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string  # the parser the scheduler itself uses

        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a cron string Dagster accepts (e.g. '0 3 * * 1')")
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return value


def load_settings() -> AutomationSettings:
    """The settings from the environment; an invalid value is a ValueError naming its variable."""
    try:
        return AutomationSettings()
    except ValidationError as exc:
        problems = "; ".join(f"RECSYS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid automation settings: {problems}") from None


# --------------------------------------------------------------------------- jobs

# Drift compares fresh events with the training reference: it re-ingests and re-cleans, and needs
# nothing that training makes, so any upstream asset past cleaning is left out (read as last
# materialized). Both outputs of the cleaning pass are stored, so that the quarantine of the newly
# ingested rows is kept rather than dropped with the pass's scratch table.
_PAST_CLEANING = AssetSelection.assets(CLEANED_INTERACTIONS).downstream(include_self=False) - AssetSelection.assets(DRIFT_REPORT)
DRIFT_SELECTION = (
    AssetSelection.assets(DRIFT_REPORT).upstream() | AssetSelection.assets(CLEANED_INTERACTIONS, QUARANTINED_EVENTS)
) - _PAST_CLEANING

drift_job = define_asset_job(
    DRIFT_JOB,
    selection=DRIFT_SELECTION,
    description="Fresh events against the training reference: ingest, clean, drift_report (whose verdict the "
    "drift sensor reads to request a retrain).",
)

# Items that arrived since the served model was trained, added to it between retrains (with the
# quarantine of the re-cleaned rows, as drift_job).
new_items_job = define_asset_job(
    NEW_ITEMS_JOB,
    selection=AssetSelection.assets(NEW_ITEM_BUNDLE).upstream() | AssetSelection.assets(QUARANTINED_EVENTS),
    description="Fresh events to a served bundle that knows the new items: ingest, clean, tokenize, features, "
    "new_item_bundle (no training; promoted through its gate).",
)


# --------------------------------------------------------------------------- schedules


def build_schedules(settings: AutomationSettings) -> list[ScheduleDefinition]:
    """The weekly retrain, the daily drift check and the daily new-item refresh, on by default: `make
    ui` runs the daemon that ticks them, and each only does what a person could start from the UI."""

    def schedule(name: str, job_name: str, setting: str) -> ScheduleDefinition:
        cron = getattr(settings, setting)
        return ScheduleDefinition(
            name=name,
            job_name=job_name,
            cron_schedule=cron,
            execution_timezone=settings.schedule_timezone,
            default_status=DefaultScheduleStatus.RUNNING,
            tags={TRIGGER_TAG: "schedule"},
            description=f"{job_name} at `{cron}` ({settings.schedule_timezone}); "
            f"RECSYS_{setting.upper()} / RECSYS_SCHEDULE_TIMEZONE.",
        )

    return [
        schedule("weekly_retrain_schedule", RETRAIN_JOB, "retrain_cron"),
        schedule("daily_drift_schedule", DRIFT_JOB, "drift_cron"),
        schedule("daily_new_items_schedule", NEW_ITEMS_JOB, "new_items_cron"),
    ]


# --------------------------------------------------------------------------- drift sensor


def _verdict_of(record: EventLogRecord) -> str | None:
    materialization = record.asset_materialization
    value = materialization.metadata.get(DRIFT_VERDICT_METADATA) if materialization else None
    return None if value is None else str(value.value)


def last_run_since(instance: DagsterInstance, job_name: str, since: datetime) -> RunRecord | None:
    """The latest run of `job_name` created after `since`, whatever its status: a failed retrain is
    alerted by run_failure_alert, not retried by every drift report."""
    records = instance.get_run_records(
        RunsFilter(job_name=job_name, created_after=since), limit=1, order_by="create_timestamp", ascending=False
    )
    return records[0] if records else None


def retrain_decision(
    instance: DagsterInstance, record: EventLogRecord, cooldown_h: float, now: float | None = None
) -> RunRequest | SkipReason:
    """One retrain_job run per drift_report materialization that calls for it, unless a retrain_job
    run was created since the report (it already answers it) or within the cool-down."""
    report = f"drift_report (run {record.run_id or 'none'}, storage id {record.storage_id})"
    verdict = _verdict_of(record)
    if verdict is None or verdict not in DRIFT_VERDICTS:
        return SkipReason(
            f"{report} has no valid {DRIFT_VERDICT_METADATA!r} metadata ({verdict!r}); expected one of {list(DRIFT_VERDICTS)}"
        )
    if verdict not in RETRAIN_VERDICTS:
        return SkipReason(f"{report}: verdict {verdict!r}, no retrain needed")
    now = time.time() if now is None else now
    since = min(record.timestamp, now - cooldown_h * 3600)
    last = last_run_since(instance, RETRAIN_JOB, datetime.fromtimestamp(since, tz=timezone.utc))
    if last is not None:
        run, created = last.dagster_run, last.create_timestamp.timestamp()
        if created >= record.timestamp:
            return SkipReason(f"{report}: verdict {verdict!r}, but {RETRAIN_JOB} run {run.run_id} ({run.status.value}) was created after it")
        return SkipReason(
            f"{report}: verdict {verdict!r} calls for a retrain, but {RETRAIN_JOB} run {run.run_id} "
            f"({run.status.value}) was created {(now - created) / 3600:.1f} h ago, within the "
            f"{cooldown_h:g} h cool-down (RECSYS_RETRAIN_COOLDOWN_H)"
        )
    return RunRequest(
        run_key=f"drift_report:{record.storage_id}",
        tags={
            TRIGGER_TAG: "drift",
            DRIFT_REPORT_RUN_TAG: record.run_id or "none",
            DRIFT_REPORT_STORAGE_TAG: str(record.storage_id),
            DRIFT_VERDICT_TAG: verdict,
        },
    )


@sensor(
    name="drift_retrain_sensor",
    job_name=RETRAIN_JOB,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests one retrain_job run when a new drift_report materialization's verdict calls for it "
    "(drift and/or degradation), at most one per RECSYS_RETRAIN_COOLDOWN_H hours (default 24).",
)
def drift_retrain_sensor(context: SensorEvaluationContext) -> SensorResult:
    after = int(context.cursor) if context.cursor else None
    # The newest report only: it supersedes any older one that arrived between two ticks.
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=DRIFT_REPORT, after_storage_id=after), limit=1, ascending=False
    ).records
    if not records:
        return SensorResult(skip_reason=SkipReason("no new drift_report materialization"), cursor=context.cursor)
    record = records[0]
    decision = retrain_decision(context.instance, record, load_settings().retrain_cooldown_h)
    if isinstance(decision, SkipReason):
        context.log.info(decision.skip_message)
        return SensorResult(skip_reason=decision, cursor=str(record.storage_id))
    return SensorResult(run_requests=[decision], cursor=str(record.storage_id))


# --------------------------------------------------------------------------- run-failure alert


def _root_message(error: SerializableErrorInfo) -> str:
    # Dagster wraps the user's exception in DagsterExecutionStepExecutionError; the cause is what failed.
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def failure_error(context: RunFailureSensorContext) -> str:
    """The failed steps' errors (what a person needs), else the run-level failure message."""
    steps = [
        f"{event.step_key}: {_root_message(event.step_failure_data.error)}"
        for event in context.get_step_failure_events()
        if event.step_failure_data.error is not None
    ]
    if steps:
        return "\n".join(steps)
    error = getattr(context.failure_event.event_specific_data, "error", None)
    return _root_message(error) if error is not None else str(context.failure_event.message)


def alert_body(run: DagsterRun, error: str, ui_url: str) -> dict[str, Any]:
    """The webhook's JSON; `text` makes it readable as-is by Slack/Mattermost-style incoming webhooks."""
    url = f"{ui_url.rstrip('/')}/runs/{run.run_id}"
    return {
        "text": f"Dagster run of {run.job_name} failed: {error.splitlines()[0] if error else ''} {url}",
        "job": run.job_name,
        "run_id": run.run_id,
        "status": run.status.value,
        "error": error,
        "run_url": url,
        "tags": {k: v for k, v in run.tags.items() if not k.startswith(".dagster")},
    }


def post_alert(url: str, body: Mapping[str, Any], timeout_s: float) -> str | None:
    """POSTs the alert; returns why it failed, or None. Never raises: a sensor that raised would
    retry the same failure at every tick."""
    try:
        httpx.post(url, json=dict(body), timeout=timeout_s).raise_for_status()
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@run_failure_sensor(
    name="run_failure_alert",
    default_status=DefaultSensorStatus.RUNNING,
    description="Logs every failed run of this code location and, when RECSYS_ALERT_WEBHOOK_URL is set, POSTs "
    "it there as JSON (job, run id, error, link to the run).",
)
def run_failure_alert(context: RunFailureSensorContext) -> None:
    run = context.dagster_run
    error = failure_error(context)
    context.log.error(f"run {run.run_id} of {run.job_name} failed: {error}")
    push_pipeline_outcome(run.job_name, succeeded=False)  # RecsysRetrainFailed; no-op without a gateway
    try:
        settings = load_settings()
    except ValueError as exc:
        context.log.error(f"alert not sent: {exc}")
        return
    if settings.alert_webhook_url is None:
        return
    body = alert_body(run, error, str(settings.dagster_ui_url))
    why = post_alert(str(settings.alert_webhook_url), body, settings.alert_webhook_timeout_s)
    if why:
        context.log.warning(f"alert for run {run.run_id} not delivered to the webhook: {why}")
    else:
        context.log.info(f"alert for run {run.run_id} delivered to the webhook")


@run_status_sensor(
    name="run_success_metrics",
    run_status=DagsterRunStatus.SUCCESS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Pushes the time of each successful run to the Pushgateway (RECSYS_PUSHGATEWAY_URL), so "
    "the retrain-failure alert clears once a later run of the job succeeds.",
)
def run_success_metrics(context: RunStatusSensorContext) -> None:
    run = context.dagster_run
    if push_pipeline_outcome(run.job_name, succeeded=True):
        context.log.info(f"pushed the success of {run.job_name} run {run.run_id}")


# --------------------------------------------------------------------------- composed by definitions.py

jobs = [drift_job, new_items_job]
schedules = build_schedules(load_settings())
sensors = [drift_retrain_sensor, run_failure_alert, run_success_metrics]


# --------------------------------------------------------------------------- make run


def execute_in_code_location(
    instance: DagsterInstance,
    job_name: str,
    workspace_file: Path = REPO_ROOT / "workspace.yaml",
    location: str = CODE_LOCATION,
    tags: Mapping[str, str] | None = None,
) -> DagsterRun:
    """Runs `job_name` of the workspace's code location `location` here, in this process, and
    returns the finished run.

    Hand-written because the CLI of Dagster 1.13 offers either an untied run (`dagster job execute`
    takes only -m/-f, so its run has no code location: the UI does not list it under the job or on
    the timeline, and the run-failure sensor ignores it) or a tied one that only the daemon starts
    (`dagster job launch -w` queues it on the QueuedRunCoordinator). This is what `job launch` and
    the run worker do, in sequence: the run is created with the origin that the workspace's code
    server reports, then executed in the foreground with its logs on the terminal.
    """
    from dagster._core.execution.api import execute_run
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._utils.hosted_user_process import recon_job_from_origin
    from dagster._utils.interrupts import capture_interrupts

    target = WorkspaceFileTarget(paths=[str(workspace_file)])
    with WorkspaceProcessContext(instance, workspace_load_target=target) as process_context:
        workspace = process_context.create_request_context()
        if location not in workspace.code_location_names:
            raise ValueError(f"no code location {location!r} in {workspace_file}: {workspace.code_location_names}")
        if workspace.has_code_location_error(location):
            raise RuntimeError(f"code location {location!r} failed to load: {workspace.get_code_location_error(location)}")
        code_location = workspace.get_code_location(location)
        (repository,) = code_location.get_repositories().values()  # Definitions make one repository
        if not repository.has_job(job_name):
            raise ValueError(f"no job {job_name!r} in code location {location!r}: {sorted(j.name for j in repository.get_all_jobs())}")
        remote_job = repository.get_full_job(job_name)
        remote_origin, code_origin = remote_job.get_remote_origin(), remote_job.get_python_origin()
    recon_job = recon_job_from_origin(code_origin)
    run = instance.create_run_for_job(
        recon_job.get_definition(),
        tags={**remote_job.tags, **(tags or {})},
        remote_job_origin=remote_origin,
        job_code_origin=code_origin,
    )
    with capture_interrupts():
        execute_run(recon_job, run, instance)
    finished = instance.get_run_by_id(run.run_id)
    assert finished is not None
    return finished


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys_assets.automation",
        description="Execute a job of the workspace's code location in this process (the run shows in the UI "
        "under its job and code location). DAGSTER_HOME must be set.",
    )
    parser.add_argument("job", help="e.g. retrain_job")
    parser.add_argument("-w", "--workspace", type=Path, default=REPO_ROOT / "workspace.yaml")
    parser.add_argument("-l", "--location", default=CODE_LOCATION)
    args = parser.parse_args(argv)
    with DagsterInstance.get() as instance:
        run = execute_in_code_location(instance, args.job, args.workspace, args.location)
    print(f"run {run.run_id} of {run.job_name} ({args.location}): {run.status.value}")
    return 0 if run.status == DagsterRunStatus.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
