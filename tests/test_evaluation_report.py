"""Evaluation protocol, report files, the gate, and the two Dagster assets on a tiny warehouse."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from _browser import browser_page

from recsys_assets.evaluation.metrics import bootstrap_ci, bootstrap_lift_ci
from recsys_assets.evaluation.protocol import (
    EvalSet,
    evaluate,
    evaluate_many,
    fit_sequences,
    make_eval_set,
    popularity_buckets,
)
from recsys_assets.evaluation.report import gate_decision, gate_passes, write_report
from recsys_assets.io_manager import TableRef
from recsys_assets.resources import PredictionTargetResource


def _rows(seqs: list[list[int]], with_context: bool = False) -> pl.DataFrame:
    data: dict[str, list] = {
        "user_id": [f"u{i}" for i in range(len(seqs))],
        "tokens": seqs,
        "train_tokens": [s[:-2] if len(s) >= 3 else s for s in seqs],
        "valid_item": [s[-2] if len(s) >= 3 else None for s in seqs],
        "test_item": [s[-1] if len(s) >= 3 else None for s in seqs],
        "n_items": [len(s) for s in seqs],
    }
    if with_context:
        data["event_types"] = [[1 + (i % 3) for i in range(len(s))] for s in seqs]
        data["tod"] = [[1 + (i % 6) for i in range(len(s))] for s in seqs]
    return pl.DataFrame(
        data,
        schema_overrides={
            "tokens": pl.List(pl.Int32), "train_tokens": pl.List(pl.Int32),
            "valid_item": pl.Int32, "test_item": pl.Int32,
        },
    )


def test_make_eval_set_splits_and_context() -> None:
    rows = _rows([[2, 3, 4, 5], [6, 7], [3, 2, 4]], with_context=True)
    valid = make_eval_set(rows, "valid")
    assert valid.user_ids.tolist() == ["u0", "u2"]  # u1 has fewer than 3 items
    assert [h.tolist() for h in valid.histories] == [[2, 3], [3]]
    assert valid.targets.tolist() == [4, 2]
    test = make_eval_set(rows, "test")
    assert [h.tolist() for h in test.histories] == [[2, 3, 4], [3, 2]]
    assert test.targets.tolist() == [5, 4]
    assert test.history_lengths.tolist() == [3, 2]
    # Context: history positions plus the request context of the target; its event type hidden.
    assert test.context["tod"][0].tolist() == [1, 2, 3, 4]
    assert test.context["event_types"][0].tolist() == [1, 2, 3, 0]
    assert [s.tolist() for s in fit_sequences(rows, "train")] == [[2, 3], [6, 7], [3]]
    assert [s.tolist() for s in fit_sequences(rows, "train+valid")] == [[2, 3, 4], [6, 7], [3, 2]]


def test_make_eval_set_rejects_broken_contract() -> None:
    bad = _rows([[2, 3, 4, 5]]).with_columns(pl.lit(9, dtype=pl.Int32).alias("test_item"))
    with pytest.raises(ValueError, match="test_item != tokens"):
        make_eval_set(bad, "test")
    with pytest.raises(ValueError, match="columns"):
        make_eval_set(pl.DataFrame({"user_id": ["a"]}), "test")
    with pytest.raises(ValueError, match="fit must be"):
        fit_sequences(_rows([[2, 3, 4]]), "all")  # type: ignore[arg-type]


def test_popularity_buckets_by_cumulative_share() -> None:
    # Items 2..6 with 50, 20, 15, 10, 5 interactions (total 100): share before each item is
    # 0, .5, .7, .85, .95 -> head (first 50%), torso (up to 80%), torso, tail, tail.
    counts = np.array([0, 0, 50, 20, 15, 10, 5, 0])
    assert popularity_buckets(counts)[2:].tolist() == ["head", "torso", "torso", "tail", "tail", "tail"]


def _oracle(eval_set: EvalSet, vocab: int, wrong_every: int = 0):
    """Scores the target highest, except for every `wrong_every`-th user where it scores lowest."""
    lookup = {tuple(h.tolist()): int(t) for h, t in zip(eval_set.histories, eval_set.targets)}

    def score(batch):
        out = np.zeros((len(batch), vocab))
        for i, h in enumerate(batch.histories):
            t = lookup[tuple(h.tolist())]
            out[i, t] = -1.0 if wrong_every and t % wrong_every == 0 else 1.0
        return out

    return score


def _toy_set(users: int = 300, vocab: int = 60, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    seqs = [list(rng.choice(np.arange(2, vocab), size=rng.integers(4, 14), replace=False)) for _ in range(users)]
    rows = _rows([[int(x) for x in s] for s in seqs])
    counts = np.bincount(np.concatenate([np.array(s) for s in seqs]), minlength=vocab).astype(float)
    return rows, counts


def test_evaluate_oracle_and_slices() -> None:
    rows, counts = _toy_set()
    eval_set = make_eval_set(rows, "test")
    result = evaluate(_oracle(eval_set, 60), eval_set, counts, ks=(1, 10), protocols=("full", "sampled_pop20"),
                      batch_size=64, n_bootstrap=200)
    assert result.metrics["full"]["HR@1"] == 1.0 and result.metrics["sampled_pop20"]["MRR"] == 1.0
    assert result.ci["full"]["NDCG@10"] == (1.0, 1.0)
    lengths = result.slices["full"]["history_length"]
    assert set(lengths) == {"1-3", "4-10", "11+"}
    assert sum(v["n_users"] for v in lengths.values()) == len(eval_set)
    pops = result.slices["full"]["popularity"]
    assert sum(v["n_users"] for v in pops.values()) == len(eval_set)

    half = evaluate(_oracle(eval_set, 60, wrong_every=2), eval_set, counts, ks=(1,), protocols=("full",), n_bootstrap=200)
    even = (eval_set.targets % 2 == 0)
    assert half.metrics["full"]["HR@1"] == pytest.approx(1 - even.mean())
    lo, hi = half.ci["full"]["HR@1"]
    assert lo < half.metrics["full"]["HR@1"] < hi
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(_oracle(eval_set, 60), eval_set, counts, protocols=("sampled_uniform",))


def test_evaluate_many_shares_negatives_and_rejects_bad_scorer() -> None:
    rows, counts = _toy_set()
    eval_set = make_eval_set(rows, "valid")
    rng = np.random.default_rng(5)
    fixed = rng.random(60)
    const = lambda b: np.tile(fixed, (len(b), 1))  # noqa: E731
    a = evaluate_many({"a": const, "b": const}, eval_set, counts, protocols=("sampled_pop30",), n_bootstrap=50)
    assert np.array_equal(a["a"].ranks["sampled_pop30"], a["b"].ranks["sampled_pop30"])
    with pytest.raises(ValueError, match="scorer returned shape"):
        evaluate(lambda b: np.zeros((1, 60)), eval_set, counts, protocols=("full",))


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(0)
    values = {"x": rng.random(4000)}
    lo, hi = bootstrap_ci(values, 500, seed=1)["x"]
    se = values["x"].std() / np.sqrt(4000)
    assert lo < values["x"].mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    lo, hi = bootstrap_lift_ci(values["x"] * 1.5, values["x"], 200)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def _doc(b4r: float, knn: float, champion: float | None = None, status: str | None = None) -> dict:
    doc: dict = {
        "dataset": {"fingerprint": "f"},
        "config": {"fit": "train"},
        "models": {
            "bert4rec": {"full": {"NDCG@10": b4r}},
            "popularity": {"full": {"NDCG@10": 0.005}},
            "item_knn": {"full": {"NDCG@10": knn}},
        },
    }
    if champion is not None:
        doc["models"]["champion"] = {"full": {"NDCG@10": champion}}
    if status is not None:
        doc["champion"] = {"status": status, "version": "v1", "reason": "model.onnx sha256 differs"}
    return doc


def test_gate() -> None:
    ok, reasons = gate_passes(_doc(0.05, 0.03))
    assert ok and any("no champion promoted yet" in r for r in reasons)
    ok, reasons = gate_passes(_doc(0.02, 0.03))
    assert not ok and any("does not beat item_knn" in r for r in reasons)
    # The champion's figure comes from the same report; within the tolerance a tie promotes (a
    # fresh retrain replaces it), and the champion is no baseline to beat strictly.
    decision = gate_decision(_doc(0.05, 0.03, champion=0.0505, status="scored"), tolerance=0.02)
    assert decision["passed"] and decision["champion"] == 0.0505 and decision["challenger"] == 0.05
    assert decision["threshold"] == pytest.approx(0.0505 * 0.98) and decision["margin"] == pytest.approx(0.05 / 0.0505 - 1)
    assert sum("champion" in r for r in decision["reasons"]) == 1
    assert not any("beat champion" in r for r in decision["reasons"])
    ok, reasons = gate_passes(_doc(0.05, 0.03, champion=0.06, status="scored"), tolerance=0.02)
    assert not ok and any(r.startswith("below champion v1 on the same data") for r in reasons)
    assert not gate_passes(_doc(0.05, 0.03, champion=0.0505), tolerance=0.0)[0]  # no tolerance: a loss is a loss
    # beating the champion does not excuse losing to a baseline
    assert not gate_passes(_doc(0.05, 0.06, champion=0.01, status="scored"), tolerance=0.02)[0]
    # A champion that could not be scored: baselines only, saying why.
    decision = gate_decision(_doc(0.05, 0.03, status="refused"), tolerance=0.02)
    assert decision["passed"] and decision["champion"] is None and decision["champion_status"] == "refused"
    assert any("champion v1 could not be scored (model.onnx sha256 differs)" in r for r in decision["reasons"])
    # Scored but its figure missing from the report: refused.
    assert not gate_passes(_doc(0.05, 0.03, status="scored"), tolerance=0.02)[0]
    assert not gate_passes({"models": {}})[0]
    with pytest.raises(ValueError, match="tolerance"):
        gate_passes(_doc(0.05, 0.03), tolerance=1.0)


def test_write_report_and_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    rows, counts = _toy_set()
    eval_set = make_eval_set(rows, "test")
    fixed = np.random.default_rng(2).random(60)
    scorers = {
        "bert4rec": _oracle(eval_set, 60, wrong_every=3),
        "champion": _oracle(eval_set, 60, wrong_every=2),
        "popularity": lambda b: np.tile(counts, (len(b), 1)),
        "item_knn": lambda b: np.tile(fixed, (len(b), 1)),
    }
    results = evaluate_many(scorers, eval_set, counts, ks=(5, 10), protocols=("full", "sampled_pop20"), n_bootstrap=100)
    log = [{"epoch": e, "train_loss": 5 - e * 0.1, "valid_NDCG@10": 0.01 * e} for e in range(1, 6)]
    doc, paths = write_report(
        results, dataset={"name": "toy", "fingerprint": "abc"}, config={"fit": "train", "split": "test"},
        training_log=log, run_id="run1", gate=lambda d: gate_decision(d, 0.02), user_ids=eval_set.user_ids,
        n_bootstrap=100, champion={"status": "scored", "version": "v7", "scores": "exact", "unknown_target_share": 0.0},
    )
    assert paths.run_dir == tmp_path / "reports" / "evaluation" / "run1"
    saved = json.loads(paths.metrics_json.read_text())
    assert set(saved["models"]) == {"bert4rec", "champion", "popularity", "item_knn"}
    assert set(saved["models"]["bert4rec"]) == {"full", "sampled_pop20"}
    assert saved["models"]["bert4rec"]["full"]["HR@10"] == pytest.approx(results["bert4rec"].metrics["full"]["HR@10"])
    lift = saved["lift"]["popularity"]["full"]["NDCG@10"]
    assert lift["relative"] == pytest.approx(lift["model"] / lift["baseline"] - 1)
    assert lift["ci"][0] <= lift["relative"] <= lift["ci"][1]
    assert saved["gate"]["passed"] is True and saved["champion"]["version"] == "v7"
    # the champion sits beside the models, compared once (not as a baseline), its figure in the gate
    assert saved["gate"]["champion"] == pytest.approx(saved["models"]["champion"]["full"]["NDCG@10"])
    assert not any("beat champion" in r for r in saved["gate"]["reasons"])
    assert "champion" in saved["lift"] and "champion" in saved["slices"]
    assert set(paths.plots) == {"metrics", "slices", "training"}
    page = paths.report_html.read_text()
    assert page.count("data:image/png;base64,") == 3 and "Relative lift" in page
    assert "<h2>Champion</h2>" in page and "v7" in page
    # Summary first, in words: who was compared, who won by how much, what the gate decided.
    summary = page.split("<h2>Summary</h2>", 1)[1].split("</p>", 1)[0]
    assert page.index("<h2>Summary</h2>") < page.index("<h2>Gate")
    assert "BERT4Rec was compared with" in summary and "item-kNN collaborative filtering" in summary
    best = max(("champion", "popularity", "item_knn"), key=lambda m: saved["models"][m]["full"]["NDCG@10"])
    rel = saved["lift"][best]["full"]["NDCG@10"]["relative"]
    assert f"{rel:+.1%}" in summary and "The evaluation gate passed" in summary
    # One slice table, a column per model, intervals; the metric definitions; raw config folded away.
    assert page.count("NDCG@10 by slice") == 2  # the plot's heading and the table's
    assert all(f"<th>{m} NDCG@10</th>" in page for m in saved["slices"])
    slice_ci = saved["slices"]["bert4rec"]["full"]["history_length"]
    assert all(v["ci"]["NDCG@10"][0] <= v["NDCG@10"] <= v["ci"]["NDCG@10"][1] for v in slice_ci.values())
    assert "<dt><b>NDCG@K</b></dt>" in page and "<details><summary>Configuration (raw)</summary>" in page
    ranks = np.load(paths.run_dir / "ranks.npz")
    assert np.array_equal(ranks["bert4rec/full"], results["bert4rec"].ranks["full"])
    latest = tmp_path / "reports" / "evaluation" / "latest"
    assert json.loads((latest / "metrics.json").read_text())["run_id"] == "run1"
    _the_report_reads_well_in_a_browser(paths.report_html, tmp_path)

    # A second run replaces latest; the first run's directory stays; no stray copies remain.
    write_report(results, dataset={"name": "toy"}, config={"fit": "train"}, run_id="run2", n_bootstrap=20)
    assert json.loads((latest / "metrics.json").read_text())["run_id"] == "run2"
    assert (tmp_path / "reports" / "evaluation" / "run1" / "metrics.json").exists()
    hidden = [p.name for p in (tmp_path / "reports" / "evaluation").iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1
    with pytest.raises(FileExistsError):
        write_report(results, dataset={}, config={}, run_id="run2", n_bootstrap=20)
    with pytest.raises(ValueError, match="run_id"):
        write_report(results, dataset={}, config={}, run_id="../x", n_bootstrap=20)


def _the_report_reads_well_in_a_browser(report: Path, shots: Path, width: int = 1280) -> None:
    """In headless Chromium: the summary comes first and shows, every plot loads and fits the
    window, nothing needs horizontal scrolling, the raw config stays folded until clicked."""
    with browser_page(width=width) as page:
        page.goto(report.as_uri())
        page.screenshot(path=str(shots / "report.png"), full_page=True)
        assert page.locator("h2").all_inner_texts()[0] == "Summary"
        assert page.locator("p.summary").is_visible()
        images = page.evaluate(
            "() => [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0, i.getBoundingClientRect().width])"
        )
        assert len(images) == 3 and all(loaded and 0 < shown <= width for _, loaded, shown in images), images
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
        assert page.get_by_text("NDCG@K", exact=True).is_visible()
        raw = page.locator("details pre")
        assert not raw.is_visible()
        page.locator("details summary").click()
        assert raw.is_visible() and '"fit": "train"' in raw.inner_text()


# --------------------------------------------------------------------------- assets


def _warehouse(tmp_path: Path, users: int = 120, vocab: int = 30) -> tuple[TableRef, TableRef]:
    """tokenized_sequences and item_vocabulary per docs/DATA_CONTRACTS.md, with a strong
    next-item pattern (item t is mostly followed by t + 1)."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(users):
        start, n = int(rng.integers(2, vocab - 8)), int(rng.integers(4, 9))
        seqs.append([min(start + i, vocab - 1) if rng.random() > 0.1 else int(rng.integers(2, vocab)) for i in range(n)])
    rows = _rows(seqs, with_context=True)
    counts = np.bincount(np.concatenate([np.array(s) for s in seqs]), minlength=vocab)
    vocab_frame = pl.DataFrame(
        {
            "token": list(range(vocab)),
            "item_id": ["[PAD]", "[MASK]"] + [f"item{t}" for t in range(2, vocab)],
            "category": [None, None] + [("cat_a" if t % 2 else "cat_b") for t in range(2, vocab)],
            "count": counts.tolist(),
            "is_special": [True, True] + [False] * (vocab - 2),
        },
        schema_overrides={"token": pl.Int32, "count": pl.Int64},
    )
    context_frame = pl.DataFrame({"kind": ["device"], "value": ["web"], "token": [1]}, schema_overrides={"token": pl.Int16})
    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        for name, frame in (("tokenized_sequences", rows), ("item_vocabulary", vocab_frame), ("context_vocabulary", context_frame)):
            con.register("incoming", frame.to_arrow())
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM incoming")
            con.unregister("incoming")
    return TableRef(str(db), "tokenized_sequences"), TableRef(str(db), "item_vocabulary")


def test_assets_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from dagster import AssetSpec, materialize

    from recsys_assets.assets import evaluation as stage
    from recsys_assets.bert4rec import BERT4Rec, BERT4RecConfig, save_model
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager

    home = tmp_path / "home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    seqs_ref, _ = _warehouse(tmp_path)
    torch.manual_seed(0)
    cfg = BERT4RecConfig(vocab_size=30, hidden=16, layers=1, heads=2, max_len=8)
    model_dir = tmp_path / "model"
    save_model(model_dir, BERT4Rec(cfg), cfg, extra={"fit": "train", "best_epoch": 1})
    (model_dir / "training_log.json").write_text(json.dumps([{"epoch": 1, "train_loss": 3.3, "valid_NDCG@10": 0.1}]))
    (home / "artifacts").mkdir(parents=True)
    (home / "artifacts" / "bert4rec_model.json").write_text(json.dumps({"path": str(model_dir)}))

    upstream = [
        AssetSpec("tokenized_sequences").with_io_manager_key("warehouse_io_manager"),
        AssetSpec("item_vocabulary").with_io_manager_key("warehouse_io_manager"),
        AssetSpec("context_vocabulary").with_io_manager_key("warehouse_io_manager"),
        AssetSpec("bert4rec_model").with_io_manager_key("artifact_io_manager"),
    ]
    knobs = {"n_bootstrap": 20, "protocols": ["full", "sampled_pop10", "sampled_pop100"]}
    resources = {
        "warehouse_io_manager": DuckDBTableIOManager(database=seqs_ref.database),
        "artifact_io_manager": JsonArtifactIOManager(),
        "prediction_target": PredictionTargetResource(),
    }

    def run(report_config: dict):
        return materialize(
            [*upstream, *stage.assets, *stage.asset_checks], resources=resources, raise_on_error=False,
            run_config={"ops": {"baselines": {"config": knobs},
                                "evaluation_report": {"config": {**knobs, "device": "cpu", **report_config}}}},
        )

    result = run({"dataset_name": "toy"})
    assert result.success
    base = json.loads((home / "artifacts" / "baselines.json").read_text())
    assert base["split"] == "valid" and base["fit"] == "train"
    assert set(base["metrics"]) == {"popularity", "item_knn", "last_item"}
    # 28 items cannot give 100 negatives outside every history: that protocol is dropped.
    assert base["protocols"] == ["full", "sampled_pop10"]
    # The data follows t -> t + 1, so the transition baseline must beat popularity.
    assert base["metrics"]["last_item"]["full"]["NDCG@10"] > base["metrics"]["popularity"]["full"]["NDCG@10"]

    out = json.loads((home / "artifacts" / "evaluation_report.json").read_text())
    assert out["fit"] == "train" and out["split"] == "test"
    assert set(out["metrics"]) == {"bert4rec", "popularity", "item_knn", "last_item"}
    # An untrained network does not beat the transition baseline: the gate must say so.
    assert out["gate"]["passed"] is False
    # Nothing promoted yet: no champion in the report, and the gate says it compared with baselines only.
    assert out["champion"]["status"] == "none" and "champion" not in out["metrics"]
    assert any("no champion promoted yet" in r for r in out["gate"]["reasons"])
    checks = result.get_asset_check_evaluations()
    assert [c.check_name for c in checks] == ["evaluation_gate"] and checks[0].passed is False
    saved = json.loads(Path(out["metrics_json"]).read_text())
    assert saved["dataset"]["name"] == "toy" and saved["config"]["fit"] == "train"
    assert "category" in saved["slices"]["bert4rec"]["full"]
    assert saved["training"][0]["epoch"] == 1
    assert (home / "reports" / "evaluation" / "latest" / "report.html").exists()
    meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "data:image/png;base64," in meta["plot_metrics"].value and "bert4rec" in meta["headline"].value

    # Baselines on other fit data than the model's are refused.
    failed = run({"fit": "train+valid"})
    assert not failed.success
    errors = [e.event_specific_data.error for e in failed.all_events if e.is_step_failure]
    assert any("same data" in (err.cause.message if err.cause else err.message) for err in errors)
