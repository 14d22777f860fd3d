"""Leave-one-out ranking metrics over the whole item vocabulary.

Conventions (those of ../shared/QUALITY_NOTES.md, so figures are comparable):
- scores are over the full token vocabulary (0 PAD, 1 MASK, items from ``FIRST_ITEM_TOKEN``);
  only item tokens are ranked;
- items of the user's history are removed, the target itself stays rankable even if seen before;
- ties are broken pessimistically: rank = 1 + number of other candidates scoring >= the target,
  so a constant scorer gets the worst rank, never a lucky one.

Numpy is the contract; torch tensors are accepted and moved to CPU numpy.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from recsys_serving.contract import FIRST_ITEM_TOKEN

K = TypeVar("K", bound=Hashable)
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
# Rows processed at once when building [rows, V] masks: bounds memory (~12 MB of bools for
# 1024 x 12k items) whatever batch the caller hands in.
_ROW_CHUNK = 1024


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores_targets(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _to_numpy(scores)
    targets = _to_numpy(targets).astype(np.int64, copy=False).reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [batch, vocab], got shape {scores.shape}")
    batch, vocab = scores.shape
    if targets.shape[0] != batch:
        raise ValueError(f"targets has {targets.shape[0]} entries but scores has {batch} rows")
    if batch and (targets.min() < FIRST_ITEM_TOKEN or targets.max() >= vocab):
        bad = targets[(targets < FIRST_ITEM_TOKEN) | (targets >= vocab)][:5].tolist()
        raise ValueError(
            f"targets must be item tokens in [{FIRST_ITEM_TOKEN}, {vocab}); got e.g. {bad}"
        )
    # np.min propagates NaN: one pass without a [B, V] temporary.
    if np.issubdtype(scores.dtype, np.floating) and scores.size and np.isnan(np.min(scores)):
        rows = np.unique(np.nonzero(np.isnan(scores))[0])[:5].tolist()
        raise ValueError(f"scores contain NaN (rows {rows}); a NaN cannot be ranked")
    return scores, targets


def _history_coords(histories: Sequence[Any], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) pairs of the history items of rows [start, stop), rows relative to start."""
    chunk = [_to_numpy(h).astype(np.int64, copy=False).reshape(-1) for h in histories[start:stop]]
    lengths = np.fromiter((len(h) for h in chunk), dtype=np.int64, count=len(chunk))
    if lengths.sum() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)
    cols = np.concatenate(chunk)
    return rows, cols


def full_ranks(scores: Any, targets: Any, histories: Sequence[Any]) -> np.ndarray:
    """1-based rank of each target among all item tokens, history items removed.

    scores: [B, V] over the whole token vocabulary; targets: [B] item tokens; histories: B arrays
    of tokens already seen by each user (PAD/MASK/out-of-range tokens are ignored). The target
    stays rankable even if it is in the history. Ties are pessimistic.
    """
    scores, targets = _check_scores_targets(scores, targets)
    if len(histories) != scores.shape[0]:
        raise ValueError(f"histories has {len(histories)} entries but scores has {scores.shape[0]} rows")
    batch, vocab = scores.shape
    ranks = np.empty(batch, dtype=np.int64)
    for start in range(0, batch, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, batch)
        block = scores[start:stop]
        idx = np.arange(stop - start)
        target_scores = block[idx, targets[start:stop]]
        # Count candidates scoring >= target on a boolean mask (not by overwriting scores with
        # -inf) so a target that itself scores -inf is still ranked pessimistically and correctly.
        beats = block >= target_scores[:, None]
        beats[:, :FIRST_ITEM_TOKEN] = False
        rows, cols = _history_coords(histories, start, stop)
        keep = (cols >= 0) & (cols < vocab)
        beats[rows[keep], cols[keep]] = False
        beats[idx, targets[start:stop]] = True  # the target counts once: rank = 1 + #others >=
        ranks[start:stop] = beats.sum(axis=1)
    return ranks


def sample_popularity_negatives(
    histories: Sequence[Any],
    targets: Any,
    item_counts: Any,
    n: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """[B, n] item tokens drawn in proportion to popularity, without replacement per user,
    never one of the user's history items nor the target.

    item_counts[token] is the interaction count of that token (length V; entries below
    ``FIRST_ITEM_TOKEN`` are ignored, zero-count items are never drawn). Deterministic for a given
    seed and input order.

    Method: the first n distinct eligible items of an i.i.d. popularity-proportional stream are,
    in law, exactly successive weighted draws without replacement from the eligible items. A short
    stream (a few times n per user) settles almost every user at O(n) cost; the few users it leaves
    short (their history covers much of the head) are finished with exponential keys
    (Efraimidis-Spirakis) over the whole vocabulary, the same law at O(V) cost.
    """
    targets = _to_numpy(targets).astype(np.int64, copy=False).reshape(-1)
    counts = _to_numpy(item_counts).astype(np.float64, copy=False).reshape(-1)
    if len(histories) != targets.shape[0]:
        raise ValueError(f"histories has {len(histories)} entries but targets has {targets.shape[0]}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("item_counts must be finite and non-negative")
    vocab = counts.shape[0]
    if targets.size and (targets.min() < FIRST_ITEM_TOKEN or targets.max() >= vocab):
        raise ValueError(f"targets must be item tokens in [{FIRST_ITEM_TOKEN}, {vocab})")
    weights = counts.copy()
    weights[:FIRST_ITEM_TOKEN] = 0.0
    if weights.sum() <= 0:
        raise ValueError("item_counts has no item with a positive count")
    cdf = np.cumsum(weights)

    rng = np.random.default_rng(seed)
    batch = targets.shape[0]
    out = np.empty((batch, n), dtype=np.int64)
    stream = 3 * n
    for start in range(0, batch, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, batch)
        m = stop - start
        rows, cols = _history_coords(histories, start, stop)
        keep = (cols >= 0) & (cols < vocab)
        excluded = np.concatenate([rows[keep] * vocab + cols[keep], np.arange(m) * vocab + targets[start:stop]])
        draws = np.searchsorted(cdf, rng.random((m, stream)) * cdf[-1], side="right")
        keys = (np.arange(m)[:, None] * vocab + draws).reshape(-1)
        valid = np.zeros(keys.shape[0], dtype=bool)
        valid[np.unique(keys, return_index=True)[1]] = True  # first occurrence of each (row, item)
        valid &= ~np.isin(keys, excluded)
        valid = valid.reshape(m, stream)
        taken = valid & (np.cumsum(valid, axis=1) <= n)
        done = taken.sum(axis=1) == n
        out[start:stop][done] = draws[done][taken[done]].reshape(-1, n)
        short = np.nonzero(~done)[0]
        if short.size:
            out[start + short] = _exponential_key_sample(
                rng, weights, [histories[start + int(i)] for i in short], targets[start + short], n, start + short
            )
    return out


def _exponential_key_sample(
    rng: np.random.Generator,
    weights: np.ndarray,
    histories: Sequence[Any],
    targets: np.ndarray,
    n: int,
    row_ids: np.ndarray,
) -> np.ndarray:
    """Weighted sampling without replacement over the whole vocabulary: the n smallest
    Exp(1) / weight keys (equivalent to Gumbel-top-k on log weights)."""
    vocab = weights.shape[0]
    inv_w = np.full(vocab, np.inf, dtype=np.float32)
    positive = weights > 0
    inv_w[positive] = (1.0 / weights[positive]).astype(np.float32)
    m = targets.shape[0]
    keys = rng.standard_exponential(size=(m, vocab), dtype=np.float32) * inv_w[None, :]
    rows, cols = _history_coords(histories, 0, m)
    keep = (cols >= 0) & (cols < vocab)
    keys[rows[keep], cols[keep]] = np.inf
    keys[np.arange(m), targets] = np.inf
    eligible = np.isfinite(keys).sum(axis=1)
    if (eligible < n).any():
        i = int(np.argmax(eligible < n))
        raise ValueError(
            f"user row {int(row_ids[i])} has only {int(eligible[i])} eligible negatives (< n={n}): "
            "too few items with a positive count outside its history"
        )
    return np.argpartition(keys, n - 1, axis=1)[:, :n]


def sampled_ranks(scores: Any, targets: Any, negatives: Any) -> np.ndarray:
    """1-based rank of each target among itself and its sampled negatives, pessimistic ties."""
    scores, targets = _check_scores_targets(scores, targets)
    negatives = _to_numpy(negatives).astype(np.int64, copy=False)
    if negatives.ndim != 2 or negatives.shape[0] != scores.shape[0]:
        raise ValueError(f"negatives must be [{scores.shape[0]}, n], got shape {negatives.shape}")
    if (negatives == targets[:, None]).any():
        raise ValueError("negatives contain the target of their row")
    if negatives.size and (negatives.min() < FIRST_ITEM_TOKEN or negatives.max() >= scores.shape[1]):
        raise ValueError("negatives must be item tokens inside the score vocabulary")
    idx = np.arange(scores.shape[0])
    target_scores = scores[idx, targets]
    neg_scores = np.take_along_axis(scores, negatives, axis=1)
    return 1 + (neg_scores >= target_scores[:, None]).sum(axis=1).astype(np.int64)


def per_user_metrics(ranks: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user metric values (means of these are `ranking_metrics`; kept for bootstrap CIs)."""
    ranks = _to_numpy(ranks).astype(np.float64, copy=False).reshape(-1)
    if ranks.size and ranks.min() < 1:
        raise ValueError(f"ranks are 1-based; got a minimum of {ranks.min()}")
    bad_ks = [k for k in ks if int(k) < 1]
    if bad_ks:
        raise ValueError(f"cut-offs must be >= 1, got {bad_ks}")
    out: dict[str, np.ndarray] = {}
    gain = 1.0 / np.log2(ranks + 1.0)
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = hit.astype(np.float64)
        out[f"NDCG@{k}"] = np.where(hit, gain, 0.0)
    out["MRR"] = 1.0 / ranks
    return out


def ranking_metrics(ranks: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item, so IDCG = 1) and untruncated MRR, averaged over users."""
    per_user = per_user_metrics(ranks, ks)
    if not per_user["MRR"].size:
        raise ValueError("no ranks to average")
    return {name: float(values.mean()) for name, values in per_user.items()}


def _bootstrap_indices(n_users: int, n_resamples: int, seed: int, chunk: int = 100):
    """Yield [c, n_users] user indices, c <= chunk, n_resamples rows in all. The same seed and
    user count give the same resamples, so CIs of different models on one eval set are paired."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        c = min(chunk, n_resamples - done)
        yield rng.integers(0, n_users, size=(c, n_users))
        done += c


def _resample_counts(idx: np.ndarray) -> np.ndarray:
    """[c, N] how often each user is drawn in each resample: means become one matrix product
    instead of gathering a [c, N, metrics] array."""
    c, n = idx.shape
    flat = (idx + np.arange(c)[:, None] * n).reshape(-1)
    return np.bincount(flat, minlength=c * n).reshape(c, n).astype(np.float64)


def bootstrap_means(values: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_resamples, C] means of each column of values [N, C] over users resampled with
    replacement; every column sees the same resamples (paired)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be [users > 0, columns], got shape {values.shape}")
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    n = values.shape[0]
    return np.concatenate([_resample_counts(idx) @ values / n for idx in _bootstrap_indices(n, n_resamples, seed)])


def _interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
    return lo, hi


def bootstrap_ci(
    per_user: Mapping[K, np.ndarray], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[K, tuple[float, float]]:
    """Percentile bootstrap CI of each metric's mean, resampling users with replacement."""
    names = list(per_user)
    values = np.stack([np.asarray(per_user[n], dtype=np.float64) for n in names], axis=1)  # [N, M]
    lo, hi = _interval(bootstrap_means(values, n_resamples, seed), level)
    return {n: (float(lo[i]), float(hi[i])) for i, n in enumerate(names)}


def bootstrap_lift_ci(
    model: np.ndarray, baseline: np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Paired percentile bootstrap CI of the relative lift mean(model) / mean(baseline) - 1 over
    the same users (both arrays aligned user by user)."""
    model = np.asarray(model, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if model.shape != baseline.shape or model.ndim != 1:
        raise ValueError(f"per-user arrays must be 1-D and aligned, got {model.shape} and {baseline.shape}")
    means = bootstrap_means(np.stack([model, baseline], axis=1), n_resamples, seed)
    lo, hi = _interval(lift_samples(means[:, 0], means[:, 1]), level)
    return float(lo), float(hi)


def lift_samples(model_means: np.ndarray, baseline_means: np.ndarray) -> np.ndarray:
    """Relative lift per resample; NaN where the baseline's resampled mean is 0 (undefined),
    ignored by the interval."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = model_means / baseline_means - 1.0
    return np.where(np.isfinite(lift), lift, np.nan)
