"""The leave-one-out evaluation protocol over `tokenized_sequences` rows.

Splits (docs/DATA_CONTRACTS.md): ``valid``: input ``tokens[:-2]`` -> ``valid_item``;
``test``: input ``tokens[:-1]`` -> ``test_item``. The input history is also the set of items
removed from the ranking (the target stays rankable even if seen before).

Fit data (what models and baselines learn from; compare only under the same one):
``train``: ``train_tokens`` (all but the last two items); ``train+valid``: ``train_tokens`` plus
``valid_item`` (validation folded in, for the final model). Same names as the BERT4Rec library's
``FitOption``.

Context: per-position context columns present in the rows (``event_types``, ``tod``, ``devices``,
``segments``, ``ts``) are kept for the history positions plus one more, the request context at
the target's position (time of day, device, segment and time are known when a recommendation is
asked for); outcome fields (``event_types``) are 0 (unknown) at that position so the target's own
event never leaks into its prediction.

Protocols: ``full`` ranks the target against every item; ``sampled_pop<n>`` against n negatives
drawn by popularity (never the user's own items), the same negatives for every model.

Slices: history length (1-3, 4-10, 11+ items before the target); target popularity (head: the
most interacted-with items that together make the first 50% of interactions, torso: the next
items up to 80%, tail: the rest, from the counts passed as ``item_counts``); target category
where the vocabulary knows it (the 8 most frequent among targets, the rest as ``other``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import polars as pl

from recsys_assets.data.schema import FIRST_ITEM_TOKEN
from recsys_assets.evaluation.metrics import (
    DEFAULT_KS,
    bootstrap_ci,
    full_ranks,
    per_user_metrics,
    ranking_metrics,
    sample_popularity_negatives,
    sampled_ranks,
)

Split = Literal["valid", "test"]
FitData = Literal["train", "train+valid"]
FIT_DESCRIPTIONS: dict[str, str] = {
    "train": "fit on all but the last two items of each user (train_tokens)",
    "train+valid": "fit on all but the last item of each user (validation folded in)",
}
CONTEXT_COLUMNS: tuple[str, ...] = ("event_types", "tod", "devices", "segments", "ts")
OUTCOME_CONTEXT: tuple[str, ...] = ("event_types",)  # hidden (0) at the target position
HISTORY_LENGTH_SLICES: tuple[tuple[str, int, int | None], ...] = (("1-3", 1, 3), ("4-10", 4, 10), ("11+", 11, None))
POPULARITY_SHARES: tuple[float, float] = (0.5, 0.8)
MAX_CATEGORY_SLICES = 8
_SAMPLED = re.compile(r"^sampled_pop(\d+)$")

# scorer(histories, context) -> [B, V] scores over the token vocabulary. `context` maps the
# per-position context columns present in the data to arrays of len(history) + 1 (the history
# positions, then the request context of the position to predict).
Scorer = Callable[[Sequence[np.ndarray], Mapping[str, Sequence[np.ndarray]]], np.ndarray]


def as_scorer(recommender: Any) -> Scorer:
    """A scorer from anything with ``score(histories)`` (the baselines ignore context)."""
    if not callable(getattr(recommender, "score", None)):
        raise TypeError(f"{type(recommender).__name__} has no score(histories) method")
    return lambda histories, context: recommender.score(histories)


def _list_column(frame: pl.DataFrame, name: str) -> list[np.ndarray]:
    """A polars List column as one numpy array per row, without a Python loop per element."""
    col = frame.get_column(name)
    lengths = col.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = col.explode().drop_nulls().to_numpy() if lengths.sum() else np.empty(0)
    if flat.shape[0] != lengths.sum():
        raise ValueError(f"column {name!r} has null elements inside its lists")
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs tokenized_sequences columns {missing}; got {frame.columns}")


def fit_sequences(rows: pl.DataFrame, fit: FitData = "train") -> list[np.ndarray]:
    """The per-user sequences models and baselines learn from under fit option `fit`."""
    if fit not in FIT_DESCRIPTIONS:
        raise ValueError(f"fit must be one of {sorted(FIT_DESCRIPTIONS)}, got {fit!r}")
    _require(rows, ["train_tokens", "valid_item"], "fit_sequences")
    train = [a.astype(np.int64) for a in _list_column(rows, "train_tokens")]
    if fit == "train":
        return train
    valid = rows.get_column("valid_item").to_list()
    return [t if v is None else np.append(t, np.int64(v)) for t, v in zip(train, valid)]


@dataclass
class EvalSet:
    """Users with a held-out target: their input history (also the items removed from the
    ranking), the target token, and per-position context: one entry per history position plus
    the request context at the target's position (module docstring)."""

    split: str
    user_ids: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    history_lengths: np.ndarray
    context: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.targets)
        if not (len(self.user_ids) == len(self.histories) == len(self.history_lengths) == n):
            raise ValueError("EvalSet fields must all have one entry per user")
        for name, values in self.context.items():
            if len(values) != n:
                raise ValueError(f"context {name!r} has {len(values)} rows for {n} users")
            if any(len(v) != len(h) + 1 for v, h in zip(values, self.histories)):
                raise ValueError(f"context {name!r} must have len(history) + 1 entries per user")

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray | slice) -> "EvalSet":
        idx = np.arange(len(self))[index]
        return EvalSet(
            split=self.split,
            user_ids=self.user_ids[idx],
            histories=[self.histories[i] for i in idx],
            targets=self.targets[idx],
            history_lengths=self.history_lengths[idx],
            context={k: [v[i] for i in idx] for k, v in self.context.items()},
        )


def make_eval_set(rows: pl.DataFrame, split: Split = "valid") -> EvalSet:
    """Eval set of the users whose `split` target is known (at least 3 items)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    target_col = f"{split}_item"
    _require(rows, ["user_id", "tokens", target_col], "make_eval_set")
    rows = rows.filter(pl.col(target_col).is_not_null())
    if rows.height == 0:
        raise ValueError(f"no user has a non-null {target_col}: nothing to evaluate")
    cut = 2 if split == "valid" else 1  # items after the input history (target included)
    tokens = [t.astype(np.int64) for t in _list_column(rows, "tokens")]
    targets = rows.get_column(target_col).to_numpy().astype(np.int64)
    histories = [t[:-cut] for t in tokens]
    # Guard the contract: the target must be the item right after the input history.
    at_cut = np.array([t[-cut] if t.size >= cut else -1 for t in tokens], dtype=np.int64)
    bad = np.nonzero(at_cut != targets)[0]
    if bad.size:
        raise ValueError(
            f"{bad.size} users have {target_col} != tokens[-{cut}] (e.g. user "
            f"{rows.get_column('user_id')[int(bad[0])]!r}); tokenized_sequences breaks its contract"
        )
    if targets.min() < FIRST_ITEM_TOKEN:
        raise ValueError(f"{target_col} holds special tokens (< {FIRST_ITEM_TOKEN})")
    context: dict[str, list[np.ndarray]] = {}
    for name in (c for c in CONTEXT_COLUMNS if c in rows.columns):
        values = [v[: len(h) + 1].copy() for v, h in zip(_list_column(rows, name), histories)]
        if any(len(v) != len(h) + 1 for v, h in zip(values, histories)):
            raise ValueError(f"context column {name!r} is shorter than tokens for some users")
        if name in OUTCOME_CONTEXT:
            for v in values:
                v[-1] = 0
        context[name] = values
    return EvalSet(
        split=split,
        user_ids=rows.get_column("user_id").cast(pl.Utf8).to_numpy(),
        histories=histories,
        targets=targets,
        history_lengths=np.array([h.size for h in histories], dtype=np.int64),
        context=context,
    )


def eval_set_fingerprint(eval_set: EvalSet) -> str:
    """Short hash of who is evaluated on what (users, histories, targets): reports with equal
    fingerprints were computed on the same data and can be compared."""
    digest = hashlib.sha256()
    digest.update(eval_set.split.encode())
    digest.update("\x1f".join(map(str, eval_set.user_ids)).encode())
    digest.update(eval_set.targets.astype(np.int64).tobytes())
    digest.update(eval_set.history_lengths.astype(np.int64).tobytes())
    digest.update(np.concatenate(eval_set.histories).astype(np.int64).tobytes() if len(eval_set) else b"")
    return digest.hexdigest()[:16]


def popularity_buckets(item_counts: np.ndarray) -> np.ndarray:
    """'head' | 'torso' | 'tail' per token by cumulative interaction share (module docstring)."""
    counts = np.asarray(item_counts, dtype=np.float64).copy()
    counts[:FIRST_ITEM_TOKEN] = 0.0
    total = counts.sum()
    if total <= 0:
        raise ValueError("item_counts has no interactions")
    order = np.lexsort((np.arange(counts.size), -counts))  # by count desc, then token
    share_before = np.empty_like(counts)
    share_before[order] = (np.cumsum(counts[order]) - counts[order]) / total
    head, torso = POPULARITY_SHARES
    buckets = np.where(share_before < head, "head", np.where(share_before < torso, "torso", "tail"))
    buckets[counts == 0] = "tail"
    return buckets.astype(object)


def _history_length_slice(lengths: np.ndarray) -> np.ndarray:
    out = np.full(lengths.shape, "0", dtype=object)
    for name, lo, hi in HISTORY_LENGTH_SLICES:
        out[(lengths >= lo) & ((lengths <= hi) if hi is not None else True)] = name
    return out


def _category_slice(targets: np.ndarray, item_categories: np.ndarray | None) -> np.ndarray | None:
    if item_categories is None:
        return None
    cats = np.asarray(item_categories, dtype=object)
    labels = np.array(
        [c if isinstance(c, str) and c else "unknown" for c in cats[targets]], dtype=object
    )
    if (labels == "unknown").all():
        return None
    known, freq = np.unique(labels[labels != "unknown"], return_counts=True)
    top = set(known[np.argsort(-freq, kind="stable")][:MAX_CATEGORY_SLICES].tolist())
    return np.array([c if c in top or c == "unknown" else "other" for c in labels], dtype=object)


def parse_protocol(protocol: str) -> int | None:
    """None for 'full', else the number of sampled negatives of 'sampled_pop<n>'."""
    if protocol == "full":
        return None
    match = _SAMPLED.match(protocol)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"unknown protocol {protocol!r}: use 'full' or 'sampled_pop<n>' (e.g. sampled_pop100)")
    return int(match.group(1))


@dataclass
class EvaluationResult:
    """One model on one eval set: per-user ranks (kept for CIs and paired comparisons) and
    their summaries."""

    n_users: int
    ks: tuple[int, ...]
    ranks: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    ci: dict[str, dict[str, tuple[float, float]]]
    slices: dict[str, dict[str, dict[str, dict[str, float]]]]

    def per_user(self, protocol: str) -> dict[str, np.ndarray]:
        return per_user_metrics(self.ranks[protocol], self.ks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-user arrays)."""
        return {
            "n_users": self.n_users,
            "metrics": self.metrics,
            "ci": {p: {m: list(v) for m, v in c.items()} for p, c in self.ci.items()},
            "slices": self.slices,
        }


def _slice_metrics(ranks: np.ndarray, labels: np.ndarray, ks: Sequence[int], order: Sequence[str]) -> dict:
    out: dict[str, dict[str, float]] = {}
    for name in order:
        mask = labels == name
        if mask.any():
            out[name] = {"n_users": int(mask.sum()), **ranking_metrics(ranks[mask], ks)}
    return out


def sample_negatives_for(eval_set: EvalSet, item_counts: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The sampled protocol's negatives: one draw per eval set, shared by every model."""
    return sample_popularity_negatives(eval_set.histories, eval_set.targets, item_counts, n=n, seed=seed)


def feasible_protocols(
    protocols: Sequence[str], eval_set: EvalSet, item_counts: np.ndarray
) -> tuple[list[str], list[str]]:
    """(kept, dropped): a sampled protocol needs n drawable items outside every user's history and
    target; on a small catalogue it cannot be run and is dropped (callers log why)."""
    positive = np.asarray(item_counts, dtype=np.float64) > 0
    positive[:FIRST_ITEM_TOKEN] = False
    seen_max = 0
    for h, t in zip(eval_set.histories, eval_set.targets):
        items = np.unique(np.append(h[(h >= 0) & (h < positive.size)], t))
        seen_max = max(seen_max, int(positive[items].sum()))
    available = int(positive.sum()) - seen_max
    kept: list[str] = []
    dropped: list[str] = []
    for p in protocols:
        n = parse_protocol(p)
        (kept if n is None or n <= available else dropped).append(p)
    return kept, dropped


def evaluate(
    scorer: Scorer,
    eval_set: EvalSet,
    item_counts: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    protocols: Sequence[str] = ("full", "sampled_pop100"),
    batch_size: int = 1024,
    seed: int = 0,
    n_bootstrap: int = 1000,
    item_categories: np.ndarray | None = None,
    negatives: Mapping[int, np.ndarray] | None = None,
) -> EvaluationResult:
    """Score every user once per batch and rank the target under each protocol.

    item_counts[token]: interaction counts (popularity negatives and popularity slices).
    negatives: optional precomputed {n: [users, n]} (see `sample_negatives_for`) so several models
    share one draw; drawn here from `seed` otherwise (deterministic, so still shared).
    """
    if len(eval_set) == 0:
        raise ValueError("empty eval set")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    item_counts = np.asarray(item_counts)
    sizes = {p: parse_protocol(p) for p in protocols}
    negs: dict[int, np.ndarray] = dict(negatives or {})
    for n in sizes.values():
        if n is not None and n not in negs:
            negs[n] = sample_negatives_for(eval_set, item_counts, n, seed)
        if n is not None and negs[n].shape != (len(eval_set), n):
            raise ValueError(f"negatives for n={n} have shape {negs[n].shape}, expected {(len(eval_set), n)}")

    ranks: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
    for start in range(0, len(eval_set), batch_size):
        stop = min(start + batch_size, len(eval_set))
        hist = eval_set.histories[start:stop]
        ctx = {k: v[start:stop] for k, v in eval_set.context.items()}
        scores = scorer(hist, ctx)
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[0] != stop - start:
            raise ValueError(f"scorer returned shape {scores.shape} for a batch of {stop - start} users")
        targets = eval_set.targets[start:stop]
        for protocol, n in sizes.items():
            if n is None:
                ranks[protocol].append(full_ranks(scores, targets, hist))
            else:
                ranks[protocol].append(sampled_ranks(scores, targets, negs[n][start:stop]))
    all_ranks = {p: np.concatenate(r) for p, r in ranks.items()}

    slice_labels: dict[str, tuple[np.ndarray, list[str]]] = {
        "history_length": (_history_length_slice(eval_set.history_lengths), [s[0] for s in HISTORY_LENGTH_SLICES]),
        "popularity": (popularity_buckets(item_counts)[eval_set.targets], ["head", "torso", "tail"]),
    }
    cats = _category_slice(eval_set.targets, item_categories)
    if cats is not None:
        names = sorted(set(cats.tolist()) - {"other", "unknown"}) + ["other", "unknown"]
        slice_labels["category"] = (cats, names)

    ks = tuple(int(k) for k in ks)
    # One bootstrap over every (protocol, metric) column: the resampling is the costly part.
    stacked = {(p, m): v for p, r in all_ranks.items() for m, v in per_user_metrics(r, ks).items()}
    intervals = bootstrap_ci(stacked, n_bootstrap, seed)
    return EvaluationResult(
        n_users=len(eval_set),
        ks=ks,
        ranks=all_ranks,
        metrics={p: ranking_metrics(r, ks) for p, r in all_ranks.items()},
        ci={p: {m: intervals[(p, m)] for (q, m) in stacked if q == p} for p in all_ranks},
        slices={
            p: {kind: _slice_metrics(r, labels, ks, order) for kind, (labels, order) in slice_labels.items()}
            for p, r in all_ranks.items()
        },
    )


def evaluate_many(
    scorers: Mapping[str, Scorer],
    eval_set: EvalSet,
    item_counts: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    protocols: Sequence[str] = ("full", "sampled_pop100"),
    batch_size: int = 1024,
    seed: int = 0,
    n_bootstrap: int = 1000,
    item_categories: np.ndarray | None = None,
) -> dict[str, EvaluationResult]:
    """Evaluate several models on one eval set with one shared draw of sampled negatives."""
    negs = {
        n: sample_negatives_for(eval_set, np.asarray(item_counts), n, seed)
        for n in (parse_protocol(p) for p in protocols)
        if n is not None
    }
    return {
        name: evaluate(
            scorer, eval_set, item_counts, ks, protocols, batch_size, seed, n_bootstrap, item_categories, negs
        )
        for name, scorer in scorers.items()
    }


def bert4rec_scorer(
    model: Any, max_len: int, batch_size: int = 512, device: str | None = None
) -> Scorer:
    """A scorer over a trained ``recsys_assets.bert4rec`` model: the library's own inference
    batching (latest max_len-1 items, right-aligned, then [MASK]) so evaluation scores exactly as
    training validated. Float32 (no autocast): ranks must not depend on the device's precision."""
    import torch

    from recsys_assets.bert4rec.data import CONTEXT_FIELDS
    from recsys_assets.bert4rec.data import EvalSet as ModelEvalSet
    from recsys_assets.bert4rec.train import score_eval_set

    dev = torch.device(device) if device else next(model.parameters()).device
    model.to(dev)

    def score(histories: Sequence[np.ndarray], context: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
        n = len(histories)
        batch = ModelEvalSet(
            inputs=list(histories),
            contexts={k: list(v) for k, v in context.items() if k in CONTEXT_FIELDS},
            targets=np.zeros(n, dtype=np.int64),  # not read when scoring
            histories=list(histories),
            users=np.arange(n),
        )
        out: np.ndarray | None = None
        for rows, scores in score_eval_set(model, batch, max_len, batch_size, dev, None):
            if out is None:
                out = np.empty((n, scores.shape[1]), dtype=np.float32)
            out[rows] = scores
        assert out is not None
        return out

    return score
