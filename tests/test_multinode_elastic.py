"""Two torchrun "nodes" on localhost, started with the multi-node manifest's own torchrun arguments
(deploy/k8s/training-multinode.yaml: --nnodes 2, c10d rendezvous, --max-restarts): one node is
killed with SIGKILL mid-run and started again, as Kubernetes restarts a preempted pod; the elastic
agents meet again, the workers resume from the checkpoint on the shared directory, and the run ends
where an uninterrupted run ends (gloo here, NCCL on the cluster)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file

from _local import free_port, write_sasrec_sequences
from recsys_assets.bert4rec.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "k8s" / "training-multinode.yaml"

# Small and deterministic (no dropout: its draws differ per process by design), long enough to be
# killed in the middle: 6 epochs of about 17 steps, a checkpoint every 5.
TRAINING_ARGS = [
    "--preset", "synthetic", "--epochs", "6", "--threads", "1", "--device", "cpu",
    "--set", "model.hidden=16", "--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.max_len=8",
    "--set", "model.dropout=0.0", "--set", "train.batching.batch_size=24", "--set", "train.batching.mask_prob=0.3",
    "--set", "train.batching.window_fraction=1.0", "--set", "train.lr=0.001", "--set", "train.amp=\"none\"",
    "--set", "train.patience=null", "--set", "train.checkpoint_every=5",
]
KILL_AFTER_STEP = 10


def _manifest_trainer() -> dict:
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc and doc.get("kind") == "Job":
            (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer"]
            assert container["command"] == ["torchrun"]
            return container
    raise AssertionError(f"no Job in {MANIFEST}")


def _manifest_torchrun_args() -> list[str]:
    """The trainer container's torchrun options and module (up to `-m <module>`)."""
    args = _manifest_trainer()["args"]
    return args[: args.index("-m") + 2]


def _manifest_env() -> dict[str, str]:
    """The trainer container's literal environment (not the ConfigMap's or the downward API's)."""
    return {e["name"]: e["value"] for e in _manifest_trainer()["env"] if "value" in e}


def _node_command(port: int, data: Path, out: Path) -> list[str]:
    """The manifest's torchrun command, with what differs on localhost: one CPU process per node, the
    rendezvous on 127.0.0.1, this test's data and output."""
    local = {"--nproc-per-node": "1", "--rdzv-endpoint": f"127.0.0.1:{port}", "--rdzv-id": "elastic-test"}
    torchrun: list[str] = []
    for arg in _manifest_torchrun_args():
        name = arg.split("=", 1)[0]
        torchrun.append(f"{name}={local[name]}" if name in local else arg)
    assert {"--nnodes=2", "--rdzv-backend=c10d"} <= set(torchrun) and any(a.startswith("--max-restarts") for a in torchrun)
    # torchrun is the console script of torch.distributed.run: the same entry point, without PATH
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, "--data", str(data), "--out", str(out),
            *TRAINING_ARGS]


def _wait_listening(port: int, node: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _latest_step(out: Path) -> int:
    try:
        name = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]  # step-<n>
        return int(name.rsplit("-", 1)[1])
    except (OSError, ValueError, KeyError):
        return -1


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL to the agent and every process under it, as when a pod goes: torchrun starts each
    worker in a session of its own, so killing the agent's process group would leave them running."""
    processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    node.wait(timeout=30)


def test_a_killed_node_rejoins_and_the_run_resumes_from_the_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    data, out = tmp_path / "seq.txt", tmp_path / "shared" / "multinode"
    write_sasrec_sequences(data, 200)
    env = {**os.environ, **_manifest_env(), "RECSYS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    port = free_port()
    cmd = _node_command(port, data, out)
    nodes = [_start(cmd, env, tmp_path / "node0.log")]
    try:
        # On the cluster only pod 0 is the endpoint's host, so it hosts the rendezvous store; here both
        # nodes are 127.0.0.1, so node 1 starts once node 0 listens. Killing the host ends the
        # rendezvous for all (the Job then replaces both pods); the test kills the other node.
        _wait_listening(port, nodes[0], tmp_path / "node0.log")
        nodes.append(_start(cmd, env, tmp_path / "node1.log"))
        deadline = time.monotonic() + 240
        while _latest_step(out) < KILL_AFTER_STEP:
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after step 10"
            time.sleep(0.02)
        killed_at = _latest_step(out)
        _kill_node(nodes[1])
        assert not (out / "model.safetensors").exists()  # killed mid-run, not after it
        nodes[1] = _start(cmd, env, tmp_path / "node1-restarted.log")  # the Job restarts the pod
        for node in nodes:
            node.wait(timeout=240)
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_node(node)
    logs = {p.name: p.read_text() for p in sorted(tmp_path.glob("node*.log"))}
    assert [n.returncode for n in nodes] == [0, 0], {k: v[-3000:] for k, v in logs.items()}

    # The surviving node's agent restarted its worker, which resumed from a checkpoint at or after
    # the one seen before the kill; so did the restarted node's worker.
    resumed = [int(line.split()[6]) for text in (logs["node0.log"], logs["node1-restarted.log"])
               for line in text.splitlines() if line.startswith("resuming from the checkpoint at step")]
    assert resumed and min(resumed) >= killed_at, logs["node0.log"][-3000:]

    assert cli_main(["--data", str(data), "--out", str(tmp_path / "uninterrupted"), "--no-resume", *TRAINING_ARGS]) == 0
    elastic = load_file(str(out / "model.safetensors"))
    reference = load_file(str(tmp_path / "uninterrupted" / "model.safetensors"))
    for name in reference:
        torch.testing.assert_close(elastic[name], reference[name], rtol=1e-4, atol=2e-5, msg=name)
    log_elastic = json.loads((out / "training_log.json").read_text())
    log_reference = json.loads((tmp_path / "uninterrupted" / "training_log.json").read_text())
    assert [r["steps"] for r in log_elastic] == [r["steps"] for r in log_reference]
    for a, b in zip(log_elastic, log_reference):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
