"""Sequences for BERT4Rec: loading, cloze batches and inference batches (the leave-one-out split
and the eval set are `recsys_assets.data.split`'s, shared with evaluation and export).

Every random choice of an epoch (order, masks, negatives) is drawn from a generator seeded by
(seed, epoch[, batch]) so that any process can rebuild any batch from its position alone: that
is what makes resumption exact and lets every DDP rank agree on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recsys_assets.data.split import (
    FIT_OPTIONS,
    OUTCOME_CONTEXT,
    EvalSet,
    FitOption,
    FitSplit,
    check_held_out_items,
    leave_one_out,
)
from recsys_serving.contract import CONTEXT_FIELDS, FIRST_ITEM_TOKEN, MASK_TOKEN, PAD_TOKEN, PredictionTarget

# Context that describes the request (known when asking for a recommendation) stays on a masked
# position; the event type is the outcome of the interaction itself, so it is hidden with the item.
REQUEST_CONTEXT: tuple[str, ...] = tuple(c for c in CONTEXT_FIELDS if c not in OUTCOME_CONTEXT)


@dataclass
class SequenceData:
    """Per-user chronological item tokens (and optional per-position context tokens)."""

    user_ids: list[str]
    tokens: list[np.ndarray]
    vocab_size: int
    contexts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.tokens):
            raise ValueError(f"{len(self.user_ids)} user ids but {len(self.tokens)} token lists")
        for name, values in self.contexts.items():
            if name not in CONTEXT_FIELDS:
                raise ValueError(f"unknown context field {name!r}; expected one of {CONTEXT_FIELDS}")
            if len(values) != len(self.tokens):
                raise ValueError(f"context {name!r} has {len(values)} rows, tokens has {len(self.tokens)}")
            for i, (ctx, tok) in enumerate(zip(values, self.tokens)):
                if len(ctx) != len(tok):
                    raise ValueError(
                        f"user {self.user_ids[i]!r}: context {name!r} has {len(ctx)} positions, tokens {len(tok)}"
                    )
        for i, tok in enumerate(self.tokens):
            if len(tok) == 0:
                raise ValueError(f"user {self.user_ids[i]!r} has an empty sequence")
            if tok.min() < FIRST_ITEM_TOKEN or tok.max() >= self.vocab_size:
                raise ValueError(
                    f"user {self.user_ids[i]!r}: tokens must be item tokens in [{FIRST_ITEM_TOKEN}, "
                    f"{self.vocab_size}); got min {tok.min()} max {tok.max()}"
                )

    def __len__(self) -> int:
        return len(self.tokens)

    def context_sizes(self) -> dict[str, int]:
        """Embedding table size per context field (max token + 1, at least 1)."""
        return {
            name: max(1, max((int(v.max()) for v in values if len(v)), default=0) + 1)
            for name, values in self.contexts.items()
        }

    @classmethod
    def from_sasrec_txt(cls, path: str | Path) -> "SequenceData":
        """``user item1 item2 ...`` per line, time ordered, items 1-based: item k -> token k+1."""
        user_ids: list[str] = []
        tokens: list[np.ndarray] = []
        with open(path) as handle:
            for line_no, line in enumerate(handle, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise ValueError(f"{path}:{line_no}: expected 'user item1 item2 ...', got {line.strip()!r}")
                try:
                    items = np.asarray([int(p) for p in parts[1:]], dtype=np.int64)
                except ValueError as exc:
                    raise ValueError(f"{path}:{line_no}: non-integer item id ({exc})") from None
                if items.min() < 1:
                    raise ValueError(f"{path}:{line_no}: item ids must start at 1")
                user_ids.append(parts[0])
                tokens.append(items + (FIRST_ITEM_TOKEN - 1))
        if not tokens:
            raise ValueError(f"{path} holds no sequences")
        vocab = int(max(t.max() for t in tokens)) + 1
        return cls(user_ids=user_ids, tokens=tokens, vocab_size=vocab)

    @classmethod
    def from_duckdb(
        cls,
        database: str | Path,
        table: str = "tokenized_sequences",
        vocab_table: str | None = "item_vocabulary",
    ) -> "SequenceData":
        """Rows of ``tokenized_sequences`` (docs/DATA_CONTRACTS.md). The vocabulary size comes from
        ``vocab_table`` when it exists (so never-seen items still get a row), else max token + 1."""
        import duckdb

        with duckdb.connect(str(database), read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if table not in tables:
                raise FileNotFoundError(f"table {table!r} is not in {database}")
            columns = {r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()}
            missing = {"user_id", "tokens"} - columns
            if missing:
                raise ValueError(f"table {table!r} lacks column(s) {sorted(missing)}")
            ctx_cols = [c for c in CONTEXT_FIELDS if c in columns]
            check_cols = [c for c in ("valid_item", "test_item") if c in columns]
            select = ", ".join(f'"{c}"' for c in ["user_id", "tokens", *ctx_cols, *check_cols])
            frame = con.sql(f'SELECT {select} FROM "{table}" ORDER BY user_id').to_arrow_table()
            vocab_size = None
            if vocab_table and vocab_table in tables:
                vocab_size = int(con.execute(f'SELECT max(token) FROM "{vocab_table}"').fetchone()[0]) + 1
        user_ids = [str(u) for u in frame.column("user_id").to_pylist()]
        tokens = _list_column(frame, "tokens")
        contexts = {c: _list_column(frame, c) for c in ctx_cols}
        held_out = {col.removesuffix("_item"): frame.column(col).to_pylist() for col in check_cols}
        check_held_out_items(user_ids, tokens, held_out, table)  # type: ignore[arg-type]
        if vocab_size is None:
            vocab_size = int(max((t.max() for t in tokens if len(t)), default=FIRST_ITEM_TOKEN)) + 1
        keep = [i for i, t in enumerate(tokens) if len(t)]
        return cls(
            user_ids=[user_ids[i] for i in keep],
            tokens=[tokens[i] for i in keep],
            vocab_size=vocab_size,
            contexts={c: [v[i] for i in keep] for c, v in contexts.items()},
        )

    def split(self, fit: FitOption, target: PredictionTarget | None = None) -> FitSplit:
        """The leave-one-out split under fit option ``train`` or ``train+valid``
        (`recsys_assets.data.split.leave_one_out`), for `target` (default next_item)."""
        if fit not in FIT_OPTIONS:
            raise ValueError(f"fit must be 'train' or 'train+valid', got {fit!r}")
        return leave_one_out(self.user_ids, self.tokens, fit, self.contexts, self.vocab_size, target)

    def tuning_split(self, target: PredictionTarget | None = None) -> FitSplit:
        """The ``tuning`` protocol of `recsys_assets.data.split`: hyper-parameters and epochs are
        chosen on it without any test item."""
        return leave_one_out(self.user_ids, self.tokens, "tuning", self.contexts, self.vocab_size, target)


def _list_column(frame: object, name: str) -> list[np.ndarray]:
    """An Arrow list column as one int64 array per row, without a Python loop over values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = frame.column(name).combine_chunks()  # type: ignore[attr-defined]
    if col.null_count:
        col = pc.fill_null(col, pa.scalar([], type=col.type))
    offsets = col.offsets.to_numpy()
    flat = col.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


# --------------------------------------------------------------------------- batches


class BatchingConfig(BaseModel):
    """How training examples are cut from the fit sequences and grouped into batches."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(128, ge=1, description="global batch (all DDP ranks together)")
    windows: Literal["last", "prefixes"] = Field(
        "prefixes",
        description="last: one window per user (its latest max_len items); prefixes: one window per "
        "position, ending with that position masked, so every transition is a next-item example",
    )
    mask_prob: float = Field(0.2, ge=0.0, le=1.0, description="cloze masking of the other positions")
    mask_last_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="windows=last: share of windows whose last position is masked"
    )
    window_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="share of the windows drawn (without replacement) each epoch; < 1 makes epochs cheaper "
        "on long histories while every window still comes up over the epochs",
    )
    train_max_len: int | None = Field(
        None, ge=2, description="longest training window (default: the model's max_len); shorter is faster"
    )
    bucket_batches: int = Field(
        64, ge=1, description="length bucketing: sort pools of this many batches by length (1 = off)"
    )


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, L] left-padded input with [MASK] where masked
    labels: torch.Tensor  # [b, L] target token at masked positions, 0 elsewhere
    contexts: dict[str, torch.Tensor]
    n_targets_global: int  # masked positions in the whole global batch (for an exact mean)


class ExampleIndex:
    """The training windows of a fit split as (sequence, end) pairs; end is exclusive. With
    `target_masks` (a next_purchase split) a window ends only at a target position."""

    def __init__(
        self, sequences: Sequence[np.ndarray], cfg: BatchingConfig, max_len: int,
        target_masks: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.cfg = cfg
        self.max_len = min(cfg.train_max_len or max_len, max_len)
        lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
        if target_masks is not None:
            seq_idx, ends = self._target_windows(target_masks, cfg.windows)
        elif cfg.windows == "last":
            seq_idx = np.arange(len(sequences), dtype=np.int64)
            ends = lengths.copy()
        else:
            # one window per position >= 1 (a position-0 window would have no history at all);
            # sequences of length 1 still give one window (their only item, cloze only)
            reps = np.maximum(lengths - 1, 1)
            seq_idx = np.repeat(np.arange(len(sequences), dtype=np.int64), reps)
            starts = np.cumsum(reps) - reps
            ends = np.arange(len(seq_idx), dtype=np.int64) - np.repeat(starts, reps) + 2
            ends = np.minimum(ends, np.repeat(lengths, reps))
        if len(seq_idx) == 0:
            raise ValueError("the fit data has no target events to learn: no training window")
        self.seq_idx = seq_idx
        self.ends = ends
        # window length: history (max_len - 1 items before the last) capped by what exists
        self.window_len = np.minimum(ends, self.max_len)

    @staticmethod
    def _target_windows(masks: Sequence[np.ndarray], windows: str) -> tuple[np.ndarray, np.ndarray]:
        """As for every position, but only target positions end a window (position 0 only when it
        is a sequence's single target)."""
        seq_parts: list[np.ndarray] = []
        end_parts: list[np.ndarray] = []
        for i, mask in enumerate(masks):
            where = np.flatnonzero(mask)
            if windows == "last":
                where = where[-1:]
            elif len(where) > 1:
                where = where[where >= 1]
            seq_parts.append(np.full(len(where), i, dtype=np.int64))
            end_parts.append(where.astype(np.int64) + 1)
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(seq_parts) if seq_parts else empty), (np.concatenate(end_parts) if end_parts else empty)

    def __len__(self) -> int:
        return len(self.seq_idx)

    def examples_per_epoch(self) -> int:
        if self.cfg.window_fraction >= 1.0:
            return len(self)
        return max(1, int(round(self.cfg.window_fraction * len(self))))

    def epoch_batches(self, seed: int, epoch: int) -> list[np.ndarray]:
        """The global batches of an epoch (example ids), same on every process."""
        rng = np.random.default_rng([seed, epoch, 0])
        order = rng.permutation(len(self))
        if self.cfg.window_fraction < 1.0:
            order = order[: max(1, int(round(self.cfg.window_fraction * len(order))))]
        bs = self.cfg.batch_size
        pool = bs * self.cfg.bucket_batches
        if self.cfg.bucket_batches > 1:
            # sort each pool of shuffled examples by length: batches hold similar lengths, so
            # dynamic padding wastes little, yet batch contents still change every epoch
            chunks = [order[i : i + pool] for i in range(0, len(order), pool)]
            order = np.concatenate([c[np.argsort(self.window_len[c], kind="stable")] for c in chunks])
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]


class BatchBuilder:
    """Turns example ids into masked, left-padded tensors (a rank's share of a global batch)."""

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        contexts: dict[str, Sequence[np.ndarray]],
        index: ExampleIndex,
        seed: int,
        target_masks: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.sequences = sequences
        self.contexts = contexts
        self.index = index
        self.seed = seed
        # one flat array per field and each sequence's offset into it: a batch is then one gather
        # instead of a Python loop over rows, whose per-row cost is paid on every step (README:
        # training time on 2 cores)
        lengths = np.asarray([len(x) for x in sequences], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._flat_tokens = _flatten(sequences)
        self._flat_contexts = {name: _flatten(values) for name, values in contexts.items()}
        self._flat_targets = None if target_masks is None else _flatten(target_masks).astype(bool)

    def build(self, example_ids: np.ndarray, epoch: int, step_in_epoch: int, rank: int = 0, world: int = 1) -> Batch:
        cfg = self.index.cfg
        rng = np.random.default_rng([self.seed, epoch, 1, step_in_epoch])
        n = len(example_ids)
        lens = self.index.window_len[example_ids]
        width = int(lens.max())
        # the masks of the whole global batch are drawn on every rank so that all agree on them
        u = rng.random((n, width))
        pos = np.arange(width)[None, :]
        valid = pos >= (width - lens)[:, None]  # left padding
        masked = valid & (u < cfg.mask_prob)
        last_masked = (
            np.ones(n, dtype=bool) if cfg.windows == "prefixes" else rng.random(n) < cfg.mask_last_prob
        )
        masked[:, -1] |= last_masked
        if self._flat_targets is not None:
            # next_purchase: only target positions are masked and labelled; the others stay inputs
            ends_all = self._offsets[self.index.seq_idx[example_ids]] + self.index.ends[example_ids]
            at = np.where(valid, ends_all[:, None] - width + pos, 0)
            masked &= np.where(valid, self._flat_targets[at], False)
        # every window needs a target: the last position if nothing else was drawn
        empty = ~masked.any(axis=1)
        masked[empty, -1] = True
        n_targets_global = int(masked.sum())

        mine = np.arange(rank, n, world)
        # A global batch smaller than the world leaves this rank no row, but it must still run a
        # backward for DDP's gradient all-reduce: it gets the batch's first row with no target.
        no_rows = len(mine) == 0
        if no_rows:
            mine = np.arange(1)
        ids = example_ids[mine]
        lens_m = lens[mine]
        width_m = int(lens_m.max())
        # row r holds window [end - len, end) of its sequence, right-aligned in width_m columns
        col = np.arange(width_m)[None, :]
        inside = col >= (width_m - lens_m)[:, None]
        ends = self._offsets[self.index.seq_idx[ids]] + self.index.ends[ids]
        gather = np.where(inside, ends[:, None] - width_m + col, 0)
        m = masked[mine][:, width - width_m :] & inside & (not no_rows)  # both right-aligned; width_m <= width
        window = np.where(inside, self._flat_tokens[gather], PAD_TOKEN)
        tokens = np.where(m, MASK_TOKEN, window)
        labels = np.where(m, window, PAD_TOKEN)
        ctx = {}
        for name, flat in self._flat_contexts.items():
            c = np.where(inside, flat[gather], 0)
            ctx[name] = np.where(m, 0, c) if name not in REQUEST_CONTEXT else c
        return Batch(
            tokens=torch.from_numpy(tokens),
            labels=torch.from_numpy(labels),
            contexts={k: torch.from_numpy(v) for k, v in ctx.items()},
            n_targets_global=n_targets_global,
        )


def _flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else np.zeros(0, np.int64)


def eval_batches(
    eval_set: EvalSet, max_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
    """Inference inputs: the latest max_len-1 history items, right-aligned, then [MASK]; the
    model's context fields (CONTEXT_FIELDS) of the eval set, the request context last."""
    hist = max_len - 1
    contexts = {name: values for name, values in eval_set.context.items() if name in CONTEXT_FIELDS}
    order = np.argsort([min(len(x), hist) for x in eval_set.histories], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = min(max(len(eval_set.histories[r]) for r in rows), hist) + 1
        tokens = np.zeros((len(rows), width), dtype=np.int64)
        ctx = {name: np.zeros((len(rows), width), dtype=np.int64) for name in contexts}
        for i, r in enumerate(rows):
            h = eval_set.histories[r][-hist:]
            tokens[i, width - 1 - len(h) : width - 1] = h
            tokens[i, -1] = MASK_TOKEN
            for name, values in contexts.items():
                c = values[r][-(len(h) + 1) :]
                ctx[name][i, width - len(c) :] = c
        yield rows, torch.from_numpy(tokens), {k: torch.from_numpy(v) for k, v in ctx.items()}

