"""Model bundle: write-once layout, checksum/format refusal (also by the server), popularity and
vocabulary from the warehouse, the evaluation gate, atomic promotion and rollback."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch

from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig
from recsys_assets.export.bundle import (
    CURRENT,
    current_version,
    data_window,
    evaluate_gate,
    export_bundle,
    model_spec_for,
    popularity_document,
    promote,
    promotion_history,
    rollback,
    vocabulary_document,
    write_bundle,
)
from recsys_assets.export.onnx_export import ExportReport, export_onnx
from recsys_serving import bundle as fmt
from recsys_serving.bundle import BundleRefused, load_bundle, salvage_popularity, verify_bundle
from recsys_serving.contract import time_of_day_token
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.model import History, OnnxRanker, MaskContext, encode
from recsys_serving.recommender import Recommender
from recsys_serving.schemas import RecommendRequest
from recsys_serving.settings import ServingSettings

ITEMS = [f"item-{i}" for i in range(60)]
VOCABULARY = {"items": ITEMS, "categories": None, "context": {"device": {"mobile": 1}, "segment": {}}}
POPULARITY = {
    "global": [{"item_id": i, "score": 1.0 / (r + 1)} for r, i in enumerate(ITEMS[:40])],
    "groups": [{"context": {"device": "mobile"}, "items": [{"item_id": i, "score": 0.1} for i in ITEMS[20:30]]}],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[BERT4RecConfig, ExportReport]:
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=len(ITEMS) + 2, hidden=16, layers=1, heads=2, max_len=10, n_devices=2)
    report = export_onnx(BERT4Rec(config).eval(), config, tmp_path_factory.mktemp("onnx") / "model.onnx", top_k=20)
    return config, report


def _metrics(
    ndcg: float, popularity: float = 0.05, fingerprint: str = "data-1", champion: tuple[str, float] | None = None
) -> dict[str, Any]:
    """An evaluation report; `champion` (version, NDCG@10): the served bundle scored in the same report."""
    doc: dict[str, Any] = {
        "models": {
            "bert4rec": {"full": {"NDCG@10": ndcg}},
            "popularity": {"full": {"NDCG@10": popularity}},
            "item_knn": {"full": {"NDCG@10": popularity * 1.5}},
        },
        "dataset": {"fingerprint": fingerprint},
        "config": {"fit": "train"},
    }
    if champion is not None:
        doc["models"]["champion"] = {"full": {"NDCG@10": champion[1]}}
        doc["champion"] = {"status": "scored", "version": champion[0]}
    return doc


def _write(root: Path, exported: tuple[BERT4RecConfig, ExportReport], version: str, ndcg: float = 0.1) -> Path:
    config, report = exported
    info = write_bundle(
        root,
        Path(report.path),
        VOCABULARY,
        POPULARITY,
        model_spec_for(config, report),
        metrics=_metrics(ndcg),
        data_window={"start": None, "end": None},
        version=version,
    )
    return Path(info.path)


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_bundle_is_complete_write_once_and_loads(tmp_path: Path, exported: tuple[BERT4RecConfig, ExportReport]) -> None:
    path = _write(tmp_path, exported, "v1")
    manifest = verify_bundle(path)
    assert manifest.format_version == fmt.BUNDLE_FORMAT_VERSION
    assert set(manifest.files) == {"model.onnx", "vocabulary.json", "popularity.json"}
    assert manifest.metrics["models"]["bert4rec"]["full"]["NDCG@10"] == 0.1
    assert all((p.stat().st_mode & 0o222) == 0 for p in path.iterdir()), "bundle files must be read-only"
    assert not list(tmp_path.glob(".staging-*")), "staging directories must not be left behind"
    with pytest.raises(FileExistsError):
        _write(tmp_path, exported, "v1")
    loaded = load_bundle(path)
    ranker = OnnxRanker(loaded, intra_threads=1, use_gpu=False, cache_dir=tmp_path / "cache")
    assert ranker.input_names == manifest.model.inputs


def test_quantized_bundle_serves_the_fp32_ranking(tmp_path: Path) -> None:
    """A bundle exported with the int8 two-stage head loads in the server's ranker and answers with
    the fp32 bundle's items and scores (the rescoring is exact)."""
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=len(ITEMS) + 2, hidden=16, layers=1, heads=2, max_len=10, n_devices=2)
    model = BERT4Rec(config).eval()
    with torch.no_grad():
        model.item_emb.weight.normal_(0, 0.5)
    root = tmp_path / "bundles"
    built = {
        table: export_bundle(root, model, config, VOCABULARY, POPULARITY, tmp_path / table, top_k=20,
                             item_table=table, rescore_candidates=32, version=table)
        for table in ("fp32", "int8")
    }
    manifest = verify_bundle(Path(built["int8"].path))
    assert manifest.export["onnx"]["item_table"] == "int8" and manifest.export["onnx"]["rescore_candidates"] == 32
    assert manifest.model.outputs == ["top_scores", "top_tokens"]
    rankers = {t: OnnxRanker(load_bundle(Path(b.path)), intra_threads=1, use_gpu=False, cache_dir=tmp_path / "cache")
               for t, b in built.items()}
    for items in (["item-3", "item-7", "item-11"], ITEMS[:30]):
        history = History(item_ids=items, devices=["mobile"] * len(items))
        answers = {}
        for table, ranker in rankers.items():
            encoded = encode(history, MaskContext(tod=2, device="mobile"), ranker.vocabulary, ranker.max_len,
                             ranker.input_names)
            assert encoded is not None
            answers[table] = ranker.decode(*ranker.rank(encoded.feeds), k=10)
        assert [i for i, _ in answers["int8"]] == [i for i, _ in answers["fp32"]]
        assert not {i for i, _ in answers["int8"]} & set(items)
        np.testing.assert_allclose([s for _, s in answers["int8"]], [s for _, s in answers["fp32"]], atol=1e-4)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda p: (p / "vocabulary.json").write_text((p / "vocabulary.json").read_text().replace("item-1", "item-X")), "sha256"),
        (lambda p: (p / "popularity.json").write_text("{}"), "bytes"),
        (lambda p: (p / "model.onnx").unlink(), "missing"),
        (lambda p: (p / "extra.bin").write_bytes(b"x"), "not in the manifest"),
        (
            lambda p: (p / "manifest.json").write_text(
                json.dumps({**json.loads((p / "manifest.json").read_text()), "format_version": 2})
            ),
            "format_version 2 is not understood",
        ),
        (
            lambda p: (p / "manifest.json").write_text(
                json.dumps({**json.loads((p / "manifest.json").read_text()), "new_field": 1})
            ),
            "new_field",
        ),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    ],
    ids=["checksum", "size", "missing-file", "unlisted-file", "format-version", "unknown-field", "bad-json"],
)
def test_tampered_bundles_are_refused(
    tmp_path: Path, exported: tuple[BERT4RecConfig, ExportReport], tamper: Any, reason: str
) -> None:
    good = _write(tmp_path / "bundles", exported, "v1")
    bad = _writable_copy(good, tmp_path / "bad")
    tamper(bad)
    with pytest.raises(BundleRefused) as err:
        load_bundle(bad)
    assert reason in err.value.reason


def test_server_refuses_a_tampered_bundle_and_serves_fallback(
    tmp_path: Path, exported: tuple[BERT4RecConfig, ExportReport], monkeypatch: pytest.MonkeyPatch
) -> None:
    import prometheus_client

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    good = _write(tmp_path / "bundles", exported, "v1")
    bad = _writable_copy(good, tmp_path / "bad")
    model = bad / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # one byte of the weights
    settings = ServingSettings.from_env(bundle_path=str(bad), feature_repo=str(tmp_path / "no_repo"))
    recommender = Recommender(settings, ServiceMetrics(registry=prometheus_client.CollectorRegistry()))
    health = recommender.health()
    assert health.degraded and health.status == "degraded" and "model.onnx sha256" in (health.reason or "")
    assert health.model_version is None
    answer = asyncio.run(recommender.recommend(RecommendRequest(user_id="u", k=3, recent_items=["item-0"])))
    assert answer.fallback and answer.reason == "model_unavailable"
    # the popularity file still verifies, so the fallback is the bundle's list minus the history
    assert [i.item_id for i in answer.items] == ["item-1", "item-2", "item-3"]
    assert salvage_popularity(bad) is not None
    (bad / "popularity.json").write_text("{}")
    assert salvage_popularity(bad) is None


def _lists(doc: dict[str, Any], *dimensions: str) -> dict[tuple[str, ...], list[str]]:
    """A popularity document's lists specific to exactly these dimensions: {values: item ids}."""
    return {
        tuple(g["context"][d] for d in dimensions): [e["item_id"] for e in g["items"]]
        for g in doc["groups"]
        if set(g["context"]) == set(dimensions)
    }


def test_popularity_vocabulary_and_window_from_the_warehouse(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute(
        """CREATE TABLE cleaned_interactions AS SELECT * FROM (VALUES
           ('u1','a',TIMESTAMP '2024-01-01','mobile','vip'), ('u2','a',TIMESTAMP '2024-03-01','mobile','vip'),
           ('u3','a',TIMESTAMP '2024-03-02','desktop',NULL), ('u1','b',TIMESTAMP '2024-03-02','desktop',NULL),
           ('u2','b',TIMESTAMP '2024-03-03','desktop','vip'), ('u3','c',TIMESTAMP '2024-03-03','mobile',NULL),
           ('u4','c',TIMESTAMP '2024-03-03','mobile',NULL), ('u5','c',TIMESTAMP '2024-03-04',NULL,NULL))
           t(user_id, item_id, ts, device, segment)"""
    )
    con.execute(
        """CREATE TABLE item_vocabulary AS SELECT * FROM (VALUES
           (0,'[PAD]',NULL,0,true),(1,'[MASK]',NULL,0,true),(2,'a','x',3,false),(3,'c',NULL,3,false),(4,'b','y',2,false))
           t(token,item_id,category,count,is_special)"""
    )
    con.execute(
        "CREATE TABLE context_vocabulary AS SELECT * FROM (VALUES ('device','mobile',1),('device','desktop',2)) t(kind,value,token)"
    )
    vocab = vocabulary_document(con, "item_vocabulary", "context_vocabulary")
    assert vocab["items"] == ["a", "c", "b"] and vocab["categories"] == ["x", None, "y"]
    assert vocab["context"]["device"] == {"mobile": 1, "desktop": 2}

    pop = popularity_document(con, "cleaned_interactions", window_days=30, top_global=100, top_group=100,
                              min_group_events=2, prior_events=0)
    assert pop["window"]["days"] == 30
    # 2024-01-01 is outside the 30 days before 2024-03-04: 'a' counts 2, 'c' 3, 'b' 2 -> c first, ties by id
    assert [e["item_id"] for e in pop["global"]] == ["c", "a", "b"]
    assert abs(pop["global"][0]["score"] - 3 / 7) < 1e-9
    assert _lists(pop, "device") == {("mobile",): ["c", "a"], ("desktop",): ["b", "a"]}
    assert _lists(pop, "segment") == {("vip",): ["a", "b"]}  # min_group_events=2: 'vip' has 2 events in the window
    assert _lists(pop, "time_of_day") == {("1",): ["c", "a", "b"]}  # every event at midnight: bucket 1
    assert set(_lists(pop, "device", "time_of_day")) == {("mobile", "1"), ("desktop", "1")}
    assert _lists(pop, "device", "segment") == {}  # one event each
    # shrunk towards global: desktop's 3 events (b 2, a 1) weigh little against 1,000 events of prior
    shrunk = popularity_document(con, "cleaned_interactions", window_days=30, top_global=100, top_group=100,
                                 min_group_events=2, prior_events=1000)
    desktop = next(g["items"] for g in shrunk["groups"] if g["context"] == {"device": "desktop"})
    assert [e["item_id"] for e in desktop] == ["c", "b", "a"]  # c: never on desktop, but 3/7 of all events
    assert abs(desktop[0]["score"] - 1000 * 3 / 7 / (3 + 1000)) < 1e-9
    assert abs(desktop[1]["score"] - (2 + 1000 * 2 / 7) / (3 + 1000)) < 1e-9
    assert shrunk["global"] == pop["global"]  # global is its own prior
    everything = popularity_document(con, "cleaned_interactions", window_days=None, top_global=100, top_group=100)
    assert [e["item_id"] for e in everything["global"]] == ["a", "c", "b"]
    assert everything["groups"] == []  # every context below min_group_events=100
    window = data_window(con, "cleaned_interactions")
    assert window["interactions"] == 8 and window["users"] == 5 and window["items"] == 3

    con.execute("DELETE FROM item_vocabulary WHERE token = 3")
    with pytest.raises(ValueError, match="contiguous"):
        vocabulary_document(con, "item_vocabulary", None)


def test_popularity_lists_per_time_of_day_and_the_cap_on_groups() -> None:
    """Time of day is bucketed as serving buckets a request's ts (the contract's function), and a
    column of many values keeps only its `max_groups` largest groups."""
    con = duckdb.connect()
    rows = [(f"u{n}", "late", f"2024-03-01 {hour:02d}:30:00", "mobile", f"s{n % 10}")
            for n, hour in enumerate([21, 22, 23, 21] * 5)]
    rows += [(f"v{n}", "early", f"2024-03-02 {hour:02d}:10:00", "desktop", f"s{n % 3}")
             for n, hour in enumerate([5, 6, 7] * 4)]
    con.execute("CREATE TABLE cleaned_interactions (user_id VARCHAR, item_id VARCHAR, ts TIMESTAMP, device VARCHAR, segment VARCHAR)")
    con.executemany("INSERT INTO cleaned_interactions VALUES (?, ?, ?, ?, ?)", rows)
    doc = popularity_document(con, "cleaned_interactions", window_days=None, top_global=100, top_group=100,
                              min_group_events=2, max_groups=3, prior_events=0)
    late, early = (str(time_of_day_token(h)) for h in (21, 5))
    assert {late, str(time_of_day_token(23)), early, str(time_of_day_token(7))} == {late, early}  # 4-hour buckets
    assert _lists(doc, "time_of_day") == {(late,): ["late"], (early,): ["early"]}
    assert _lists(doc, "device", "time_of_day") == {("mobile", late): ["late"], ("desktop", early): ["early"]}
    # segments s0..s9: s0, s1, s2 have the most events (2 each from mobile, 4 each from desktop)
    assert set(_lists(doc, "segment")) == {("s0",), ("s1",), ("s2",)}
    # capped as well: the desktop combinations (4 events each) beat the mobile ones (2 each)
    assert set(_lists(doc, "device", "segment")) == {("desktop", "s0"), ("desktop", "s1"), ("desktop", "s2")}
    popularity = fmt.Popularity.model_validate(doc)
    assert popularity.choose("desktop", "s1", time_of_day_token(6))[1] == f"device=desktop,segment=s1,time_of_day={early}"
    assert popularity.choose("mobile", "s0", time_of_day_token(22))[1] == f"device=mobile,time_of_day={late}"
    assert popularity.knows("segment", "s0") and not popularity.knows("segment", "s9")


def _popularity_for_every_context(device: str, segment: str, tod: int) -> dict[str, Any]:
    """A document with one list for every combination of dimensions of this context (each list's
    single item names its combination) and lists for other values that must never be chosen."""
    values = {"device": device, "segment": segment, "time_of_day": str(tod)}
    groups = []
    for dims in fmt.POPULARITY_CHOICE_ORDER:
        name = "+".join(dims)
        groups.append({"context": {d: values[d] for d in dims}, "items": [{"item_id": name, "score": 1.0}]})
        groups.append({"context": {d: "other" if d != "time_of_day" else str(tod % 6 + 1) for d in dims},
                       "items": [{"item_id": "wrong", "score": 1.0}]})
    return {"global": [{"item_id": "global", "score": 1.0}, {"item_id": "wrong", "score": 0.5}], "groups": groups}


def test_popularity_choice_goes_from_all_three_dimensions_to_pairs_singles_and_global() -> None:
    doc = _popularity_for_every_context("mobile", "vip", 6)
    order = [len(dims) for dims in fmt.POPULARITY_CHOICE_ORDER]
    assert order == sorted(order, reverse=True) and order[0] == 3 and sorted(order) == [1, 1, 1, 2, 2, 2, 3]
    values = {"device": "mobile", "segment": "vip", "time_of_day": "6"}
    chosen = []
    while True:
        items, name = fmt.Popularity.model_validate(doc).choose("mobile", "vip", 6)
        chosen.append(items[0].item_id)
        if name == "global":
            break
        assert name == ",".join(f"{d}={values[d]}" for d in items[0].item_id.split("+"))
        doc["groups"] = [g for g in doc["groups"] if "+".join(g["context"]) != items[0].item_id]  # the next one answers
    assert chosen == ["+".join(dims) for dims in fmt.POPULARITY_CHOICE_ORDER] + ["global"]

    full = fmt.Popularity.model_validate(_popularity_for_every_context("mobile", "vip", 6))
    assert full.choose("mobile", "vip", None)[0][0].item_id == "device+segment"  # time of day unknown: skipped
    assert full.choose("mobile", "vip", 0)[0][0].item_id == "device+segment"  # the contract's unknown token
    assert full.choose("tablet", None, 6)[0][0].item_id == "time_of_day"
    assert full.choose("tablet", "nobody", None)[1] == "global"
    # the answer: the chosen list, topped up from the less specific ones in order, then global
    ranked = [item for item, _ in full.ranked("mobile", "vip", 6, k=20)]
    assert ranked == ["+".join(dims) for dims in fmt.POPULARITY_CHOICE_ORDER] + ["global", "wrong"]
    assert [item for item, _ in full.ranked("mobile", None, 6, k=3, exclude={"device+time_of_day"})] == [
        "time_of_day", "device", "global"]


def test_popularity_documents_with_per_device_and_segment_maps_still_read() -> None:
    """Bundles written before context lists have `by_device` / `by_segment`: the same single-dimension lists."""
    items = [{"item_id": "x", "score": 1.0}]
    old = fmt.Popularity.model_validate({"global": items, "by_segment": {"vip": items}, "by_device": {"mobile": items}})
    new = fmt.Popularity.model_validate({"global": items, "groups": [
        {"context": {"device": "mobile"}, "items": items}, {"context": {"segment": "vip"}, "items": items}]})
    assert old == new and old.choose("mobile", None)[1] == "device=mobile" and old.choose(None, "vip")[1] == "segment=vip"
    with pytest.raises(ValueError, match="time_of_day"):
        fmt.Popularity.model_validate({"global": items, "groups": [{"context": {"time_of_day": "7"}, "items": items}]})
    with pytest.raises(ValueError, match="two popularity lists"):
        fmt.Popularity.model_validate({"global": items, "groups": [{"context": {"device": "a"}, "items": items}] * 2})


def test_gate_promotion_and_rollback(tmp_path: Path, exported: tuple[BERT4RecConfig, ExportReport]) -> None:
    root = tmp_path / "bundles"
    assert current_version(root) is None

    # no champion: beats the baselines -> promoted
    first = evaluate_gate(root, _metrics(0.10), tolerance=0.02)
    assert first.passed and first.champion is None and first.champion_status == "none"
    _write(root, exported, "v1", ndcg=0.10)
    promote(root, "v1", first.reasons)
    assert (root / CURRENT).is_symlink() and current_version(root) == "v1"

    # 5% below the champion scored in the same report (> 2% tolerance) -> not promoted, bundle kept
    worse = evaluate_gate(root, _metrics(0.095, champion=("v1", 0.10)), tolerance=0.02)
    assert not worse.passed and worse.champion == "v1"
    assert any(r.startswith("below champion v1 on the same data") for r in worse.reasons)
    assert (worse.challenger_value, worse.champion_value) == (0.095, 0.10)
    assert worse.margin == pytest.approx(-0.05) and worse.figures["champion"] == {"full": {"NDCG@10": 0.10}}
    _write(root, exported, "v2", ndcg=0.095)
    assert current_version(root) == "v1"

    # a report that did not score the served champion (or scored another one) cannot promote
    stale = evaluate_gate(root, _metrics(0.2), tolerance=0.02)
    assert not stale.passed and any("re-run evaluation_report" in r for r in stale.reasons)
    assert not evaluate_gate(root, _metrics(0.2, champion=("v0", 0.1)), tolerance=0.02).passed

    # does not beat a baseline -> refused even when it holds up against the champion
    assert not evaluate_gate(root, _metrics(0.10, popularity=0.2, champion=("v1", 0.10)), tolerance=0.02).passed

    # within tolerance -> promoted; the switch is atomic (a symlink replaced, never absent)
    ok = evaluate_gate(root, _metrics(0.099, champion=("v1", 0.10)), tolerance=0.02)
    assert ok.passed and ok.margin == pytest.approx(-0.01)
    _write(root, exported, "v3", ndcg=0.099)
    promote(root, "v3", ok.reasons)
    assert current_version(root) == "v3"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "current", "promotions.jsonl", "v1", "v2", "v3",
    ]
    assert not [p for p in root.iterdir() if p.name.startswith(".current-")]

    # rollback goes back to the previous champion; history records both switches
    record = rollback(root)
    assert record.version == "v1" and record.previous == "v3" and current_version(root) == "v1"
    assert [(h.action, h.version) for h in promotion_history(root)] == [
        ("promote", "v1"), ("promote", "v3"), ("rollback", "v1"),
    ]
    assert load_bundle(root / CURRENT).version == "v1"

    # a bundle that does not verify is never promoted
    bad = _writable_copy(root / "v2", root / "v2-bad")
    (bad / "vocabulary.json").write_text("{}")
    with pytest.raises(BundleRefused):
        promote(root, "v2-bad")
    assert current_version(root) == "v1"


def _warehouse(home: Path) -> None:
    """cleaned_interactions -> item/context vocabularies -> tokenized_sequences, with the real SQL."""
    from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary, tokenize_sequences

    con = duckdb.connect(str(home / "warehouse.duckdb"))
    con.execute("SELECT setseed(0.5)")
    con.execute(
        """CREATE TABLE cleaned_interactions AS
           SELECT 'u' || (i // 8) AS user_id, 'item-' || CAST(floor(pow(random(), 2) * 60) AS INTEGER) AS item_id,
                  ['view', 'cart', 'purchase'][1 + CAST(i % 3 AS INTEGER)] AS event_type,
                  TIMESTAMP '2024-03-01' + to_minutes(CAST(i AS BIGINT)) AS ts, NULL::VARCHAR AS session_id,
                  'cat' AS category, ['web', 'ios'][1 + CAST(i % 2 AS INTEGER)] AS device,
                  ['new', 'vip'][1 + CAST((i // 8) % 2 AS INTEGER)] AS segment, NULL::DOUBLE AS price, i AS event_id
           FROM range(2400) r(i)"""
    )
    build_item_vocabulary(con)
    build_context_vocabulary(con)
    tokenize_sequences(con)
    con.close()


def test_export_assets_materialize_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx_model -> tensorrt_engine -> model_bundle -> bento, upstream values read by the real IO managers."""
    from dagster import AssetCheckSeverity, AssetKey, SourceAsset, materialize

    from recsys_assets.assets import export as export_assets
    from recsys_assets.bert4rec.model import save_model
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    _warehouse(tmp_path)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as con:
        vocab_size = con.execute("SELECT max(token) + 1 FROM item_vocabulary").fetchone()[0]
        sizes = dict(con.execute("SELECT kind, count(*) + 1 FROM context_vocabulary GROUP BY kind").fetchall())
    torch.manual_seed(0)
    config = BERT4RecConfig(vocab_size=vocab_size, hidden=16, layers=1, heads=2, max_len=12,
                            n_devices=sizes["device"], n_segments=sizes["segment"])
    save_model(tmp_path / "model", BERT4Rec(config).eval(), config)
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(_metrics(0.2)))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "bert4rec_model.json").write_text(json.dumps({"path": str(tmp_path / "model")}))
    (artifacts / "evaluation_report.json").write_text(json.dumps({"metrics_json": str(metrics_path), "run_id": "r1"}))
    (artifacts / "feast_online_store.json").write_text(json.dumps({"max_len": 50}))

    upstream = [
        SourceAsset(AssetKey(name), io_manager_key=key)
        for name, key in [
            ("bert4rec_model", "artifact_io_manager"), ("evaluation_report", "artifact_io_manager"),
            ("feast_online_store", "artifact_io_manager"), ("tokenized_sequences", "warehouse_io_manager"), ("item_vocabulary", "warehouse_io_manager"),
            ("context_vocabulary", "warehouse_io_manager"), ("cleaned_interactions", "warehouse_io_manager"),
        ]
    ]
    result = materialize(
        [*export_assets.assets, *export_assets.asset_checks, *upstream],
        resources={"warehouse_io_manager": DuckDBTableIOManager(), "artifact_io_manager": JsonArtifactIOManager()},
        run_config={
            "ops": {
                "onnx_model": {"config": {"parity_sequences": 300, "min_parity_sequences": 200}},
                "tensorrt_engine": {"config": {"parity_sequences": 300}},
                "model_bundle": {"config": {"popularity_min_group_events": 10}},
                "bento": {"config": {"bentoml_home": str(tmp_path / "bentoml")}},
            }
        },
    )
    assert result.success
    onnx_out = result.output_for_node("onnx_model")
    assert onnx_out["parity"]["passed"] and onnx_out["parity"]["n_sequences"] == 300
    assert onnx_out["export"]["contexts"] == ["tod", "devices", "segments", "event_types"]
    trt = result.output_for_node("tensorrt_engine")
    if not trt["built"]:  # this machine: no CUDA / no tensorrt, and the asset says which
        assert trt["reason"] and trt["path"] is None
    bundle_out = result.output_for_node("model_bundle")
    assert bundle_out["promoted"] and bundle_out["current"] == bundle_out["version"]
    # signed with the key model_bundle created on first use; the default public key beside it verifies
    from recsys_serving.bundle import configured_public_keys

    keys = configured_public_keys()
    assert [k.key_id for k in keys] == [bundle_out["signed_by"]]
    manifest = verify_bundle(tmp_path / "bundles" / "current", keys)
    assert manifest.export["parity"]["passed"] and manifest.data_window["interactions"] == 2400
    assert manifest.gate["passed"] and manifest.metrics == _metrics(0.2)
    assert ("model.plan" in manifest.files) == trt["built"]
    popularity = json.loads((tmp_path / "bundles" / "current" / "popularity.json").read_text())
    assert set(_lists(popularity, "device")) == {("web",), ("ios",)}
    assert set(_lists(popularity, "segment")) == {("new",), ("vip",)}
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert {name: c.passed for name, c in checks.items()} == {"bundle_loads_in_serving": True, "tensorrt_engine_built": trt["built"]}
    if not trt["built"]:  # a warning in the UI with the reason, not a green tensorrt_engine; the bundle still built
        assert checks["tensorrt_engine_built"].severity == AssetCheckSeverity.WARN
        assert checks["tensorrt_engine_built"].metadata["reason"].value == trt["reason"]
    bento = result.output_for_node("bento")
    assert bento["tag"] == f"recsys_recommender:{bundle_out['version'].lower()}"
    built = tmp_path / "bentoml" / "bentos" / "recsys_recommender" / bundle_out["version"].lower()
    assert (built / "src" / "bundle" / "manifest.json").exists()
    assert (built / "src" / "bundle" / "manifest.sig").exists(), "the bento carries the bundle's signature"
    assert verify_bundle(built / "src" / "bundle", keys).version == bundle_out["version"]
    assert (built / "src" / "recsys_serving" / "service.py").exists()
    assert not list((built / "src").rglob("*.safetensors")), "the bento must not carry training artifacts"
