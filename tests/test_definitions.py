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
