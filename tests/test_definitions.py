"""The code location loads, and the Dagster webserver serves it over GraphQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _browser import browser_page
from _local import free_port

REPO = Path(__file__).resolve().parent.parent
DATA_ASSETS = {
    "raw_events",
    "cleaned_interactions",
    "quarantined_events",
    "item_vocabulary",
    "context_vocabulary",
    "tokenized_sequences",
    "user_sequence_features",
    "feast_online_store",
}
AUTOMATIONS = ("weekly_retrain_schedule", "daily_drift_schedule", "drift_retrain_sensor", "run_failure_alert")


def test_definitions_load_every_stage() -> None:
    from recsys_assets.definitions import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert DATA_ASSETS <= keys
    assert defs.resolve_job_def("retrain_job") is not None
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"counts_reconcile", "no_null_ids", "no_duplicate_events", "sequences_valid", "online_matches_offline"} <= checks


def test_jobs_schedules_and_sensors_of_the_location() -> None:
    """retrain_job leaves drift_report to drift_job, which re-ingests and re-cleans but runs nothing of
    training; the schedules and sensors are loaded, on by default, targeting those jobs."""
    from dagster import DefaultScheduleStatus, DefaultSensorStatus

    from recsys_assets.automation import AutomationSettings
    from recsys_assets.definitions import defs

    def selected(job_name: str) -> set[str]:
        job = defs.resolve_job_def(job_name)
        return {k.to_user_string() for k in job.asset_layer.selected_asset_keys}

    everything = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "drift_report" in everything
    assert "new_item_bundle" in everything
    assert selected("retrain_job") == everything - {"drift_report", "new_item_bundle"}
    assert selected("drift_job") == {"raw_events", "cleaned_interactions", "quarantined_events", "drift_report"}
    # new items between retrains: the data stages and the feature store, nothing of training
    assert selected("new_items_job") == DATA_ASSETS | {"new_item_bundle"}
    graph = defs.resolve_asset_graph()
    drift_checks = {c.name for c in defs.resolve_job_def("drift_job").asset_layer.asset_graph.asset_check_keys}
    assert {"counts_reconcile", "no_null_ids", "no_duplicate_events"} <= drift_checks

    repo = defs.get_repository_def()
    settings = AutomationSettings()  # the crons come from the environment (defaults: tests/test_automation.py)
    schedules = {s.name: (s.job_name, s.cron_schedule, s.default_status) for s in repo.schedule_defs}
    assert schedules == {
        "weekly_retrain_schedule": ("retrain_job", settings.retrain_cron, DefaultScheduleStatus.RUNNING),
        "daily_drift_schedule": ("drift_job", settings.drift_cron, DefaultScheduleStatus.RUNNING),
        "daily_new_items_schedule": ("new_items_job", settings.new_items_cron, DefaultScheduleStatus.RUNNING),
    }
    sensors = {s.name: s for s in repo.sensor_defs}
    assert {"drift_retrain_sensor", "run_failure_alert"} <= set(sensors)
    assert sensors["drift_retrain_sensor"].job_name == "retrain_job"
    assert all(sensors[n].default_status == DefaultSensorStatus.RUNNING for n in ("drift_retrain_sensor", "run_failure_alert"))
    assert "tensorrt_engine_built" in {c.name for c in graph.asset_check_keys}


@pytest.mark.parametrize("query", ["*evaluation_report", "cleaned_interactions", "quarantined_events"])
def test_selections_that_split_the_cleaning_multi_asset_resolve(query: str) -> None:
    """`dagster asset materialize --select '*evaluation_report'` takes cleaned_interactions but not
    quarantined_events: the cleaning multi-asset must be subsettable (DagsterInvalidSubsetError otherwise)."""
    from dagster import AssetKey, AssetSelection

    from recsys_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    selection = AssetSelection.from_string(query)
    keys = selection.resolve(graph)
    checks = selection.resolve_checks(graph)
    assert (AssetKey("cleaned_interactions") in keys) != (AssetKey("quarantined_events") in keys)
    # counts_reconcile follows cleaned_interactions: it is checked on the cleaning pass itself.
    cleaned_checks = {"counts_reconcile", "no_null_ids", "no_duplicate_events"}
    names = {c.name for c in checks}
    assert cleaned_checks <= names if AssetKey("cleaned_interactions") in keys else not cleaned_checks & names
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=keys, asset_check_selection=checks)
    assert "clean_raw_events" in {node.name for node in job.graph.node_defs}
    if query == "*evaluation_report":
        assert {k.to_user_string() for k in keys} == {
            "raw_events", "cleaned_interactions", "item_vocabulary", "context_vocabulary", "tokenized_sequences",
            "bert4rec_model", "baselines", "evaluation_report",
        }


@pytest.mark.timeout(180)
def test_webserver_lists_assets_over_graphql(tmp_path: Path) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_HOME": str(tmp_path / "recsys")}
    port = free_port()
    webserver = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = "{ assetNodes { assetKey { path } } }"
    try:
        deadline = time.monotonic() + 150
        names: set[str] = set()
        while time.monotonic() < deadline and not DATA_ASSETS <= names:
            assert proc.poll() is None, "dagster-webserver exited"
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10)
                nodes = reply.json().get("data", {}).get("assetNodes") or []
                names = {n["assetKey"]["path"][-1] for n in nodes}
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        assert DATA_ASSETS <= names, f"GraphQL listed {sorted(names)}"
        # The automations as the UI shows them: on by default in a fresh instance.
        automations = (
            '{ repositoryOrError(repositorySelector: {repositoryLocationName: "recsys", repositoryName: "__repository__"})'
            " { ... on Repository { schedules { name scheduleState { status } } sensors { name sensorState { status } } } } }"
        )
        repo = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": automations}, timeout=30).json()
        repo = repo["data"]["repositoryOrError"]
        states = {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
        states |= {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
        assert {n: states.get(n) for n in AUTOMATIONS} == dict.fromkeys(AUTOMATIONS, "RUNNING"), states
        _the_ui_shows_the_graph(f"http://127.0.0.1:{port}", tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _the_ui_shows_the_graph(url: str, shots: Path) -> None:
    """What a person sees in a real browser: the catalog lists every asset with its description,
    the evaluation group's lineage draws its assets, the job page names its stages."""
    with browser_page() as page:
        page.goto(f"{url}/assets")
        page.get_by_text("evaluation_report", exact=True).first.wait_for(timeout=60_000)
        catalog = page.inner_text("body")
        page.screenshot(path=str(shots / "catalog.png"))
        assert {"raw_events", "tokenized_sequences", "bert4rec_model", "model_bundle"} <= set(catalog.split())
        assert "Popularity, item-kNN and last-item" in catalog  # descriptions, not only names

        page.goto(f"{url}/locations/recsys/asset-groups/evaluation")
        page.get_by_text("evaluation_report", exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "evaluation_group.png"))
        assert "baselines" in page.inner_text("body")

        page.goto(f"{url}/locations/recsys/jobs/retrain_job")
        page.get_by_text("View as Asset Graph").wait_for(timeout=60_000)
        job = page.inner_text("body")
        page.screenshot(path=str(shots / "retrain_job.png"))
        assert {"ingest", "training", "sequences"} <= set(job.split()), job[:500]
