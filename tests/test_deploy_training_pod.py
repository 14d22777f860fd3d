"""The training pod that `bert4rec_model` starts through Dagster Pipes on Kubernetes.

Its spec is built by dagster-k8s's own builder (`dagster_k8s.pipes.build_pod_body`, what
`PipesK8sClient.run` sends to the API server) and validated against the Kubernetes schema; its
command is then run for real here (torchrun, one CPU process) on a small warehouse, and the asset's
way of reading the result back gives what a local `train()` returns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import kubernetes
import kubernetes_validate
import numpy as np
import pytest
import torch
from dagster_k8s.pipes import build_pod_body, get_pod_name
from safetensors.torch import load_file

from recsys_assets.bert4rec.cli import parse_overrides
from recsys_assets.bert4rec.data import SequenceData
from recsys_assets.bert4rec.presets import build_configs
from recsys_assets.bert4rec.train import train
from recsys_assets.k8s import GPU_RESOURCE, TRAINING_CLI_MODULE, TrainingLauncherSettings, result_from_directory, training_pod_request

K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
PIPES_CONTEXT = "DAGSTER_PIPES_CONTEXT"  # set by the Pipes session; build_pod_body copies it to every container


def _configs(n_devices: int = 3):
    sizes = {"tod": 5, "event_types": 4, "devices": n_devices, "segments": 2}
    over = {"hidden": 16, "layers": 1, "heads": 2, "max_len": 8}
    train_over = {"epochs": 1, "batching.batch_size": 16, "seed": 3, "num_threads": 1}
    model_cfg, _ = build_configs("synthetic", 40, sizes, over, train_over)
    return model_cfg, train_over


@pytest.fixture
def training_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECSYS_TRAINING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECSYS_TRAINING_LAUNCHER", "k8s")
    monkeypatch.setenv("RECSYS_TRAINING_IMAGE", "registry.example.com/recsys/recsys-dagster:0.1.0-cuda")
    monkeypatch.setenv("RECSYS_TRAINING_GPUS", "2")
    monkeypatch.setenv("RECSYS_TRAINING_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')


def test_local_training_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECSYS_TRAINING_"):
            monkeypatch.delenv(name)
    assert TrainingLauncherSettings().launcher == "local"
    with pytest.raises(ValueError, match="RECSYS_TRAINING_IMAGE"):
        model_cfg, train_over = _configs()
        training_pod_request(
            TrainingLauncherSettings(launcher="k8s"), run_id="r", preset="synthetic",
            model_config=model_cfg, train_overrides=train_over,
        )


def test_pod_spec_from_dagster_k8s_builder(training_env: None) -> None:
    settings = TrainingLauncherSettings()
    model_cfg, train_over = _configs()
    request = training_pod_request(
        settings, run_id="run-1", preset="synthetic", model_config=model_cfg, train_overrides=train_over
    )
    pod = build_pod_body(
        pod_name=get_pod_name("run-1", "bert4rec_model"),
        image=request.image,
        command=request.command,
        env_vars={**request.env, PIPES_CONTEXT: "e30="},
        base_pod_meta=request.base_pod_meta,
        base_pod_spec=request.base_pod_spec,
    )
    body = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
    body = {"apiVersion": "v1", "kind": "Pod", **body}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(body, version, strict=True)

    spec = pod.spec
    assert spec.restart_policy == "Never"
    assert spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.to_dict().items() if v is not None} for t in spec.tolerations
    ]
    assert spec.security_context.run_as_non_root and spec.security_context.run_as_user == 10001
    (container,) = spec.containers
    assert container.image == "registry.example.com/recsys/recsys-dagster:0.1.0-cuda"
    command = container.command
    assert command[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    assert command[4:6] == ["-m", TRAINING_CLI_MODULE]
    assert command[command.index("--data") + 1] == "/var/lib/recsys/warehouse.duckdb"
    assert command[command.index("--out") + 1] == "/var/lib/recsys/models/run-1"
    assert container.resources.requests[GPU_RESOURCE] == "2"
    assert container.resources.limits[GPU_RESOURCE] == "2"
    env = {e.name: e.value for e in container.env}
    assert env["RECSYS_HOME"] == "/var/lib/recsys" and env[PIPES_CONTEXT] == "e30="
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    volumes = {v.name: v for v in spec.volumes}
    assert volumes[mounts["/var/lib/recsys"]].persistent_volume_claim.claim_name == "recsys-data"
    assert volumes[mounts["/tmp"]].empty_dir is not None
    assert volumes[mounts["/dev/shm"]].empty_dir.medium == "Memory"


def test_the_cli_builds_the_assets_network_from_the_command(training_env: None) -> None:
    """The pod's CLI sees other context sizes in the data than the asset's vocabularies: the command's
    --set arguments still make it build exactly the asset's model and training configuration."""
    settings = TrainingLauncherSettings()
    model_cfg, train_over = _configs(n_devices=7)
    request = training_pod_request(
        settings, run_id="r", preset="synthetic", model_config=model_cfg, train_overrides=train_over
    )
    sets = [request.command[i + 1] for i, arg in enumerate(request.command) if arg == "--set"]
    model_over, cli_train_over = parse_overrides(sets)
    cli_model, cli_train = build_configs("synthetic", 40, {"devices": 2, "tod": 5}, model_over, cli_train_over)
    assert cli_model == model_cfg
    _, expected_train = build_configs("synthetic", 40, None, None, {**train_over, "device": "cuda"})
    assert cli_train == expected_train


def _warehouse(path: Path) -> None:
    rng = np.random.default_rng(0)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE tokenized_sequences (user_id VARCHAR, tokens INTEGER[])")
        rows = [(f"u{i}", [int(t) for t in rng.integers(2, 40, size=int(rng.integers(4, 9)))]) for i in range(48)]
        con.executemany("INSERT INTO tokenized_sequences VALUES (?, ?)", rows)
        con.execute("CREATE TABLE item_vocabulary AS SELECT range AS token FROM range(40)")


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not in the venv")
def test_the_pods_command_trains_and_the_asset_reads_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command as the pod runs it (CPU: no GPU here), then the asset's read-back of the model: the
    same result, to the weights, as the local path's `train()` with the same configuration."""
    home = tmp_path / "home"
    home.mkdir()
    _warehouse(home / "warehouse.duckdb")
    settings = TrainingLauncherSettings(launcher="k8s", image="unused", gpus=0, home=str(home))
    data = SequenceData.from_duckdb(home / "warehouse.duckdb")
    model_cfg, train_over = _configs()
    model_cfg = model_cfg.model_copy(update={"vocab_size": data.vocab_size})
    request = training_pod_request(
        settings, run_id="pod-run", preset="synthetic", model_config=model_cfg, train_overrides=train_over
    )
    assert "--nproc-per-node=1" in request.command
    command = [str(Path(sys.executable).parent / request.command[0]), *request.command[1:]]
    env = {**os.environ, **request.env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["path"] == request.out_dir

    result = result_from_directory(request.out_dir)
    _, train_cfg = build_configs("synthetic", data.vocab_size, None, None, {**train_over, "device": "cpu"})
    local = train(model_cfg, train_cfg, data, tmp_path / "local")
    assert result.config == local.config
    assert result.train_config == local.train_config
    assert (result.epochs, result.best_epoch, result.best_valid) == (local.epochs, local.best_epoch, local.best_valid)
    assert result.epochs == summary["epochs"] == 1
    assert [r["train_loss"] for r in result.log] == [r["train_loss"] for r in local.log]
    pod_weights = load_file(str(Path(request.out_dir) / "model.safetensors"))
    local_weights = load_file(str(tmp_path / "local" / "model.safetensors"))
    assert pod_weights.keys() == local_weights.keys()
    assert all(torch.equal(pod_weights[k], local_weights[k]) for k in pod_weights)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        result_from_directory(tmp_path / "missing")
