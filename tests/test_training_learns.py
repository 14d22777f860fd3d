"""A short run on data with planted sequential structure clearly beats popularity; the Dagster
asset trains from the warehouse tables and reports what downstream assets read."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from dagster import build_asset_context

from recsys_assets.bert4rec.data import BatchingConfig, SequenceData
from recsys_assets.bert4rec.model import BERT4RecConfig, load_model
from recsys_assets.bert4rec.train import TrainConfig, evaluate, train
from recsys_assets.evaluation.baselines import PopularityRecommender
from recsys_assets.evaluation.metrics import full_ranks, ranking_metrics
from recsys_assets.resources import PredictionTargetResource

N_ITEMS = 60
FIRST = 2


def planted_sequences(n_users: int = 300, seed: int = 0) -> list[np.ndarray]:
    """Walks over a hidden successor permutation (85% follow it): the next item is predictable
    from the last one, while item popularity is nearly flat."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(N_ITEMS)
    seqs = []
    for _ in range(n_users):
        cur = int(rng.integers(N_ITEMS))
        seq = [cur]
        for _ in range(int(rng.integers(5, 12)) - 1):
            cur = int(successor[cur]) if rng.random() < 0.85 else int(rng.integers(N_ITEMS))
            seq.append(cur)
        seqs.append(np.asarray(seq) + FIRST)
    return seqs


def test_short_training_beats_popularity_by_a_clear_margin(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    seqs = planted_sequences()
    data = SequenceData([f"u{i}" for i in range(len(seqs))], seqs, vocab_size=N_ITEMS + FIRST)
    model_cfg = BERT4RecConfig(vocab_size=data.vocab_size, hidden=32, layers=1, heads=2, max_len=10, dropout=0.1)
    cfg = TrainConfig(
        fit="train+valid", epochs=6, lr=3e-3, num_threads=1, seed=0, checkpoint_every=None,
        batching=BatchingConfig(batch_size=64, windows="prefixes", mask_prob=0.15),
    )
    result = train(model_cfg, cfg, data, tmp_path / "model")
    model, saved_cfg = load_model(result.path)
    split = data.split("train+valid")
    ours = evaluate(model, split.test, saved_cfg.max_len)

    pop = PopularityRecommender(data.vocab_size).fit(split.sequences)
    ranks = full_ranks(pop.score(split.test.histories), split.test.targets, split.test.histories)
    baseline = ranking_metrics(ranks)
    # 85% of next items are predictable from the last one; popularity cannot see that
    assert ours["HR@10"] > 0.6, ours
    assert ours["NDCG@10"] > baseline["NDCG@10"] + 0.3, (ours, baseline)
    assert result.log[-1]["train_loss"] < result.log[0]["train_loss"]


def _warehouse(path: Path) -> None:
    seqs = planted_sequences(120, seed=1)
    rng = np.random.default_rng(1)
    rows = []
    for i, s in enumerate(seqs):
        tokens = s.tolist()
        rows.append({
            "user_id": f"u{i:03d}", "tokens": tokens,
            "event_types": [1] * len(tokens), "tod": rng.integers(1, 7, len(tokens)).tolist(),
            "devices": [1 + i % 2] * len(tokens), "segments": [0] * len(tokens),
            "ts": list(range(len(tokens))), "n_items": len(tokens), "train_tokens": tokens[:-2],
            "valid_item": tokens[-2], "test_item": tokens[-1],
        })
    frame = pl.DataFrame(rows)
    vocab = pl.DataFrame({
        "token": list(range(N_ITEMS + FIRST)), "item_id": ["[PAD]", "[MASK]"] + [f"i{k}" for k in range(N_ITEMS)],
        "category": [None] * (N_ITEMS + FIRST), "count": [0] * (N_ITEMS + FIRST),
        "is_special": [True, True] + [False] * N_ITEMS,
    })
    ctx = pl.DataFrame({"kind": ["device", "device"], "value": ["web", "app"], "token": [1, 2]})
    with duckdb.connect(str(path)) as con:
        for name, df in (("tokenized_sequences", frame), ("item_vocabulary", vocab), ("context_vocabulary", ctx)):
            con.register("df", df.to_arrow())
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM df")
            con.unregister("df")
        con.execute("ALTER TABLE context_vocabulary ALTER token TYPE SMALLINT")


def test_asset_trains_from_the_warehouse(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    from recsys_assets.assets.training import BERT4RecTrainingConfig, bert4rec_model
    from recsys_assets.io_manager import TableRef

    db = tmp_path / "warehouse.duckdb"
    _warehouse(db)
    refs = {name: TableRef(str(db), name) for name in ("tokenized_sequences", "item_vocabulary", "context_vocabulary")}
    config = BERT4RecTrainingConfig(
        preset="synthetic", run_id="test-run", epochs=2, hidden=16, layers=1, heads=2, num_threads=1,
        train_overrides_json=json.dumps({"checkpoint_every": None}),
    )
    context = build_asset_context()
    out = bert4rec_model(context, config, **refs, prediction_target=PredictionTargetResource())
    assert {"path", "run_id", "config", "best_valid", "epochs", "seconds_per_epoch", "fit"} <= out.keys()
    assert out["run_id"] == "test-run" and out["fit"] == "train" and out["epochs"] == 2
    assert out["target"] == {"name": "next_item", "event_types": []}
    assert Path(out["path"]) == tmp_path / "home" / "models" / "test-run"
    assert out["config"]["n_devices"] == 3 and out["config"]["n_segments"] == 1  # segments all unknown
    assert 0.0 <= out["best_valid"]["NDCG@10"] <= 1.0
    log = json.loads((Path(out["path"]) / "training_log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    model, cfg = load_model(out["path"])
    assert cfg.vocab_size == N_ITEMS + FIRST and cfg.hidden == 16
    json.dumps(out)  # the artifact IO manager stores it as JSON


def test_asset_config_rejects_bad_overrides() -> None:
    from recsys_assets.assets.training import BERT4RecTrainingConfig

    with pytest.raises(ValueError, match="not valid JSON"):
        BERT4RecTrainingConfig(model_overrides_json="{oops").overrides()


def test_auto_sizes_by_the_budget_searches_on_validation_and_refits_on_train_valid(tmp_path, monkeypatch) -> None:
    """The default (preset auto): the client's network where the budget affords it, epochs chosen
    on the tuning split, and the returned model refit on all but each user's last item."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    from recsys_assets.assets.training import BERT4RecTrainingConfig, bert4rec_model
    from recsys_assets.bert4rec.sizing import CLIENT_NETWORK, MIN_EPOCHS
    from recsys_assets.io_manager import TableRef

    db = tmp_path / "warehouse.duckdb"
    _warehouse(db)
    refs = {name: TableRef(str(db), name) for name in ("tokenized_sequences", "item_vocabulary", "context_vocabulary")}
    assert BERT4RecTrainingConfig().preset == "auto"
    config = BERT4RecTrainingConfig(run_id="auto-run", budget_minutes=10.0, num_threads=1,
                                    train_overrides_json=json.dumps({"checkpoint_every": None}))
    out = bert4rec_model(build_asset_context(), config, **refs, prediction_target=PredictionTargetResource())
    sizing = out["sizing"]
    assert sizing["network"].startswith("client") and sizing["budget_seconds"] == 600.0
    assert sizing["max_epochs"] >= MIN_EPOCHS and sizing["costs"][0]["affordable_epochs"] >= MIN_EPOCHS
    assert sizing["profile"]["users"] == 120 and len(sizing["reasons"]) >= 2
    assert {k: out["config"][k] for k in ("hidden", "layers", "heads", "max_len")} == {
        k: CLIENT_NETWORK[k] for k in ("hidden", "layers", "heads", "max_len")}
    model_dir = Path(out["path"])
    search_log = json.loads((model_dir / "search" / "training_log.json").read_text())
    assert all("valid_NDCG@10" in r for r in search_log) and len(search_log) <= sizing["max_epochs"]
    best = max(search_log, key=lambda r: r["valid_NDCG@10"])["epoch"]
    assert out["best_epoch"] == best
    assert out["best_valid"]["NDCG@10"] == pytest.approx(max(r["valid_NDCG@10"] for r in search_log))
    # the refit: train+valid, as many epochs as the search's best, no validation
    assert out["fit"] == "train+valid" and out["epochs"] == best
    refit_log = json.loads((model_dir / "training_log.json").read_text())
    assert len(refit_log) == best and not any("valid_NDCG@10" in r for r in refit_log)
    extra = json.loads((model_dir / "extra.json").read_text())
    assert extra["fit"] == "train+valid" and extra["sizing"]["network"] == sizing["network"]
    assert extra["search_best_epoch"] == best
    assert json.loads((model_dir / "sizing.json").read_text())["network"] == sizing["network"]
    json.dumps(out)


def test_auto_falls_back_to_the_smallest_network_when_nothing_fits_and_says_so() -> None:
    from recsys_assets.bert4rec.sizing import CANDIDATE_NETWORKS, choose_training

    seqs = planted_sequences(60, seed=2)
    data = SequenceData(user_ids=[str(i) for i in range(len(seqs))], tokens=seqs, vocab_size=N_ITEMS + FIRST)
    decision = choose_training(data, budget_seconds=0.5, train_overrides={"num_threads": 1}, log=lambda _: None)
    assert [c.network for c in decision.costs] == [name for name, *_ in CANDIDATE_NETWORKS]
    assert decision.network == CANDIDATE_NETWORKS[-1][0] and decision.max_epochs == 1
    assert any("no network affords" in r for r in decision.reasons)
    assert all(c.step_seconds > 0 and c.refit_epoch_seconds >= round(c.step_seconds, 3) * 0.99 for c in decision.costs)


def test_a_time_budget_stops_training_after_the_epoch_it_names(tmp_path) -> None:
    """`stop_after_epoch` (what the sizing's deadline uses) ends the run after that epoch, with the
    best model so far, as early stopping does."""
    seqs = planted_sequences(80, seed=3)
    data = SequenceData([f"u{i}" for i in range(len(seqs))], seqs, vocab_size=N_ITEMS + FIRST)
    model_cfg = BERT4RecConfig(vocab_size=data.vocab_size, hidden=16, layers=1, heads=2, max_len=8)
    cfg = TrainConfig(fit="train", epochs=6, num_threads=1, checkpoint_every=None, patience=None,
                      batching=BatchingConfig(batch_size=64))
    asked: list[int] = []

    def stop(log: list[dict]) -> bool:
        asked.append(len(log))
        assert all("seconds" in r and "valid_NDCG@10" in r for r in log)
        return len(log) == 2

    result = train(model_cfg, cfg, data, tmp_path / "model", stop_after_epoch=stop)
    assert asked == [1, 2] and result.epochs == 2 and result.best_epoch in (1, 2)
