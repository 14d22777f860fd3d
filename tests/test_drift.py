"""Data after training and the drift report: following periods of the generator, ingest picking them
up, the Evidently signals and verdicts against a really trained and exported bundle, the answer log,
and the drift_report asset in a real Dagster instance."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from recsys_assets.data import sources
from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.synthetic import DEFAULT_CONFIG, PeriodShift, SyntheticConfig, generate_events, main
from recsys_assets.monitoring.drift import DriftConfig, compute_drift
from recsys_assets.monitoring.drift_report import write_drift_report
from recsys_assets.monitoring.pushgateway import parse_drift_summary
from recsys_serving.answer_log import answer_line
from recsys_serving.contract import DRIFT_VERDICTS, RETRAIN_VERDICTS

# What raw_events generates with synthetic_users / synthetic_items / synthetic_seed set (as in the asset test).
BASE_OVERRIDES = {"n_users": 1500, "n_items": 400, "seed": 3}
BASE = SyntheticConfig.model_validate({**DEFAULT_CONFIG.model_dump(), **BASE_OVERRIDES})
SHIFT = PeriodShift(
    days=14, new_items=40, new_item_share=0.3, popularity_rotation=0.5, category_rotation=0.5,
    device_mix={"desktop": 0.85, "mobile": 0.05, "tablet": 0.05, "app": 0.05},
)
SHIFTED_SIGNALS = {"popularity_decile", "out_of_vocabulary", "category", "device"}
UNSHIFTED_SIGNALS = {"event_type", "segment", "sequence_length"}


@dataclass(frozen=True)
class Served:
    bundles: Path  # a bundles root whose `current` is a bundle trained on BASE
    warehouse: Path  # BASE alone, cleaned
    items: list[str]  # the bundle's vocabulary, most popular first


def _load_and_clean(source: Path, database: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(database))
    sources.load_events(con, source, "csv", table="raw_events")
    clean_events(con, CleaningConfig(), raw_table="raw_events", cleaned_table="cleaned_interactions",
                 quarantine_table="quarantined_events")
    return con


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The tiny pipeline once: BASE -> cleaned -> tokenized -> BERT4Rec (150 real training steps) ->
    ONNX bundle with the training window in its manifest -> promoted."""
    from recsys_assets.bert4rec.data import SequenceData
    from recsys_assets.bert4rec.model import load_model
    from recsys_assets.bert4rec.presets import build_configs
    from recsys_assets.bert4rec.train import train
    from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary, tokenize_sequences
    from recsys_assets.export.bundle import data_window, export_bundle, popularity_document, promote, vocabulary_document
    from recsys_assets.export.onnx_export import model_contexts

    root = tmp_path_factory.mktemp("served")
    generate_events(root / "source", BASE)
    con = _load_and_clean(root / "source", root / "warehouse.duckdb")
    build_item_vocabulary(con)
    build_context_vocabulary(con)
    tokenize_sequences(con)
    sizes = dict(con.execute("SELECT kind, max(token) + 1 FROM context_vocabulary GROUP BY kind").fetchall())
    vocabulary = vocabulary_document(con, "item_vocabulary", "context_vocabulary")
    popularity = popularity_document(con, "cleaned_interactions", window_days=30, top_global=100, top_group=100,
                                     min_group_events=10)
    window = data_window(con, "cleaned_interactions")
    con.close()
    data = SequenceData.from_duckdb(root / "warehouse.duckdb")
    model_cfg, train_cfg = build_configs(
        "synthetic", data.vocab_size, {"tod": 7, "event_types": 4, "devices": sizes["device"], "segments": sizes["segment"]},
        {"hidden": 32, "max_len": 12}, {"epochs": 1, "max_steps": 150, "lr": 5e-3, "patience": None, "checkpoint_every": None},
    )
    train(model_cfg, train_cfg, data, root / "model")
    model, model_cfg = load_model(root / "model")
    export_bundle(root / "bundles", model, model_cfg, vocabulary, popularity, root / "onnx",
                  contexts=model_contexts(model_cfg), top_k=50, data_window=window, version="v1")
    promote(root / "bundles", "v1")
    return Served(bundles=root / "bundles", warehouse=root / "warehouse.duckdb", items=list(vocabulary["items"]))


def _write_answers(directory: Path, name: str, answers: list[tuple[datetime, list[str], str | None]],
                   partial_last_line: bool = False) -> None:
    """Answer-log lines as the service writes them (recsys_serving.answer_log.answer_line); `ts` naive UTC."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        answer_line((ts.replace(tzinfo=timezone.utc).timestamp(), f"u{k}", items, "v1", reason))
        for k, (ts, items, reason) in enumerate(answers)
    ]
    text = "\n".join(lines) + "\n" + ('{"ts": "2025-12-05T10:00:00+00:00", "user_id": "u1", "ite' if partial_last_line else "")
    if name.endswith(".gz"):
        (directory / name).write_bytes(gzip.compress(text.encode()))
    else:
        (directory / name).write_text(text)


# --------------------------------------------------------------------------- the generator


def test_following_periods_continue_the_base_window(tmp_path: Path) -> None:
    small = SyntheticConfig(n_users=600, n_items=200, n_categories=10, events_per_user_mean=15, chunk_users=300, seed=5)
    generate_events(tmp_path / "base", small)
    periods = [PeriodShift(days=7), SHIFT]
    summary = generate_events(tmp_path / "both", small.model_copy(update={"following_periods": periods}))
    base_files = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    both = {p.name: p.read_bytes() for p in (tmp_path / "both").iterdir()}
    # Adding periods leaves the base window's files byte-identical; each period has its own chunks.
    assert all(both[name] == data for name, data in base_files.items())
    assert sorted(set(both) - set(base_files)) == [f"events-p0{k}-0000{c}.csv.gz" for k in (1, 2) for c in (0, 1)]
    assert [(p.start, p.end) for p in summary.periods] == [
        (small.end, small.end + timedelta(days=7)), (small.end + timedelta(days=7), small.end + timedelta(days=21)),
    ]
    assert summary.periods[1].new_item_ids == ("i201", "i240") and summary.periods[0].new_item_ids is None

    con = duckdb.connect()
    sources.load_events(con, tmp_path / "both", "csv", table="raw")
    catalogue = ", ".join(f"'i{k}'" for k in range(1, small.n_items + 1))  # ids i1..i<n_items>
    base_users = {r[0] for r in con.execute("SELECT DISTINCT user_id FROM raw WHERE source NOT LIKE '%-p0%'").fetchall()}
    stats = {
        period: row for period, *row in con.execute(
            """SELECT CASE WHEN source LIKE '%-p01-%' THEN 1 WHEN source LIKE '%-p02-%' THEN 2 ELSE 0 END AS period,
                      min(ts), max(ts) FILTER (WHERE ts < TIMESTAMP '2030-01-01'),
                      avg(CAST(device = 'desktop' AS DOUBLE)), count(*)
               FROM raw WHERE parse_error IS NULL GROUP BY 1"""
        ).fetchall()
    }
    for k, period in enumerate(summary.periods, start=1):
        first, last = stats[k][0], stats[k][1]
        assert period.start <= first and last < period.end  # noise aside (future timestamps), inside its days
        users = {r[0] for r in con.execute(f"SELECT DISTINCT user_id FROM raw WHERE source LIKE '%-p0{k}-%'").fetchall()}
        assert users - {None} <= base_users  # the same users carry on
    # Unshifted: the same catalogue and device mix; shifted: trending new items and another mix.
    new_share = dict(con.execute(
        f"""SELECT source LIKE '%-p02-%', avg(CAST(item_id NOT IN ({catalogue}) AS DOUBLE))
            FROM raw WHERE source LIKE '%-p0%' AND item_id IS NOT NULL GROUP BY 1"""
    ).fetchall())
    assert new_share[False] == 0 and new_share[True] > 0.1
    assert abs(stats[1][2] - stats[0][2]) < 0.05 and stats[2][2] > 0.7 > stats[0][2]


def test_periods_from_the_cli_and_the_raw_events_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from recsys_assets.assets.ingest import SYNTHETIC_PERIODS_ENV, RawEventsConfig, synthetic_periods

    main(["--out", str(tmp_path / "cli"), "--users", "300", "--items", "300", "--following-days", "7",
          "--new-items", "10", "--new-item-share", "0.2", "--device-mix", "mobile=1,desktop=0"])
    assert "following period 1: 2025-12-01 00:00:00 .. 2025-12-08 00:00:00" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["events-00000.csv.gz", "events-p01-00000.csv.gz"]
    with pytest.raises(SystemExit, match="device-mix"):
        main(["--out", str(tmp_path / "bad"), "--device-mix", "mobile"])
    with pytest.raises(SystemExit, match="not in devices"):
        main(["--out", str(tmp_path / "bad"), "--device-mix", "fridge=1"])
    with pytest.raises(ValidationError, match="set together"):
        PeriodShift(new_items=5)

    monkeypatch.setenv(SYNTHETIC_PERIODS_ENV, '[{"days": 3}]')
    assert synthetic_periods(RawEventsConfig()) == [PeriodShift(days=3)]
    assert synthetic_periods(RawEventsConfig(synthetic_periods_json='[{"days": 5, "activity": 2}]')) == [
        PeriodShift(days=5, activity=2)
    ]
    with pytest.raises(ValueError, match="(?s)synthetic_periods_json .*0.days"):
        synthetic_periods(RawEventsConfig(synthetic_periods_json='[{"days": 0}]'))
    monkeypatch.setenv(SYNTHETIC_PERIODS_ENV, "not json")
    with pytest.raises(ValueError, match=SYNTHETIC_PERIODS_ENV):
        synthetic_periods(RawEventsConfig())


# --------------------------------------------------------------------------- the drift library


def test_no_promoted_bundle_or_no_new_events_is_no_reference(tmp_path: Path, served: Served) -> None:
    with duckdb.connect(str(served.warehouse), read_only=True) as con:
        nothing = compute_drift(con, "cleaned_interactions", tmp_path / "bundles" / "current", None).summary
        assert nothing.verdict == "no_reference" and "no promoted bundle" in nothing.reasons[0]
        # The training data alone: nothing after the window yet.
        early = compute_drift(con, "cleaned_interactions", served.bundles / "current", None).summary
    assert early.verdict == "no_reference" and "no events after the training window" in early.reasons[0]
    assert early.windows["reference"].events > 0 and early.windows["current"].events == 0
    # A handful of new events: nothing can be judged, and the verdict does not claim "stable".
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{served.warehouse}' AS base (READ_ONLY)")
        con.execute("""CREATE TABLE events AS SELECT * FROM base.cleaned_interactions UNION ALL
                       (SELECT * REPLACE (ts + INTERVAL 1 HOUR AS ts, event_id + 10000000 AS event_id)
                        FROM base.cleaned_interactions ORDER BY ts DESC LIMIT 3)""")
        few = compute_drift(con, "events", served.bundles / "current", None).summary
    assert few.verdict == "no_reference" and few.windows["current"].events == 3, few.reasons
    assert "too little data" in few.reasons[0] and few.evaluated_signals == 0
    assert nothing.verdict in DRIFT_VERDICTS and parse_drift_summary(early.model_dump(mode="json")).verdict == "no_reference"


def test_an_unshifted_following_period_is_stable(tmp_path: Path, served: Served) -> None:
    generate_events(tmp_path / "source", BASE.model_copy(update={"following_periods": [PeriodShift(days=14)]}))
    con = _load_and_clean(tmp_path / "source", tmp_path / "warehouse.duckdb")
    window_end = datetime.fromisoformat(json.loads((served.bundles / "current" / "manifest.json").read_text())["data_window"]["end"])
    # Answers in the current window only: prediction drift has no reference yet, and says so.
    _write_answers(tmp_path / "answers", "answers-h-1.jsonl",
                   [(window_end + timedelta(hours=1 + k), served.items[k % 30: k % 30 + 10], None) for k in range(200)])
    result = compute_drift(con, "cleaned_interactions", served.bundles / "current", tmp_path / "answers")
    con.close()
    summary = result.summary
    assert summary.verdict == "stable", (summary.reasons, {n: s.statistic for n, s in summary.signals.items()})
    judged = {n for n, s in summary.signals.items() if s.evaluated}
    assert judged == SHIFTED_SIGNALS | UNSHIFTED_SIGNALS | {"time_of_day"} and summary.drifted_signals == 0
    assert summary.answers.current == 200 and summary.answers.reference == 0
    assert "no answers in the reference window" in summary.signals["fallback"].note
    assert summary.performance is not None and summary.performance.drop is not None
    assert summary.performance.drop < DriftConfig().degradation_threshold and not summary.performance.degraded
    assert summary.performance.reference["n"] >= 1000 and summary.sample_sizes["events"]["current"] > 10_000
    assert summary.out_of_vocabulary_share["current"] < 0.02
    paths = write_drift_report(result, tmp_path / "reports", "run-1")
    assert paths.report_html.read_text().count("<iframe") == 2  # events and users; no answers to compare
    assert json.loads(paths.summary_json.read_text())["verdict"] == "stable"
    assert (paths.latest_dir / "summary.json").read_text() == paths.summary_json.read_text()
    with pytest.raises(FileExistsError):
        write_drift_report(result, tmp_path / "reports", "run-1")


# --------------------------------------------------------------------------- the asset


def test_drift_report_asset_on_a_shifted_period(tmp_path: Path, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """raw_events (synthetic, with a shifted following period from its run config) -> cleaned ->
    drift_report, in an ephemeral Dagster instance, against the promoted bundle."""
    from dagster import DagsterInstance, materialize

    from recsys_assets.assets import cleaning, ingest, monitoring
    from recsys_assets.assets.metadata import DRIFT_VERDICT_METADATA
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager
    from recsys_assets.resources import WarehouseResource

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.delenv("RECSYS_EVENTS_PATH", raising=False)
    monkeypatch.delenv("RECSYS_EVENTS_FORMAT", raising=False)
    monkeypatch.delenv("RECSYS_PUSHGATEWAY_URL", raising=False)
    (home / "bundles").symlink_to(served.bundles, target_is_directory=True)
    end = datetime.fromisoformat(json.loads((served.bundles / "current" / "manifest.json").read_text())["data_window"]["end"])
    answers = home / "events" / "answers"
    # Reference window: popular items from the model; current: tail items and a third of fallbacks.
    _write_answers(answers, "answers-h-1.1.jsonl",
                   [(end - timedelta(hours=1 + k), served.items[k % 20: k % 20 + 10], None) for k in range(300)])
    _write_answers(answers, "answers-h-1.jsonl.gz",
                   [(end + timedelta(hours=1 + k), served.items[-10 - k % 50:][:10], "model_timeout" if k % 3 == 0 else None)
                    for k in range(300)], partial_last_line=True)
    db = str(tmp_path / "warehouse.duckdb")
    result = materialize(
        [*ingest.assets, *cleaning.assets, *monitoring.assets],
        selection=["raw_events", "cleaned_interactions", "drift_report"],
        instance=DagsterInstance.ephemeral(),
        resources={
            "warehouse": WarehouseResource(database=db, memory_limit="2GB"),
            "warehouse_io_manager": DuckDBTableIOManager(database=db),
            "artifact_io_manager": JsonArtifactIOManager(directory=str(tmp_path / "artifacts")),
        },
        run_config={"ops": {
            "raw_events": {"config": {
                "synthetic_users": BASE_OVERRIDES["n_users"], "synthetic_items": BASE_OVERRIDES["n_items"],
                "synthetic_seed": BASE_OVERRIDES["seed"], "synthetic_periods_json": json.dumps([SHIFT.model_dump()]),
            }},
            "drift_report": {"config": {"max_scored_users": 1000}},
        }},
    )
    assert result.success
    meta = result.asset_materializations_for_node("drift_report")[0].metadata
    out = result.output_for_node("drift_report")
    summary = json.loads(Path(out["summary_json"]).read_text())
    assert meta[DRIFT_VERDICT_METADATA].value == out["verdict"] == summary["verdict"]
    assert summary["verdict"] == "drift_and_degradation" and summary["verdict"] in RETRAIN_VERDICTS, summary["reasons"]
    drifted = {n for n, s in summary["signals"].items() if s["drifted"]}
    assert SHIFTED_SIGNALS <= drifted and not drifted & UNSHIFTED_SIGNALS, drifted
    # Prediction drift from the answer log: rotated and gzip files read, the partial last line skipped.
    assert {"recommended_popularity_decile", "fallback"} <= drifted
    assert summary["answers"]["reference"] == 300 and summary["answers"]["current"] == 300
    assert summary["answers"]["unreadable_lines"] == 1 and summary["answers"]["files"] == 2
    assert summary["performance"]["drop"] > DriftConfig().degradation_threshold
    assert summary["performance"]["current"]["unknown_target_share"] > 0.05
    # The report: our page, Evidently's, the JSON, latest/, and the metadata the UI shows and charts.
    report = Path(out["report_html"])
    assert report.parent == home / "reports" / "drift" / result.run_id
    page = report.read_text()
    assert "drift_and_degradation" in page and page.count("<iframe") == 4
    for unit in ("events", "users", "recommendations", "answers"):
        assert (report.parent / f"evidently_{unit}.html").stat().st_size > 100_000
    assert (home / "reports" / "drift" / "latest" / "report.html").read_text() == page
    assert meta["report"].value == report.resolve().as_uri() and meta["report_path"].value == str(report)
    assert meta["drifted_signals"].value == len(drifted) and meta["share_drifted"].value == summary["share_drifted"]
    assert meta["performance_drop"].value == summary["performance"]["drop"]
    assert meta["out_of_vocabulary_share"].value > 0.1 and meta["current_events"].value > 10_000
    assert meta["popularity_deciles"].value.startswith("![traffic per popularity decile](data:image/png;base64,")


def test_old_drift_reports_are_pruned(tmp_path: Path) -> None:
    """A daily report must not fill the disk: only the newest `keep` run directories stay."""
    import os

    from recsys_assets.monitoring.drift_report import SUMMARY_FILE, prune_reports

    for k in range(5):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / SUMMARY_FILE).write_text("{}")
        os.utime(run / SUMMARY_FILE, (1_000_000 + k, 1_000_000 + k))
    (tmp_path / "latest").symlink_to("run4", target_is_directory=True)
    (tmp_path / "notes").mkdir()  # not a report: left alone
    deleted = prune_reports(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["run0", "run1", "run2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes", "run3", "run4"]
