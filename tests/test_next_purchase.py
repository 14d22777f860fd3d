"""The next_purchase target: every event is an input, only purchases are held out, learned and
predicted; the split, the baselines, training, the report and the bundle follow it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys_assets.bert4rec.data import BatchBuilder, BatchingConfig, ExampleIndex, SequenceData
from recsys_assets.bert4rec.model import EXTRA_FILE, BERT4RecConfig, load_model
from recsys_assets.bert4rec.train import TrainConfig, evaluate, train
from recsys_assets.data.split import leave_one_out
from recsys_assets.evaluation.baselines import fit_baselines
from recsys_assets.evaluation.metrics import full_ranks, ranking_metrics
from recsys_assets.evaluation.report import gate_decision, summary_sentences
from recsys_serving.bundle import ModelSpec
from recsys_serving.contract import EVENT_TYPE_TOKENS, FIRST_ITEM_TOKEN, MASK_TOKEN, PredictionTarget

VIEW, CART, BUY = (EVENT_TYPE_TOKENS[t] for t in ("view", "cart", "purchase"))
PURCHASES = PredictionTarget("next_purchase")


def test_target_is_canonical_and_refuses_what_it_cannot_mean() -> None:
    assert PredictionTarget.parse("next_purchase", "purchase, cart") == PredictionTarget("next_purchase", ("cart", "purchase"))
    assert PredictionTarget.parse("", "") == PredictionTarget() and PredictionTarget().every_event
    assert PredictionTarget.from_dict(None) == PredictionTarget()  # bundles and reports from before targets
    assert PredictionTarget.from_dict(PURCHASES.to_dict()) == PURCHASES and PURCHASES.event_types == ("purchase",)
    assert not PURCHASES.removes_history and PredictionTarget().removes_history
    with pytest.raises(ValueError, match="not event types"):
        PredictionTarget("next_purchase", ("like",))
    with pytest.raises(ValueError, match="must be one of"):
        PredictionTarget("next_click")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only with next_purchase"):
        PredictionTarget("next_item", ("purchase",))


def test_split_holds_out_the_last_purchases_with_every_event_before_them_as_input() -> None:
    # u0: view a, cart a, buy a, view b, buy b, view c  -> test b (pos 4), valid a (pos 2)
    # u1: one purchase only -> learned from, never evaluated
    tokens = [np.array([2, 2, 2, 3, 3, 4]), np.array([5, 5, 6])]
    types = [np.array([VIEW, CART, BUY, VIEW, BUY, VIEW]), np.array([VIEW, BUY, VIEW])]
    split = leave_one_out(["u0", "u1"], tokens, "train", {"event_types": types}, vocab_size=7, target=PURCHASES)

    assert split.test.user_ids.tolist() == ["u0"] and split.test.targets.tolist() == [3]
    np.testing.assert_array_equal(split.test.histories[0], [2, 2, 2, 3])
    assert split.valid is not None and split.valid.targets.tolist() == [2]
    np.testing.assert_array_equal(split.valid.histories[0], [2, 2])
    # the target's own event type is hidden at the request position
    assert split.test.context["event_types"][0].tolist() == [VIEW, CART, BUY, VIEW, 0]
    # fit: u0 up to the valid purchase, u1 in full; only purchases are target events
    assert [s.tolist() for s in split.sequences] == [[2, 2], [5, 5, 6]]
    assert split.target_masks is not None and [m.tolist() for m in split.target_masks] == [[False, False], [False, True, False]]
    assert split.item_counts.tolist() == [0, 0, 0, 0, 0, 1, 0]
    # a shopper buys what they viewed: the history stays rankable
    assert not split.test.removes_history and [e.size for e in split.test.excluded([0])] == [0]

    final = leave_one_out(["u0", "u1"], tokens, "train+valid", {"event_types": types}, vocab_size=7, target=PURCHASES)
    assert final.sequences[0].tolist() == [2, 2, 2, 3]  # everything before the test purchase
    with pytest.raises(ValueError, match="needs each event's type"):
        leave_one_out(["u0", "u1"], tokens, "train", vocab_size=7, target=PURCHASES)


def test_training_windows_end_and_labels_fall_only_on_purchases() -> None:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(FIRST_ITEM_TOKEN, 30, size=int(rng.integers(2, 12))) for _ in range(40)]
    types = [rng.choice([VIEW, CART, BUY], size=len(t), p=[0.6, 0.2, 0.2]) for t in tokens]
    data = SequenceData([f"u{i}" for i in range(40)], tokens, vocab_size=30, contexts={"event_types": types})
    split = data.split("train+valid", PURCHASES)
    assert split.target_masks is not None
    for windows in ("prefixes", "last"):
        cfg = BatchingConfig(batch_size=8, windows=windows, mask_prob=0.5)
        index = ExampleIndex(split.sequences, cfg, 8, split.target_masks)
        builder = BatchBuilder(split.sequences, split.contexts, index, 1, split.target_masks)
        assert len(index) > 0
        for s, end in zip(index.seq_idx, index.ends):
            assert split.target_masks[s][end - 1]  # every window ends on a purchase
        for step, ids in enumerate(index.epoch_batches(8, 0)):
            batch = builder.build(ids, 0, step)
            labels, toks = batch.labels.numpy(), batch.tokens.numpy()
            for row, ex in enumerate(ids):
                s, end = index.seq_idx[ex], index.ends[ex]
                width = labels.shape[1]
                positions = np.arange(end - width, end)
                for col in np.flatnonzero(labels[row] > 0):
                    assert positions[col] >= 0 and split.target_masks[s][positions[col]], "a label off a purchase"
                    assert toks[row, col] == MASK_TOKEN


def test_baselines_predict_purchases_not_views() -> None:
    # item 2 is viewed by everyone, item 3 is what they buy after viewing item 4
    seqs = [np.array([2, 2, 4, 3]) for _ in range(5)]
    masks = [np.array([False, False, False, True]) for _ in range(5)]
    models = fit_baselines(seqs, 6, target_masks=masks)
    history = [np.array([2, 4])]
    assert int(np.argmax(models["popularity"].score(history)[0])) == 3  # next_item popularity: 2
    assert int(np.argmax(models["last_item"].score(history)[0])) == 3  # 4 -> 3 into a purchase
    assert int(np.argmax(models["item_knn"].score(history)[0])) == 3  # 2 and 4 came before buying 3
    # a purchase of what was viewed: item-kNN keeps an item's own column
    again = fit_baselines([np.array([5, 4, 5])] * 3, 6, target_masks=[np.array([False, False, True])] * 3)
    assert int(np.argmax(again["item_knn"].score([np.array([5])])[0])) == 5
    assert int(np.argmax(fit_baselines(seqs, 6)["popularity"].score(history)[0])) == 2


def _funnels(n_users: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sessions of views; a viewed item is carted, then bought: the purchase is the carted item."""
    rng = np.random.default_rng(seed)
    tokens, types = [], []
    for _ in range(n_users):
        seq, kind = [], []
        for _ in range(int(rng.integers(2, 4))):
            viewed = rng.integers(FIRST_ITEM_TOKEN, 40, size=int(rng.integers(2, 5)))
            bought = int(rng.choice(viewed))
            seq += [*viewed.tolist(), bought, bought]
            kind += [VIEW] * len(viewed) + [CART, BUY]
        tokens.append(np.asarray(seq))
        types.append(np.asarray(kind))
    return tokens, types


def test_a_short_run_learns_to_predict_the_carted_purchase(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    tokens, types = _funnels(300, 0)
    data = SequenceData([f"u{i}" for i in range(300)], tokens, vocab_size=40, contexts={"event_types": types})
    model_cfg = BERT4RecConfig(vocab_size=40, hidden=32, layers=1, heads=2, max_len=16, dropout=0.1, n_event_types=4)
    cfg = TrainConfig(
        fit="train+valid", target=PURCHASES, epochs=8, lr=3e-3, num_threads=1, seed=0, checkpoint_every=None,
        batching=BatchingConfig(batch_size=32, windows="prefixes", mask_prob=0.2),
    )
    result = train(model_cfg, cfg, data, tmp_path / "model")
    model, saved = load_model(result.path)
    split = data.split("train+valid", PURCHASES)
    ours = evaluate(model, split.test, saved.max_len)
    pop = fit_baselines(split.sequences, 40, target_masks=split.target_masks)["popularity"]
    baseline = ranking_metrics(full_ranks(pop.score(split.test.histories), split.test.targets, split.test.excluded(slice(None))))
    # the purchase is the item carted just before: in the history, so it must stay rankable
    assert ours["HR@1"] > 0.8, ours
    assert ours["NDCG@10"] > baseline["NDCG@10"] + 0.5, (ours, baseline)
    assert result.train_config.target == PURCHASES
    assert json.loads((Path(result.path) / EXTRA_FILE).read_text())["target"] == PURCHASES.to_dict()


def test_report_and_gate_speak_of_the_target() -> None:
    doc = {
        "dataset": {"name": "shop", "n_users_evaluated": 10},
        "config": {"split": "test", "target": PURCHASES.to_dict()},
        "models": {"bert4rec": {"full": {"NDCG@10": 0.3, "HR@10": 0.5}}, "popularity": {"full": {"NDCG@10": 0.1, "HR@10": 0.2}}},
        "champion": {"status": "other_target", "version": "v1", "reason": "it predicts next_item, this report next_purchase (purchase)"},
    }
    assert "last purchase event" in summary_sentences(doc)[0]
    gate = gate_decision(doc)
    assert gate["passed"] and gate["champion_status"] == "other_target"
    assert any("not comparable" in r for r in gate["reasons"])


def test_bundle_manifest_records_the_target() -> None:
    spec = dict(architecture="bert4rec", max_len=8, vocab_size=10, top_k=5, inputs=["tokens"], outputs=["top_tokens"], opset=17)
    assert ModelSpec(**spec).prediction_target == PredictionTarget()  # a manifest from before targets
    assert ModelSpec(**spec, target=PURCHASES.to_dict()).prediction_target == PURCHASES
    with pytest.raises(ValueError, match="must be one of"):
        ModelSpec(**spec, target={"name": "next_click"})
