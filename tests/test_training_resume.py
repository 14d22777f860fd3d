"""A run interrupted after N steps and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recsys_assets.bert4rec.data import BatchingConfig, SequenceData
from recsys_assets.bert4rec.model import BERT4RecConfig
from recsys_assets.bert4rec.train import TrainConfig, TrainEvent, train


class Killed(Exception):
    pass


def _data() -> SequenceData:
    rng = np.random.default_rng(0)
    tokens = [rng.integers(2, 30, size=int(rng.integers(3, 9))) for _ in range(40)]
    return SequenceData([f"u{i}" for i in range(40)], tokens, vocab_size=30)


def _configs(fit: str) -> tuple[BERT4RecConfig, TrainConfig]:
    model = BERT4RecConfig(vocab_size=30, hidden=16, layers=1, heads=2, max_len=8, dropout=0.2)
    trainer = TrainConfig(
        fit=fit, epochs=3, seed=5, num_threads=1, checkpoint_every=4, patience=None, amp="none",
        batching=BatchingConfig(batch_size=16, windows="prefixes", mask_prob=0.3),
    )
    return model, trainer


def _kill_at(step: int):
    def progress(event: TrainEvent) -> None:
        if event.kind == "step" and event.global_step == step:
            raise Killed(f"killed after step {step}")

    return progress


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(("fit", "kill_step"), [("train", 10), ("train+valid", 8)])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, fit: str, kill_step: int) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    data = _data()
    model_cfg, cfg = _configs(fit)
    full = train(model_cfg, cfg, data, tmp_path / "full")

    with pytest.raises(Killed):
        train(model_cfg, cfg, data, tmp_path / "resumed", progress=_kill_at(kill_step))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    steps: list[int] = []
    resumed = train(model_cfg, cfg, data, tmp_path / "resumed", progress=lambda e: steps.append(e.global_step))
    assert steps[0] == (kill_step - 1) // 4 * 4  # the latest checkpoint before the kill (every 4 steps)

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = lambda log: [{k: v for k, v in r.items() if "seconds" not in k} for r in log]  # noqa: E731
    assert strip(full.log) == strip(resumed.log)
    assert full.best_epoch == resumed.best_epoch
    saved_log = json.loads((tmp_path / "resumed" / "training_log.json").read_text())
    assert [r["epoch"] for r in saved_log] == [1, 2, 3]
    assert {"epoch", "train_loss", "lr", "seconds"} <= saved_log[0].keys()
    if fit == "train":
        assert "valid_NDCG@10" in saved_log[0] and "valid_HR@10" in saved_log[0]


def test_resuming_into_another_configuration_is_refused(tmp_path) -> None:
    data = _data()
    model_cfg, cfg = _configs("train")
    with pytest.raises(Killed):
        train(model_cfg, cfg, data, tmp_path / "run", progress=_kill_at(5))
    other = cfg.model_copy(update={"lr": 0.5})
    with pytest.raises(ValueError, match="another configuration"):
        train(model_cfg, other, data, tmp_path / "run")
    # starting over explicitly is allowed
    fresh = train(model_cfg, other.model_copy(update={"resume": False, "epochs": 1}), data, tmp_path / "run")
    assert fresh.epochs == 1
