"""Cost of a BERT4Rec training step as the catalogue grows (20k, 200k, 2M items) on this CPU.

For each catalogue size and loss (sampled softmax with logQ correction by default, full softmax on
request) it builds the client's network (hidden 256, 4 layers, 8 heads, length 50) with the
library's AdamW, negative sampler and objective, feeds it synthetic batches cut and masked by the
library's own `ExampleIndex` / `BatchBuilder` (uniform random item tokens, `--seq-len` items per
user, one window per user: an epoch is one sequence per user), and measures:

- parameter bytes per table (item, previous-item input, input item, output bias, context and
  position tables) and of the rest of the network; gradient bytes and AdamW state bytes
  (exp_avg + exp_avg_sq), read from the tensors after a step;
- ms per step (split into data, forward, backward, clip + AdamW), sequences/s, peak RSS;
- FLOPs of one step (forward + backward) with `torch.utils.flop_counter.FlopCounterMode`, and the
  item-table rows that got a non-zero gradient in it;
- the time of one epoch (`EPOCH_SEQUENCES`, the users left after cleaning 100M events) here, and
  projected onto one A100 and onto 8 from the measured FLOPs and the bytes the dense optimizer
  update moves (assumptions: the constants below).

Each (catalogue, loss) runs in its own spawned process, so its peak RSS is its own.

    python benchmarks/train_scale.py                                # 20k, 200k, 2M items, sampled
    python benchmarks/train_scale.py --loss sampled full --out .recsys/reports/train_scale.json
    python benchmarks/train_scale.py --items 2000 --steps 2 --warmup 1

A configuration whose peak RSS, extrapolated from the two smaller catalogues of the same loss (or
estimated from its tensors where there are none), would not fit in the memory available now is
not run (rather than run into the OOM killer, next to other people's work): its table sizes come from
the network built on the meta device, its time, FLOPs and peak RSS from the two largest measured
runs of the same loss, and the report marks every such figure with '~'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from recsys_assets.bert4rec.data import Batch, BatchBuilder, BatchingConfig, ExampleIndex  # noqa: E402
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig  # noqa: E402
from recsys_assets.bert4rec.presets import CLIENT_NETWORK  # noqa: E402
from recsys_assets.bert4rec.train import (  # noqa: E402
    NegativeSampler,
    TrainConfig,
    _autocast,
    _Objective,
    build_optimizer,
    build_scheduler,
    keep_cpu_allocations_mapped,
    resolve_amp,
)
from recsys_serving.contract import FIRST_ITEM_TOKEN  # noqa: E402

# The client's data after cleaning 100M events (README: data pipeline scale): one sequence per user
# is one epoch here.
EPOCH_SEQUENCES = 7_080_984
# Projection onto A100s. Assumptions, not measurements:
A100_BF16_PEAK_FLOPS = 312e12  # dense bf16 tensor-core peak
ASSUMED_MFU = 0.35  # share of that peak a step of this size reaches
A100_HBM_BYTES_PER_S = 2.0e12  # HBM2e, 80 GB part
A100_NVLINK_BYTES_PER_S = 300e9  # per direction, what a ring all-reduce moves per GPU
DDP_SCALING_EFFICIENCY = 0.9  # 8 GPUs: stragglers and the rest of the communication
N_GPUS = 8
# Bytes one fp32 parameter element costs per step with dense gradients (nn.Embedding without
# sparse=True) and fused AdamW, which updates every element of every table on every step:
ADAMW_BYTES_PER_ELEMENT = 28  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
GRAD_BYTES_PER_ELEMENT = 16  # dense gradient zero-filled (4), read for the clip norm (4), rescaled in place (8)
CONTEXT_TABLES = ("pos_emb", "tod_emb", "event_emb", "device_emb", "segment_emb")


# --------------------------------------------------------------------------- one configuration


def synthetic_batches(
    model_cfg: BERT4RecConfig, batching: BatchingConfig, n_batches: int, seq_len: int, seed: int
) -> tuple[Callable[[int], Batch], np.ndarray]:
    """Uniform random user sequences cut and masked by the library; returns batch(step) and the
    item counts the popularity sampler is fit on."""
    rng = np.random.default_rng(seed)
    # "last" windows: one per user, so n_batches * batch users; "prefixes" gives more than enough
    n_users = n_batches * batching.batch_size
    flat = rng.integers(FIRST_ITEM_TOKEN, model_cfg.vocab_size, size=(n_users, seq_len))
    sequences = list(flat)
    contexts = {
        "tod": list(rng.integers(1, model_cfg.n_tod, size=(n_users, seq_len))),
        "event_types": list(rng.integers(1, model_cfg.n_event_types, size=(n_users, seq_len))),
    }
    index = ExampleIndex(sequences, batching, model_cfg.max_len)
    builder = BatchBuilder(sequences, contexts, index, seed)
    batches = index.epoch_batches(seed, 0)
    counts = np.bincount(flat.ravel(), minlength=model_cfg.vocab_size)
    return (lambda step: builder.build(batches[step % len(batches)], 0, step)), counts


class Step:
    """One optimizer step as `train()` runs it on one CPU process (no DDP, no GradScaler: both are
    no-ops there), with the time of each phase."""

    def __init__(self, model: BERT4Rec, cfg: TrainConfig, counts: np.ndarray, total_steps: int) -> None:
        self.model, self.cfg = model, cfg
        self.device = torch.device("cpu")
        self.amp = resolve_amp(cfg, self.device, model.config.hidden)
        self.sampler = NegativeSampler(counts, cfg, cfg.seed) if cfg.loss == "sampled" else None
        self.log_q = self.sampler.log_q if self.sampler is not None else None
        self.objective = _Objective(model, cfg, self.log_q)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)

    def __call__(
        self, batch_of: Callable[[int], Batch], step: int, after_backward: Callable[[], None] | None = None
    ) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = batch_of(step)
        neg = neg_lq = None
        if self.sampler is not None:
            neg = torch.from_numpy(self.sampler.draw(0, step))
            neg_lq = self.log_q[neg]
        t1 = time.perf_counter()
        with _autocast(self.device, self.amp):
            loss_sum = self.objective(batch.tokens, batch.labels, batch.contexts, neg, neg_lq)
        loss = loss_sum / batch.n_targets_global
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        if after_backward is not None:
            after_backward()
        t3b = time.perf_counter()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        t4 = time.perf_counter()
        return {
            "data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3b,
            "total": (t4 - t0) - (t3b - t3), "targets": float(batch.n_targets_global), "loss": float(loss.detach()),
        }


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def table_bytes(model: BERT4Rec) -> dict[str, int]:
    """Parameter bytes per table and of the rest of the network."""
    tables = {
        "item_table": _nbytes(model.item_emb.weight),
        "prev_item_table": _nbytes(model.prev_item_emb.weight) if model.prev_item_emb is not None else 0,
        "input_item_table": _nbytes(model.item_in_emb.weight) if model.item_in_emb is not None else 0,
        "output_bias": _nbytes(model.out_bias),
        "context_and_position_tables": sum(_nbytes(getattr(model, n).weight) for n in CONTEXT_TABLES),
    }
    total = sum(_nbytes(p) for p in model.parameters())
    tables["rest_of_network"] = total - sum(tables.values())
    tables["all_parameters"] = total
    return tables


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Builds and times one (catalogue, loss) configuration; runs in its own process."""
    torch.set_num_threads(spec["threads"])
    keep_cpu_allocations_mapped()  # as train() does on CPU
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    model_cfg = BERT4RecConfig.model_validate({**CLIENT_NETWORK, "vocab_size": spec["items"] + FIRST_ITEM_TOKEN})
    defaults = TrainConfig()
    batching = defaults.batching.model_copy(update={"batch_size": spec["batch_size"], "windows": spec["windows"]})
    cfg = defaults.model_copy(update={
        "loss": spec["loss"], "num_negatives": spec["num_negatives"], "batching": batching,
        "device": "cpu", "num_threads": spec["threads"], "seed": spec["seed"],
    })
    n_batches = spec["warmup"] + spec["steps"] + 1
    batch_of, counts = synthetic_batches(model_cfg, batching, n_batches, spec["seq_len"], spec["seed"])
    model = BERT4Rec(model_cfg)
    model.train()
    step = Step(model, cfg, counts, total_steps=n_batches)
    build_s = time.perf_counter() - started

    warm_s = 0.0
    for i in range(spec["warmup"]):
        warm_s = step(batch_of, i)["total"]
    # fewer timed steps where the warm-up says the requested count would overrun the budget
    n_steps = spec["steps"] if warm_s == 0.0 else max(2, min(spec["steps"], int(spec["budget_s"] / warm_s)))
    timings = [step(batch_of, spec["warmup"] + i) for i in range(n_steps)]

    rows_with_grad: dict[str, int] = {}

    def count_rows() -> None:
        for name in ("item_emb", "prev_item_emb", "item_in_emb"):
            table = getattr(model, name)
            if table is not None and table.weight.grad is not None:
                rows_with_grad[name] = int((table.weight.grad != 0).any(dim=1).sum())

    flop_counter = FlopCounterMode(display=False)
    with flop_counter:
        step(batch_of, spec["warmup"] + n_steps, after_backward=count_rows)
    flops = int(flop_counter.get_total_flops())
    per_module = flop_counter.get_flop_counts()
    model_flops = int(sum(per_module.get("_Objective.model", {}).values()))

    state = step.optimizer.state
    adam_bytes = sum(_nbytes(s.get("exp_avg")) + _nbytes(s.get("exp_avg_sq")) for s in state.values())
    all_state_bytes = sum(_nbytes(v) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    grad_bytes = sum(_nbytes(p.grad) for p in model.parameters())
    dense_grads = all(p.grad is None or p.grad.layout == torch.strided for p in model.parameters())
    n_elements = sum(p.numel() for p in model.parameters())

    def mean(key: str) -> float:
        return float(np.mean([t[key] for t in timings]))

    step_s = mean("total")
    return {
        "items": spec["items"], "loss": spec["loss"], "vocab_size": model_cfg.vocab_size, "hidden": model_cfg.hidden,
        "num_negatives": cfg.num_negatives if cfg.loss == "sampled" else None,
        "negative_sampler": cfg.negative_sampler if cfg.loss == "sampled" else None,
        "batch_size": batching.batch_size, "windows": batching.windows, "mask_prob": batching.mask_prob,
        "seq_len": spec["seq_len"], "amp": str(step.amp) if step.amp is not None else "none",
        "targets_per_step": mean("targets"), "build_seconds": build_s,
        "warmup_steps": spec["warmup"], "timed_steps": n_steps,
        "ms_per_step": 1e3 * step_s, "ms_per_step_min": 1e3 * min(t["total"] for t in timings),
        "ms_phases": {k: 1e3 * mean(k) for k in ("data", "forward", "backward", "optimizer")},
        "sequences_per_s": batching.batch_size / step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "parameter_bytes": table_bytes(model), "parameter_elements": n_elements,
        "gradient_bytes": grad_bytes, "dense_gradients": dense_grads,
        "adamw_exp_avg_plus_sq_bytes": adam_bytes, "adamw_all_state_bytes": all_state_bytes,
        "adamw_fused": bool(step.optimizer.defaults.get("fused")),
        "flops_per_step": flops, "flops_in_network": model_flops, "flops_in_loss": flops - model_flops,
        "item_rows_with_gradient": rows_with_grad, "last_loss": timings[-1]["loss"],
    }


# --------------------------------------------------------------------------- projection


def project(r: dict[str, Any]) -> dict[str, Any]:
    """Epoch times here and on A100s: per step the larger of FLOP-bound and memory-bound."""
    steps_per_epoch = math.ceil(EPOCH_SEQUENCES / r["batch_size"])
    flop_s = r["flops_per_step"] / (A100_BF16_PEAK_FLOPS * ASSUMED_MFU)
    # the optimizer updates every element of every table densely: its bytes do not shrink with the batch
    dense_bytes = r["parameter_elements"] * (ADAMW_BYTES_PER_ELEMENT + GRAD_BYTES_PER_ELEMENT)
    mem_s = dense_bytes / A100_HBM_BYTES_PER_S
    one_step = max(flop_s, mem_s)
    # DDP all-reduces the dense gradients of every parameter (ring: 2(n-1)/n of them per GPU)
    allreduce_s = 2 * (N_GPUS - 1) / N_GPUS * r["gradient_bytes"] / A100_NVLINK_BYTES_PER_S
    # a) the same per-GPU batch on each of 8 GPUs (global batch x8): 8x fewer steps, each a full step + all-reduce
    eight_step = one_step + allreduce_s
    eight_epoch = steps_per_epoch / N_GPUS * eight_step / DDP_SCALING_EFFICIENCY
    # b) the library's semantics (batch_size is global): 1/8 of the FLOPs per GPU, the same dense update
    split_step = max(flop_s / N_GPUS, mem_s) + allreduce_s
    split_epoch = steps_per_epoch * split_step / DDP_SCALING_EFFICIENCY
    rows = sum(r["item_rows_with_gradient"].values())
    sparse_bytes = rows * r["hidden"] * ADAMW_BYTES_PER_ELEMENT
    return {
        "steps_per_epoch": steps_per_epoch,
        "epoch_here_s": steps_per_epoch * r["ms_per_step"] / 1e3,
        "a100_flop_bound_ms": 1e3 * flop_s,
        "dense_update_bytes_per_step": dense_bytes,
        "adamw_bytes_per_step_dense": r["parameter_elements"] * ADAMW_BYTES_PER_ELEMENT,
        "adamw_bytes_per_step_if_row_sparse": sparse_bytes,
        "a100_memory_bound_ms": 1e3 * mem_s,
        "a100_step_ms": 1e3 * one_step,
        "a100_epoch_s": steps_per_epoch * one_step,
        "allreduce_ms": 1e3 * allreduce_s,
        "a100x8_per_gpu_batch_step_ms": 1e3 * eight_step,
        "a100x8_per_gpu_batch_epoch_s": eight_epoch,
        "a100x8_global_batch_step_ms": 1e3 * split_step,
        "a100x8_global_batch_epoch_s": split_epoch,
    }


# --------------------------------------------------------------------------- memory guard


def _measured_below(items: int, loss: str, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two largest measured (not extrapolated) smaller catalogues of this loss."""
    prior = [r for r in done if r["loss"] == loss and r["items"] < items and not r.get("extrapolated")]
    return sorted(prior, key=lambda r: r["items"])[-2:]


def _linear(items: int, a: dict[str, Any], b: dict[str, Any], get: Callable[[dict[str, Any]], float]) -> float:
    return get(b) + (get(b) - get(a)) * (items - b["items"]) / (b["items"] - a["items"])


def predicted_peak(items: int, loss: str, done: list[dict[str, Any]]) -> int:
    """Peak RSS extrapolated linearly in the catalogue from the two largest smaller runs of this
    loss; without them, params + grads + AdamW's two moments + one transient table gradient."""
    prior = _measured_below(items, loss, done)
    if len(prior) == 2:
        return int(_linear(items, *prior, lambda r: r["peak_rss_bytes"]))
    tables = 1 + int(BERT4RecConfig.model_fields["previous_item_input"].default)
    return int(items * CLIENT_NETWORK["hidden"] * 4 * (tables * 4 + 1)) + (1 << 30)


def extrapolated(items: int, loss: str, done: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    """A configuration that does not fit here: its tables' sizes from the network built on the
    meta device (shapes, no memory), gradients and AdamW state as the measured runs hold them (a
    dense gradient per trained parameter, two moments per gradient), and time, FLOPs and peak RSS
    linear in the catalogue from the two largest measured runs of this loss. Every such figure is
    marked as extrapolated in the report."""
    model_cfg = BERT4RecConfig.model_validate({**CLIENT_NETWORK, "vocab_size": items + FIRST_ITEM_TOKEN})
    with torch.device("meta"):
        model = BERT4Rec(model_cfg)
    params = table_bytes(model)
    row: dict[str, Any] = {
        "items": items, "loss": loss, "skipped": reason, "extrapolated": True,
        "vocab_size": model_cfg.vocab_size, "hidden": model_cfg.hidden, "parameter_bytes": params,
        "parameter_elements": sum(p.numel() for p in model.parameters()),
    }
    prior = _measured_below(items, loss, done)
    if len(prior) < 2:
        return row  # nothing to extrapolate from
    a, b = prior
    if not (b["dense_gradients"] and b["adamw_exp_avg_plus_sq_bytes"] == 2 * b["gradient_bytes"]):
        return row  # the state is not simply two moments of each gradient: no guess
    # tables the step never touches (one-row context tables) get no gradient and no state
    grads = params["all_parameters"] - (b["parameter_bytes"]["all_parameters"] - b["gradient_bytes"])
    row.update({
        "gradient_bytes": grads, "adamw_exp_avg_plus_sq_bytes": 2 * grads,
        "batch_size": b["batch_size"], "targets_per_step": b["targets_per_step"],
        "ms_per_step": _linear(items, a, b, lambda r: r["ms_per_step"]),
        "flops_per_step": int(_linear(items, a, b, lambda r: r["flops_per_step"])),
        "flops_in_loss": int(_linear(items, a, b, lambda r: r["flops_in_loss"])),
        "peak_rss_bytes": predicted_peak(items, loss, done),
        "item_rows_with_gradient": {},
    })
    row["sequences_per_s"] = 1e3 * row["batch_size"] / row["ms_per_step"]
    row["projection"] = project(row)
    return row


# --------------------------------------------------------------------------- report


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}" if n < 1e9 else f"{n / 1e9:.2f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def markdown(results: list[dict[str, Any]]) -> str:
    """Three tables; figures not measured (a configuration that does not fit) carry a '~'."""
    seen: set[int] = set()
    lines = [
        "Parameter bytes (GB, 1e9) per table, gradients and AdamW state (exp_avg + exp_avg_sq, read from the optimizer "
        "after a step; '~': not run, see below):",
        "",
        "| items | item table | prev-item table | input item table | output bias | context + position | rest of network "
        "| all parameters | gradients | AdamW state |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["items"], bool(r.get("extrapolated")))):
        if r["items"] in seen or "parameter_bytes" not in r:
            continue
        seen.add(r["items"])
        p, x = r["parameter_bytes"], "~" if r.get("extrapolated") else ""
        grads = f"{x}{_gb(r['gradient_bytes'])}" if "gradient_bytes" in r else "-"
        state = f"{x}{_gb(r['adamw_exp_avg_plus_sq_bytes'])}" if "adamw_exp_avg_plus_sq_bytes" in r else "-"
        lines.append(
            f"| {r['items']:,} | {_gb(p['item_table'])} | {_gb(p['prev_item_table'])} | {_gb(p['input_item_table'])} "
            f"| {_gb(p['output_bias'])} | {_gb(p['context_and_position_tables'])} | {_gb(p['rest_of_network'])} "
            f"| {_gb(p['all_parameters'])} | {grads} | {state} |"
        )
    lines += [
        "",
        "Step cost here (timed steps after the warm-up: mean and fastest; phases data / forward / backward / clip + "
        "AdamW; '~': not run, linear in the catalogue from the two largest measured runs of the same loss):",
        "",
        "| items | loss | targets/step | steps | ms/step mean (min) | phases ms | sequences/s | peak RSS GB "
        "| GFLOP/step (loss share) | item rows with grad | epoch here |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "ms_per_step" not in r:
            lines.append(f"| {r['items']:,} | {r['loss']} | not run: {r['skipped']} | | | | | | | | |")
            continue
        proj, x = r["projection"], "~" if r.get("extrapolated") else ""
        share = f"{100 * r['flops_in_loss'] / max(r['flops_per_step'], 1):.1f} %"
        if x:
            lines.append(
                f"| {r['items']:,} | {r['loss']} | | not run: {r['skipped']} | ~{r['ms_per_step']:,.0f} | | "
                f"~{r['sequences_per_s']:,.1f} | ~{_gb(r['peak_rss_bytes'])} | ~{r['flops_per_step'] / 1e9:,.0f} ({share}) "
                f"| | ~{_duration(proj['epoch_here_s'])} |"
            )
            continue
        ph = r["ms_phases"]
        lines.append(
            f"| {r['items']:,} | {r['loss']} | {r['targets_per_step']:.0f} | {r['timed_steps']} "
            f"| {r['ms_per_step']:,.0f} ({r['ms_per_step_min']:,.0f}) "
            f"| {ph['data']:.0f} / {ph['forward']:.0f} / {ph['backward']:.0f} / {ph['optimizer']:.0f} "
            f"| {r['sequences_per_s']:,.1f} | {_gb(r['peak_rss_bytes'])} | {r['flops_per_step'] / 1e9:,.0f} ({share}) "
            f"| {r['item_rows_with_gradient'].get('item_emb', 0):,} | {_duration(proj['epoch_here_s'])} |"
        )
    lines += [
        "",
        f"Projection of an epoch ({EPOCH_SEQUENCES:,} sequences): per step max(FLOPs / ({A100_BF16_PEAK_FLOPS / 1e12:.0f} "
        f"TFLOP/s x MFU {ASSUMED_MFU}), dense update bytes / {A100_HBM_BYTES_PER_S / 1e12:.1f} TB/s); dense update = "
        f"{ADAMW_BYTES_PER_ELEMENT + GRAD_BYTES_PER_ELEMENT} B per parameter ({ADAMW_BYTES_PER_ELEMENT} AdamW + "
        f"{GRAD_BYTES_PER_ELEMENT} gradient); 8 GPUs add a ring all-reduce of the dense gradients at "
        f"{A100_NVLINK_BYTES_PER_S / 1e9:.0f} GB/s and divide by DDP efficiency {DDP_SCALING_EFFICIENCY}:",
        "",
        "| items | loss | FLOP-bound ms/step | dense update GB/step | AdamW GB/step dense (row-sparse) | memory-bound ms/step "
        "| 1 x A100 epoch | all-reduce ms/step | 8 x A100, same batch per GPU | 8 x A100, same global batch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "projection" not in r:
            continue
        p, x = r["projection"], "~" if r.get("extrapolated") else ""
        sparse = f" ({_gb(p['adamw_bytes_per_step_if_row_sparse'])})" if r["item_rows_with_gradient"] else ""
        lines.append(
            f"| {r['items']:,} | {r['loss']} | {x}{p['a100_flop_bound_ms']:.2f} | {_gb(p['dense_update_bytes_per_step'])} "
            f"| {_gb(p['adamw_bytes_per_step_dense'])}{sparse} | {p['a100_memory_bound_ms']:.2f} "
            f"| {x}{_duration(p['a100_epoch_s'])} | {p['allreduce_ms']:.2f} "
            f"| {x}{_duration(p['a100x8_per_gpu_batch_epoch_s'])} | {x}{_duration(p['a100x8_global_batch_epoch_s'])} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--loss", nargs="+", choices=["sampled", "full"], default=["sampled"])
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batching.batch_size)
    parser.add_argument("--windows", choices=["last", "prefixes"], default="last",
                        help="last: one window per user, the library's cloze masking (an epoch = one sequence per user)")
    parser.add_argument("--seq-len", type=int, default=CLIENT_NETWORK["max_len"], help="items per synthetic user")
    parser.add_argument("--num-negatives", type=int, default=TrainConfig().num_negatives)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (fewer where --budget-s says so, at least 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0, help="time for the timed steps of one configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-margin", type=float, default=0.9,
                        help="do not run a configuration predicted to need more than this share of the available memory")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for loss in args.loss:
        for items in sorted(args.items):
            spec = {"items": items, "loss": loss, "batch_size": args.batch_size, "windows": args.windows,
                    "seq_len": args.seq_len, "num_negatives": args.num_negatives, "steps": args.steps,
                    "warmup": args.warmup, "budget_s": args.budget_s, "threads": args.threads, "seed": args.seed}
            need, available = predicted_peak(items, loss, results), psutil.virtual_memory().available
            if need > args.memory_margin * available:
                reason = f"predicted peak RSS {_gb(need)} GB > {args.memory_margin} x {_gb(available)} GB available"
                print(f"{items:,} items, {loss}: not run, {reason}", flush=True)
                results.append(extrapolated(items, loss, results, reason))
                continue
            # a fresh process per configuration: ru_maxrss is then this configuration's peak
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                r = pool.submit(run_one, spec).result()
            r["projection"] = project(r)
            r["predicted_peak_rss_bytes"] = need
            results.append(r)
            print(f"{items:,} items, {loss}: {r['ms_per_step']:,.0f} ms/step, {r['sequences_per_s']:,.1f} seq/s, "
                  f"peak RSS {_gb(r['peak_rss_bytes'])} GB, {r['flops_per_step'] / 1e9:,.0f} GFLOP/step", flush=True)
    load_after = os.getloadavg()
    header = (
        f"## Training step at catalogue scale (client network {CLIENT_NETWORK['hidden']}/{CLIENT_NETWORK['layers']}/"
        f"{CLIENT_NETWORK['heads']}/{CLIENT_NETWORK['max_len']})\n\n"
        f"{psutil.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {args.threads} torch threads, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}; wall {time.perf_counter() - started:,.0f} s\n"
    )
    report = header + "\n" + markdown(results)
    print("\n" + report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                        "load_average_before": load_before, "load_average_after": load_after, "torch": torch.__version__},
            "assumptions": {
                "epoch_sequences": EPOCH_SEQUENCES, "a100_bf16_peak_flops": A100_BF16_PEAK_FLOPS,
                "assumed_mfu": ASSUMED_MFU, "a100_hbm_bytes_per_s": A100_HBM_BYTES_PER_S,
                "a100_nvlink_bytes_per_s": A100_NVLINK_BYTES_PER_S, "ddp_scaling_efficiency": DDP_SCALING_EFFICIENCY,
                "adamw_bytes_per_element": ADAMW_BYTES_PER_ELEMENT, "grad_bytes_per_element": GRAD_BYTES_PER_ELEMENT,
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
            "table_markdown": report,
        }
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"\nwritten {args.out}")
    return results


if __name__ == "__main__":  # each configuration runs in a spawned process, which imports this module
    main()
