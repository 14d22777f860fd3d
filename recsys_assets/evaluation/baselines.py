"""Non-neural next-item baselines: the floors BERT4Rec has to beat.

Definitions follow ../shared/QUALITY_NOTES.md (reproduced there on Amazon Beauty to within
rounding, see tests/test_baselines.py):
- popularity: interaction counts in the fit data;
- item-kNN: cosine similarity of items over binary user co-occurrence, a user's scores are the
  similarities summed over every item of the history; ties (and users whose items have no
  neighbours) fall back to popularity;
- last-item transition: first-order transition counts out of the last history item, ties and
  unseen transitions fall back to popularity.

Under a next_purchase target (``target_masks``: which fit positions are target events) each learns
what leads to a target event: popularity counts target events; item-kNN is the cosine, over target
events, between "i was in the history before it" and "it was on j", its own item included (a viewed
item is the likeliest purchase); last-item counts transitions into target events only.

All share one protocol: ``fit(train_sequences, target_masks=None) -> self`` then ``score(histories) -> [B, V]``
over the whole token vocabulary (PAD/MASK columns score -inf). Tokens below
``FIRST_ITEM_TOKEN`` in inputs (padding) are ignored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, Sequence

import numpy as np
import scipy.sparse as sp

from recsys_serving.contract import FIRST_ITEM_TOKEN


class Recommender(Protocol):
    """What evaluation needs from a fitted next-item model."""

    name: str

    def fit(
        self, train_sequences: Sequence[np.ndarray], target_masks: Sequence[np.ndarray] | None = None
    ) -> "Recommender": ...

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...


def _as_items(seq: Any, vocab_size: int | None = None) -> np.ndarray:
    """Int64 item tokens of one sequence, specials dropped; out-of-vocabulary is an error."""
    arr = np.asarray(seq if not hasattr(seq, "detach") else seq.detach().cpu().numpy())
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    arr = arr[arr >= FIRST_ITEM_TOKEN]
    if vocab_size is not None and arr.size and arr.max() >= vocab_size:
        raise ValueError(f"token {int(arr.max())} is outside the vocabulary of size {vocab_size}")
    return arr


class _Base(ABC):
    name = "base"

    def __init__(self, vocab_size: int | None = None) -> None:
        if vocab_size is not None and vocab_size <= FIRST_ITEM_TOKEN:
            raise ValueError(f"vocab_size must exceed {FIRST_ITEM_TOKEN} (PAD and MASK), got {vocab_size}")
        self.vocab_size = vocab_size
        self.item_counts: np.ndarray | None = None

    @abstractmethod
    def fit(self, train_sequences: Sequence[Any], target_masks: Sequence[np.ndarray] | None = None) -> "_Base":
        """Learn from the per-user sequences of item tokens (`target_masks`: which positions are
        target events, None = all); returns self."""

    @abstractmethod
    def score(self, histories: Sequence[Any]) -> np.ndarray:
        """[len(histories), vocab_size] scores, PAD/MASK at -inf."""

    def _prepare_fit(
        self, train_sequences: Sequence[Any], target_masks: Sequence[np.ndarray] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """-> (item tokens per sequence, target masks aligned with them or None); sets item_counts."""
        if target_masks is not None and len(target_masks) != len(train_sequences):
            raise ValueError(f"{self.name}: {len(target_masks)} target masks for {len(train_sequences)} sequences")
        seqs, masks = [], None if target_masks is None else []
        for i, raw in enumerate(train_sequences):
            arr = np.asarray(raw).astype(np.int64, copy=False).reshape(-1)
            keep = arr >= FIRST_ITEM_TOKEN
            seqs.append(arr[keep])
            if masks is not None:
                masks.append(np.asarray(target_masks[i], dtype=bool).reshape(-1)[keep])  # type: ignore[index]
        if not any(s.size for s in seqs):
            raise ValueError(f"{self.name}: no item tokens in the fit data")
        top = max(int(s.max()) for s in seqs if s.size)
        if self.vocab_size is None:
            self.vocab_size = top + 1
        elif top >= self.vocab_size:
            raise ValueError(f"{self.name}: fit data has token {top} >= vocab_size {self.vocab_size}")
        targets = seqs if masks is None else [s[m] for s, m in zip(seqs, masks)]
        if not any(t.size for t in targets):
            raise ValueError(f"{self.name}: no target events in the fit data")
        self.item_counts = np.bincount(np.concatenate(targets), minlength=self.vocab_size).astype(np.float64)
        return seqs, masks

    def _check_fitted(self) -> tuple[int, np.ndarray]:
        if self.item_counts is None or self.vocab_size is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return self.vocab_size, self.item_counts

    def _popularity_backoff(self) -> np.ndarray:
        """Popularity scaled into [0, 1): added to integer counts it only breaks their ties."""
        _, counts = self._check_fitted()
        return counts / (counts.max() + 1.0)

    @staticmethod
    def _mask_specials(scores: np.ndarray) -> np.ndarray:
        scores[:, :FIRST_ITEM_TOKEN] = -np.inf
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class PopularityRecommender(_Base):
    """Everyone gets the most interacted-with items of the fit data."""

    name = "popularity"

    def fit(self, train_sequences: Sequence[Any], target_masks: Sequence[np.ndarray] | None = None) -> "PopularityRecommender":
        self._prepare_fit(train_sequences, target_masks)
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        _, counts = self._check_fitted()
        scores = np.repeat(counts[None, :], len(histories), axis=0)
        return self._mask_specials(scores)


class ItemKNNRecommender(_Base):
    """Item-item cosine over binary user co-occurrence, summed over the user's history."""

    name = "item_knn"

    def __init__(self, vocab_size: int | None = None) -> None:
        super().__init__(vocab_size)
        self.similarity: sp.csr_matrix | None = None
        self._tie_scale = 0.0

    def fit(self, train_sequences: Sequence[Any], target_masks: Sequence[np.ndarray] | None = None) -> "ItemKNNRecommender":
        seqs, masks = self._prepare_fit(train_sequences, target_masks)
        vocab = self.vocab_size
        assert vocab is not None
        if masks is None:
            users = _indicator(seqs, vocab)  # [users, V] binary: a repeat counts once
            co = (users.T @ users).tocsr()  # [V, V] co-occurrence counts, diagonal = item degree
            degree = np.sqrt(co.diagonal())
            inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
            sim = sp.csr_matrix(sp.diags(inv) @ co @ sp.diags(inv))
            sim.setdiag(0.0)  # an item is not its own neighbour (history items are not ranked anyway)
        else:
            # one row per target event: the items before it, and the item it was on
            before = [s[:p] for s, m in zip(seqs, masks) for p in np.flatnonzero(m)]
            hit = [s[p : p + 1] for s, m in zip(seqs, masks) for p in np.flatnonzero(m)]
            history, target = _indicator(before, vocab), _indicator(hit, vocab)
            co = (history.T @ target).tocsr()  # i was in the history of a target event on j
            inv_i = _inverse_sqrt(np.asarray(history.sum(axis=0)).ravel())
            inv_j = _inverse_sqrt(np.asarray(target.sum(axis=0)).ravel())
            sim = sp.csr_matrix(sp.diags(inv_i) @ co @ sp.diags(inv_j))
        sim.eliminate_zeros()
        self.similarity = sim
        # Popularity breaks ties far below the smallest similarity, so it never outranks a real
        # neighbour signal but orders items that have none (the floor's definition).
        smallest = float(sim.data.min()) if sim.nnz else 1.0
        self._tie_scale = 1e-6 * smallest
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        vocab, _ = self._check_fitted()
        assert self.similarity is not None
        hist = _indicator([_as_items(h, vocab) for h in histories], vocab)
        scores = np.asarray((hist @ self.similarity).todense(), dtype=np.float64)
        scores += self._tie_scale * self._popularity_backoff()[None, :]
        return self._mask_specials(scores)


class LastItemTransitionRecommender(_Base):
    """First-order transition counts out of the last history item, popularity back-off."""

    name = "last_item"

    def __init__(self, vocab_size: int | None = None) -> None:
        super().__init__(vocab_size)
        self.transitions: sp.csr_matrix | None = None

    def fit(
        self, train_sequences: Sequence[Any], target_masks: Sequence[np.ndarray] | None = None
    ) -> "LastItemTransitionRecommender":
        seqs, masks = self._prepare_fit(train_sequences, target_masks)
        vocab = self.vocab_size
        assert vocab is not None
        src = np.concatenate([s[:-1] for s in seqs])
        dst = np.concatenate([s[1:] for s in seqs])
        if masks is not None:  # transitions into target events only
            into_target = np.concatenate([m[1:] for m in masks])
            src, dst = src[into_target], dst[into_target]
        # csr_matrix sums duplicate (src, dst) pairs, giving the transition counts.
        self.transitions = sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(vocab, vocab))
        self.transitions.sum_duplicates()
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        vocab, _ = self._check_fitted()
        assert self.transitions is not None
        items = [_as_items(h, vocab) for h in histories]
        has_last = np.array([h.size > 0 for h in items], dtype=bool)
        last = np.array([h[-1] if h.size else 0 for h in items], dtype=np.int64)
        scores = np.asarray(self.transitions[last].todense(), dtype=np.float64)
        scores[~has_last] = 0.0  # empty history: popularity alone
        scores += self._popularity_backoff()[None, :]  # < 1: breaks ties of integer counts only
        return self._mask_specials(scores)


def _inverse_sqrt(x: np.ndarray) -> np.ndarray:
    root = np.sqrt(x.astype(np.float64))
    return np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)


def _indicator(seqs: Sequence[np.ndarray], vocab: int) -> sp.csr_matrix:
    """Binary [len(seqs), vocab] matrix of which items each sequence contains."""
    lengths = np.fromiter((s.size for s in seqs), dtype=np.int64, count=len(seqs))
    rows = np.repeat(np.arange(len(seqs)), lengths)
    cols = np.concatenate(seqs) if lengths.sum() else np.empty(0, np.int64)
    mat = sp.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(seqs), vocab))
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


BASELINES: dict[str, type[_Base]] = {
    PopularityRecommender.name: PopularityRecommender,
    ItemKNNRecommender.name: ItemKNNRecommender,
    LastItemTransitionRecommender.name: LastItemTransitionRecommender,
}


def fit_baselines(
    train_sequences: Sequence[Any], vocab_size: int, names: Sequence[str] = tuple(BASELINES),
    target_masks: Sequence[np.ndarray] | None = None,
) -> dict[str, _Base]:
    """Fit the named baselines on the same data (and the same target events)."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
    return {name: BASELINES[name](vocab_size).fit(train_sequences, target_masks) for name in names}
