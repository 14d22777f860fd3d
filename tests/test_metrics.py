"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from recsys_assets.evaluation.metrics import (
    full_ranks,
    per_user_metrics,
    ranking_metrics,
    sample_popularity_negatives,
    sampled_ranks,
)

# Vocabulary of 8 tokens: 0 PAD, 1 MASK, items 2..7.
SCORES = np.array(
    [
        # PAD  MASK  2    3    4    5    6    7
        [9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.3, 0.2],
        [0.0, 0.0, 0.4, 0.4, 0.4, 0.1, 0.4, 0.0],
    ],
    dtype=np.float32,
)


def test_full_ranks_hand_computed() -> None:
    # Row 0: target 5 (0.7). Only item 3 (0.9) beats it; PAD/MASK (9.0) are not items -> rank 2.
    # Removing item 3 (history) gives rank 1.
    assert full_ranks(SCORES[:1], np.array([5]), [np.array([], dtype=np.int64)]).tolist() == [2]
    assert full_ranks(SCORES[:1], np.array([5]), [np.array([3])]).tolist() == [1]
    # Row 1: target 2 ties with 3, 4, 6 at 0.4: pessimistic rank = 1 + 3 = 4; history {4} -> 3.
    ranks = full_ranks(SCORES, np.array([5, 2]), [np.array([3, 0]), np.array([4])])
    assert ranks.tolist() == [1, 3]


def test_full_ranks_target_in_history_stays_rankable() -> None:
    # Target 3 also in history: still ranked, items 2 and 5 in history are removed.
    ranks = full_ranks(SCORES[:1], np.array([6]), [np.array([3, 5, 6])])
    # 0.3 for item 6; remaining items 2 (0.5), 4 (0.1), 7 (0.2): only item 2 beats it.
    assert ranks.tolist() == [2]


def test_full_ranks_constant_scores_are_worst_case() -> None:
    scores = np.zeros((1, 8))
    assert full_ranks(scores, np.array([2]), [np.array([])]).tolist() == [6]
    # -inf everywhere (a masked scorer) is still a tie, not a free win.
    scores = np.full((1, 8), -np.inf)
    assert full_ranks(scores, np.array([4]), [np.array([2])]).tolist() == [5]


def test_full_ranks_accepts_torch_and_rejects_bad_input() -> None:
    ranks = full_ranks(torch.from_numpy(SCORES), torch.tensor([5, 2]), [torch.tensor([3]), torch.tensor([4])])
    assert ranks.tolist() == [1, 3]
    with pytest.raises(ValueError, match="item tokens"):
        full_ranks(SCORES, np.array([1, 2]), [np.array([]), np.array([])])
    with pytest.raises(ValueError, match="NaN"):
        bad = SCORES.copy()
        bad[1, 3] = np.nan
        full_ranks(bad, np.array([5, 2]), [np.array([]), np.array([])])
    with pytest.raises(ValueError, match="histories"):
        full_ranks(SCORES, np.array([5, 2]), [np.array([])])


def test_full_ranks_matches_loop_reference_on_random_data() -> None:
    rng = np.random.default_rng(1)
    batch, vocab = 2100, 40  # > one internal row chunk
    scores = rng.integers(0, 6, size=(batch, vocab)).astype(np.float64)  # many ties
    targets = rng.integers(2, vocab, size=batch)
    histories = [rng.integers(0, vocab, size=rng.integers(0, 8)) for _ in range(batch)]
    got = full_ranks(scores, targets, histories)
    for i in range(0, batch, 97):
        seen = set(histories[i].tolist()) - {int(targets[i])}
        others = [t for t in range(2, vocab) if t not in seen and t != targets[i]]
        expected = 1 + sum(scores[i, t] >= scores[i, targets[i]] for t in others)
        assert got[i] == expected


def test_sampled_ranks_hand_computed() -> None:
    # Row 0: target 4 (0.1) vs negatives 2 (0.5), 7 (0.2) -> rank 3. Row 1: target 5 (0.1) vs
    # 7 (0.0), 2 (0.4) -> rank 2. Ties pessimistic: row 1 target 3 (0.4) vs 2, 6 (0.4) -> rank 3.
    ranks = sampled_ranks(SCORES, np.array([4, 5]), np.array([[2, 7], [7, 2]]))
    assert ranks.tolist() == [3, 2]
    assert sampled_ranks(SCORES[1:], np.array([3]), np.array([[2, 6]])).tolist() == [3]
    with pytest.raises(ValueError, match="contain the target"):
        sampled_ranks(SCORES[1:], np.array([3]), np.array([[3, 6]]))


def test_ranking_metrics_hand_computed() -> None:
    ranks = np.array([1, 2, 5, 11])
    m = ranking_metrics(ranks, ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.75)
    assert m["HR@10"] == pytest.approx(0.75)
    assert m["NDCG@1"] == pytest.approx(0.25)
    ndcg5 = (1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(6)) / 4
    assert m["NDCG@5"] == pytest.approx(ndcg5)
    assert m["NDCG@10"] == pytest.approx(ndcg5)
    assert m["MRR"] == pytest.approx((1 + 0.5 + 0.2 + 1 / 11) / 4)
    assert set(per_user_metrics(ranks, ks=(10,))) == {"HR@10", "NDCG@10", "MRR"}
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics(np.array([0, 1]))


def test_negatives_exclude_history_and_target_without_replacement() -> None:
    rng = np.random.default_rng(0)
    vocab = 300
    counts = np.zeros(vocab)
    counts[2:] = rng.integers(1, 50, size=vocab - 2)
    counts[10] = 0  # never drawn
    histories = [rng.integers(2, vocab, size=rng.integers(1, 60)) for _ in range(1500)]
    targets = rng.integers(2, vocab, size=1500)
    neg = sample_popularity_negatives(histories, targets, counts, n=100, seed=3)
    assert neg.shape == (1500, 100)
    assert (neg >= 2).all() and (neg != 10).all()
    for i in range(1500):
        assert len(set(neg[i].tolist())) == 100
        assert not set(neg[i].tolist()) & (set(histories[i].tolist()) | {int(targets[i])})
    again = sample_popularity_negatives(histories, targets, counts, n=100, seed=3)
    assert np.array_equal(neg, again)


def _successive_draw_probs(weights: dict[int, float], n: int) -> dict[frozenset[int], float]:
    """Exact law of n successive proportional draws without replacement."""
    out: dict[frozenset[int], float] = {}
    for order in itertools.permutations(weights, n):
        p, left = 1.0, dict(weights)
        for item in order:
            p *= left[item] / sum(left.values())
            del left[item]
        out[frozenset(order)] = out.get(frozenset(order), 0.0) + p
    return out


@pytest.mark.parametrize("history_len", [0, 4])
def test_negatives_follow_successive_popularity_law(history_len: int) -> None:
    # Items 2..7 with skewed counts; the user saw item 2 (and with history_len=4 also 3, 4, 5 so
    # only 6, 7, 8 ... remain, which forces the whole-vocabulary fallback for many rows).
    counts = np.array([0, 0, 50, 20, 10, 8, 5, 4, 3], dtype=float)
    seen = np.array([2, 3, 4, 5][: max(history_len, 1)])
    users = 20000
    neg = sample_popularity_negatives([seen] * users, np.full(users, 8), counts, n=2, seed=11)
    eligible = {t: counts[t] for t in range(2, 8) if t not in set(seen.tolist())}
    expected = _successive_draw_probs(eligible, 2)
    observed: dict[frozenset[int], float] = {}
    for row in neg:
        key = frozenset(row.tolist())
        observed[key] = observed.get(key, 0.0) + 1 / users
    assert set(observed) <= set(expected)
    for key, p in expected.items():
        assert observed.get(key, 0.0) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / users) + 1e-3)


def test_negatives_reject_impossible_requests() -> None:
    counts = np.array([0, 0, 5, 5, 5], dtype=float)
    with pytest.raises(ValueError, match="eligible negatives"):
        sample_popularity_negatives([np.array([2])], np.array([3]), counts, n=2)
