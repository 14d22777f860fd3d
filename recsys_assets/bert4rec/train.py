"""Cloze training of BERT4Rec: masking, full or sampled softmax, AdamW with warm-up + cosine,
mixed precision, length-bucketed batches, DDP, exact resumption and early stopping.

Plain PyTorch (no Dagster): the asset, the CLI and ``torchrun`` all call :func:`train`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from recsys_assets.bert4rec.checkpoint import (
    TrainingState,
    checkpoint_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from recsys_assets.bert4rec.data import (
    BatchBuilder,
    BatchingConfig,
    ExampleIndex,
    SequenceData,
    eval_batches,
)
from recsys_assets.bert4rec.distributed import DistContext, all_reduce_sum, barrier, broadcast_object, current_context
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, save_model
from recsys_assets.data.split import EvalSet, FitOption, FitSplit
from recsys_serving.contract import FIRST_ITEM_TOKEN, PredictionTarget
from recsys_assets.evaluation.metrics import full_ranks, ranking_metrics

LOG_FILE = "training_log.json"
EVAL_KS: tuple[int, ...] = (1, 5, 10, 20)


class TrainConfig(BaseModel):
    """Every knob of a training run (the model's sizes live in :class:`BERT4RecConfig`)."""

    model_config = ConfigDict(extra="forbid")

    fit: FitOption = "train"
    target: PredictionTarget = Field(
        default_factory=PredictionTarget,
        description="what is predicted: next_item, or next_purchase with its target event types",
    )
    seed: int = 0
    epochs: int = Field(50, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    loss: Literal["full", "sampled"] = "full"
    num_negatives: int = Field(
        1024, ge=1,
        description="sampled softmax: negatives shared by a batch (1,024 chosen on Beauty's tuning split; "
        "README: training at 2M items)",
    )
    negative_sampler: Literal["uniform", "popularity"] = "popularity"
    popularity_alpha: float = Field(0.75, ge=0.0, le=1.0, description="popularity sampler: q ~ count^alpha")
    logq_correction: bool = True
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="cosine floor as a share of lr")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of all steps spent warming up")
    weight_decay: float = Field(0.01, ge=0.0)
    decay_embeddings: bool = True
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = Field(1.0, gt=0.0)
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA; on CPU bf16 for hidden >= 128 where the CPU has AMX, else none"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(2, ge=1, description="torch CPU threads per process")
    eval_every: int = Field(1, ge=1, description="validate every N epochs")
    eval_batch_size: int = Field(512, ge=1)
    patience: int | None = Field(5, ge=1, description="evaluations without NDCG@10 gain before stopping")
    early_stop_metric: str = "NDCG@10"
    checkpoint_every: int | None = Field(500, ge=1, description="checkpoint every N optimizer steps (+ each epoch)")
    resume: bool = True


@dataclass
class TrainEvent:
    """What the progress callback receives (tqdm in the CLI, context.log in Dagster)."""

    kind: Literal["start", "step", "epoch", "checkpoint", "stop"]
    epoch: int
    global_step: int
    total_steps: int
    loss: float | None = None
    record: dict[str, Any] | None = None


ProgressCallback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    path: str
    config: BERT4RecConfig
    train_config: TrainConfig
    best_valid: dict[str, float] | None
    best_epoch: int | None
    epochs: int
    seconds_per_epoch: float
    log: list[dict[str, Any]]


# --------------------------------------------------------------------------- loss


def cloze_loss_sum(
    model: BERT4Rec,
    hidden: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    negatives: Tensor | None = None,
    neg_log_q: Tensor | None = None,
    target_log_q: Tensor | None = None,
) -> Tensor:
    """Summed cross-entropy over masked positions (labels > 0).

    full: softmax over every item token (PAD/MASK left out, so label smoothing stays finite).
    sampled: softmax over [target, K shared negatives]; with logQ correction each logit is
    reduced by log q(item) so the sampled loss estimates the full one; a negative equal to the
    target is masked out (an accidental hit is not a negative).
    """
    where = labels > 0
    h = model.head(hidden[where])  # [N, H]
    targets = labels[where]
    table = model.item_emb.weight
    bias = model.out_bias
    if cfg.loss == "full":
        compute = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else torch.float32
        return chunked_softmax_ce(
            h, table[FIRST_ITEM_TOKEN:], bias[FIRST_ITEM_TOKEN:], targets - FIRST_ITEM_TOKEN,
            cfg.label_smoothing, compute,
        )
    if negatives is None:
        raise ValueError("sampled softmax needs negatives")
    pos = (h * table[targets]).sum(-1) + bias[targets]
    neg = h @ table[negatives].t() + bias[negatives]
    pos, neg = pos.float(), neg.float()
    if cfg.logq_correction and neg_log_q is not None and target_log_q is not None:
        pos = pos - target_log_q[targets]
        neg = neg - neg_log_q
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    zeros = torch.zeros(len(targets), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, zeros, reduction="sum", label_smoothing=cfg.label_smoothing)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Summed softmax cross-entropy of ``h @ table.T + bias`` without the [N, V] logit matrix.

    Written by hand because PyTorch has no fused linear + cross-entropy: materialising [N, V]
    logits and their gradient makes the loss memory-bound on CPU once V is catalogue-sized.
    Rows are processed in chunks whose logits stay in cache, and since the loss is the end of
    the graph, the gradients are formed in the same pass (softmax - one-hot) and only scaled by
    the incoming gradient in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, table: Tensor, bias: Tensor, targets: Tensor, smoothing: float,
        compute: torch.dtype, chunk: int,
    ) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            n, vocab = h.shape[0], table.shape[0]
            hc_all, tab = h.detach().to(compute), table.detach().to(compute)
            bias32 = bias.detach().float()
            # the bias rides in the product as an extra column against a column of ones: one pass
            # over the [chunk, V] logits fewer than adding it (fp32 only: bf16 would round the bias)
            fold = compute == torch.float32
            if fold:
                hc_all = torch.cat([hc_all, hc_all.new_ones(n, 1)], dim=1)
                tab_t = torch.cat([tab, bias32[:, None]], dim=1).t()
            else:
                tab_t = tab.t()
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
            grad_table = torch.zeros(table.shape, dtype=torch.float32, device=h.device)
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float64, device=h.device)
            for start in range(0, n, chunk):
                hc, t = hc_all[start : start + chunk], targets[start : start + chunk]
                rows = torch.arange(hc.shape[0], device=h.device)
                z = hc @ tab_t if fold else (hc @ tab_t).float().add_(bias32)
                target_logit = z[rows, t]
                mean_logit = z.mean(dim=1) if smoothing else None
                # one exp pass: softmax and log-sum-exp from the same exp(z - max)
                top = z.amax(dim=1, keepdim=True)
                p = z.sub_(top).exp_()
                norm = p.sum(dim=1, keepdim=True)
                lse = (top + norm.log()).squeeze(1)
                loss = (lse - target_logit).sum() * (1.0 - smoothing)
                if smoothing:
                    loss = loss + smoothing * (lse - mean_logit).sum()
                total += loss.double()
                p.div_(norm)
                p[rows, t] -= 1.0 - smoothing
                if smoothing:
                    p.sub_(smoothing / vocab)
                pc = p.to(compute)
                grad_h[start : start + chunk] = (pc @ tab).float()
                if fold:
                    grad_table.addmm_(pc.t(), hc[:, :-1])
                else:
                    grad_table.add_((pc.t() @ hc).float())
                grad_bias.add_(p.sum(dim=0))
        ctx.save_for_backward(grad_h, grad_table, grad_bias)
        ctx.dtypes = (h.dtype, table.dtype, bias.dtype)
        return total.float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_table, grad_bias = ctx.saved_tensors
        dh, dt, db = ctx.dtypes
        return (grad_h * grad).to(dh), (grad_table * grad).to(dt), (grad_bias * grad).to(db), None, None, None, None


def chunked_softmax_ce(
    h: Tensor, table: Tensor, bias: Tensor, targets: Tensor, label_smoothing: float = 0.0,
    compute: torch.dtype = torch.float32, chunk: int = 64,
) -> Tensor:
    """sum_i CE(softmax(h_i @ table.T + bias), targets_i), with label smoothing, as one fused op."""
    if h.shape[0] == 0:
        return (h.sum() + table.sum() * 0 + bias.sum() * 0).float()
    return _ChunkedSoftmaxCE.apply(h, table, bias, targets, label_smoothing, compute, chunk)


class _Objective(nn.Module):
    """Forward + loss in one module, so DDP sees every parameter the loss touches."""

    def __init__(self, model: BERT4Rec, cfg: TrainConfig, log_q: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.log_q = log_q

    def forward(
        self, tokens: Tensor, labels: Tensor, contexts: dict[str, Tensor], negatives: Tensor | None,
        neg_log_q: Tensor | None,
    ) -> Tensor:
        if not bool(labels[:, :-1].any()):
            # next-item windows: every target is the trailing [MASK], so the last block runs for it alone
            hidden = self.model(tokens, **contexts, last_only=True)
            labels = labels[:, -1:]
        else:
            hidden = self.model(tokens, **contexts)
        return cloze_loss_sum(self.model, hidden, labels, self.cfg, negatives, neg_log_q, self.log_q)


class NegativeSampler:
    """K negatives per batch, a pure function of (seed, epoch, step) like everything else."""

    def __init__(self, item_counts: np.ndarray, cfg: TrainConfig, seed: int) -> None:
        vocab = len(item_counts)
        weights = np.zeros(vocab, dtype=np.float64)
        if cfg.negative_sampler == "uniform":
            weights[FIRST_ITEM_TOKEN:] = 1.0
        else:
            weights[FIRST_ITEM_TOKEN:] = np.power(item_counts[FIRST_ITEM_TOKEN:].astype(np.float64) + 1.0, cfg.popularity_alpha)
        self.q = weights / weights.sum()
        self.k = cfg.num_negatives
        self.seed = seed
        log_q = np.full(vocab, 0.0)
        log_q[FIRST_ITEM_TOKEN:] = np.log(self.q[FIRST_ITEM_TOKEN:] * self.k)
        self.log_q = torch.from_numpy(log_q).float()

    def draw(self, epoch: int, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 2, step])
        return rng.choice(len(self.q), size=self.k, replace=True, p=self.q)


# --------------------------------------------------------------------------- schedule / optimizer


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights never decay (decaying them only shrinks the scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith("_emb.weight")
        if p.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter group instead of ~10 elementwise ops per tensor, whose
    # per-op overhead dominates the optimizer step of a small model on CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup = max(1, int(round(cfg.warmup_ratio * total_steps)))
    cosine_steps = max(1, total_steps - warmup)
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        schedulers=[
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_steps, eta_min=cfg.lr * cfg.min_lr_ratio),
        ],
        milestones=[warmup],
    )


def resolve_amp(cfg: TrainConfig, device: torch.device, hidden: int | None = None) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if cfg.amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp='fp16' needs CUDA; use 'bf16' on CPU")
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # auto on CPU: bf16 only where the CPU multiplies bf16 in hardware (AMX) and the network is wide
    # enough to profit: a wide network's matmuls gain more than the casts cost, while at hidden 64
    # the casts cost more than the smaller matmuls save; without AMX bf16 is
    # emulated and far slower than fp32.
    if hidden is not None and hidden >= CPU_BF16_MIN_HIDDEN and _cpu_has_amx_bf16():
        return torch.bfloat16
    return None


CPU_BF16_MIN_HIDDEN = 128


def _cpu_has_amx_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded: absent means "no"
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a probe failure only means we stay in fp32
        return False


def keep_cpu_allocations_mapped(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Stops glibc from handing the step's large buffers back to the kernel after every step.

    A training step allocates and frees the same multi-megabyte tensors (gradients of the item
    tables, logit chunks) each time; above glibc's mmap threshold each one is a fresh mapping whose
    pages fault in on first touch, on every step (README: training time on 2 cores). Raising
    the thresholds (what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do, set at run time with
    mallopt) keeps them in the heap. Up to ``trim_threshold`` of free heap is then kept mapped.
    Returns False where the C library is not glibc (nothing changed).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_eval_set(
    model: BERT4Rec, eval_set: EvalSet, max_len: int, batch_size: int, device: torch.device,
    amp: torch.dtype | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (rows, scores [b, V] as float32 numpy) over an evaluation set."""
    was_training = model.training
    model.eval()
    try:
        for rows, tokens, ctx in eval_batches(eval_set, max_len, batch_size):
            ctx = {k: v.to(device) for k, v in ctx.items() if _context_size(model.config, k) > 1}
            with _autocast(device, amp):
                scores = model.score_next(tokens.to(device), **ctx)
            yield rows, scores.float().cpu().numpy()
    finally:
        model.train(was_training)


def evaluate(
    model: BERT4Rec, eval_set: EvalSet, max_len: int, batch_size: int = 512, device: torch.device | None = None,
    amp: torch.dtype | None = None, ks: tuple[int, ...] = EVAL_KS,
) -> dict[str, float]:
    """Full-ranking leave-one-out metrics (history removed where the target says so, pessimistic ties)."""
    device = device or next(model.parameters()).device
    ranks = np.empty(len(eval_set), dtype=np.int64)
    for rows, scores in score_eval_set(model, eval_set, max_len, batch_size, device, amp):
        ranks[rows] = full_ranks(scores, eval_set.targets[rows], eval_set.excluded(rows))
    return ranking_metrics(ranks, ks)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- training


def train(
    model_config: BERT4RecConfig,
    cfg: TrainConfig,
    data: SequenceData | FitSplit,
    out_dir: str | Path,
    progress: ProgressCallback | None = None,
    extra: dict[str, Any] | None = None,
    stop_after_epoch: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> TrainResult:
    """Trains, checkpoints into ``out_dir/checkpoints`` and writes the final (best on validation,
    else last) model to ``out_dir`` with ``training_log.json``. Resumes from the latest checkpoint
    in ``out_dir`` when ``cfg.resume``. Under torchrun, call after ``init_distributed``.
    ``stop_after_epoch(log)``, if given, is asked after each epoch whether to stop there (a time
    budget); it must answer the same on every rank."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = current_context(_pick_device(cfg.device))
    device = ctx.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cpu":
        keep_cpu_allocations_mapped()
    split = data.split(cfg.fit, cfg.target) if isinstance(data, SequenceData) else data
    if split.fit != cfg.fit:
        raise ValueError(f"data was split for fit={split.fit!r} but the config says fit={cfg.fit!r}")
    if split.target != cfg.target:
        raise ValueError(f"data was split for {split.target.label()} but the config says {cfg.target.label()}")
    if model_config.vocab_size < len(split.item_counts):
        raise ValueError(f"model vocab_size {model_config.vocab_size} < data vocabulary {len(split.item_counts)}")
    amp = resolve_amp(cfg, device, model_config.hidden)
    model_config = fit_context_sizes(model_config, split)

    torch.manual_seed(cfg.seed)
    model = BERT4Rec(model_config).to(device)
    contexts = _usable_contexts(split, model_config)
    index = ExampleIndex(split.sequences, cfg.batching, model_config.max_len, split.target_masks)
    builder = BatchBuilder(split.sequences, contexts, index, cfg.seed, split.target_masks)
    sampler = NegativeSampler(split.item_counts, cfg, cfg.seed) if cfg.loss == "sampled" else None
    log_q = sampler.log_q.to(device) if sampler is not None else None
    steps_per_epoch = math.ceil(index.examples_per_epoch() / cfg.batching.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    ckpt_root = out / "checkpoints"
    fingerprint = run_fingerprint(model_config, cfg)
    state = TrainingState.fresh(fingerprint)
    if cfg.resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is not None:
            if checkpoint_fingerprint(latest) != fingerprint:
                raise ValueError(
                    f"{latest} belongs to a run with another configuration; use a new output directory "
                    "or resume=False to start over"
                )
            state = load_checkpoint(latest, model, optimizer, scheduler, scaler)
    objective = _Objective(model, cfg, log_q)
    ddp_model: nn.Module = objective
    if ctx.enabled:
        # find_unused_parameters: context tables the data does not use get no gradient
        ddp_model = DDP(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    valid = split.valid
    _emit(progress, TrainEvent("start", state.epoch, state.global_step, total_steps))

    def checkpoint() -> None:
        if ctx.is_main:
            save_checkpoint(ckpt_root, model, optimizer, scheduler, scaler, state)
            _emit(progress, TrainEvent("checkpoint", state.epoch, state.global_step, total_steps))
        barrier(ctx)

    model.train()
    while not state.stopped and state.epoch < cfg.epochs and state.global_step < total_steps:
        epoch = state.epoch
        batches = index.epoch_batches(cfg.seed, epoch)
        started = time.perf_counter()
        for step in range(state.step_in_epoch, len(batches)):
            batch = builder.build(batches[step], epoch, step, ctx.rank, ctx.world_size)
            tokens = batch.tokens.to(device)
            labels = batch.labels.to(device)
            bctx = {k: v.to(device) for k, v in batch.contexts.items()}
            neg = neg_lq = None
            if sampler is not None:
                neg = torch.from_numpy(sampler.draw(epoch, step)).to(device)
                neg_lq = log_q[neg]
            with _autocast(device, amp):
                loss_sum = ddp_model(tokens, labels, bctx, neg, neg_lq)
            # DDP averages gradients over ranks; scaling by world / global count turns that
            # average into the exact mean over every masked position of the global batch.
            loss = loss_sum * (ctx.world_size / batch.n_targets_global)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step_loss = all_reduce_sum(float(loss_sum.detach()), ctx) / batch.n_targets_global
            state.global_step += 1
            state.step_in_epoch = step + 1
            state.epoch_loss_sum += step_loss
            state.epoch_loss_count += 1
            now = time.perf_counter()
            state.epoch_seconds += now - started
            started = now
            _emit(progress, TrainEvent("step", epoch, state.global_step, total_steps, loss=step_loss))
            last_step = state.global_step >= total_steps
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 and not last_step:
                checkpoint()
            if last_step:
                break
        record = _end_epoch(model, state, valid, cfg, model_config, ctx, optimizer, out)
        _emit(progress, TrainEvent("epoch", record["epoch"], state.global_step, total_steps, record=record))
        if stop_after_epoch is not None and not state.stopped and stop_after_epoch(state.log):
            state.stopped = True
        checkpoint()
    if ctx.is_main:
        result = _finish(model, model_config, cfg, state, out, split, extra)
    else:
        result = None
    barrier(ctx)
    _emit(progress, TrainEvent("stop", state.epoch, state.global_step, total_steps))
    result = broadcast_object(result, ctx)
    return result


def _end_epoch(
    model: BERT4Rec, state: TrainingState, valid: EvalSet | None, cfg: TrainConfig, model_config: BERT4RecConfig,
    ctx: DistContext, optimizer: torch.optim.Optimizer, out: Path,
) -> dict[str, Any]:
    """Logs the epoch, validates (rank 0), keeps the best weights and decides on early stopping."""
    epoch = state.epoch
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": state.epoch_loss_sum / max(1, state.epoch_loss_count),
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(state.epoch_seconds, 3),
        "steps": state.global_step,
    }
    evaluate_now = valid is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
    metrics = None
    if evaluate_now and ctx.is_main:
        t0 = time.perf_counter()
        # float32 scores: reduced precision creates ties, and ties are ranked pessimistically
        metrics = evaluate(model, valid, model_config.max_len, cfg.eval_batch_size, ctx.device, None)
        record["eval_seconds"] = round(time.perf_counter() - t0, 3)
    metrics = broadcast_object(metrics, ctx)
    if metrics is not None:
        record.update({f"valid_{k}": v for k, v in metrics.items()})
        value = metrics[cfg.early_stop_metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_evals = value, epoch + 1, 0
            if ctx.is_main:
                save_model(out / "best", model, model_config, extra={"epoch": epoch + 1, "valid": metrics})
        else:
            state.bad_evals += 1
            if cfg.patience is not None and state.bad_evals >= cfg.patience:
                state.stopped = True
    state.log.append(record)
    if ctx.is_main:
        _write_log(out, state.log)
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum, state.epoch_loss_count, state.epoch_seconds = 0.0, 0, 0.0
    return record


def _finish(
    model: BERT4Rec, model_config: BERT4RecConfig, cfg: TrainConfig, state: TrainingState, out: Path,
    split: FitSplit, extra: dict[str, Any] | None,
) -> TrainResult:
    best_valid = None
    if state.best_epoch is not None and (out / "best" / "model.safetensors").exists():
        from recsys_assets.bert4rec.model import load_model

        model, _ = load_model(out / "best")
        best_valid = {k[len("valid_"):]: v for k, v in state.log[state.best_epoch - 1].items() if k.startswith("valid_")}
    seconds = [r["seconds"] for r in state.log]
    info = {
        "fit": cfg.fit,
        "target": cfg.target.to_dict(),
        "train_config": json.loads(cfg.model_dump_json()),
        "best_epoch": state.best_epoch,
        "best_valid": best_valid,
        "epochs": len(state.log),
        "global_step": state.global_step,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0,
        "n_train_sequences": len(split.sequences),
        **(extra or {}),
    }
    save_model(out, model, model_config, extra=info)
    _write_log(out, state.log)
    return TrainResult(
        path=str(out), config=model_config, train_config=cfg, best_valid=best_valid, best_epoch=state.best_epoch,
        epochs=len(state.log), seconds_per_epoch=info["seconds_per_epoch"], log=state.log,
    )


def _write_log(out: Path, log: list[dict[str, Any]]) -> None:
    tmp = out / (LOG_FILE + ".tmp")
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(out / LOG_FILE)


def run_fingerprint(model_config: BERT4RecConfig, cfg: TrainConfig) -> str:
    """Identifies what a checkpoint may be resumed into (knobs that do not change results excluded)."""
    import hashlib

    knobs = cfg.model_dump(exclude={"resume", "num_threads", "checkpoint_every", "eval_batch_size", "device"})
    blob = json.dumps({"model": model_config.model_dump(), "train": knobs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_context_sizes(config: BERT4RecConfig, split: FitSplit) -> BERT4RecConfig:
    """A context the data does not carry (absent or all unknown) gets a one-row table, so the
    saved model ignores it at serving time instead of adding never-trained embeddings."""
    updates = {}
    for name, key in _CONTEXT_KEYS.items():
        values = split.contexts.get(name)
        if values is None or not any(len(v) and int(v.max()) > 0 for v in values):
            updates[key] = 1
    return config.model_copy(update=updates) if updates else config


def _usable_contexts(split: FitSplit, config: BERT4RecConfig) -> dict[str, list[np.ndarray]]:
    """Context fields the model has a table for; a token beyond its table is an error, not a crash."""
    usable = {}
    for name, values in split.contexts.items():
        size = _context_size(config, name)
        if size <= 1:
            continue
        top = max((int(v.max()) for v in values if len(v)), default=0)
        if top >= size:
            raise ValueError(f"context {name!r} has token {top} but the model's table holds {size} (0..{size - 1})")
        usable[name] = values
    return usable


_CONTEXT_KEYS = {"tod": "n_tod", "devices": "n_devices", "segments": "n_segments", "event_types": "n_event_types"}


def _context_size(cfg: BERT4RecConfig, name: str) -> int:
    return int(getattr(cfg, _CONTEXT_KEYS[name]))


def _pick_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _emit(progress: ProgressCallback | None, event: TrainEvent) -> None:
    if progress is not None:
        progress(event)
