"""Non-neural next-item baselines: the floors BERT4Rec has to beat.

Definitions follow ../shared/QUALITY_NOTES.md (reproduced there on Amazon Beauty to within
rounding, see tests/test_baselines.py):
- popularity: interaction counts in the fit data;
- item-kNN: cosine similarity of items over binary user co-occurrence, a user's scores are the
  similarities summed over every item of the history; ties (and users whose items have no
  neighbours) fall back to popularity;
- last-item transition: first-order transition counts out of the last history item, ties and
  unseen transitions fall back to popularity.

All share one protocol: ``fit(train_sequences) -> self`` then ``score(histories) -> [B, V]``
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

    def fit(self, train_sequences: Sequence[np.ndarray]) -> "Recommender": ...

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
    def fit(self, train_sequences: Sequence[Any]) -> "_Base":
        """Learn from the per-user sequences of item tokens; returns self."""

    @abstractmethod
    def score(self, histories: Sequence[Any]) -> np.ndarray:
        """[len(histories), vocab_size] scores, PAD/MASK at -inf."""

    def _prepare_fit(self, train_sequences: Sequence[Any]) -> list[np.ndarray]:
        seqs = [_as_items(s) for s in train_sequences]
        if not any(s.size for s in seqs):
            raise ValueError(f"{self.name}: no item tokens in the fit data")
        top = max(int(s.max()) for s in seqs if s.size)
        if self.vocab_size is None:
            self.vocab_size = top + 1
        elif top >= self.vocab_size:
            raise ValueError(f"{self.name}: fit data has token {top} >= vocab_size {self.vocab_size}")
        self.item_counts = np.bincount(np.concatenate(seqs), minlength=self.vocab_size).astype(np.float64)
        return seqs

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

    def fit(self, train_sequences: Sequence[Any]) -> "PopularityRecommender":
        self._prepare_fit(train_sequences)
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

    def fit(self, train_sequences: Sequence[Any]) -> "ItemKNNRecommender":
        seqs = self._prepare_fit(train_sequences)
        vocab = self.vocab_size
        assert vocab is not None
        users = _indicator(seqs, vocab)  # [users, V] binary: a repeat counts once
        co = (users.T @ users).tocsr()  # [V, V] co-occurrence counts, diagonal = item degree
        degree = np.sqrt(co.diagonal())
        inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
        sim = sp.diags(inv) @ co @ sp.diags(inv)
        sim = sp.csr_matrix(sim)
        sim.setdiag(0.0)  # an item is not its own neighbour (history items are not ranked anyway)
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

    def fit(self, train_sequences: Sequence[Any]) -> "LastItemTransitionRecommender":
        seqs = self._prepare_fit(train_sequences)
        vocab = self.vocab_size
        assert vocab is not None
        src = np.concatenate([s[:-1] for s in seqs])
        dst = np.concatenate([s[1:] for s in seqs])
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
    train_sequences: Sequence[Any], vocab_size: int, names: Sequence[str] = tuple(BASELINES)
) -> dict[str, _Base]:
    """Fit the named baselines on the same data."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
    return {name: BASELINES[name](vocab_size).fit(train_sequences) for name in names}
