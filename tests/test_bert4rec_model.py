"""BERT4Rec network: shapes, right-aligned positions, context as a no-op, save/load, ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, load_model, save_model
from recsys_assets.bert4rec.presets import PRESETS, build_configs
from recsys_serving.contract import MASK_TOKEN, PAD_TOKEN

V = 40


def tiny(**kw) -> BERT4RecConfig:
    base = dict(vocab_size=V, hidden=16, layers=2, heads=2, max_len=8, dropout=0.0, n_devices=3, n_segments=3)
    return BERT4RecConfig(**{**base, **kw})


@pytest.fixture()
def model() -> BERT4Rec:
    torch.manual_seed(0)
    return BERT4Rec(tiny(init_std=0.3)).eval()


def _input(history: list[int], width: int) -> torch.Tensor:
    row = [PAD_TOKEN] * (width - len(history) - 1) + history + [MASK_TOKEN]
    return torch.tensor([row])


def test_shapes_and_special_tokens_never_scored(model: BERT4Rec) -> None:
    tokens = torch.tensor([[0, 0, 5, 6, 7, 1], [2, 3, 4, 5, 6, 1]])
    assert model(tokens).shape == (2, 6, 16)
    scores = model.score_next(tokens)
    assert scores.shape == (2, V)
    assert torch.isinf(scores[:, [PAD_TOKEN, MASK_TOKEN]]).all()
    assert torch.isfinite(scores[:, 2:]).all()


def test_most_recent_item_has_the_same_position_whatever_the_padding(model: BERT4Rec) -> None:
    # the pitfall of QUALITY_NOTES: with dynamic padding the last item's position must not move
    history = [5, 9, 11]
    short = model.score_next(_input(history, 4))
    long = model.score_next(_input(history, 8))
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)
    # and the order of the history matters (positions are used at all)
    reordered = model.score_next(_input([11, 9, 5], 8))
    assert not torch.allclose(long, reordered, atol=1e-4)


def test_absent_context_is_a_no_op(model: BERT4Rec) -> None:
    tokens = _input([5, 9, 11], 6)
    zeros = torch.zeros_like(tokens)
    plain = model.score_next(tokens)
    torch.testing.assert_close(model.score_next(tokens, tod=zeros, devices=zeros, segments=zeros, event_types=zeros), plain)
    with_device = model.score_next(tokens, devices=torch.full_like(tokens, 2))
    assert not torch.allclose(with_device, plain, atol=1e-5)


def test_context_without_a_table_is_ignored() -> None:
    torch.manual_seed(0)
    m = BERT4Rec(tiny(n_devices=1, n_tod=1)).eval()
    tokens = _input([5, 9], 5)
    torch.testing.assert_close(
        m.score_next(tokens, devices=torch.full_like(tokens, 4), tod=torch.full_like(tokens, 3)), m.score_next(tokens)
    )


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="divisible"):
        tiny(hidden=18, heads=4)
    with pytest.raises(ValidationError):
        tiny(vocab_size=2)
    with pytest.raises(ValidationError):
        tiny(unknown_field=1)


def test_save_load_round_trip_without_pickle(model: BERT4Rec, tmp_path) -> None:
    save_model(tmp_path / "m", model, model.config, extra={"note": "x"})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "extra.json", "model.safetensors"]
    head = (tmp_path / "m" / "model.safetensors").read_bytes()[:64]
    assert not head.startswith(b"\x80") and b"PK" not in head[:4]  # neither pickle nor torch zip
    loaded, cfg = load_model(tmp_path / "m")
    assert cfg == model.config
    tokens = torch.tensor([[0, 3, 4, 5, 1], [6, 7, 8, 9, 1]])
    torch.testing.assert_close(loaded.score_next(tokens), model.score_next(tokens))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["hidden"] == 16


def test_load_model_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved BERT4Rec model"):
        load_model(tmp_path)
    m = BERT4Rec(tiny())
    save_model(tmp_path, m, m.config)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version"):
        load_model(tmp_path)


def test_presets_build_valid_configs() -> None:
    for name in PRESETS:
        model_cfg, train_cfg = build_configs(name, vocab_size=100, context_sizes={"devices": 4})
        assert model_cfg.vocab_size == 100 and model_cfg.n_devices == 4
    model_cfg, train_cfg = build_configs("default", 100, None, {"hidden": 32, "heads": 4}, {"batching.mask_prob": 0.3})
    assert (model_cfg.hidden, model_cfg.layers, model_cfg.max_len) == (32, 4, 50)
    assert train_cfg.batching.mask_prob == 0.3
    default, _ = build_configs("default", 100)
    assert (default.hidden, default.layers, default.heads, default.max_len) == (256, 4, 8, 50)
    with pytest.raises(ValueError, match="unknown preset"):
        build_configs("nope", 100)


def test_previous_item_path_keeps_padding_invariance() -> None:
    torch.manual_seed(0)
    m = BERT4Rec(tiny(init_std=0.3, previous_item_input=True, input_item_table=True)).eval()
    with torch.no_grad():  # the extra tables start at zero; give them content to test
        m.prev_item_emb.weight.normal_(0, 0.3)
        m.item_in_emb.weight.normal_(0, 0.3)
        m.prev_item_emb.weight[PAD_TOKEN].zero_()
    torch.testing.assert_close(m.score_next(_input([5, 9, 11], 4)), m.score_next(_input([5, 9, 11], 8)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m.score_next(_input([5, 9, 11], 6)), m.score_next(_input([5, 9, 12], 6)), atol=1e-4)


def test_score_next_exports_to_onnx_with_dynamic_batch_and_length(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = BERT4Rec(tiny(init_std=0.3, previous_item_input=True, input_item_table=True)).eval()
    with torch.no_grad():
        model.prev_item_emb.weight[2:].normal_(0, 0.3)
        model.item_in_emb.weight[2:].normal_(0, 0.3)

    class Export(torch.nn.Module):
        def __init__(self, m: BERT4Rec) -> None:
            super().__init__()
            self.m = m

        def forward(self, tokens: torch.Tensor, devices: torch.Tensor) -> torch.Tensor:
            return self.m.score_next(tokens, devices=devices)

    path = tmp_path / "m.onnx"
    tokens = torch.tensor([[0, 0, 5, 6, 1], [2, 3, 4, 5, 1]])
    devices = torch.tensor([[0, 0, 1, 1, 2], [1, 1, 1, 2, 2]])
    batch, length = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("length", min=2, max=8)
    torch.onnx.export(
        Export(model).eval(), (tokens, devices), str(path), input_names=["tokens", "devices"], output_names=["scores"],
        dynamic_shapes={"tokens": {0: batch, 1: length}, "devices": {0: batch, 1: length}}, dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, d in ((tokens, devices), (tokens[:1, 2:], devices[:1, 2:]), (torch.tensor([[7, 8, 9, 10, 11, 12, 13, 1]] * 3), torch.ones(3, 8, dtype=torch.long))):
        got = session.run(None, {"tokens": t.numpy(), "devices": d.numpy()})[0]
        want = model.score_next(t, devices=d).detach().numpy()
        finite = np.isfinite(want)
        assert (np.isfinite(got) == finite).all()
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_mixed_precision_choice_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 on CPU only for wide networks on CPUs with AMX; explicit choices are obeyed."""
    from recsys_assets.bert4rec import train as train_mod
    from recsys_assets.bert4rec.train import TrainConfig, resolve_amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_mod, "_cpu_has_amx_bf16", lambda: True)
    assert resolve_amp(TrainConfig(amp="auto"), cpu, hidden=256) is torch.bfloat16
    assert resolve_amp(TrainConfig(amp="auto"), cpu, hidden=64) is None
    assert resolve_amp(TrainConfig(amp="none"), cpu, hidden=256) is None
    monkeypatch.setattr(train_mod, "_cpu_has_amx_bf16", lambda: False)
    assert resolve_amp(TrainConfig(amp="auto"), cpu, hidden=256) is None
    assert resolve_amp(TrainConfig(amp="bf16"), cpu, hidden=64) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        resolve_amp(TrainConfig(amp="fp16"), cpu)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_last_only_equals_the_last_position_of_the_full_pass(norm_first: bool, layers: int) -> None:
    # scoring and next-item training run the last block for the trailing [MASK] alone
    torch.manual_seed(1)
    m = BERT4Rec(tiny(layers=layers, norm_first=norm_first, init_std=0.3)).eval()
    tokens = torch.tensor([[0, 0, 0, 5, 6, 1], [2, 3, 4, 5, 6, 1], [0, 7, 8, 9, 10, 1]])
    devices = torch.tensor([[0, 0, 0, 1, 2, 2]] * 3)
    with torch.no_grad():
        full = m(tokens, devices=devices)[:, -1:]
        last = m(tokens, devices=devices, last_only=True)
    assert last.shape == (3, 1, 16)
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)
