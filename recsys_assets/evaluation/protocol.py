"""The leave-one-out evaluation protocol over `tokenized_sequences` rows.

The split, the fit data and the eval set are `recsys_assets.data.split`'s (the same ones the
BERT4Rec library trains and validates on): ``valid``: input ``tokens[:-2]`` -> ``tokens[-2]``
(``valid_item``); ``test``: input ``tokens[:-1]`` -> ``tokens[-1]`` (``test_item``). The input
history is also the set of items removed from the ranking (the target stays rankable even if seen
before). Fit data (what models and baselines learn from; compare only under the same one):
``train`` (all but the last two items) or ``train+valid`` (validation folded in, for the final
model). Context columns present in the rows (``event_types``, ``tod``, ``devices``, ``segments``,
``ts``) are kept for the history positions plus the request context at the target's position,
outcome fields hidden there (see `recsys_assets.data.split`).

Protocols: ``full`` ranks the target against every item; ``sampled_pop<n>`` against n negatives
drawn by popularity (never the user's own items), the same negatives for every model.

Slices: history length (1-3, 4-10, 11+ items before the target); target popularity (head: the
most interacted-with items that together make the first 50% of interactions, torso: the next
items up to 80%, tail: the rest, from the counts passed as ``item_counts``); target category
where the vocabulary knows it (the 8 most frequent among targets, the rest as ``other``); the
request context (device, segment) where the caller passes it as ``context_labels``. Each slice has
95% bootstrap intervals of its `SLICE_CI_METRICS` over its users.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl

from recsys_assets.data.split import (
    MIN_EVALUATED_ITEMS,
    EvalSet,
    FitOption,
    FitSplit,
    Split,
    check_held_out_items,
    leave_one_out,
)
from recsys_serving.contract import FIRST_ITEM_TOKEN, PredictionTarget
from recsys_assets.evaluation.metrics import (
    DEFAULT_KS,
    bootstrap_ci,
    full_ranks,
    per_user_metrics,
    ranking_metrics,
    sample_popularity_negatives,
    sampled_ranks,
)

FitData = FitOption
FIT_DESCRIPTIONS: dict[str, str] = {
    "train": "fit on all but the last two items of each user (train_tokens)",
    "train+valid": "fit on all but the last item of each user (validation folded in)",
}
_PURCHASE_FIT_DESCRIPTIONS: dict[str, str] = {
    "train": "fit on every event before each user's second-to-last {what} event",
    "train+valid": "fit on every event before each user's last {what} event (validation folded in)",
}


def fit_description(fit: str, target: PredictionTarget | None = None) -> str:
    """What models learn from under `fit`, in words, for `target` (default next_item)."""
    if target is None or target.every_event:
        return FIT_DESCRIPTIONS[fit]
    return _PURCHASE_FIT_DESCRIPTIONS[fit].format(what=" or ".join(target.event_types))


CONTEXT_COLUMNS: tuple[str, ...] = ("event_types", "tod", "devices", "segments", "ts")
HISTORY_LENGTH_SLICES: tuple[tuple[str, int, int | None], ...] = (("1-3", 1, 3), ("4-10", 4, 10), ("11+", 11, None))
POPULARITY_SHARES: tuple[float, float] = (0.5, 0.8)
MAX_CATEGORY_SLICES = 8
_SAMPLED = re.compile(r"^sampled_pop(\d+)$")

# scorer(batch) -> [len(batch), V] scores over the token vocabulary, for a batch of an EvalSet:
# its histories and its context (the context columns present in the data, len(history) + 1
# entries per user: the history positions, then the request context of the position to predict).
Scorer = Callable[[EvalSet], np.ndarray]


def as_scorer(recommender: Any) -> Scorer:
    """A scorer from anything with ``score(histories)`` (the baselines ignore context)."""
    if not callable(getattr(recommender, "score", None)):
        raise TypeError(f"{type(recommender).__name__} has no score(histories) method")
    return lambda batch: recommender.score(batch.histories)


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


def split_rows(
    rows: pl.DataFrame, fit: FitOption = "train", with_context: bool = True, target: PredictionTarget | None = None
) -> FitSplit:
    """The leave-one-out split (`recsys_assets.data.split.leave_one_out`) of `tokenized_sequences`
    rows for `target` (default next_item), after checking their stored ``valid_item`` /
    ``test_item`` against the next_item split they hold."""
    _require(rows, ["user_id", "tokens"], "the leave-one-out split")
    user_ids = rows.get_column("user_id").cast(pl.Utf8).to_numpy()
    tokens = [t.astype(np.int64) for t in _list_column(rows, "tokens")]
    held_out = {c.removesuffix("_item"): rows.get_column(c).to_list() for c in ("valid_item", "test_item") if c in rows.columns}
    check_held_out_items(user_ids, tokens, held_out)  # type: ignore[arg-type]
    names = [c for c in CONTEXT_COLUMNS if c in rows.columns] if with_context else []
    if target is not None and not target.every_event and "event_types" not in names:
        _require(rows, ["event_types"], f"target {target.label()}")
        names.append("event_types")  # which events are targets
    return leave_one_out(user_ids, tokens, fit, {name: _list_column(rows, name) for name in names}, target=target)


def fit_sequences(rows: pl.DataFrame, fit: FitData = "train") -> list[np.ndarray]:
    """The per-user sequences models and baselines learn from under fit option `fit`."""
    if fit not in FIT_DESCRIPTIONS:
        raise ValueError(f"fit must be one of {sorted(FIT_DESCRIPTIONS)}, got {fit!r}")
    return split_rows(rows, fit, with_context=False).sequences


def make_eval_set(rows: pl.DataFrame, split: Split = "valid", target: PredictionTarget | None = None) -> EvalSet:
    """Eval set of the users whose `split` target is known (next_item: at least 3 items; next_purchase:
    two target events with an event before the first)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    eval_set = getattr(split_rows(rows, "train", target=target), split)
    if len(eval_set) == 0:
        need = (f"at least {MIN_EVALUATED_ITEMS} items" if target is None or target.every_event
                else f"two {target.label()} events")
        raise ValueError(f"no user has a {split} target (users need {need}): nothing to evaluate")
    return eval_set


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


SLICE_CI_METRICS: tuple[str, ...] = ("HR@10", "NDCG@10")
SLICE_BOOTSTRAP = 200  # resamples per slice (fewer than the headline's: many slices, small ones)


def _slice_metrics(
    ranks: np.ndarray, labels: np.ndarray, ks: Sequence[int], order: Sequence[str], seed: int = 0
) -> dict:
    out: dict[str, dict[str, Any]] = {}
    for name in order:
        mask = labels == name
        if mask.any():
            per_user = {m: v for m, v in per_user_metrics(ranks[mask], ks).items() if m in SLICE_CI_METRICS}
            ci = {m: list(v) for m, v in bootstrap_ci(per_user, SLICE_BOOTSTRAP, seed).items()} if per_user else {}
            out[name] = {"n_users": int(mask.sum()), **ranking_metrics(ranks[mask], ks), "ci": ci}
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


def recommended_items(scorer: Scorer, eval_set: EvalSet, k: int = 10, batch_size: int = 1024) -> np.ndarray:
    """[users, k] tokens each user would be shown, best first: the top-k of the scores, with the
    history left out where the target removes it (PAD and MASK never)."""
    top = np.zeros((len(eval_set), k), dtype=np.int64)
    for start in range(0, len(eval_set), batch_size):
        batch = eval_set.subset(slice(start, min(start + batch_size, len(eval_set))))
        scores = scorer(batch)
        scores = np.array(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float32)
        scores[:, :FIRST_ITEM_TOKEN] = -np.inf
        for row, history in enumerate(batch.excluded(slice(None))):
            scores[row, history] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        top[start : start + len(batch)] = np.take_along_axis(part, order, axis=1)
    return top


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
    context_labels: Mapping[str, np.ndarray] | None = None,
) -> EvaluationResult:
    """Score every user once per batch and rank the target under each protocol.

    item_counts[token]: interaction counts (popularity negatives and popularity slices).
    context_labels: optional {slice kind: label per eval-set user} (device, segment).
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
        batch = eval_set.subset(slice(start, stop))
        scores = scorer(batch)
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[0] != stop - start:
            raise ValueError(f"scorer returned shape {scores.shape} for a batch of {stop - start} users")
        targets = batch.targets
        for protocol, n in sizes.items():
            if n is None:
                ranks[protocol].append(full_ranks(scores, targets, batch.excluded(slice(None))))
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
    for kind, labels in (context_labels or {}).items():
        labels = np.asarray(labels, dtype=object)
        if labels.shape != (len(eval_set),):
            raise ValueError(f"context_labels[{kind!r}] has shape {labels.shape}, expected ({len(eval_set)},)")
        slice_labels[kind] = (labels, sorted(set(labels.tolist())))

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
            p: {kind: _slice_metrics(r, labels, ks, order, seed) for kind, (labels, order) in slice_labels.items()}
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
    context_labels: Mapping[str, np.ndarray] | None = None,
) -> dict[str, EvaluationResult]:
    """Evaluate several models on one eval set with one shared draw of sampled negatives."""
    negs = {
        n: sample_negatives_for(eval_set, np.asarray(item_counts), n, seed)
        for n in (parse_protocol(p) for p in protocols)
        if n is not None
    }
    return {
        name: evaluate(
            scorer, eval_set, item_counts, ks, protocols, batch_size, seed, n_bootstrap, item_categories, negs,
            context_labels,
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

    from recsys_assets.bert4rec.train import score_eval_set

    dev = torch.device(device) if device else next(model.parameters()).device
    model.to(dev)

    def score(batch: EvalSet) -> np.ndarray:
        out: np.ndarray | None = None
        for rows, scores in score_eval_set(model, batch, max_len, batch_size, dev, None):
            if out is None:
                out = np.empty((len(batch), scores.shape[1]), dtype=np.float32)
            out[rows] = scores
        assert out is not None
        return out

    return score
