"""The code location loads, and the Dagster webserver serves it over GraphQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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


def test_definitions_load_every_stage() -> None:
    from recsys_assets.definitions import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert DATA_ASSETS <= keys
    assert defs.resolve_job_def("retrain_job") is not None
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"counts_reconcile", "no_null_ids", "time_ordered", "sequences_valid", "online_matches_offline"} <= checks


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
    cleaned_checks = {"counts_reconcile", "no_null_ids", "time_ordered"}
    names = {c.name for c in checks}
    assert cleaned_checks <= names if AssetKey("cleaned_interactions") in keys else not cleaned_checks & names
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=keys, asset_check_selection=checks)
    assert "clean_raw_events" in {node.name for node in job.graph.node_defs}
    if query == "*evaluation_report":
        assert {k.to_user_string() for k in keys} == {
            "raw_events", "cleaned_interactions", "item_vocabulary", "context_vocabulary", "tokenized_sequences",
            "bert4rec_model", "baselines", "evaluation_report",
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_webserver_lists_assets_over_graphql(tmp_path: Path) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_HOME": str(tmp_path / "recsys")}
    port = _free_port()
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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
