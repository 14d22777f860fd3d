"""Time of the drift_report asset at scale, run by Dagster as drift_job runs it.

    python benchmarks/drift_scale.py                                   # make run's data + a 14-day period
    python benchmarks/drift_scale.py --users 1000000 --items 200000 --events 10000000

Set-up (not timed): the synthetic base window and one shifted following period (--events counts
both; the default is DEFAULT_CONFIG, `make run`'s data, plus a period as large), loaded and cleaned
by the project's stage functions; a served bundle built from the base window alone (its vocabulary,
popularity lists and data window) around an untrained BERT4Rec of the `synthetic` preset's shape
(scoring time does not depend on the weights, and training on 10M events is not what is measured);
an answer log of --answers answers in each window. Then `drift_report` is materialized alone
(cleaned_interactions read as an upstream asset) in an ephemeral Dagster instance, and the script
prints its wall time, the phases recorded in summary.json and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_scale import PeakRss  # noqa: E402  (the sibling benchmark's RSS sampler)

from recsys_assets.data import sources  # noqa: E402
from recsys_assets.data.cleaning import CleaningConfig, clean_events  # noqa: E402
from recsys_assets.data.synthetic import DEFAULT_CONFIG, PeriodShift, SyntheticConfig, generate_events  # noqa: E402

SHIFT = PeriodShift(days=14, new_items=0, new_item_share=0.0, popularity_rotation=0.3,
                    device_mix={"desktop": 0.6, "mobile": 0.2, "tablet": 0.1, "app": 0.1})


def generation_config(args: argparse.Namespace) -> SyntheticConfig:
    shift = SHIFT.model_copy(update={"new_items": max(1, args.items // 50), "new_item_share": 0.2})
    if args.events is None:
        return DEFAULT_CONFIG.model_copy(update={"following_periods": [shift]})
    # Half before the window's end, half after; bots and duplicates included, as in pipeline_scale.py.
    bot_rate, bot_events = DEFAULT_CONFIG.bot_user_rate, DEFAULT_CONFIG.bot_events_mean
    per_window = args.events / 2 / (1 + DEFAULT_CONFIG.duplicate_rate) - args.users * bot_rate * bot_events
    per_user = per_window / (args.users * (1 - bot_rate))
    if per_user < 1:
        raise SystemExit(f"--events {args.events:,} is too few for --users {args.users:,} (and their bots)")
    return SyntheticConfig(
        n_users=args.users, n_items=args.items, n_categories=max(1, args.items // 200),
        events_per_user_mean=per_user,
        seed=args.seed, output_format="parquet", malformed_rate=0.0, chunk_users=50_000, workers=args.workers,
        following_periods=[shift],
    )


def prepare(args: argparse.Namespace, home: Path) -> dict[str, object]:
    """Events, cleaned table, served bundle and answer log under `home` (RECSYS_HOME)."""
    import torch

    from recsys_assets.bert4rec.model import BERT4Rec
    from recsys_assets.bert4rec.presets import build_configs
    from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary
    from recsys_assets.export.bundle import data_window, export_bundle, popularity_document, promote, vocabulary_document
    from recsys_assets.export.onnx_export import model_contexts
    from recsys_serving.answer_log import answer_line

    cfg = generation_config(args)
    started = time.perf_counter()
    summary = generate_events(args.workdir / "events", cfg)
    print(f"generated {summary.events:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
    db = home / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(f"SET memory_limit = '{args.memory_limit}'")
        con.execute(f"SET temp_directory = '{args.workdir / 'duckdb_tmp'}'")
        sources.load_events(con, args.workdir / "events", cfg.output_format, table="raw_events")
        cleaned = clean_events(con, CleaningConfig(), raw_table="raw_events", cleaned_table="cleaned_interactions",
                               quarantine_table="quarantined_events")
        con.execute("DROP TABLE raw_events")
        # The served model's data: the base window only, as training saw it.
        con.execute(f"CREATE TABLE base AS SELECT * FROM cleaned_interactions WHERE ts < TIMESTAMP '{cfg.end}'")
        build_item_vocabulary(con, "base")
        build_context_vocabulary(con, "base")
        vocabulary = vocabulary_document(con, "item_vocabulary", "context_vocabulary")
        popularity = popularity_document(con, "base", window_days=30, top_global=1000, top_group=300)
        window = data_window(con, "base")
        sizes = dict(con.execute("SELECT kind, max(token) + 1 FROM context_vocabulary GROUP BY kind").fetchall())
        current = con.execute(f"SELECT count(*) FROM cleaned_interactions WHERE ts > TIMESTAMP '{window['end']}'").fetchall()[0][0]
        con.execute("DROP TABLE base")
    print(f"cleaned {cleaned.cleaned:,} of {cleaned.raw:,} rows; reference {window['interactions']:,}, current {current:,}",
          flush=True)
    model_cfg, _ = build_configs("synthetic", len(vocabulary["items"]) + 2,
                                 {"tod": 7, "event_types": 4, "devices": sizes["device"], "segments": sizes["segment"]})
    torch.manual_seed(0)
    export_bundle(home / "bundles", BERT4Rec(model_cfg).eval(), model_cfg, vocabulary, popularity,
                  args.workdir / "onnx", contexts=model_contexts(model_cfg), data_window=window, version="bench")
    promote(home / "bundles", "bench")
    end = datetime.fromisoformat(window["end"]).replace(tzinfo=timezone.utc)
    items, rng = vocabulary["items"], random.Random(0)
    answers = home / "events" / "answers"
    answers.mkdir(parents=True)
    with open(answers / "answers-bench-1.jsonl", "w") as out:
        for k in range(args.answers):
            for sign in (-1, 1):
                ts = (end + sign * timedelta(seconds=1 + rng.random() * 13 * 86_400)).timestamp()
                top = min(len(items), 200 if sign < 0 else 2000)
                picks = [items[int(rng.paretovariate(1.2)) % top] for _ in range(10)]
                reason = "model_timeout" if sign > 0 and k % 20 == 0 else None
                out.write(answer_line((ts, f"u{k}", picks, "bench", reason)) + "\n")
    return {"rows": summary.events, "cleaned": cleaned.cleaned, "reference": window["interactions"], "current": current,
            "users": cfg.n_users, "items": cfg.n_items}


def run_asset(args: argparse.Namespace, home: Path) -> tuple[float, dict, int]:
    from dagster import AssetKey, DagsterInstance, SourceAsset, materialize

    from recsys_assets.assets import monitoring
    from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager
    from recsys_assets.resources import WarehouseResource

    db = str(home / "warehouse.duckdb")
    monitor = PeakRss().start()
    started = time.perf_counter()
    result = materialize(
        [*monitoring.assets, SourceAsset(AssetKey("cleaned_interactions"), io_manager_key="warehouse_io_manager")],
        instance=DagsterInstance.ephemeral(),
        resources={
            "warehouse": WarehouseResource(database=db, memory_limit=args.memory_limit, threads=args.threads),
            "warehouse_io_manager": DuckDBTableIOManager(database=db),
            "artifact_io_manager": JsonArtifactIOManager(directory=str(home / "artifacts")),
        },
    )
    seconds = time.perf_counter() - started
    monitor.stop()
    if not result.success:
        raise SystemExit("drift_report failed")
    out = result.output_for_node("drift_report")
    return seconds, json.loads(Path(out["summary_json"]).read_text()), monitor.overall_peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=None, help="rows before and after the window together (default: make run's data + a period)")
    parser.add_argument("--answers", type=int, default=100_000, help="answers in each window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="8GB")
    parser.add_argument("--workdir", type=Path, default=Path(".recsys") / "bench-drift")
    args = parser.parse_args(argv)
    if args.events is None:
        args.items = DEFAULT_CONFIG.n_items
    shutil.rmtree(args.workdir, ignore_errors=True)
    home = args.workdir / "home"
    home.mkdir(parents=True)
    os.environ["RECSYS_HOME"] = str(home.resolve())
    data = prepare(args, home)
    seconds, summary, peak = run_asset(args, home)
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, {args.threads} DuckDB threads")
    print("| rows (raw) | cleaned | reference | current | drift_report | phases (s) | peak RSS | verdict |")
    print("|---:|---:|---:|---:|---:|---|---:|---|")
    phases = ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items())
    print(f"| {data['rows']:,} | {data['cleaned']:,} | {data['reference']:,} | {data['current']:,} | {seconds:.1f} s "
          f"| {phases} | {peak / 1e9:.2f} GB | {summary['verdict']} |")
    print("samples:", json.dumps(summary["sample_sizes"]))
    print("signals:", {n: (round(s["statistic"], 3) if s["statistic"] is not None else None, s["drifted"])
                       for n, s in summary["signals"].items()})
    print("performance:", summary["performance"]["note"] if summary["performance"] else None)


if __name__ == "__main__":
    main()
