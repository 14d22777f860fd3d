"""Promotion that can be trusted: the served champion bundle is scored by the same evaluation code on
the same eval set as the challenger (BundleScorer), and the gate compares the two figures of that one
report. Real parts throughout: warehouse tables built by the project's SQL, models trained by the
project's trainer, bundles exported and verified by the real writer and reader, the Dagster assets
materialized on a temporary instance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pytest
import torch

from recsys_assets.bert4rec.data import BatchingConfig, SequenceData
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, load_model, save_model
from recsys_assets.bert4rec.train import TrainConfig, train
from recsys_assets.data.split import EvalSet
from recsys_assets.evaluation.bundle_scorer import BundleScorer, evaluate_bundle_on_histories
from recsys_assets.evaluation.protocol import bert4rec_scorer, evaluate, make_eval_set
from recsys_assets.export.bundle import (
    CURRENT,
    current_version,
    evaluate_gate,
    export_bundle,
    popularity_document,
    promote,
    vocabulary_document,
)
from recsys_assets.export.onnx_export import model_contexts
from recsys_assets.resources import PredictionTargetResource
from recsys_serving.bundle import verify_bundle
from recsys_serving.contract import EVENT_TYPE_TOKENS, FIRST_ITEM_TOKEN

MAX_LEN = 12
EVENT_NAMES = {t: n for n, t in EVENT_TYPE_TOKENS.items()}


# --------------------------------------------------------------------------- data and models


def _write_warehouse(db: Path, n_items: int, n_users: int, seed: int) -> None:
    """cleaned_interactions -> vocabularies -> tokenized_sequences with the project's SQL. Each user
    walks two interleaved runs over a ring of items: the next item is the one two steps back, plus one
    (90%), which a sequence model learns and a last-item transition table cannot see."""
    from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary, tokenize_sequences

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        first, second = rng.choice(n_items, 2, replace=False)
        seq = [int(first), int(second)]
        while len(seq) < int(rng.integers(6, 12)):
            seq.append((seq[-2] + 1) % n_items if rng.random() < 0.9 else int(rng.integers(n_items)))
        device, segment = ("web", "ios")[u % 2], ("new", "vip")[(u // 2) % 2]
        for t, item in enumerate(seq):
            rows.append({
                "user_id": f"u{u:04d}", "item_id": f"i{item}", "event_type": EVENT_NAMES[1 + t % 3],
                "minute": u * 60 + t, "device": device if rng.random() < 0.8 else "web", "segment": segment,
            })
    frame = pl.DataFrame(rows)
    with duckdb.connect(str(db)) as con:
        con.register("incoming", frame.to_arrow())
        con.execute(
            """CREATE TABLE cleaned_interactions AS
               SELECT user_id, item_id, event_type, TIMESTAMP '2024-03-01' + to_minutes(minute) AS ts,
                      NULL::VARCHAR AS session_id, 'cat' AS category, device, segment, NULL::DOUBLE AS price,
                      row_number() OVER () AS event_id
               FROM incoming"""
        )
        con.unregister("incoming")
        build_item_vocabulary(con)
        build_context_vocabulary(con)
        tokenize_sequences(con)


def _model_config(db: Path) -> BERT4RecConfig:
    from recsys_assets.assets.training import context_sizes
    from recsys_assets.io_manager import TableRef

    sizes = context_sizes(TableRef(str(db), "context_vocabulary"))
    with duckdb.connect(str(db), read_only=True) as con:
        vocab_size = con.execute("SELECT max(token) + 1 FROM item_vocabulary").fetchall()[0][0]
    return BERT4RecConfig(vocab_size=vocab_size, hidden=32, layers=1, heads=2, max_len=MAX_LEN, dropout=0.0,
                          n_devices=sizes["devices"], n_segments=sizes["segments"])


def _train(db: Path, out: Path) -> Path:
    data = SequenceData.from_duckdb(db, "tokenized_sequences", "item_vocabulary")
    cfg = TrainConfig(fit="train", epochs=15, lr=1e-2, num_threads=1, seed=0, checkpoint_every=None,
                      batching=BatchingConfig(batch_size=64, windows="prefixes"))
    return Path(train(_model_config(db), cfg, data, out).path)


class World:
    """Two warehouses: `old` (30 items) and `new` (40: ten items the old model never saw, on the
    same ring), a model trained on each, and the old model's bundle (the champion)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = {"old": root / "old.duckdb", "new": root / "new.duckdb"}
        _write_warehouse(self.db["old"], 30, 300, seed=0)
        _write_warehouse(self.db["new"], 40, 300, seed=1)
        self.model_dir = {name: _train(db, root / f"model-{name}") for name, db in self.db.items()}
        self.champion = self.bundle("old", "champion-v1")

    def bundle(self, name: str, version: str, **export: Any) -> Path:
        model, config = load_model(self.model_dir[name])
        with duckdb.connect(str(self.db[name]), read_only=True) as con:
            vocabulary = vocabulary_document(con, "item_vocabulary", "context_vocabulary")
            popularity = popularity_document(con, "cleaned_interactions", window_days=None, min_group_events=10)
        info = export_bundle(self.root / "bundles", model, config, vocabulary, popularity, self.root / f"onnx-{version}",
                             contexts=model_contexts(config), version=version, **export)
        return Path(info.path)

    def rows(self, name: str) -> pl.DataFrame:
        with duckdb.connect(str(self.db[name]), read_only=True) as con:
            return con.sql("SELECT * FROM tokenized_sequences").pl().sort("user_id")

    def item_ids(self, name: str) -> list[str]:
        with duckdb.connect(str(self.db[name]), read_only=True) as con:
            return [r[0] for r in con.execute(
                "SELECT item_id FROM item_vocabulary WHERE NOT is_special ORDER BY token").fetchall()]

    def context_values(self, name: str) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        with duckdb.connect(str(self.db[name]), read_only=True) as con:
            for kind, value, token in con.execute("SELECT kind, value, token FROM context_vocabulary").fetchall():
                out.setdefault(kind, {})[int(token)] = value
        return out

    def counts(self, name: str) -> np.ndarray:
        with duckdb.connect(str(self.db[name]), read_only=True) as con:
            rows = con.execute("SELECT token, count FROM item_vocabulary ORDER BY token").fetchall()
        return np.array([c for _, c in rows], dtype=np.float64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    torch.set_num_threads(1)
    return World(tmp_path_factory.mktemp("promotion"))


# --------------------------------------------------------------------------- BundleScorer


def test_bundle_scores_like_the_pytorch_model(world: World) -> None:
    """The champion's bundle through BundleScorer (serving's request encoding, context included) gives
    the PyTorch model's metrics on the same EvalSet, under both protocols."""
    eval_set = make_eval_set(world.rows("old"), "test")
    assert {"tod", "devices", "segments", "event_types"} <= set(eval_set.context)
    model, config = load_model(world.model_dir["old"])
    scorer = BundleScorer(world.champion, intra_threads=1)
    assert scorer.exact and scorer.version == "champion-v1"
    assert set(scorer.ranker.input_names) == {"tokens", "tod", "devices", "segments", "event_types", "exclude"}
    args = dict(item_counts=world.counts("old"), ks=(1, 10), protocols=("full", "sampled_pop10"), n_bootstrap=20)
    ours = evaluate(scorer.scorer(world.item_ids("old"), world.context_values("old")), eval_set, **args)
    torch_result = evaluate(bert4rec_scorer(model, config.max_len), eval_set, **args)
    assert torch_result.metrics["full"]["HR@10"] > 0.8, "the champion must have learned the data's rule"
    for protocol in ("full", "sampled_pop10"):
        assert ours.metrics[protocol]["HR@10"] == torch_result.metrics[protocol]["HR@10"]
        for metric in ("NDCG@10", "MRR"):
            assert ours.metrics[protocol][metric] == pytest.approx(torch_result.metrics[protocol][metric], abs=1e-6)
    assert np.mean(ours.ranks["full"] == torch_result.ranks["full"]) > 0.99
    assert scorer.cold_start_users == 0

    # Without the device/segment token -> value map the bundle's context inputs cannot be fed.
    with pytest.raises(ValueError, match="'devices'"):
        scorer.scorer(world.item_ids("old"))(eval_set.subset(slice(0, 4)))


def test_bundle_scorer_maps_another_token_space(world: World) -> None:
    """Scores land on the caller's tokens whatever their order; unknown items score -inf; a history
    of items the bundle does not know is dropped as serving drops it."""
    eval_set = make_eval_set(world.rows("old"), "test").subset(slice(0, 64))
    items, values = world.item_ids("old"), world.context_values("old")
    scorer = BundleScorer(world.champion, intra_threads=1)
    reference = scorer.scorer(items, values)(eval_set)

    rng = np.random.default_rng(3)
    other = [*items, "brand-new-1", "brand-new-2"]
    order = rng.permutation(len(other))  # other token space: position p holds other[order[p]]
    shuffled = [other[i] for i in order]
    new_token = {item: p + FIRST_ITEM_TOKEN for p, item in enumerate(shuffled)}
    remap = lambda tokens: np.array([new_token[items[t - FIRST_ITEM_TOKEN]] for t in tokens], dtype=np.int64)  # noqa: E731
    moved = EvalSet(split="test", user_ids=eval_set.user_ids, histories=[remap(h) for h in eval_set.histories],
                    targets=remap(eval_set.targets), source_rows=eval_set.source_rows, context=eval_set.context)
    scores = scorer.scorer(shuffled, values)(moved)
    assert scores.shape == (64, len(other) + FIRST_ITEM_TOKEN)
    for item in items:
        np.testing.assert_allclose(scores[:, new_token[item]], reference[:, items.index(item) + FIRST_ITEM_TOKEN], rtol=1e-6)
    assert np.isneginf(scores[:, [new_token["brand-new-1"], new_token["brand-new-2"]]]).all()

    # Unknown items are dropped from the history: a history made only of them has no model answer.
    unknown_only = EvalSet(split="test", user_ids=np.array(["x"], dtype=object),
                           histories=[np.array([new_token["brand-new-1"]])], targets=np.array([new_token[items[0]]]),
                           source_rows=np.array([0]), context={})
    before = scorer.cold_start_users
    assert np.isneginf(scorer.scorer(shuffled, values)(unknown_only)).all()
    assert scorer.cold_start_users == before + 1


def test_top_k_only_bundle_keeps_hr_at_10(world: World) -> None:
    """A graph without the `scores` output (the quantized two-stage head) is scored from its top-K:
    HR@10 and NDCG@10 equal the exact bundle's, since K leaves room for the whole history."""
    quantized = world.bundle("old", "champion-int8", item_table="int8", top_k=24)  # of 30 items
    eval_set = make_eval_set(world.rows("old"), "test")
    items, values = world.item_ids("old"), world.context_values("old")
    top_k = BundleScorer(quantized, intra_threads=1)
    assert not top_k.exact and top_k.top_k == 24 >= 10 + MAX_LEN - 1
    args = dict(item_counts=world.counts("old"), ks=(10,), protocols=("full",), n_bootstrap=20)
    approx = evaluate(top_k.scorer(items, values), eval_set, **args).metrics["full"]
    exact = evaluate(BundleScorer(world.champion, intra_threads=1).scorer(items, values), eval_set, **args).metrics["full"]
    assert approx["HR@10"] == exact["HR@10"]
    assert approx["NDCG@10"] == pytest.approx(exact["NDCG@10"], abs=1e-4)


def test_evaluate_bundle_on_histories_in_item_id_space(world: World) -> None:
    eval_set = make_eval_set(world.rows("old"), "test")
    items, values = world.item_ids("old"), world.context_values("old")
    histories = [[items[t - FIRST_ITEM_TOKEN] for t in h] for h in eval_set.histories]
    targets = [items[t - FIRST_ITEM_TOKEN] for t in eval_set.targets]
    contexts = {
        "tod": [c.tolist() for c in eval_set.context["tod"]],
        "devices": [[values["device"].get(int(t)) for t in c] for c in eval_set.context["devices"]],
        "segments": [[values["segment"].get(int(t)) for t in c] for c in eval_set.context["segments"]],
        "event_types": [[EVENT_NAMES.get(int(t)) for t in c] for c in eval_set.context["event_types"]],
    }
    got = evaluate_bundle_on_histories(world.champion, histories, targets, ks=(1, 10), contexts=contexts)
    result = evaluate(BundleScorer(world.champion, intra_threads=1).scorer(items, values), eval_set,
                      world.counts("old"), ks=(1, 10), protocols=("full",), n_bootstrap=20)
    expected = result.metrics["full"]
    assert set(got) == {"HR@1", "NDCG@1", "HR@10", "NDCG@10", "MRR", "n", "unknown_target_share"}
    assert got["n"] == len(eval_set) and got["unknown_target_share"] == 0.0
    for metric in ("HR@1", "HR@10", "NDCG@10", "MRR"):
        assert got[metric] == pytest.approx(expected[metric], abs=1e-9)

    # Targets the bundle cannot rank are misses; items it does not know vanish from the histories.
    half = len(targets) // 2
    shifted = [f"unseen-{i}" if i < half else t for i, t in enumerate(targets)]
    padded = [[*h, "unseen-x"] if i % 2 else h for i, h in enumerate(histories)]
    ctx = {k: [[*c[:-1], c[-2], c[-1]] if i % 2 else c for i, c in enumerate(v)] for k, v in contexts.items()}
    miss = evaluate_bundle_on_histories(world.champion, padded, shifted, ks=(10,), contexts=ctx)
    assert miss["unknown_target_share"] == pytest.approx(half / len(targets))
    ranks = result.ranks["full"]
    kept = np.arange(len(targets)) >= half
    assert miss["HR@10"] == pytest.approx(np.mean((ranks <= 10) & kept))
    assert miss["MRR"] == pytest.approx(np.mean(np.where(kept, 1.0 / ranks, 0.0)))

    with pytest.raises(ValueError, match="2 histories but 1 targets"):
        evaluate_bundle_on_histories(world.champion, [["i1"], ["i2"]], ["i3"])
    with pytest.raises(ValueError, match="unknown context fields"):
        evaluate_bundle_on_histories(world.champion, [["i1"]], ["i3"], contexts={"weather": [["sun", "rain"]]})
    with pytest.raises(ValueError, match="len\\(history\\) \\+ 1"):
        evaluate_bundle_on_histories(world.champion, [["i1"]], ["i3"], contexts={"tod": [[1]]})


# --------------------------------------------------------------------------- the pipeline's gate


def _pipeline(world: World, home: Path, data: str, model_dir: Path, export: bool = True) -> Any:
    """baselines -> evaluation_report (scores the champion in bundles/current) -> onnx_model ->
    tensorrt_engine -> model_bundle (gate, promotion), upstream read by the real IO managers;
    `export=False` stops after evaluation_report."""
    from dagster import AssetSpec, materialize

    from recsys_assets.assets import evaluation as evaluation_assets
    from recsys_assets.assets import export as export_assets
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager

    artifacts = home / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "bert4rec_model.json").write_text(json.dumps({"path": str(model_dir), "fit": "train"}))
    (artifacts / "feast_online_store.json").write_text(json.dumps({"max_len": 50}))
    sources = [AssetSpec(n).with_io_manager_key("warehouse_io_manager") for n in
               ("tokenized_sequences", "item_vocabulary", "context_vocabulary", "cleaned_interactions")]
    sources += [AssetSpec(n).with_io_manager_key("artifact_io_manager") for n in ("bert4rec_model", "feast_online_store")]
    knobs = {"n_bootstrap": 20, "protocols": ["full", "sampled_pop10"]}
    stages = [evaluation_assets.baselines, evaluation_assets.evaluation_report]
    if export:
        stages += [export_assets.onnx_model, export_assets.tensorrt_engine, export_assets.model_bundle]
    result = materialize(
        [*sources, *stages],
        resources={"warehouse_io_manager": DuckDBTableIOManager(database=str(world.db[data])),
                   "artifact_io_manager": JsonArtifactIOManager(), "prediction_target": PredictionTargetResource()},
        run_config={"ops": {
            "baselines": {"config": knobs},
            "evaluation_report": {"config": {**knobs, "device": "cpu", "champion_threads": 1}},
            **({
                "onnx_model": {"config": {"parity_sequences": 300, "min_parity_sequences": 200}},
                "tensorrt_engine": {"config": {"parity_sequences": 300}},
                "model_bundle": {"config": {"popularity_min_group_events": 10}},
            } if export else {}),
        }},
    )
    assert result.success
    return result


def _serve_champion(world: World, home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RECSYS_HOME", str(home))
    root = home / "bundles"
    root.mkdir(parents=True)
    shutil.copytree(world.champion, root / world.champion.name)
    promote(root, world.champion.name, reasons=["the champion of this test"])
    return root


def _outputs(result: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    report = result.output_for_node("evaluation_report")
    doc = json.loads(Path(report["metrics_json"]).read_text())
    bundle = result.output_for_node("model_bundle")
    meta = result.asset_materializations_for_node("model_bundle")[0].metadata
    return report, doc, bundle, meta


def test_worse_challenger_on_the_champions_data_is_not_promoted(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _serve_champion(world, tmp_path, monkeypatch)
    torch.manual_seed(1)
    config = _model_config(world.db["old"])
    save_model(tmp_path / "untrained", BERT4Rec(config).eval(), config, extra={"fit": "train"})

    result = _pipeline(world, tmp_path, "old", tmp_path / "untrained")
    report, doc, bundle, meta = _outputs(result)
    assert list(doc["models"])[:2] == ["bert4rec", "champion"]
    assert doc["champion"]["status"] == "scored" and doc["champion"]["version"] == "champion-v1"
    assert doc["champion"]["unknown_target_share"] == 0.0
    # the champion is ranked with the same negatives and bootstrap: its own sampled figures and CIs exist
    assert set(doc["models"]["champion"]) == {"full", "sampled_pop10"} and "champion" in doc["ci"]
    champion, challenger = doc["models"]["champion"]["full"]["NDCG@10"], doc["models"]["bert4rec"]["full"]["NDCG@10"]
    assert champion > 0.8 > challenger
    assert not report["gate"]["passed"] and report["gate"]["champion"] == pytest.approx(champion)
    assert any(r.startswith("below champion champion-v1 on the same data") for r in report["gate"]["reasons"])
    # the champion is no baseline: it is compared once, as the champion
    assert not any("beat champion" in r for r in report["gate"]["reasons"])
    report_meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert report_meta["champion_ndcg10"].value == pytest.approx(champion)
    assert report_meta["challenger_ndcg10"].value == pytest.approx(challenger)
    assert "champion" in report_meta["headline"].value
    page = Path(report["report"]["report_html"]).read_text()
    assert "champion-v1" in page and "<td>champion</td>" in page

    # model_bundle writes the bundle, does not promote it, and the champion keeps serving
    assert not bundle["promoted"] and current_version(root) == "champion-v1" and bundle["current"] == "champion-v1"
    assert meta["gate_passed"].value is False
    assert meta["champion_ndcg10"].value == pytest.approx(champion)
    assert meta["challenger_ndcg10"].value == pytest.approx(challenger)
    assert meta["margin"].value == pytest.approx(challenger / champion - 1)
    gate = verify_bundle(Path(bundle["path"])).gate
    assert gate["passed"] is False and gate["champion"] == "champion-v1" and gate["champion_status"] == "scored"
    assert gate["champion_value"] == pytest.approx(champion)
    assert gate["figures"]["champion"]["full"]["NDCG@10"] == pytest.approx(champion)


def test_better_challenger_on_shifted_data_is_promoted(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New items arrive: the champion cannot rank those that are now targets, the retrained
    challenger can, and it replaces the champion."""
    root = _serve_champion(world, tmp_path, monkeypatch)
    result = _pipeline(world, tmp_path, "new", world.model_dir["new"])
    report, doc, bundle, meta = _outputs(result)
    assert doc["champion"]["status"] == "scored" and doc["champion"]["unknown_target_share"] > 0.1
    champion, challenger = doc["models"]["champion"]["full"]["NDCG@10"], doc["models"]["bert4rec"]["full"]["NDCG@10"]
    assert challenger > champion
    assert report["gate"]["passed"], report["gate"]["reasons"]
    assert any(r.startswith("holds up against champion champion-v1") for r in report["gate"]["reasons"])
    assert bundle["promoted"] and current_version(root) == bundle["version"] != "champion-v1"
    assert meta["margin"].value == pytest.approx(challenger / champion - 1) and meta["margin"].value > 0
    gate = verify_bundle(root / CURRENT).gate
    assert gate["passed"] and gate["challenger_value"] == pytest.approx(challenger)


def test_unloadable_champion_is_reported_and_the_gate_uses_baselines(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _serve_champion(world, tmp_path, monkeypatch)
    vocabulary = root / "champion-v1" / "vocabulary.json"
    vocabulary.chmod(0o644)
    vocabulary.write_text(vocabulary.read_text().replace('"i1"', '"x1"'))  # same size: the checksum refuses it

    # model_bundle's own behaviour is pinned above; here the report and the gate it feeds
    result = _pipeline(world, tmp_path, "new", world.model_dir["new"], export=False)
    report = result.output_for_node("evaluation_report")
    doc = json.loads(Path(report["metrics_json"]).read_text())
    assert doc["champion"]["status"] == "refused" and doc["champion"]["version"] == "champion-v1"
    assert "vocabulary.json sha256" in doc["champion"]["reason"]
    assert "champion" not in doc["models"] and "champion" not in doc["lift"]
    reasons = report["gate"]["reasons"]
    assert any("champion champion-v1 could not be scored (vocabulary.json sha256" in r
               and "compared with the baselines only" in r for r in reasons), reasons
    assert all(r.startswith("beats ") for r in reasons if "champion" not in r) and report["gate"]["passed"]
    report_meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "refused" in report_meta["champion"].value and "champion_ndcg10" not in report_meta
    assert "could not be scored" in Path(report["report"]["report_html"]).read_text()

    decision = evaluate_gate(root, doc, tolerance=0.02)  # what model_bundle decides on this report
    assert decision.passed and decision.champion == "champion-v1" and decision.champion_status == "refused"
    assert decision.champion_value is None and decision.margin is None
    assert decision.challenger_value == pytest.approx(doc["models"]["bert4rec"]["full"]["NDCG@10"])
