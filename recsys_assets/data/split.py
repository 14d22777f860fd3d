"""The leave-one-out split and the eval set: the one definition that training validation
(`recsys_assets.bert4rec`), the evaluation report (`recsys_assets.evaluation`) and the ONNX parity
check (`recsys_assets.export`) all use.

Per user, over the chronological item tokens (users with at least 3 items are evaluated; the
others are learned from in full and never evaluated):

- ``test``: input ``tokens[:-1]`` -> target ``tokens[-1]``
- ``valid``: input ``tokens[:-2]`` -> target ``tokens[-2]``

The input history is also the set of items removed from the ranking (the target stays rankable
even if seen before). Fit options (what models and baselines learn from):

- ``train``: ``tokens[:-2]`` (the warehouse's ``train_tokens``); validation and test sets.
- ``train+valid``: ``tokens[:-1]`` (validation folded in, for the final model); test set only.
- ``tuning``: for choosing hyper-parameters and epochs without the test items: learn
  ``tokens[:-3]`` (users with fewer than 4 items: ``tokens[:-1]``, users with 1 item dropped) and
  validate users with at least 4 items on ``tokens[:-2]`` -> ``tokens[-2]``. As at test time, the
  latest input item is one the model never saw in that user's training data (``train``'s
  validation feeds back exactly a training sequence, which overstates how well a model that
  memorises sequences does at test). ``test`` is the validation set again: no test item is
  anywhere in this split. Its fit option is ``train``.

Targets (`recsys_serving.contract.PredictionTarget`): under ``next_item`` every position is a
target, as above. Under ``next_purchase`` only positions whose event type is a target type are:
"the last item" above reads "the last target event" (``test``: the last target event, its input
every event before it; ``valid``: the one before that; ``train`` learns every event before the
valid target, ``train+valid`` every event before the test target; ``tuning`` learns every event
before the third-last target event). Users need two target events, with an event before the
earlier one, to be evaluated. ``item_counts`` counts target events only, and ``target_masks``
tells training which fit positions are targets.

Context: per-position context fields are kept for the history positions plus one more, the
request context at the target's position (time of day, device, segment and time are known when a
recommendation is asked for); outcome fields (``event_types``) are 0 (unknown) at that position so
the target's own event never leaks into its prediction.

The warehouse stores the same split as columns (docs/DATA_CONTRACTS.md: ``train_tokens``,
``valid_item``, ``test_item``); loaders check those columns against this split with
`check_held_out_items` and otherwise split ``tokens`` here.

numpy only (no torch, polars or Dagster), so every stack imports it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np

from recsys_serving.contract import FIRST_ITEM_TOKEN, PredictionTarget

FitOption = Literal["train", "train+valid"]
FIT_OPTIONS: tuple[str, ...] = ("train", "train+valid")
SplitFit = Literal["train", "train+valid", "tuning"]
Split = Literal["valid", "test"]
MIN_EVALUATED_ITEMS = 3  # fewer items: never evaluated, learned from in full
OUTCOME_CONTEXT: tuple[str, ...] = ("event_types",)  # hidden (0) at the target position
_OFFSET: dict[str, int] = {"valid": 2, "test": 1}  # next_item: target = tokens[-offset], input = tokens[:-offset]


@dataclass
class EvalSet:
    """Users with a held-out target: their input history (also the items removed from the
    ranking), the target token, where each user sits in the data the set was cut from, and
    per-position context: one entry per history position plus the request context at the
    target's position (module docstring)."""

    split: str
    user_ids: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    source_rows: np.ndarray  # row of each user in the data the split was cut from
    context: dict[str, list[np.ndarray]] = field(default_factory=dict)
    removes_history: bool = True  # history items leave the ranking (PredictionTarget.removes_history)

    def __post_init__(self) -> None:
        n = len(self.targets)
        if not (len(self.user_ids) == len(self.histories) == len(self.source_rows) == n):
            raise ValueError("EvalSet fields must all have one entry per user")
        for name, values in self.context.items():
            if len(values) != n:
                raise ValueError(f"context {name!r} has {len(values)} rows for {n} users")
            if any(len(v) != len(h) + 1 for v, h in zip(values, self.histories)):
                raise ValueError(f"context {name!r} must have len(history) + 1 entries per user")

    def __len__(self) -> int:
        return len(self.targets)

    def excluded(self, rows: Sequence[int] | np.ndarray | slice) -> list[np.ndarray]:
        """The items removed from the ranking of each of `rows`: the history, or none."""
        picked = self.histories[rows] if isinstance(rows, slice) else [self.histories[int(r)] for r in rows]
        return picked if self.removes_history else [np.zeros(0, np.int64)] * len(picked)

    @property
    def history_lengths(self) -> np.ndarray:
        return np.fromiter((len(h) for h in self.histories), dtype=np.int64, count=len(self.histories))

    def subset(self, index: np.ndarray | slice) -> "EvalSet":
        idx = np.arange(len(self))[index]
        return EvalSet(
            split=self.split,
            user_ids=self.user_ids[idx],
            histories=[self.histories[i] for i in idx],
            targets=self.targets[idx],
            source_rows=self.source_rows[idx],
            context={k: [v[i] for i in idx] for k, v in self.context.items()},
            removes_history=self.removes_history,
        )


@dataclass
class FitSplit:
    """What a model may learn from (``sequences``, ``contexts``) and what it is judged on."""

    fit: FitOption
    sequences: list[np.ndarray]
    contexts: dict[str, list[np.ndarray]]
    valid: EvalSet | None
    test: EvalSet
    item_counts: np.ndarray  # target events per token in the fit data (popularity negatives)
    target: PredictionTarget = field(default_factory=PredictionTarget)
    # per fit sequence, which positions are targets; None = every position (next_item)
    target_masks: list[np.ndarray] | None = None


def target_masks_of(
    tokens: Sequence[np.ndarray], contexts: Mapping[str, Sequence[np.ndarray]], target: PredictionTarget
) -> list[np.ndarray] | None:
    """Which positions of each sequence are targets; None when every one is (next_item)."""
    if target.every_event:
        return None
    types = contexts.get("event_types")
    if types is None:
        raise ValueError(
            f"target {target.label()} needs each event's type, but the sequences have no event_types"
        )
    wanted = np.asarray(target.event_type_tokens, dtype=np.int64)
    return [np.isin(np.asarray(t), wanted) for t in types]


def leave_one_out(
    user_ids: Sequence[str] | np.ndarray,
    tokens: Sequence[np.ndarray],
    fit: SplitFit = "train",
    contexts: Mapping[str, Sequence[np.ndarray]] | None = None,
    vocab_size: int | None = None,
    target: PredictionTarget | None = None,
) -> FitSplit:
    """The leave-one-out split of per-user chronological item tokens (module docstring).

    `contexts` maps a context field to one array per user, as long as the user's tokens;
    `vocab_size` sizes ``item_counts`` (default: the largest fitted token + 1); `target` says
    which events are held out and learned as targets (default next_item)."""
    if fit not in (*FIT_OPTIONS, "tuning"):
        raise ValueError(f"fit must be 'train', 'train+valid' or 'tuning', got {fit!r}")
    target = target or PredictionTarget()
    contexts = dict(contexts or {})
    n = len(tokens)
    if len(user_ids) != n:
        raise ValueError(f"{len(user_ids)} user ids but {n} token lists")
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=n)
    for name, values in contexts.items():
        ctx_lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        if len(values) != n or not np.array_equal(ctx_lengths, lengths):
            raise ValueError(f"context {name!r} must have one entry per token of every user")
    masks = target_masks_of(tokens, contexts, target)
    # target positions from the end: last (test), second-last (valid), third-last; -1 = none
    last, second, third = (_nth_last_target(lengths, masks, k) for k in (1, 2, 3))
    if fit == "tuning":
        evaluated = np.flatnonzero(third >= 1)
        cut = np.where(third >= 1, third, np.where(last >= 0, last, lengths))
        fitted = np.flatnonzero(cut > 0)
    else:
        evaluated = np.flatnonzero(second >= 1)
        held_out = second if fit == "train" else last
        cut = np.where(second >= 1, held_out, lengths)
        fitted = np.arange(n)
    cuts, fitted_rows = cut.tolist(), fitted.tolist()
    sequences = [tokens[i][: cuts[i]] for i in fitted_rows]
    fit_contexts = {name: [values[i][: cuts[i]] for i in fitted_rows] for name, values in contexts.items()}
    fit_masks = None if masks is None else [masks[i][: cuts[i]] for i in fitted_rows]
    targets = sequences if fit_masks is None else [s[m] for s, m in zip(sequences, fit_masks)]
    flat = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    counts = np.bincount(flat, minlength=vocab_size or 0).astype(np.int64)
    ids = np.asarray(user_ids, dtype=object)
    valid = _eval_set("valid", ids, tokens, contexts, evaluated, second, target) if fit != "train+valid" else None
    test = valid if fit == "tuning" else _eval_set("test", ids, tokens, contexts, evaluated, last, target)
    assert test is not None
    split = FitSplit(
        fit="train" if fit == "tuning" else fit, sequences=sequences, contexts=fit_contexts,
        valid=valid, test=test, item_counts=counts, target=target, target_masks=fit_masks,
    )
    if fit != "tuning":
        assert_no_leakage(user_ids, tokens, split, contexts)
    return split


def _nth_last_target(lengths: np.ndarray, masks: list[np.ndarray] | None, k: int) -> np.ndarray:
    """Per user, the position of the k-th last target event (-1 where there are fewer than k)."""
    if masks is None:
        return np.where(lengths >= k, lengths - k, -1)
    out = np.full(len(lengths), -1, dtype=np.int64)
    for i, m in enumerate(masks):
        where = np.flatnonzero(m)
        if len(where) >= k:
            out[i] = where[-k]
    return out


def _eval_set(
    split: Split, user_ids: np.ndarray, tokens: Sequence[np.ndarray],
    contexts: Mapping[str, Sequence[np.ndarray]], users: np.ndarray, positions: np.ndarray,
    target: PredictionTarget,
) -> EvalSet:
    """Target tokens[p]; input tokens[:p]; the request context is the target's (p: per user)."""
    at = positions[users].tolist()
    histories = [tokens[u][:p] for u, p in zip(users, at)]
    targets = np.asarray([tokens[u][p] for u, p in zip(users, at)], dtype=np.int64)
    if targets.size and targets.min() < FIRST_ITEM_TOKEN:
        raise ValueError(f"{split} targets hold special tokens (< {FIRST_ITEM_TOKEN})")
    context: dict[str, list[np.ndarray]] = {}
    for name, values in contexts.items():
        ctx = [values[u][: p + 1].copy() for u, p in zip(users, at)]
        if name in OUTCOME_CONTEXT:
            for c in ctx:
                c[-1] = 0
        context[name] = ctx
    return EvalSet(
        split=split, user_ids=user_ids[users], histories=histories, targets=targets,
        source_rows=users, context=context, removes_history=target.removes_history,
    )


def assert_no_leakage(
    user_ids: Sequence[str] | np.ndarray, tokens: Sequence[np.ndarray], split: FitSplit,
    contexts: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> None:
    """Raises if a held-out position (valid for ``train``, test always) is in the fit data of a
    ``train`` / ``train+valid`` split (one fit sequence per user, in order). `contexts`: the full
    sequences' context, needed to find the held-out positions of a next_purchase split."""
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    masks = target_masks_of(tokens, contexts or {}, split.target)
    second = _nth_last_target(lengths, masks, 2)
    held_out = second if split.fit == "train" else _nth_last_target(lengths, masks, 1)
    for i, (full, seq) in enumerate(zip(tokens, split.sequences)):
        if second[i] >= 1 and len(seq) > held_out[i]:
            raise AssertionError(f"user {user_ids[i]!r}: fit data reaches a held-out position")
        if not np.array_equal(seq, full[: len(seq)]):
            raise AssertionError(f"user {user_ids[i]!r}: fit data is not a prefix of the history")


def check_held_out_items(
    user_ids: Sequence[str] | np.ndarray,
    tokens: Sequence[np.ndarray],
    held_out: Mapping[Split, Sequence[int | None]],
    table: str = "tokenized_sequences",
) -> None:
    """Raises if the warehouse's stored held-out items (``valid_item`` / ``test_item``, keyed by
    split here) disagree with this split: a table built under another contract."""
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    for split, stored in held_out.items():
        offset = _OFFSET[split]
        expected = np.array(
            [int(t[-offset]) if n >= MIN_EVALUATED_ITEMS else -1 for t, n in zip(tokens, lengths)], dtype=np.int64
        )
        got = np.array([-1 if v is None else int(v) for v in stored], dtype=np.int64)
        bad = np.flatnonzero(got != expected)
        if bad.size:
            i = int(bad[0])
            shown = [None if v < 0 else int(v) for v in (got[i], expected[i])]
            raise ValueError(
                f"{bad.size} users have {split}_item != tokens[-{offset}] (e.g. user {user_ids[i]!r}: "
                f"{shown[0]} vs {shown[1]}); {table} breaks its contract"
            )


__all__ = [
    "FIT_OPTIONS",
    "OUTCOME_CONTEXT",
    "EvalSet",
    "FitOption",
    "FitSplit",
    "Split",
    "SplitFit",
    "assert_no_leakage",
    "check_held_out_items",
    "leave_one_out",
    "target_masks_of",
]
