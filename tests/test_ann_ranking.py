"""The approximate nearest-neighbour ranking (item_table="ann"): a FAISS index over [item, bias]
rows proposes candidates, rescored exactly in fp32; its files are checksummed bundle files, and
serving answers nearly as the exact bundle does."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig
from recsys_assets.evaluation.bundle_scorer import evaluate_bundle_on_histories
from recsys_assets.export.ann_index import AnnOptions, build_ann_files, exact_top, query_vectors
from recsys_assets.export.bundle import export_bundle
from recsys_assets.export.onnx_export import export_onnx
from recsys_serving.ann import rescore
from recsys_serving.bundle import ANN_INDEX_FILE, ANN_TABLE_FILE, BundleRefused, load_bundle, sha256_file, verify_bundle
from recsys_serving.contract import FIRST_ITEM_TOKEN, MASK_TOKEN, PAD_TOKEN
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.model import History, MaskContext, OnnxRanker, encode
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

ITEMS = [f"item-{i}" for i in range(3000)]
VOCABULARY = {"items": ITEMS, "categories": None, "context": {"device": {"mobile": 1}, "segment": {}}}
POPULARITY = {"global": [{"item_id": i, "score": 1.0 / (r + 1)} for r, i in enumerate(ITEMS[:40])], "groups": []}
TOP_K = 20


@dataclass
class _Batch:
    tokens: np.ndarray
    contexts: dict[str, np.ndarray]


def _model() -> tuple[BERT4Rec, BERT4RecConfig]:
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=len(ITEMS) + 2, hidden=32, layers=1, heads=2, max_len=10, n_devices=2)
    model = BERT4Rec(config).eval()
    with torch.no_grad():  # spread item vectors and biases: a ranking that depends on the query
        model.item_emb.weight.normal_(0, 0.5)
        model.out_bias.normal_(0, 0.2)
    return model, config


def _histories(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[ITEMS[j] for j in rng.integers(0, len(ITEMS), int(rng.integers(1, 9)))] for _ in range(n)]


def _tuning_queries(model: BERT4Rec, n: int = 200) -> np.ndarray:
    """Validation-like queries: other random histories than the ones the tests ask about."""
    rng = np.random.default_rng(1)
    tokens = np.concatenate([rng.integers(FIRST_ITEM_TOKEN, len(ITEMS) + FIRST_ITEM_TOKEN, (n, 6)),
                             np.full((n, 1), MASK_TOKEN)], axis=1).astype(np.int64)
    return query_vectors(model, [_Batch(tokens=tokens, contexts={"devices": np.ones_like(tokens)})])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, config = _model()
    tmp = tmp_path_factory.mktemp("ann")
    root = tmp / "bundles"
    common: dict[str, Any] = {"top_k": TOP_K, "contexts": ["devices"]}
    fp32 = export_bundle(root, model, config, VOCABULARY, POPULARITY, tmp / "fp32", version="fp32", **common)
    ann = export_bundle(root, model, config, VOCABULARY, POPULARITY, tmp / "ann", version="ann", item_table="ann",
                        ann=AnnOptions(target_recall=0.99), ann_tuning_queries=_tuning_queries(model), **common)
    return {"fp32": Path(fp32.path), "ann": Path(ann.path)}


def _ranker(path: Path, tmp_path: Path) -> OnnxRanker:
    return OnnxRanker(load_bundle(path), intra_threads=1, use_gpu=False, cache_dir=tmp_path / "cache")


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_ann_bundle_lists_and_checksums_its_index_and_table(bundles: dict[str, Path]) -> None:
    manifest = verify_bundle(bundles["ann"])
    ranking = manifest.model.ranking
    assert ranking is not None and ranking.kind == "faiss"
    assert {ANN_INDEX_FILE, ANN_TABLE_FILE} <= set(manifest.files) == {p.name for p in bundles["ann"].iterdir()} - {"manifest.json"}
    for name in ranking.files:
        assert manifest.files[name].sha256 == sha256_file(bundles["ann"] / name)
    # the served interface, as any bundle's: the graph itself stops at the query
    assert manifest.model.inputs == ["tokens", "devices", "exclude"]
    assert manifest.model.outputs == ["top_scores", "top_tokens"]
    onnx = manifest.export["onnx"]
    assert onnx["item_table"] == "ann" and onnx["ann"]["met_target"] is True
    assert onnx["ann"]["tuning"] and onnx["rescore_candidates"] == ranking.candidates
    # enough candidates for a full top-K after the longest history is left out
    assert ranking.candidates >= TOP_K + manifest.model.max_len - 1
    table = np.load(bundles["ann"] / ANN_TABLE_FILE)
    assert table.shape == (len(ITEMS) + FIRST_ITEM_TOKEN, 33) and table.dtype == np.float32
    assert verify_bundle(bundles["fp32"]).model.ranking is None


def test_ann_bundle_serves_nearly_the_exact_ranking(bundles: dict[str, Path], tmp_path: Path) -> None:
    """Its top-10 equals the exact bundle's for most requests, the scores it returns are exact, and
    the history and PAD/MASK never come back."""
    ann, exact = _ranker(bundles["ann"], tmp_path), _ranker(bundles["fp32"], tmp_path)
    assert ann.ann is not None and exact.ann is None and ann.input_names == exact.input_names
    identical = 0
    recall = 0.0
    histories = _histories(200, seed=7)
    for items in histories:
        history = History(item_ids=items, devices=["mobile"] * len(items))
        encoded = encode(history, MaskContext(device="mobile"), ann.vocabulary, ann.max_len, ann.input_names)
        assert encoded is not None
        scores, tokens = ann.rank(encoded.feeds)
        assert tokens.shape == (TOP_K,) and (tokens >= FIRST_ITEM_TOKEN).all()
        got = ann.decode(scores, tokens, 10)
        want = exact.decode(*exact.rank(encoded.feeds), 10)
        assert not {i for i, _ in got} & set(items)
        identical += [i for i, _ in got] == [i for i, _ in want]
        recall += len({i for i, _ in got} & {i for i, _ in want}) / 10
        shared = dict(want)
        for item, score in got:
            if item in shared:
                assert abs(score - shared[item]) < 1e-4
    assert identical >= 0.9 * len(histories) and recall / len(histories) >= 0.98


def test_ann_batch_ranking_matches_single_requests(bundles: dict[str, Path], tmp_path: Path) -> None:
    ranker = _ranker(bundles["ann"], tmp_path)
    rng = np.random.default_rng(3)
    encoded = [encode(History(item_ids=[ITEMS[j] for j in rng.choice(len(ITEMS), 3, replace=False)]), MaskContext(),
                      ranker.vocabulary, ranker.max_len, ranker.input_names) for _ in range(4)]
    feeds = {name: np.concatenate([e.feeds[name] for e in encoded if e is not None]) for name in ("tokens", "devices", "exclude")}
    scores, tokens = ranker.rank_batch(feeds)
    for row, e in enumerate(encoded):
        assert e is not None
        one_scores, one_tokens = ranker.rank(e.feeds)
        np.testing.assert_array_equal(tokens[row], one_tokens)
        np.testing.assert_allclose(scores[row], one_scores, rtol=0, atol=1e-6)


def test_ann_bundle_scores_in_the_evaluation_as_the_exact_one(bundles: dict[str, Path]) -> None:
    """The gate's champion scoring runs an ANN bundle through the same ranker (rank_batch)."""
    histories = _histories(300, seed=11)
    targets = [h[-1] for h in histories]
    inputs = [h[:-1] or h for h in histories]
    exact = evaluate_bundle_on_histories(bundles["fp32"], inputs, targets)
    approx = evaluate_bundle_on_histories(bundles["ann"], inputs, targets)
    assert abs(approx["HR@10"] - exact["HR@10"]) <= 0.02


@pytest.mark.parametrize("name", [ANN_INDEX_FILE, ANN_TABLE_FILE])
def test_a_corrupted_ann_file_is_refused_like_any_bundle_file(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import prometheus_client

    bad = _writable_copy(bundles["ann"], tmp_path / "bad")
    data = bytearray((bad / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the codes / the table
    (bad / name).write_bytes(bytes(data))
    with pytest.raises(BundleRefused) as err:
        load_bundle(bad)
    assert f"{name} sha256" in err.value.reason
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    settings = ServingSettings.from_env(bundle_path=str(bad), feature_repo=str(tmp_path / "no_repo"))
    recommender = Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))
    health = recommender.health()
    assert health.degraded and f"{name} sha256" in (health.reason or "")
    answer = asyncio.run(recommender.recommend(RecommendRequest(user_id="u", k=3, recent_items=["item-0"])))
    assert answer.fallback and answer.reason == "model_unavailable"


def _rewrite_manifest(path: Path, edit: Any) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_an_ann_file_missing_from_the_manifest_or_another_models_index_is_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    unlisted = _writable_copy(bundles["ann"], tmp_path / "unlisted")
    (unlisted / ANN_INDEX_FILE).unlink()
    _rewrite_manifest(unlisted, lambda m: m["files"].pop(ANN_INDEX_FILE))
    with pytest.raises(BundleRefused, match="not listed in the manifest"):
        load_bundle(unlisted)

    # a well-formed index of another catalogue, checksums rewritten to match: the ranker refuses it
    _, config = _model()
    other = tmp_path / "other"
    small = BERT4Rec(config.model_copy(update={"vocab_size": 502})).eval()
    build_ann_files(small, other, AnnOptions(), top_k=TOP_K, min_candidates=TOP_K)
    swapped = _writable_copy(bundles["ann"], tmp_path / "swapped")
    shutil.copyfile(other / ANN_INDEX_FILE, swapped / ANN_INDEX_FILE)

    def fix(m: dict[str, Any]) -> None:
        m["files"][ANN_INDEX_FILE] = {"sha256": sha256_file(swapped / ANN_INDEX_FILE),
                                      "bytes": (swapped / ANN_INDEX_FILE).stat().st_size}

    _rewrite_manifest(swapped, fix)
    with pytest.raises(BundleRefused, match="does not match the model"):
        _ranker(swapped, tmp_path)


def test_rescore_leaves_out_history_and_specials_and_breaks_ties_by_token() -> None:
    table = np.zeros((8, 3), dtype=np.float32)  # rows [item (2 dims), bias]
    table[:, 0] = [9, 9, 1, 3, 3, 2, 5, 0]  # PAD/MASK would score highest
    table[:, 2] = [0, 0, 0, 0, 0, 0, 0, 0.5]
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    candidates = np.array([[0, 1, 4, 3, 6, 7, -1, 5, 2]], dtype=np.int64)
    scores, tokens = rescore(table, query, candidates, exclude=np.array([[6, PAD_TOKEN]]), top_k=10)
    # 6 (history), PAD, MASK and -1 dropped; 3 and 4 tie (3.0): lower token first; bias counts (7: 0.5)
    assert tokens[0].tolist() == [3, 4, 5, 2, 7] + [PAD_TOKEN] * 5
    np.testing.assert_allclose(scores[0, :5], [3, 3, 2, 1, 0.5])
    assert np.isneginf(scores[0, 5:]).all()


def test_tuning_picks_the_fewest_candidates_that_reach_the_target(tmp_path: Path) -> None:
    model, _ = _model()
    queries = _tuning_queries(model)
    report = build_ann_files(model, tmp_path, AnnOptions(target_recall=0.99), top_k=TOP_K, min_candidates=32,
                             tuning_queries=queries)
    reaching = [r.candidates for r in report.tuning if r.recall_at_10 >= 0.99]
    assert report.met_target and report.candidates == min(reaching)
    assert report.factory == "PQ11x4fs" and report.index_dim == 33  # 32 + bias, 3 dimensions per code
    table = np.load(tmp_path / ANN_TABLE_FILE)
    # the exact reference: every item scored [q, 1] . [item, bias], PAD/MASK never
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(queries[:5])).numpy()
    assert exact_top(table, queries[:5]).tolist() == np.argsort(-logits, axis=1, kind="stable")[:, :10].tolist()

    ivf = build_ann_files(model, tmp_path / "ivf", AnnOptions(nlist=16, target_recall=0.99), top_k=TOP_K,
                          min_candidates=32, tuning_queries=queries)
    assert ivf.factory == "IVF16,PQ11x4fs" and ivf.nprobe is not None and ivf.met_target
    assert {r.nprobe for r in ivf.tuning} == {1, 2, 4, 8, 16}


def test_ann_export_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    model, config = _model()
    with pytest.raises(ValueError, match="item_table='ann'"):
        export_onnx(model, config, tmp_path / "a.onnx", item_table="int8", ann=AnnOptions())
    tiny_config = config.model_copy(update={"vocab_size": 12})
    with pytest.raises(ValueError, match="at least 16 items"):
        export_onnx(BERT4Rec(tiny_config).eval(), tiny_config, tmp_path / "b.onnx", top_k=5, item_table="ann")
    with pytest.raises(ValueError, match="nprobe needs an IVF index"):
        build_ann_files(model, tmp_path / "c", AnnOptions(nprobe=4), top_k=TOP_K, min_candidates=TOP_K)


def test_bundle_ranking_check_measures_the_ann_bundle_against_pytorch(bundles: dict[str, Path]) -> None:
    """What the serving benchmark reports as the ANN bundle's recall@10: serving's ranker against
    fp32 PyTorch with the history masked in both."""
    from recsys_assets.export.verification import ParityBatch, bundle_ranking_check

    model, _ = _model()
    rng = np.random.default_rng(13)
    tokens = np.concatenate([rng.integers(FIRST_ITEM_TOKEN, len(ITEMS) + FIRST_ITEM_TOKEN, (64, 5)),
                             np.full((64, 1), MASK_TOKEN)], axis=1).astype(np.int64)
    batch = ParityBatch(tokens=tokens, contexts={"devices": np.ones_like(tokens)}, exclude=tokens[:, :-1].copy())
    report = bundle_ranking_check(model, bundles["ann"], [batch], threads=1)
    assert report.n_sequences == 64 and report.recall_at_k >= 0.98 and report.max_score_diff < 1e-4
    assert report.passed
