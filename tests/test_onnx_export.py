"""ONNX export of BERT4Rec: graph interface, parity with PyTorch on real validation sequences,
the in-graph history masking / top-K, dynamic batch and length."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from recsys_assets.bert4rec.data import SequenceData
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig
from recsys_assets.export.onnx_export import export_onnx, model_contexts
from recsys_assets.export.verification import (
    ParityBatch,
    parity_check,
    quantized_ranking_check,
    validation_batches,
)
from recsys_serving.bundle import MODEL_OUTPUTS

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty" / "Beauty.txt"

torch.set_num_threads(2)


def _benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) as a module: its import runs no benchmark."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def context_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[BERT4Rec, BERT4RecConfig, Path]:
    """A small model with time-of-day and device context, exported once for the module."""
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=300, hidden=32, layers=2, heads=2, max_len=16, n_devices=4, dropout=0.0)
    model = BERT4Rec(config).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(model, config, path, contexts=["tod", "devices", "event_types"], top_k=50)
    assert report.contexts == ["tod", "devices", "event_types"]
    return model, config, path


def _synthetic_data(config: BERT4RecConfig, users: int, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(2, config.vocab_size, size=int(rng.integers(3, 40))) for _ in range(users)]
    contexts = {
        "tod": [rng.integers(0, 7, size=len(t)) for t in tokens],
        "devices": [rng.integers(0, config.n_devices, size=len(t)) for t in tokens],
        "event_types": [rng.integers(0, 4, size=len(t)) for t in tokens],
    }
    return SequenceData(user_ids=[str(i) for i in range(users)], tokens=tokens, vocab_size=config.vocab_size, contexts=contexts)


def test_graph_interface_is_checked_and_dynamic(context_model: tuple[BERT4Rec, BERT4RecConfig, Path]) -> None:
    _, _, path = context_model
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert list(inputs) == ["tokens", "tod", "devices", "event_types", "exclude"]
    assert all(isinstance(d, str) for d in inputs["tokens"]), f"batch and length must be dynamic: {inputs['tokens']}"
    assert inputs["tokens"] == inputs["tod"] == inputs["devices"]
    assert [o.name for o in proto.graph.output] == ["scores", "top_scores", "top_tokens"]
    assert set(MODEL_OUTPUTS) == {o.name for o in proto.graph.output}


def test_contexts_follow_the_model_tables() -> None:
    config = BERT4RecConfig(vocab_size=10, hidden=8, heads=2, n_devices=1, n_segments=3)
    # devices has a 1-row table (never trained): not an input; segments only when the data has them
    assert model_contexts(config) == ["tod", "segments", "event_types"]
    assert model_contexts(config, available=["tod", "devices"]) == ["tod"]


def test_every_batch_and_length_matches_pytorch(context_model: tuple[BERT4Rec, BERT4RecConfig, Path]) -> None:
    model, config, path = context_model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, length in [(1, 1), (1, 2), (3, 7), (5, config.max_len)]:
        tokens = rng.integers(2, config.vocab_size, size=(batch, length))
        tokens[:, -1] = 1
        tokens[0, : length // 2] = 0  # left padding in one row
        ctx = {
            "tod": rng.integers(0, 7, size=(batch, length)),
            "devices": rng.integers(0, config.n_devices, size=(batch, length)),
            "event_types": rng.integers(0, 4, size=(batch, length)),
        }
        with torch.no_grad():
            ref = model.score_next(torch.from_numpy(tokens), **{k: torch.from_numpy(v) for k, v in ctx.items()}).numpy()
        (scores,) = session.run(["scores"], {"tokens": tokens, **ctx, "exclude": np.zeros((batch, 1), dtype=np.int64)})
        finite = np.isfinite(ref)
        assert (np.isfinite(scores) == finite).all()
        assert np.abs(scores[finite] - ref[finite]).max() < 1e-4, (batch, length)


def test_ranking_head_masks_history_and_special_tokens(context_model: tuple[BERT4Rec, BERT4RecConfig, Path]) -> None:
    _, config, path = context_model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    tokens = rng.integers(2, config.vocab_size, size=(2, 6))
    tokens[:, -1] = 1
    feeds = {"tokens": tokens, "tod": np.ones_like(tokens), "devices": np.ones_like(tokens), "event_types": np.ones_like(tokens)}
    (scores,) = session.run(["scores"], {**feeds, "exclude": np.zeros((2, 1), dtype=np.int64)})
    best = np.argsort(-scores, axis=1)[:, :5]  # mask the model's own favourites
    exclude = np.concatenate([best, np.zeros((2, 2), dtype=np.int64)], axis=1)
    top_scores, top_tokens = session.run(["top_scores", "top_tokens"], {**feeds, "exclude": exclude})
    assert top_tokens.shape == (2, 50)
    for row in range(2):
        assert not set(top_tokens[row].tolist()) & set(best[row].tolist())
        assert not {0, 1} & set(top_tokens[row].tolist())
        masked = scores[row].copy()
        masked[best[row]] = -np.inf
        np.testing.assert_array_equal(top_tokens[row, :10], np.argsort(-masked, kind="stable")[:10])
        assert (np.diff(top_scores[row]) <= 0).all()


def test_parity_check_fails_for_another_model(context_model: tuple[BERT4Rec, BERT4RecConfig, Path]) -> None:
    model, config, path = context_model
    data = _synthetic_data(config, users=64)
    batches = list(validation_batches(data, config.max_len, ["tod", "devices", "event_types"], 64))
    assert parity_check(model, path, batches).passed
    torch.manual_seed(1)
    other = BERT4Rec(config).eval()  # same architecture, other weights: must not pass
    report = parity_check(other, path, batches)
    assert not report.passed and report.max_abs_diff > 1e-4


@pytest.fixture(scope="module")
def beauty_model() -> tuple[BERT4Rec, BERT4RecConfig, list[ParityBatch]]:
    """Amazon Beauty (12,101 items): a model with spread scores and its first 1,000 validation inputs."""
    if not BEAUTY.exists():
        pytest.skip("shared/data/amazon_beauty/Beauty.txt is absent")
    data = SequenceData.from_sasrec_txt(BEAUTY)
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=data.vocab_size, hidden=32, layers=2, heads=2, max_len=50, dropout=0.0)
    model = BERT4Rec(config).eval()
    with torch.no_grad():  # spread the scores: at init they are nearly tied and the test would be weak
        model.item_emb.weight.normal_(0, 0.5)
        model.out_bias.normal_(0, 0.5)
    return model, config, list(validation_batches(data, config.max_len, [], 1000))


def test_parity_on_1000_real_validation_sequences(
    beauty_model: tuple[BERT4Rec, BERT4RecConfig, list[ParityBatch]], tmp_path: Path
) -> None:
    """Amazon Beauty (12,101 items): fp32 max |diff| < 1e-4 and identical top-10 on >= 1,000 users."""
    model, config, batches = beauty_model
    report = export_onnx(model, config, tmp_path / "model.onnx", contexts=[])
    assert report.inputs == ["tokens", "exclude"]
    assert report.item_table == "fp32" and report.rescore_candidates is None
    parity = parity_check(model, report.path, batches)
    assert parity.n_sequences == 1000
    assert parity.max_abs_diff < 1e-4
    assert parity.top10_identical == 1000, parity
    assert parity.topk_head_identical == 1000, parity
    assert parity.passed


def test_int8_item_table_recall_on_1000_real_validation_sequences(
    beauty_model: tuple[BERT4Rec, BERT4RecConfig, list[ParityBatch]], tmp_path: Path
) -> None:
    """The quantized two-stage head (int8 scores of all 12,101 items, the best 256 rescored in fp32)
    against fp32 PyTorch: recall@10 >= 0.99 and every returned score is the exact fp32 score."""
    model, config, batches = beauty_model
    report = export_onnx(model, config, tmp_path / "model.onnx", contexts=[], item_table="int8", rescore_candidates=256)
    assert report.item_table == "int8" and report.rescore_candidates == 256
    assert report.inputs == ["tokens", "exclude"] and report.outputs == ["top_scores", "top_tokens"]
    proto = onnx.load(report.path)
    assert "MatMulNBits" in {n.op_type for n in proto.graph.node}
    (rows,) = [n for n in proto.graph.node if n.name == "ranking_rows"]  # the fp32 rescoring's table
    (table,) = [i for i in proto.graph.initializer if i.name == rows.input[0]]
    np.testing.assert_array_equal(numpy_helper.to_array(table), model.item_emb.weight.detach().numpy())
    assert "ranking_item_table" not in {i.name for i in proto.graph.initializer}, "reused, not copied"
    check = quantized_ranking_check(model, report.path, batches)
    assert check.n_sequences == 1000
    assert check.recall_at_k >= 0.99, check
    assert check.max_score_diff < 1e-4, check
    assert check.passed
    latency = _benchmark("onnx_latency").batch1_latency(model, report.path, [], 7, repeats=5)
    assert latency.ort_scores_then_numpy_topk_ms is None and latency.topk_in_graph_faster is None


def test_quantized_head_masks_history_and_keeps_context_inputs(
    context_model: tuple[BERT4Rec, BERT4RecConfig, Path], tmp_path: Path
) -> None:
    """int4 table, more candidates than items left: excluded and special tokens are never returned
    with a finite score, and the finite part of the list is exactly the fp32 ranking."""
    model, config, _ = context_model
    report = export_onnx(model, config, tmp_path / "q.onnx", contexts=["tod", "devices", "event_types"], top_k=50,
                         item_table="int4", rescore_candidates=config.vocab_size * 2)
    assert report.inputs == ["tokens", "tod", "devices", "event_types", "exclude"]
    assert report.rescore_candidates == config.vocab_size
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, config.vocab_size, size=(2, 9))
    tokens[:, -1] = 1
    ctx = {"tod": rng.integers(0, 7, size=(2, 9)), "devices": rng.integers(0, config.n_devices, size=(2, 9)),
           "event_types": rng.integers(0, 4, size=(2, 9))}
    exclude = np.stack([rng.permutation(np.arange(2, config.vocab_size))[: config.vocab_size - 30] for _ in range(2)])
    top_scores, top_tokens = session.run(["top_scores", "top_tokens"], {"tokens": tokens, **ctx, "exclude": exclude})
    with torch.no_grad():
        ref = model.score_next(torch.from_numpy(tokens), **{k: torch.from_numpy(v) for k, v in ctx.items()}).numpy()
    np.put_along_axis(ref, exclude, -np.inf, axis=1)
    for row in range(2):
        finite = np.isfinite(top_scores[row])
        assert finite.sum() == 28  # 30 tokens left minus PAD and MASK
        assert not set(top_tokens[row][finite].tolist()) & (set(exclude[row].tolist()) | {0, 1})
        np.testing.assert_array_equal(top_tokens[row][finite], np.argsort(-ref[row], kind="stable")[:28])
        np.testing.assert_allclose(top_scores[row][finite], ref[row, top_tokens[row][finite]], atol=1e-4)


def test_quantized_check_fails_for_another_model(context_model: tuple[BERT4Rec, BERT4RecConfig, Path],
                                                 tmp_path: Path) -> None:
    model, config, _ = context_model
    contexts = ["tod", "devices", "event_types"]
    report = export_onnx(model, config, tmp_path / "q.onnx", contexts=contexts, top_k=50, item_table="int8",
                         rescore_candidates=64)
    batches = list(validation_batches(_synthetic_data(config, users=64), config.max_len, contexts, 64))
    assert quantized_ranking_check(model, report.path, batches).passed
    torch.manual_seed(1)
    other = BERT4Rec(config).eval()
    check = quantized_ranking_check(other, report.path, batches)
    assert not check.passed and check.recall_at_k < 0.5


def test_export_refuses_bad_quantization_settings(context_model: tuple[BERT4Rec, BERT4RecConfig, Path],
                                                  tmp_path: Path) -> None:
    model, config, _ = context_model
    with pytest.raises(ValueError, match="item_table"):
        export_onnx(model, config, tmp_path / "a.onnx", item_table="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rescore_candidates"):
        export_onnx(model, config, tmp_path / "b.onnx", top_k=50, item_table="int8", rescore_candidates=10)


def test_validation_batches_hold_history_for_exclusion() -> None:
    config = BERT4RecConfig(vocab_size=50, hidden=8, heads=2, max_len=5)
    data = SequenceData(
        user_ids=["a"], tokens=[np.array([5, 6, 7, 8, 9, 10, 11])], vocab_size=50, contexts={}
    )
    (batch,) = list(validation_batches(data, config.max_len, [], 10))
    assert isinstance(batch, ParityBatch)
    # validation: history tokens[:-2] = 5..9, target 10; input = latest max_len-1 items + [MASK]
    np.testing.assert_array_equal(batch.tokens, [[6, 7, 8, 9, 1]])
    np.testing.assert_array_equal(np.sort(batch.exclude[0]), [5, 6, 7, 8, 9])


def test_large_catalogue_export_attaches_real_tables_as_aligned_external_data(
    context_model: tuple[BERT4Rec, BERT4RecConfig, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above LARGE_TABLE_BYTES the quantized graph is traced at a stand-in vocabulary and the real
    tables are attached as page-aligned external data: it answers exactly as a direct export."""
    import recsys_assets.export.onnx_export as onnx_export

    model, config, _ = context_model
    contexts = ["tod", "devices", "event_types"]
    direct = export_onnx(model, config, tmp_path / "direct.onnx", contexts=contexts, top_k=50, item_table="int8",
                         rescore_candidates=128)
    monkeypatch.setattr(onnx_export, "LARGE_TABLE_BYTES", 0)
    monkeypatch.setattr(onnx_export, "STAND_IN_VOCAB", 40)
    large = export_onnx(model, config, tmp_path / "large.onnx", contexts=contexts, top_k=50, item_table="int8",
                        rescore_candidates=128)
    assert direct.external_data is None and large.external_data == "large.onnx.data"
    proto = onnx.load(large.path, load_external_data=False)
    tables = {i.name: i for i in proto.graph.initializer if i.name.startswith("model.") and i.name.endswith("emb.weight")
              and i.dims[0] == config.vocab_size}
    assert set(tables) >= {"model.item_emb.weight", "model.prev_item_emb.weight"}
    for init in tables.values():
        assert init.data_location == onnx.TensorProto.EXTERNAL
        offset = int({e.key: e.value for e in init.external_data}["offset"])
        assert offset % onnx_export.EXTERNAL_ALIGNMENT == 0
    batches = list(validation_batches(_synthetic_data(config, users=64), config.max_len, contexts, 64))
    outputs = []
    for report in (direct, large):
        session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
        outputs.append([session.run(["top_scores", "top_tokens"], {"tokens": b.tokens, **b.contexts, "exclude": b.exclude})
                        for b in batches])
    for (s1, t1), (s2, t2) in zip(*outputs):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert quantized_ranking_check(model, large.path, batches).passed
