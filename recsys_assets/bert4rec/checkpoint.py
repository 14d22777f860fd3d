"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a directory ``checkpoints/step-<n>/`` holding the model, the optimizer state
(tensors flattened to ``state.<param>.<key>``), the RNG states and ``state.json`` (optimizer
hyper-parameters, scheduler, grad scaler, data position, early stopping, the epoch log).
``checkpoints/latest.json`` names the newest complete one and is replaced atomically, so a run
killed while writing leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
KEEP = 2  # complete checkpoints kept on disk (the newest and one fallback)


@dataclass
class TrainingState:
    """Where training stands: enough to continue exactly as if never stopped."""

    epoch: int  # epoch of the next step
    step_in_epoch: int  # index of the next batch in that epoch
    global_step: int  # optimizer steps done
    epoch_loss_sum: float  # running sums of the current epoch (for its log line)
    epoch_loss_count: int
    epoch_seconds: float
    best_metric: float | None
    best_epoch: int | None
    bad_evals: int  # evaluations since the best one (early stopping)
    stopped: bool
    log: list[dict[str, Any]]
    fingerprint: str = ""  # the run configuration this state belongs to

    @classmethod
    def fresh(cls, fingerprint: str = "") -> "TrainingState":
        return cls(0, 0, 0, 0.0, 0, 0.0, None, None, 0, False, [], fingerprint)


def save_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: TrainingState,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.global_step:09d}"
    final = root / name
    tmp = root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        "param_groups": opt["param_groups"],
        "scalar_state": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "training": state.__dict__,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(json.dumps({"checkpoint": name}))
    pointer.replace(root / LATEST)
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[:-KEEP]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / json.loads(pointer.read_text())["checkpoint"]
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete or missing")
    return path


def checkpoint_fingerprint(path: Path) -> str:
    """The run configuration a checkpoint belongs to (read without loading any tensor)."""
    return str(json.loads((path / "state.json").read_text())["training"].get("fingerprint", ""))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> TrainingState:
    """Restores everything in place (RNG included) and returns the data position."""
    meta = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalar_state"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"] is not None:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return TrainingState(**meta["training"])
