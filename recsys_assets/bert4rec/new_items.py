"""Items a trained model has never seen, added without retraining it.

The network has no user embedding and only per-item rows of its token tables (the tied item table,
the input-only tables, the output bias) name an item. A new item gets one new row in each:
started at the mean of its peers' rows (the items of its category, the caller's choice), then
fitted by next-item cross-entropy on the windows that contain a new item, everything else frozen.
The old items keep their exact rows, so what the model knows about them is unchanged; a new item
starts where its category stands and moves towards what its own events say, pulled back to that
start by an L2 prior (few events: close to the category; many: its own place).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recsys_assets.bert4rec.data import BatchBuilder, BatchingConfig, ExampleIndex
from recsys_assets.bert4rec.model import BERT4Rec, token_tables
from recsys_assets.bert4rec.train import TrainConfig, cloze_loss_sum


class NewItemFitConfig(BaseModel):
    """How the new rows are fitted (the rest of the network stays as trained)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(4, ge=0, description="passes over the windows that contain a new item (0: peers' mean only)")
    lr: float = Field(5e-3, gt=0, description="Adam step size of the new rows")
    batch_size: int = Field(128, ge=1)
    prior_weight: float = Field(1e-3, ge=0, description="L2 pull of each new row back to its peers' mean")
    seed: int = 0


class NewItemFit(BaseModel):
    """What fitting the new rows did."""

    n_new: int
    n_windows: int  # training windows containing a new item
    epochs: int
    loss_per_epoch: list[float]  # mean cross-entropy per window
    seconds: float


def add_items(model: BERT4Rec, peers: Sequence[np.ndarray]) -> BERT4Rec:
    """A copy of `model` with ``len(peers)`` tokens appended after its vocabulary; the rows of new
    token ``vocab_size + i`` in every token table are the mean of the rows of tokens ``peers[i]``."""
    old = model.config.vocab_size
    if any(len(p) == 0 for p in peers):
        raise ValueError("every new item needs at least one peer token to start from")
    if any(int(np.min(p)) < 2 or int(np.max(p)) >= old for p in peers):
        raise ValueError(f"peer tokens must be item tokens of the model (2..{old - 1})")
    config = model.config.model_copy(update={"vocab_size": old + len(peers)})
    grown = BERT4Rec(config)
    tables = token_tables(model)
    state = {}
    for name, value in model.state_dict().items():
        if name in tables:
            rows = torch.stack([value[torch.as_tensor(np.asarray(p, dtype=np.int64))].mean(0) for p in peers]) if peers else value[:0]
            value = torch.cat([value, rows.to(value.dtype)])
        state[name] = value
    grown.load_state_dict(state)
    return grown.eval()


def windows_with_new_items(index: ExampleIndex, sequences: Sequence[np.ndarray], first_new: int) -> np.ndarray:
    """Ids of the examples of `index` whose window holds a token >= first_new (input or target)."""
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else np.zeros(0, np.int64)
    new_before = np.concatenate([[0], np.cumsum(flat >= first_new)])  # new tokens before each flat position
    ends = offsets[index.seq_idx] + index.ends
    return np.flatnonzero(new_before[ends] - new_before[ends - index.window_len] > 0)


def fit_new_items(
    model: BERT4Rec,
    first_new: int,
    sequences: Sequence[np.ndarray],
    contexts: dict[str, Sequence[np.ndarray]],
    cfg: NewItemFitConfig,
    target_masks: Sequence[np.ndarray] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> NewItemFit:
    """Fits the rows >= `first_new` of every token table in place (module docstring).

    `sequences`/`contexts`: fit data in the model's token space, as for `train`; every window ends
    with its last position masked (next-item windows; with `target_masks` only at targets)."""
    started = time.perf_counter()
    n_new = model.config.vocab_size - first_new
    names = token_tables(model)
    tables = {name: p for name, p in model.named_parameters() if name in names}
    batching = BatchingConfig(batch_size=cfg.batch_size, windows="prefixes", mask_prob=0.0, bucket_batches=1)
    index = ExampleIndex(sequences, batching, model.config.max_len, target_masks)
    ids = windows_with_new_items(index, sequences, first_new)
    losses: list[float] = []
    if n_new == 0 or len(ids) == 0 or cfg.epochs == 0:
        return NewItemFit(n_new=n_new, n_windows=len(ids), epochs=0, loss_per_epoch=[], seconds=time.perf_counter() - started)
    builder = BatchBuilder(sequences, contexts, index, cfg.seed, target_masks)
    prior = {name: p.detach()[first_new:].clone() for name, p in tables.items()}
    frozen = [p for p in model.parameters() if all(p is not t for t in tables.values())]
    for p in frozen:
        p.requires_grad_(False)
    keep_old = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    keep_old[:first_new] = True
    hooks = [p.register_hook(lambda g: g.masked_fill(keep_old.view(-1, *([1] * (g.ndim - 1))), 0.0)) for p in tables.values()]
    optimizer = torch.optim.Adam(list(tables.values()), lr=cfg.lr)
    loss_cfg = TrainConfig(loss="full", label_smoothing=0.0)
    model.eval()  # dropout off: the frozen network is the served one
    try:
        for epoch in range(cfg.epochs):
            order = np.random.default_rng([cfg.seed, epoch]).permutation(ids)
            total, windows = 0.0, 0
            for step, start in enumerate(range(0, len(order), cfg.batch_size)):
                batch = builder.build(order[start : start + cfg.batch_size], epoch, step)
                # next-item windows: the trailing [MASK] is the only target, so the last block runs for it alone
                hidden = model(batch.tokens, **batch.contexts, last_only=True)
                ce = cloze_loss_sum(model, hidden, batch.labels[:, -1:], loss_cfg)
                pull = sum(((tables[n][first_new:] - prior[n]) ** 2).sum() for n in tables)
                loss = ce / len(batch.tokens) + cfg.prior_weight * pull
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(ce.detach())
                windows += int((batch.labels > 0).sum())
            losses.append(total / max(windows, 1))
            if progress is not None:
                progress(epoch + 1, losses[-1])
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return NewItemFit(
        n_new=n_new, n_windows=len(ids), epochs=cfg.epochs, loss_per_epoch=losses, seconds=time.perf_counter() - started
    )
