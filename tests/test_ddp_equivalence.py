"""Two gloo processes under torchrun train the same model as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from _local import free_port, write_sasrec_sequences
from recsys_assets.bert4rec.cli import main as cli_main

ARGS = [
    "--preset", "synthetic", "--epochs", "2", "--threads", "1", "--device", "cpu", "--no-resume",
    "--set", "model.hidden=16", "--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.max_len=8",
    "--set", "model.dropout=0.0",  # dropout draws differ per process by design; the data path must not
    "--set", "train.batching.batch_size=24", "--set", "train.batching.mask_prob=0.3",
    "--set", "train.batching.window_fraction=1.0", "--set", "train.lr=0.001",
    "--set", "train.amp=\"none\"", "--set", "train.patience=null", "--set", "train.checkpoint_every=5",
]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    data = tmp_path / "seq.txt"
    write_sasrec_sequences(data, 60)
    env = {**os.environ, "RECSYS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "recsys_assets.bert4rec.cli",
        "--data", str(data), "--out", str(tmp_path / "ddp"), *ARGS,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert cli_main(["--data", str(data), "--out", str(tmp_path / "single"), *ARGS]) == 0

    ddp, single = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "single" / "model.safetensors"))
    start = load_file(str(tmp_path / "single" / "checkpoints" / sorted(
        p.name for p in (tmp_path / "single" / "checkpoints").glob("step-*"))[0] / "model.safetensors"))
    moved = 0.0
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=2e-5, msg=name)
        moved = max(moved, float((single[name] - start[name]).abs().max()))
    assert moved > 1e-4  # the comparison is about a model that actually trained after the first checkpoint
    log_ddp = json.loads((tmp_path / "ddp" / "training_log.json").read_text())
    log_single = json.loads((tmp_path / "single" / "training_log.json").read_text())
    assert [r["steps"] for r in log_ddp] == [r["steps"] for r in log_single]
    for a, b in zip(log_ddp, log_single):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["valid_NDCG@10"] - b["valid_NDCG@10"]) < 1e-6
