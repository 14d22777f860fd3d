"""New items without a full retrain: the grown model (`bert4rec.new_items`), what counts as new and
in which tokens (`export.new_items`), and `new_items_job` end to end with the real service following.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from recsys_assets.bert4rec.data import BatchingConfig, ExampleIndex
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, token_tables
from recsys_assets.bert4rec.new_items import NewItemFitConfig, add_items, fit_new_items, windows_with_new_items
from recsys_assets.data.split import EvalSet
from recsys_assets.evaluation.protocol import recommended_items
from recsys_assets.export.new_items import (
    find_new_items,
    grown_vocabulary_document,
    new_item_uptake,
    to_vocabulary_space,
)
from recsys_serving.bundle import Vocabulary
from recsys_serving.contract import BUNDLES_DIR, FIRST_ITEM_TOKEN, MASK_TOKEN


def _model(vocab: int = 12) -> BERT4Rec:
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=vocab, hidden=16, layers=1, heads=2, max_len=8, input_item_table=True)
    model = BERT4Rec(config).eval()
    with torch.no_grad():  # non-zero input-only tables, so that their new rows are checked too
        for t in (model.prev_item_emb, model.item_in_emb):
            assert t is not None
            t.weight.normal_(0, 0.02)
        model.out_bias.normal_(0, 0.1)
    return model


def test_add_items_keeps_every_old_row_and_starts_new_ones_at_their_peers_mean() -> None:
    model = _model()
    peers = [np.array([2, 3]), np.array([5, 6, 7])]
    grown = add_items(model, peers)
    assert grown.config.vocab_size == 14
    before, after = token_tables(model), token_tables(grown)
    assert set(before) == set(after) == {"item_emb.weight", "item_in_emb.weight", "prev_item_emb.weight", "out_bias"}
    for name, old in before.items():
        assert torch.equal(after[name][:12], old), name
        for i, p in enumerate(peers):
            assert torch.allclose(after[name][12 + i], old[torch.as_tensor(p)].mean(0)), name
    tokens = torch.tensor([[4, 2, 9, MASK_TOKEN]])
    assert torch.allclose(grown.score_next(tokens)[:, :12], model.score_next(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="peer"):
        add_items(model, [np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="item tokens"):
        add_items(model, [np.array([1])])


def test_windows_with_new_items_counts_inputs_and_targets() -> None:
    sequences = [np.array([2, 3, 4, 5]), np.array([12, 3]), np.array([2, 3, 13])]
    index = ExampleIndex(sequences, BatchingConfig(windows="prefixes"), max_len=3)
    ids = windows_with_new_items(index, sequences, first_new=12)
    windows = [tuple(sequences[s][max(0, e - w) : e]) for s, e, w in zip(index.seq_idx, index.ends, index.window_len)]
    assert sorted(windows[i] for i in ids) == sorted(w for w in windows if max(w) >= 12)
    assert len(ids) == 2  # (12, 3) and (3, 13) with max_len 3 -> (2, 3, 13)


def test_fit_new_items_moves_only_the_new_rows_and_learns_their_place() -> None:
    model = _model()
    grown = add_items(model, [np.array([2, 3, 4])])  # token 12: a new item that always follows 7
    rng = np.random.default_rng(0)
    sequences = [np.concatenate([rng.integers(2, 12, 3), [7, 12], rng.integers(2, 12, 2)]) for _ in range(200)]
    contexts = {"tod": [np.ones(len(s), dtype=np.int64) for s in sequences]}
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    history = torch.tensor([[5, 7, MASK_TOKEN]])
    rank_before = int((grown.score_next(history)[0, 2:] > grown.score_next(history)[0, 12]).sum())
    fit = fit_new_items(grown, 12, sequences, contexts, NewItemFitConfig(epochs=6, lr=0.05, batch_size=64))
    assert fit.n_new == 1 and fit.n_windows > 200 and fit.loss_per_epoch[-1] < fit.loss_per_epoch[0]
    after = grown.state_dict()
    tables = set(token_tables(grown))
    for name, value in before.items():
        if name in tables:
            assert torch.equal(after[name][:12], value[:12]), name
        else:
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["item_emb.weight"][12], before["item_emb.weight"][12])
    assert all(p.requires_grad for p in grown.parameters())
    with torch.no_grad():
        scores = grown.score_next(history)[0]
    assert int((scores[2:] > scores[12]).sum()) < rank_before
    assert int((scores[2:] > scores[12]).sum()) == 0  # after 7 the new item comes first


def _vocabulary() -> Vocabulary:
    return Vocabulary(items=["a", "b", "c"], categories=["x", "x", "y"], devices={"mobile": 1, "app": 2}, segments={})


def test_find_new_items_takes_category_peers_and_says_what_it_left_out() -> None:
    new = find_new_items(
        _vocabulary(),
        item_ids=["c", "n1", "a", "n2", "n3", "n4", "n5"],
        categories=["y", "x", "x", None, "z", "y", "x"],
        counts=[50, 3, 40, 9, 8, 7, 1],
        max_new=2,
    )
    assert new.item_ids == ["n4", "n1"]  # most interacted first
    assert [p.tolist() for p in new.peers] == [[4], [2, 3]]
    assert new.left_out == {"no_category": 1, "category_unknown_to_bundle": 1, "over_max_new_items": 1}
    doc = grown_vocabulary_document(_vocabulary(), new)
    grown = Vocabulary.from_json(doc)
    assert grown.item_to_token == {"a": 2, "b": 3, "c": 4, "n4": 5, "n1": 6}
    assert grown.categories[-2:] == ["y", "x"] and grown.devices == {"mobile": 1, "app": 2}


def test_to_vocabulary_space_drops_unknown_items_and_renumbers_devices() -> None:
    vocabulary = Vocabulary(items=["a", "b", "n"], categories=[None] * 3, devices={"app": 1, "mobile": 2}, segments={})
    # current tokens: 2 = "n", 3 = "zz" (unknown to the bundle), 4 = "a"; current devices 1 = mobile, 2 = tv
    seqs, ctx, masks = to_vocabulary_space(
        [np.array([4, 3, 2]), np.array([3])],
        {"devices": [np.array([1, 1, 2]), np.array([1])], "tod": [np.array([3, 4, 5]), np.array([1])]},
        [np.array([False, True, True]), np.array([True])], ["n", "zz", "a"], {"device": {1: "mobile", 2: "tv"}},
        vocabulary,
    )
    assert len(seqs) == 1 and seqs[0].tolist() == [2, 4]  # the second user knew nothing the bundle knows
    assert ctx["devices"][0].tolist() == [2, 0] and ctx["tod"][0].tolist() == [3, 5]
    assert masks is not None and masks[0].tolist() == [False, True]


def test_recommended_items_and_uptake() -> None:
    eval_set = EvalSet(
        split="test", user_ids=np.array(["u1", "u2"]), histories=[np.array([2]), np.array([3])],
        targets=np.array([5, 2]), source_rows=np.arange(2),
    )
    scores = np.array([[0, 0, 9, 1, 2, 8], [0, 0, 3, 9, 1, 2]], dtype=np.float32)
    top = recommended_items(lambda batch: scores[: len(batch)], eval_set, k=2)
    assert top.tolist() == [[5, 4], [2, 5]]  # history (2 / 3) left out, best first
    is_new = np.array([False] * 5 + [True])
    uptake = new_item_uptake(top, eval_set, np.array([1, 1]), is_new)
    assert uptake["new_item_slot_share"] == 0.5 and uptake["users_shown_new_item"] == 1.0
    assert uptake["new_item_precision"] == 0.5 and uptake["new_target_users"] == 1
    assert uptake["HR@10_new_targets"] == 1.0 and uptake["HR@10_old_targets"] == 1.0


# --------------------------------------------------------------------------- the job, end to end

BASE = {"synthetic_users": 1200, "synthetic_items": 300, "synthetic_seed": 3}
PERIODS = [{"days": 14, "new_items": 40, "new_item_share": 0.35}]
TRAINING = {"preset": "synthetic", "hidden": 32, "layers": 1, "heads": 2, "max_len": 12, "epochs": 4, "patience": 2}


def _run_config(periods: list[dict[str, Any]], training: bool) -> dict[str, Any]:
    ops: dict[str, Any] = {
        "raw_events": {"config": {**BASE, "synthetic_periods_json": json.dumps(periods)}},
        "user_sequence_features": {"config": {"max_len": 20}},
    }
    if training:
        ops.update({
            "bert4rec_model": {"config": TRAINING},
            "baselines": {"config": {"n_bootstrap": 20}},
            "evaluation_report": {"config": {"n_bootstrap": 20}},
            "onnx_model": {"config": {"parity_sequences": 300, "min_parity_sequences": 200}},
            "tensorrt_engine": {"config": {"parity_sequences": 300}},
            "model_bundle": {"config": {"popularity_min_group_events": 10}},
        })
    else:
        ops["new_item_bundle"] = {"config": {"popularity_min_group_events": 10, "n_bootstrap": 20}}
    return {"ops": ops}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    for name in ("RECSYS_EVENTS_PATH", "RECSYS_EVENTS_FORMAT", "RECSYS_SYNTHETIC_PERIODS", "RECSYS_PUSHGATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path


def test_new_items_job_grows_the_served_bundle_and_the_service_recommends_new_items(home: Path) -> None:
    from dagster import instance_for_test

    from recsys_assets.definitions import defs
    from recsys_assets.export.bundle import current_version, promotion_history
    from recsys_serving.bundle import load_bundle

    from _service_harness import Server

    bundles = home / BUNDLES_DIR
    with instance_for_test() as instance:
        def run(job: str, config: dict[str, Any]) -> Any:
            result = defs.resolve_job_def(job).execute_in_process(run_config=config, instance=instance, raise_on_error=False)
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            return result

        champion = run("retrain_job", _run_config([], training=True)).output_for_node("model_bundle")
        assert champion["promoted"]
        # nothing new yet: no bundle, nothing switched
        same = run("new_items_job", _run_config([], training=False)).output_for_node("new_item_bundle")
        assert same["status"] == "nothing_new" and current_version(bundles) == champion["version"]

        server = Server("new-items", home, {"RECSYS_RELOAD_INTERVAL_S": "0.5", "RECSYS_CACHE_TTL_S": "0.001"})
        try:
            server.wait_ready(time.monotonic() + 120)
            grown = run("new_items_job", _run_config(PERIODS, training=False)).output_for_node("new_item_bundle")
            assert grown["promoted"], grown["gate"]["reasons"]
            assert grown["gate"]["champion"] == champion["version"] and grown["added"] >= 30
            uptake = grown["new_items"]
            # the champion cannot show an item it has never seen; the grown bundle shows and hits them
            assert uptake["champion"]["new_item_slot_share"] == 0.0 and uptake["champion"]["HR@10_new_targets"] == 0.0
            assert uptake["grown"]["users_shown_new_item"] > 0.5
            assert uptake["grown"]["HR@10_new_targets"] > uptake["item_knn"]["HR@10_new_targets"] * 0.8 > 0
            assert grown["gate"]["challenger_value"] > grown["gate"]["champion_value"]

            bundle = load_bundle(bundles / grown["version"])
            old = load_bundle(bundles / champion["version"])
            assert bundle.vocabulary.items[: len(old.vocabulary.items)] == old.vocabulary.items
            new_ids = bundle.vocabulary.items[len(old.vocabulary.items):]
            assert bundle.manifest.export["new_items"]["base_version"] == champion["version"]
            assert promotion_history(bundles)[-1].version == grown["version"]

            deadline = time.monotonic() + 120  # the reload poll, on a machine busy with other tests
            while server.client.get("/healthz").json().get("model_version") != grown["version"]:
                assert time.monotonic() < deadline, "the service never switched to the grown bundle"
                time.sleep(0.3)
            answer = server.recommend(user_id="someone", k=10, recent_items=[new_ids[0]])
            assert answer["model_version"] == grown["version"] and answer["reason"] == "model"
            assert {i["item_id"] for i in answer["items"]} & set(new_ids), answer  # the series of new items continues
        finally:
            server.stop()
