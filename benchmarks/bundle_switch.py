"""What a bundle switch costs the running service (not a test).

The real `bentoml serve` on `$RECSYS_HOME/bundles/current`, under a steady closed-loop load
(`--concurrency` 8 httpx async clients, random Amazon Beauty users, k=10, answer cache off so every
request reads the feature store and runs the model): after `--steady-s` seconds a second bundle is
promoted. Measured: (a) the time from the promotion to the first answer of the new version and to
the last answer of the old one (every worker switched), next to the server's own
`recsys_model_loaded_timestamp_seconds`; (b) p50/p99, requests/s and errors of the requests sent in
the `--window-s` seconds from the promotion (poll wait, load, checksums, warm-up and swap all fall
in it) against the same length of steady load just before it.

The bundles: the `beauty` preset's network (hidden 256, 4 layers, 12,101 items) with random
weights, the second one a copy of the first under another version (same files, so the same load
and verification work as a new model). Users go through the real feature pipeline into the SQLite
online store (benchmarks/serve_latency.py's helpers).

    python benchmarks/bundle_switch.py --out .recsys/reports/bundle_switch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig  # noqa: E402
from recsys_assets.bert4rec.presets import get_preset  # noqa: E402
from recsys_assets.export.bundle import promote, write_bundle  # noqa: E402
from recsys_serving.bundle import MODEL_FILE, read_manifest  # noqa: E402

# siblings (benchmarks/ is sys.path[0] when run as a script)
from serve_latency import (  # noqa: E402
    BEAUTY,
    Server,
    _summary,
    beauty_documents,
    build_bundle,
    load_feature_store_with_beauty,
    server_env,
)


# One request: (sent, done, latency_ms, answered (HTTP 200), model_version, reason or error kind).
Record = tuple[float, float, float, bool, "str | None", str]


async def drive(url: str, users: list[str], concurrency: int, duration: float, promote_after: float,
                do_promote: Any, seed: int) -> tuple[list[Record], float]:
    """Closed loop for `duration` s; `do_promote()` runs (in a thread) `promote_after` s in.
    -> (a Record per request, when the promotion returned), on the perf_counter clock."""
    rng = random.Random(seed)
    records: list[Record] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        for _ in range(20):  # warm-up (connections, first inferences)
            await client.post("/recommend", json={"user_id": rng.choice(users), "k": 10})
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    resp = await client.post("/recommend", json={"user_id": rng.choice(users), "k": 10})
                except httpx.HTTPError as exc:
                    records.append((sent, time.perf_counter(), 0.0, False, None, type(exc).__name__))
                    continue
                done = time.perf_counter()
                if resp.status_code != 200:
                    records.append((sent, done, 1000 * (done - sent), False, None, f"http_{resp.status_code}"))
                else:
                    body = resp.json()
                    records.append((sent, done, 1000 * (done - sent), True, body["model_version"], body["reason"]))

        async def switch() -> float:
            await asyncio.sleep(promote_after)
            await asyncio.to_thread(do_promote)
            return time.perf_counter()

        promoted, *_ = await asyncio.gather(switch(), *(worker() for _ in range(concurrency)))
    assert isinstance(promoted, float)
    return records, promoted


def window(records: list[Record], start: float, end: float, concurrency: int) -> dict[str, Any]:
    """The requests sent in [start, end): serve_latency's summary plus answers by version."""
    chosen = [r for r in records if start <= r[0] < end]
    errors = Counter(r[5] for r in chosen if not r[3])
    reasons = Counter(r[5] for r in chosen if r[3])
    versions = Counter(str(r[4]) for r in chosen if r[3])
    summary = _summary(concurrency, end - start, [r[2] for r in chosen if r[3]], 0.0, dict(errors),
                       dict(reasons), "httpx")
    summary.pop("client_cpu_ms_per_request")
    summary["answers_by_version"] = dict(versions)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beauty", type=Path, default=BEAUTY)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steady-s", type=float, default=15.0, help="load before the promotion")
    parser.add_argument("--window-s", type=float, default=10.0, help="compared windows: before / from the promotion")
    parser.add_argument("--tail-s", type=float, default=5.0, help="load after the switch window")
    parser.add_argument("--reload-interval-s", type=float, default=2.0, help="RECSYS_RELOAD_INTERVAL_S (the default)")
    parser.add_argument("--cache-ttl", type=float, default=0.001, help="answer cache TTL (s); tiny = uncached")
    parser.add_argument("--model-timeout-ms", type=float, default=1000.0)
    parser.add_argument("--intra-threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--execution", choices=["auto", "thread", "inline"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.window_s > args.steady_s:
        parser.error("--window-s must not exceed --steady-s (the steady window lies before the promotion)")
    if not args.beauty.is_file():
        parser.error(f"{args.beauty} is missing (Amazon Beauty in SASRec's Beauty.txt format, see CONTRIBUTING.md)")

    import torch

    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bundle_switch_"))
    home = work / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    os.environ["RECSYS_HOME"] = str(home)  # Feast paths and the bundles follow it
    data = SequenceData.from_sasrec_txt(args.beauty)
    preset = get_preset("beauty").model
    config = BERT4RecConfig(vocab_size=data.vocab_size, **{k: preset[k] for k in ("hidden", "layers", "heads", "max_len")})
    torch.manual_seed(args.seed)
    root = home / "bundles"
    t = time.perf_counter()
    first = build_bundle(root, work / "export", BERT4Rec(config).eval(), config, data, "beauty-a")
    vocabulary, popularity = beauty_documents(data, config.vocab_size - 2)
    write_bundle(root, work / "export" / MODEL_FILE, vocabulary, popularity, read_manifest(first).model,
                 version="beauty-b")
    promote(root, "beauty-a")
    bundle_mb = sum(p.stat().st_size for p in first.iterdir()) / 1e6
    print(f"bundles in {time.perf_counter() - t:.1f}s ({bundle_mb:.1f} MB each)", flush=True)
    t = time.perf_counter()
    n_users = load_feature_store_with_beauty(data, home, config.max_len)
    print(f"feature store: {n_users} users in {time.perf_counter() - t:.1f}s", flush=True)

    env = {**server_env(args, args.cache_ttl), "RECSYS_RELOAD_INTERVAL_S": str(args.reload_interval_s)}
    server = Server(home, root / "current", env, tag="switch")
    try:
        server.wait_ready()
        duration = args.steady_s + args.window_s + args.tail_s
        wall_at_promotion: list[float] = []

        def do_promote() -> None:
            promote(root, "beauty-b")
            wall_at_promotion.append(time.time())

        records, promoted = asyncio.run(
            drive(server.url, list(data.user_ids), args.concurrency, duration, args.steady_s, do_promote, args.seed)
        )
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text) for s in f.samples]
        loaded = next((s.value for s in samples if s.name == "recsys_model_loaded_timestamp_seconds"), None)
        switches = next((s.value for s in samples if s.name == "recsys_model_switches_total"
                         and s.labels.get("outcome") == "switched"), None)
        health = httpx.get(server.url + "/healthz").json()
    finally:
        server.stop()

    new = [r for r in records if r[4] == "beauty-b"]
    old_after = [r for r in records if r[4] == "beauty-a" and r[1] >= promoted]
    first_new_ms = 1000 * (min(r[1] for r in new) - promoted) if new else None
    last_old_ms = 1000 * (max(r[1] for r in old_after) - promoted) if old_after else 0.0
    report: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "catalogue_items": config.vocab_size - 2,
        "model": config.model_dump(),
        "bundle_mb": round(bundle_mb, 1),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "reload_interval_s": args.reload_interval_s,
        "cache_ttl_s": args.cache_ttl,
        "promotion_to_first_new_answer_ms": round(first_new_ms, 1) if first_new_ms is not None else None,
        "promotion_to_last_old_answer_ms": round(last_old_ms, 1),
        # the latest worker's load (livemax), on the wall clock: when the last worker had switched
        "promotion_to_last_worker_loaded_ms": round(1000 * (loaded - wall_at_promotion[0]), 1)
        if loaded and wall_at_promotion else None,
        "worker_switches": switches,
        "served_version_at_end": health.get("model_version"),
        "steady": window(records, promoted - args.window_s, promoted, args.concurrency),
        "switch": window(records, promoted, promoted + args.window_s, args.concurrency),
        "errors_total": sum(1 for r in records if not r[3]),
        "requests_total": len(records),
    }
    rows = [("", "steady (before)", "switch window")]
    for key, label in (("requests", "requests"), ("requests_per_s", "req/s"), ("p50_ms", "p50 ms"),
                       ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("errors", "errors")):
        rows.append((label, str(report["steady"][key]), str(report["switch"][key])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, width)))
    print(f"\npromotion -> first answer of the new bundle: {report['promotion_to_first_new_answer_ms']} ms; "
          f"-> last answer of the old one: {report['promotion_to_last_old_answer_ms']} ms; "
          f"-> last worker loaded: {report['promotion_to_last_worker_loaded_ms']} ms "
          f"(poll interval {args.reload_interval_s} s, {args.workers} workers)")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
