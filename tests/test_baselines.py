"""Baselines: hand-computed scores on toy data, and the Amazon Beauty floors of QUALITY_NOTES."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_assets.evaluation.baselines import (
    ItemKNNRecommender,
    LastItemTransitionRecommender,
    PopularityRecommender,
    fit_baselines,
)
from recsys_assets.evaluation.metrics import full_ranks, ranking_metrics
from recsys_assets.evaluation.protocol import as_scorer, evaluate, fit_sequences, make_eval_set

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty" / "Beauty.txt"  # ../shared/data

# Items are tokens 2..6 (vocab 7).
TOY = [np.array([2, 3, 4]), np.array([2, 3]), np.array([3, 5, 3]), np.array([6])]


def test_popularity_scores_are_fit_counts() -> None:
    model = PopularityRecommender(7).fit(TOY)
    scores = model.score([np.array([2]), np.array([])])
    assert scores.shape == (2, 7)
    assert np.isneginf(scores[:, :2]).all()
    # counts: 2 -> 2, 3 -> 4 (a repeat counts twice), 4 -> 1, 5 -> 1, 6 -> 1
    assert scores[0, 2:].tolist() == [2, 4, 1, 1, 1]
    assert scores[1, 2:].tolist() == [2, 4, 1, 1, 1]


def test_last_item_transitions_with_popularity_backoff() -> None:
    model = LastItemTransitionRecommender(7).fit(TOY)
    # Transitions: 2->3 (x2), 3->4, 3->5, 5->3.
    scores = model.score([np.array([6, 2]), np.array([3]), np.array([6]), np.array([], dtype=np.int64)])
    backoff = np.array([2, 4, 1, 1, 1]) / 5.0  # counts / (max + 1)
    assert scores[0, 2:] == pytest.approx(np.array([0, 2, 0, 0, 0]) + backoff)
    assert scores[1, 2:] == pytest.approx(np.array([0, 0, 1, 1, 0]) + backoff)
    assert scores[2, 2:] == pytest.approx(backoff)  # 6 has no successor: popularity alone
    assert scores[3, 2:] == pytest.approx(backoff)  # empty history
    # Back-off only breaks ties: a single transition beats the most popular unseen item.
    assert scores[1, 4] > scores[1, 3]


def test_item_knn_cosine_over_binary_co_occurrence() -> None:
    model = ItemKNNRecommender(7).fit(TOY)
    sim = model.similarity.toarray()
    # Users (binary): {2,3,4}, {2,3}, {3,5}, {6}. deg: 2->2, 3->3, 4->1, 5->1, 6->1.
    assert sim[2, 3] == pytest.approx(2 / math.sqrt(2 * 3))
    assert sim[3, 5] == pytest.approx(1 / math.sqrt(3 * 1))
    assert sim[2, 5] == 0 and sim[3, 3] == 0 and sim[6].sum() == 0
    scores = model.score([np.array([2, 4])])
    # item 3: sim(2,3) + sim(4,3) = 2/sqrt(6) + 1/sqrt(3); item 5: 0 (+ tiny back-off)
    assert scores[0, 3] == pytest.approx(2 / math.sqrt(6) + 1 / math.sqrt(3))
    assert scores[0, 5] < 1e-6 and scores[0, 5] > scores[0, 6] - 1e-12
    # Repeats in the history count once (binary), padding is ignored.
    assert np.allclose(model.score([np.array([0, 0, 2, 2, 4])]), scores)


def test_baselines_reject_bad_input() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PopularityRecommender(7).score([np.array([2])])
    with pytest.raises(ValueError, match="vocab_size"):
        LastItemTransitionRecommender(4).fit(TOY)
    with pytest.raises(ValueError, match="no item tokens"):
        ItemKNNRecommender(7).fit([np.array([0, 0])])
    with pytest.raises(ValueError, match="unknown baselines"):
        fit_baselines(TOY, 7, ["popularity", "svd"])
    model = ItemKNNRecommender(7).fit(TOY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.score([np.array([9])])


@pytest.fixture(scope="module")
def beauty_rows() -> pl.DataFrame:
    if not BEAUTY.exists():
        pytest.skip(f"{BEAUTY} not available")
    # Items k -> token k + 1 (the schema puts items from token 2); user lines in file order.
    seqs = [[int(x) + 1 for x in line.split()[1:]] for line in BEAUTY.read_text().splitlines() if line.strip()]
    return pl.DataFrame(
        {
            "user_id": [str(i) for i in range(len(seqs))],
            "tokens": seqs,
            "train_tokens": [s[:-2] for s in seqs],
            "valid_item": [s[-2] for s in seqs],
            "test_item": [s[-1] for s in seqs],
        },
        schema_overrides={"tokens": pl.List(pl.Int32), "train_tokens": pl.List(pl.Int32)},
    )


# QUALITY_NOTES floors (HR@10, NDCG@10, MRR): test = last item, full ranking, history removed.
FLOORS = {
    "train": {"popularity": (0.0110, 0.0053, 0.0055), "item_knn": (0.0566, 0.0324, 0.0295), "last_item": (0.0665, 0.0438, 0.0394)},
    "train+valid": {"popularity": (0.0130, 0.0059, 0.0059), "item_knn": (0.0640, 0.0374, 0.0341), "last_item": (0.0755, 0.0502, 0.0452)},
}


@pytest.mark.parametrize("fit", ["train", "train+valid"])
def test_beauty_floors(beauty_rows: pl.DataFrame, fit: str) -> None:
    vocab = int(beauty_rows["tokens"].list.max().max()) + 1
    eval_set = make_eval_set(beauty_rows, "test")
    # Item-kNN scores from the whole input history tokens[:-1] (incl. the validation item even
    # when it is not in the fit data): that is what reproduces the floor (tokens[:-2] gives ~0.042).
    counts = np.bincount(np.concatenate(eval_set.histories), minlength=vocab)
    for name, model in fit_baselines(fit_sequences(beauty_rows, fit), vocab).items():
        result = evaluate(as_scorer(model), eval_set, counts, ks=(10,), protocols=("full",), n_bootstrap=20)
        got = result.metrics["full"]
        for metric, floor in zip(("HR@10", "NDCG@10", "MRR"), FLOORS[fit][name]):
            assert got[metric] == pytest.approx(floor, rel=0.03), (fit, name, metric, got[metric])


def test_beauty_validation_floors(beauty_rows: pl.DataFrame) -> None:
    # QUALITY_NOTES: validation = second-to-last, fit on all but the last three.
    vocab = int(beauty_rows["tokens"].list.max().max()) + 1
    seqs = [np.asarray(s) for s in beauty_rows["tokens"].to_list()]
    fit = [s[:-3] for s in seqs]
    histories = [s[:-2] for s in seqs]
    targets = np.array([s[-2] for s in seqs])
    floors = {"item_knn": (0.0602, 0.0341), "last_item": (0.0786, 0.0503)}
    for name, model in fit_baselines(fit, vocab, list(floors)).items():
        ranks = np.concatenate(
            [
                full_ranks(model.score(histories[b : b + 2048]), targets[b : b + 2048], histories[b : b + 2048])
                for b in range(0, len(seqs), 2048)
            ]
        )
        got = ranking_metrics(ranks, (10,))
        assert got["HR@10"] == pytest.approx(floors[name][0], rel=0.03)
        assert got["NDCG@10"] == pytest.approx(floors[name][1], rel=0.03)
