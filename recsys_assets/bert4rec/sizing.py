"""Training sized by the data: the network and the number of epochs chosen from the data and a
time budget, then the final model refit on everything but each user's last item.

1. Profile the data (users, items, interactions, history lengths).
2. Measure, on this machine and this data, what an epoch costs for each candidate network, largest
   (the client's 256/4/8/50) first, and take the first that affords `MIN_EPOCHS` epochs of search
   plus as many of refit within the budget. Measured rather than modelled: the cost of a step
   depends on the device, the catalogue (full softmax) and the history lengths.
3. Search: train on the `tuning` split (`recsys_assets.data.split`: no test item anywhere, and the
   latest input item of each validated user is one its training data never had, as at test time),
   validate every epoch, stop when NDCG@10 stops improving or at the cap the budget affords.
4. Refit: train from scratch on `train+valid` (all but each user's last item) for the search's best
   number of epochs. This is the model that is evaluated on test, gated and served.

Plain PyTorch, no Dagster: the asset and the CLI call :func:`train_sized`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from recsys_assets.bert4rec.data import ExampleIndex, SequenceData
from recsys_assets.bert4rec.model import BERT4RecConfig
from recsys_assets.bert4rec.presets import (
    CLIENT_NETWORK,
    NEXT_ITEM_RECIPE,
    SMALL_NETWORK,
    SMALL_NEXT_ITEM_RECIPE,
    Preset,
    build_configs,
    merge_overrides,
)
from recsys_assets.bert4rec.train import ProgressCallback, TrainConfig, TrainEvent, TrainResult, evaluate, train
from recsys_assets.data.split import EvalSet, FitSplit
from recsys_serving.contract import PredictionTarget

# (name, network, recipe), largest first; the first the budget affords is trained.
CANDIDATE_NETWORKS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("client (256 hidden, 4 layers, 8 heads, length 50)", CLIENT_NETWORK, NEXT_ITEM_RECIPE),
    ("256 hidden, 2 layers, 8 heads, length 50", {**CLIENT_NETWORK, "layers": 2}, NEXT_ITEM_RECIPE),
    ("128 hidden, 2 layers, 4 heads, length 50", {**CLIENT_NETWORK, "hidden": 128, "layers": 2, "heads": 4},
     NEXT_ITEM_RECIPE),
    ("64 hidden, 1 layer, 2 heads, length 50", SMALL_NETWORK, SMALL_NEXT_ITEM_RECIPE),
)
MIN_EPOCHS = 3  # fewer affordable epochs than this: a smaller network
MAX_EPOCHS = 30  # the cap when the budget affords more; early stopping ends sooner
PATIENCE = 2  # validations without NDCG@10 gain before the search stops
SAMPLED_SOFTMAX_ITEMS = 200_000  # larger catalogues: sampled softmax (logQ-corrected) instead of full
BUDGET_SHARE_PLANNED = 0.9  # the rest absorbs what the probe does not see (checkpoints, slower epochs)
PROBE_STEPS = 6  # batches of the probe's users, trained twice, the second time timed
PROBE_EVAL_USERS = 512  # validation users scored to time an evaluation


class DataProfile(BaseModel):
    users: int
    items: int
    interactions: int
    median_length: float
    p90_length: float

    @classmethod
    def of(cls, data: SequenceData) -> "DataProfile":
        lengths = np.fromiter((len(t) for t in data.tokens), dtype=np.int64, count=len(data.tokens))
        items = int(np.unique(np.concatenate(data.tokens)).size) if len(data.tokens) else 0
        return cls(
            users=len(data), items=items, interactions=int(lengths.sum()),
            median_length=float(np.median(lengths)) if lengths.size else 0.0,
            p90_length=float(np.percentile(lengths, 90)) if lengths.size else 0.0,
        )


class NetworkCost(BaseModel):
    """What one candidate costs here, measured."""

    network: str
    parameters_hidden_layers_heads: tuple[int, int, int]
    step_seconds: float
    search_steps: int = Field(description="optimizer steps of one search epoch")
    refit_steps: int = Field(description="optimizer steps of one refit epoch")
    search_epoch_seconds: float = Field(description="search steps + one validation")
    refit_epoch_seconds: float
    affordable_epochs: int = Field(description="search + refit epoch pairs that fit in what was left of the budget")


class SizingDecision(BaseModel):
    """What was chosen and why (Dagster metadata, the report, `sizing.json`)."""

    budget_seconds: float
    profile: DataProfile
    network: str
    model_overrides: dict[str, Any]
    train_overrides: dict[str, Any]
    max_epochs: int
    costs: list[NetworkCost]
    probe_seconds: float
    reasons: list[str]


@dataclass
class SizedResult:
    decision: SizingDecision
    search: TrainResult  # the validated run (tuning split): its curve and best epoch
    final: TrainResult  # the refit (train+valid): the model that is evaluated and served
    seconds_total: float


def _recipe_preset(network: dict[str, Any], recipe: dict[str, Any]) -> Preset:
    return Preset(name="auto", description="sized by the data", model=network, train=recipe)


def _eval_sample(valid: EvalSet, n: int) -> EvalSet:
    return valid.subset(slice(0, min(n, len(valid))))


def target_of(train_overrides: dict[str, Any]) -> PredictionTarget:
    """The prediction target a set of training overrides names (default next_item)."""
    raw = train_overrides.get("target")
    if raw is None:
        return PredictionTarget()
    return raw if isinstance(raw, PredictionTarget) else PredictionTarget.from_dict(raw)


def _probe_split(search: FitSplit, train_cfg: TrainConfig, max_len: int, seed: int = 0) -> FitSplit:
    """Random users with about `PROBE_STEPS` batches of examples: one epoch of them spans the data's
    history lengths (the first batches of a length-bucketed epoch are its shortest)."""
    order = np.random.default_rng(seed).permutation(len(search.sequences))
    masks = search.target_masks
    index = ExampleIndex(
        [search.sequences[i] for i in order], train_cfg.batching, max_len, None if masks is None else [masks[i] for i in order]
    )
    per_user = np.bincount(index.seq_idx, minlength=len(order))  # examples of each user, in `order`
    want = PROBE_STEPS * train_cfg.batching.batch_size
    keep = order[: int(np.searchsorted(np.cumsum(per_user), want)) + 1]
    return FitSplit(
        fit=search.fit, sequences=[search.sequences[i] for i in keep],
        contexts={k: [v[i] for i in keep] for k, v in search.contexts.items()},
        valid=None, test=search.test, item_counts=search.item_counts, target=search.target,
        target_masks=None if masks is None else [masks[i] for i in keep],
    )


def _padded_lengths(split: FitSplit, train_cfg: TrainConfig, max_len: int) -> np.ndarray:
    """The padded length of every batch of one epoch, in training order (what `train()` builds)."""
    index = ExampleIndex(split.sequences, train_cfg.batching, max_len, split.target_masks)
    return np.asarray([int(index.window_len[ids].max()) for ids in index.epoch_batches(train_cfg.seed, 0)])


def _step_cost_model(lengths: np.ndarray, seconds: np.ndarray, fallback: float) -> tuple[float, float]:
    """Least squares a + b x length >= 0 (hand-written: two coefficients, numpy's lstsq and a clamp)."""
    n = min(len(lengths), len(seconds))
    if n == 0:
        return fallback, 0.0
    x, y = np.asarray(lengths[:n], dtype=np.float64), np.asarray(seconds[:n], dtype=np.float64)
    if n < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0
    b, a = np.linalg.lstsq(np.stack([x, np.ones(n)], axis=1), y, rcond=None)[0]
    if a < 0 or b < 0:  # noise on few points: the proportional model through the mean instead
        return (0.0, float(y.sum() / x.sum())) if a < 0 else (float(y.mean()), 0.0)
    return float(a), float(b)


def measure_network(
    model_cfg: BERT4RecConfig, train_cfg: TrainConfig, search: FitSplit, refit: FitSplit, workdir: Path,
    seconds_left: float = math.inf,
) -> tuple[float, int, int, float]:
    """-> (seconds per optimizer step, steps per search epoch, steps per refit epoch, seconds per
    validation), from `train()` over about `PROBE_STEPS` batches of random users (run twice, the second
    timed) and one timed
    validation sample (not timed when the steps of `MIN_EPOCHS` epochs alone exceed `seconds_left`)."""
    stamps: list[float] = []

    def on_step(event: TrainEvent) -> None:
        if event.kind == "step":
            stamps.append(time.perf_counter())

    # The same batches twice, the second run timed: the first pays what a real run pays once per
    # batch shape (oneDNN primitives, allocations).
    probe_cfg = train_cfg.model_copy(update={"epochs": 1, "checkpoint_every": None, "resume": False})
    probe = _probe_split(search, train_cfg, model_cfg.max_len)
    t0 = time.perf_counter()
    train(model_cfg, probe_cfg, probe, workdir / "warm-up")
    result = train(model_cfg, probe_cfg, probe, workdir / "timed", progress=on_step)
    # A step costs a + b x (its batch's padded length): the item softmax and the optimizer do not
    # grow with the length, the encoder does. Fitted on the probe's steps (whose batches are
    # bucketed more coarsely than a long epoch's), applied to the real epoch's batches.
    probe_lengths = _padded_lengths(probe, train_cfg, model_cfg.max_len)[1: len(stamps)]
    gaps = np.diff(stamps)
    a, b = _step_cost_model(probe_lengths, gaps, fallback=time.perf_counter() - t0)
    step_s = a + b * float(np.mean(_padded_lengths(search, train_cfg, model_cfg.max_len)))

    def steps(split: FitSplit) -> int:
        return len(_padded_lengths(split, train_cfg, model_cfg.max_len))

    search_steps, refit_steps = steps(search), steps(refit)
    eval_s = 0.0
    affordable_without_eval = MIN_EPOCHS * (search_steps + refit_steps) * step_s <= seconds_left
    if search.valid is not None and len(search.valid) and affordable_without_eval:
        from recsys_assets.bert4rec.model import load_model

        model, cfg = load_model(result.path)
        sample = _eval_sample(search.valid, PROBE_EVAL_USERS)
        t0 = time.perf_counter()
        evaluate(model, sample, cfg.max_len, train_cfg.eval_batch_size)
        eval_s = (time.perf_counter() - t0) * len(search.valid) / len(sample)
    return step_s, search_steps, refit_steps, eval_s


def choose_training(
    data: SequenceData,
    budget_seconds: float,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    log: Any = print,
    context_sizes: dict[str, int] | None = None,
) -> SizingDecision:
    """Measures the candidates (largest first) and returns the first the budget affords."""
    started = time.perf_counter()
    sizes = context_sizes or data.context_sizes()
    profile = DataProfile.of(data)
    train_over = dict(train_overrides or {})
    reasons = [
        f"data: {profile.users:,} users, {profile.items:,} items, {profile.interactions:,} interactions, "
        f"median history {profile.median_length:g} (90th percentile {profile.p90_length:g})"
    ]
    if profile.items > SAMPLED_SOFTMAX_ITEMS and "loss" not in train_over:
        train_over["loss"] = "sampled"
        reasons.append(f"{profile.items:,} items > {SAMPLED_SOFTMAX_ITEMS:,}: sampled softmax with logQ correction")
    target = target_of(train_over)
    search, refit = data.tuning_split(target), data.split("train+valid", target)
    costs: list[NetworkCost] = []
    chosen: tuple[str, dict[str, Any], dict[str, Any], int] | None = None
    with tempfile.TemporaryDirectory(prefix="recsys-sizing-") as tmp:
        for i, (name, network, recipe) in enumerate(CANDIDATE_NETWORKS):
            model_cfg, train_cfg = build_configs(
                _recipe_preset(network, recipe), data.vocab_size, sizes, model_overrides, train_over
            )
            left = budget_seconds - (time.perf_counter() - started)
            step_s, search_steps, refit_steps, eval_s = measure_network(
                model_cfg, train_cfg, search, refit, Path(tmp) / str(i), left)
            search_s, refit_s = search_steps * step_s + eval_s, refit_steps * step_s
            left = (budget_seconds - (time.perf_counter() - started)) * BUDGET_SHARE_PLANNED
            affordable = int(left // (search_s + refit_s)) if search_s + refit_s > 0 else MAX_EPOCHS
            costs.append(NetworkCost(
                network=name, parameters_hidden_layers_heads=(model_cfg.hidden, model_cfg.layers, model_cfg.heads),
                step_seconds=round(step_s, 4), search_steps=search_steps, refit_steps=refit_steps,
                search_epoch_seconds=round(search_s, 3),
                refit_epoch_seconds=round(refit_s, 3), affordable_epochs=affordable,
            ))
            log(f"sizing: {name}: {step_s * 1000:.0f} ms per step, {search_s:.0f} s per search epoch, "
                f"{refit_s:.0f} s per refit epoch -> {affordable} epochs affordable")
            if affordable >= MIN_EPOCHS:
                chosen = (name, network, recipe, affordable)
                break
    if chosen is None:
        name, network, recipe = CANDIDATE_NETWORKS[-1]
        chosen = (name, network, recipe, max(1, costs[-1].affordable_epochs))
        reasons.append(f"no network affords {MIN_EPOCHS} epochs in {budget_seconds:.0f} s: the smallest, "
                       f"for {chosen[3]} epoch(s)")
    name, network, recipe, affordable = chosen
    max_epochs = min(MAX_EPOCHS, affordable)
    skipped = [c.network for c in costs[:-1]]
    if skipped:
        reasons.append(f"not {', '.join(skipped)}: fewer than {MIN_EPOCHS} search + refit epochs fit the budget")
    reasons.append(
        f"{name}: {costs[-1].search_epoch_seconds:.0f} s per search epoch, {costs[-1].refit_epoch_seconds:.0f} s per "
        f"refit epoch on this machine; up to {max_epochs} epochs"
        + (f" (the cap; the budget affords {affordable})" if affordable > MAX_EPOCHS else " (what the budget affords)")
        + f", early stop after {PATIENCE} validations without NDCG@10 gain"
    )
    train_over = merge_overrides({**recipe, "epochs": max_epochs, "patience": PATIENCE}, train_over)
    return SizingDecision(
        budget_seconds=budget_seconds, profile=profile, network=name,
        model_overrides={**network, **(model_overrides or {})}, train_overrides=train_over, max_epochs=max_epochs,
        costs=costs, probe_seconds=round(time.perf_counter() - started, 1), reasons=reasons,
    )


def train_sized(
    data: SequenceData,
    out_dir: str | Path,
    budget_seconds: float,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    log: Any = print,
    extra: dict[str, Any] | None = None,
    context_sizes: dict[str, int] | None = None,
) -> SizedResult:
    """Chooses (:func:`choose_training`), searches on the tuning split into ``out_dir/search``, then
    refits on train+valid into ``out_dir`` for the best number of epochs; writes ``sizing.json``."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = context_sizes or data.context_sizes()
    decision = choose_training(data, budget_seconds, model_overrides, train_overrides, log, sizes)
    for reason in decision.reasons:
        log(f"sizing: {reason}")
    preset = _recipe_preset(decision.model_overrides, decision.train_overrides)
    model_cfg, search_cfg = build_configs(preset, data.vocab_size, sizes, None, {"fit": "train"})
    cost = decision.costs[-1]
    deadline = started + budget_seconds

    def out_of_time(log_so_far: list[dict[str, Any]]) -> bool:
        """Stop the search when one more epoch plus the refit it could call for would end past the
        budget; measured epoch times replace the probe's estimate."""
        train_s = float(np.mean([r["seconds"] for r in log_so_far]))
        eval_s = float(np.mean([r.get("eval_seconds", 0.0) for r in log_so_far]))
        refit_epoch_s = train_s * cost.refit_steps / max(1, cost.search_steps)
        needed = train_s + eval_s + refit_epoch_s * (len(log_so_far) + 1)
        if time.perf_counter() + needed > deadline:
            log(f"sizing: the search stops after epoch {len(log_so_far)}: another epoch and its refit "
                f"({needed:.0f} s) would end past the budget")
            return True
        return False

    search = train(model_cfg, search_cfg, data.tuning_split(search_cfg.target), out / "search", progress=progress,
                   stop_after_epoch=out_of_time)
    epochs = search.best_epoch or search.epochs
    log(f"sizing: search stopped after {search.epochs} epoch(s), best {epochs}; refit on train+valid for {epochs}")
    _, refit_cfg = build_configs(preset, data.vocab_size, sizes, None,
                                 {"fit": "train+valid", "epochs": epochs, "patience": None})
    info = {"sizing": json.loads(decision.model_dump_json()), "search_best_epoch": search.best_epoch,
            "search_best_valid": search.best_valid, **(extra or {})}
    final = train(model_cfg, refit_cfg, data, out, progress=progress, extra=info)
    (out / "sizing.json").write_text(decision.model_dump_json(indent=2))
    return SizedResult(decision=decision, search=search, final=final, seconds_total=time.perf_counter() - started)
