"""Latency and throughput of the real BentoML server (not a test).

1. Amazon Beauty catalogue (12,101 items): a bundle from `--model-dir` (a BERT4Rec trained on
   Beauty, e.g. by benchmarks/quality_beauty.py) or, without one, the `beauty` preset's network with
   random weights (same shapes, so the same latency; the output says which). Every Beauty user's
   history goes through the real feature pipeline (cleaned_interactions -> user_sequence_features ->
   feast apply -> materialize_latest) into the SQLite online store.
2. `bentoml serve` on 127.0.0.1, driven by an asyncio load generator for `--duration` seconds at each
   `--concurrency` (random Beauty users, k=10): client-side p50/p95/p99, requests/s, errors, fallbacks.
   The answer cache is disabled by default (`--cache-ttl 0.001`) so every request pays the feature
   store read and the model: the uncached worst case.
3. The same for a 2,000,000-item catalogue (random weights, same network; Beauty users' item ids
   exist in it), and ONNX Runtime vs PyTorch eager at batch 1 for both.

Goals on 2 cores: p99 <= 10 ms at concurrency 1 with 12k items, >= 300 req/s at concurrency 32,
p99 <= 70 ms with 2M items, ORT >= 2x PyTorch eager. The load generator runs on the same cores.

    python benchmarks/serve_latency.py --duration 60 --out .recsys/reports/serve_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import httpx
import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, load_model  # noqa: E402
from recsys_assets.bert4rec.presets import get_preset  # noqa: E402
from recsys_assets.data.user_features import (  # noqa: E402
    UserFeaturesConfig,
    apply_feature_repo,
    build_user_sequence_features,
    materialize_latest,
)
from recsys_assets.export.bundle import export_bundle  # noqa: E402
from recsys_assets.export.onnx_export import batch1_latency  # noqa: E402
from recsys_serving.feature_client import load_feature_store  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"
FEATURE_REPO = REPO / "feature_repo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_feature_store_with_beauty(data: SequenceData, home: Path, max_len: int) -> int:
    """Beauty histories -> cleaned_interactions (one event a minute, no timestamps in the file) -> Feast."""
    con = duckdb.connect(str(home / "bench.duckdb"))
    raw = pa.table({
        "user_id": [u for u, seq in zip(data.user_ids, data.tokens) for _ in range(len(seq))],
        "item_id": [str(int(t) - 1) for seq in data.tokens for t in seq.tolist()],
        "pos": [n for seq in data.tokens for n in range(len(seq))],
        "uid": [i for i, seq in enumerate(data.tokens) for _ in range(len(seq))],
    })
    con.register("raw", raw)
    con.execute(
        """CREATE TABLE cleaned_interactions AS
           SELECT user_id, item_id, 'view' AS event_type,
                  TIMESTAMP '2024-01-01' + to_seconds(CAST(uid AS BIGINT)) + to_minutes(CAST(pos AS BIGINT)) AS ts,
                  NULL::VARCHAR AS session_id, NULL::VARCHAR AS category, 'web' AS device,
                  NULL::VARCHAR AS segment, NULL::DOUBLE AS price, row_number() OVER () AS event_id
           FROM raw"""
    )
    path = home / "features" / "user_sequence_features.parquet"
    build_user_sequence_features(con, "cleaned_interactions", path, UserFeaturesConfig(max_len=max_len, granularity="day"))
    con.close()
    store = load_feature_store(FEATURE_REPO)
    apply_feature_repo(store, FEATURE_REPO, max_len=max_len)
    return materialize_latest(store, path).written


def beauty_documents(data: SequenceData, n_items: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vocabulary (item k <-> token k+1, as SequenceData.from_sasrec_txt) and global popularity."""
    counts = Counter(int(t) for seq in data.tokens for t in seq.tolist())
    items = [str(k) for k in range(1, n_items + 1)]
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:1000]
    total = sum(counts.values())
    popularity = {"global": [{"item_id": str(tok - 1), "score": c / total} for tok, c in top], "by_segment": {}, "by_device": {}}
    return {"items": items, "categories": None, "context": {"device": {"web": 1}, "segment": {}}}, popularity


def build_bundle(root: Path, work: Path, model: BERT4Rec, config: BERT4RecConfig, data: SequenceData,
                 version: str) -> Path:
    vocabulary, popularity = beauty_documents(data, config.vocab_size - 2)
    work.mkdir(parents=True, exist_ok=True)
    info = export_bundle(root, model, config, vocabulary, popularity, work, contexts=[], version=version)
    return Path(info.path)


class Server:
    def __init__(self, home: Path, bundle: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{bundle.name}.log"
        full = {**os.environ, "RECSYS_HOME": str(home), "RECSYS_BUNDLE": str(bundle),
                "BENTOML_HOME": str(home / f"bentoml-{bundle.name}"), "BENTOML_DO_NOT_TRACK": "True", **env}
        cmd = [sys.executable, "-m", "bentoml", "serve", "recsys_serving.service:RecommenderService",
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=full, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-3000:])

    def cpu_seconds(self) -> float:
        """user + system CPU of the server and its worker processes so far."""
        root = psutil.Process(self.proc.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def drive(url: str, users: list[str], concurrency: int, duration: float, seed: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients for `duration` seconds; client-side latency of each request."""
    rng = random.Random(seed)
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        for _ in range(20):  # warm-up (connections, first inferences)
            await client.post("/recommend", json={"user_id": rng.choice(users), "k": 10})
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                body = {"user_id": rng.choice(users), "k": 10}
                t0 = time.perf_counter()
                try:
                    resp = await client.post("/recommend", json=body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    errors[f"http_{resp.status_code}"] += 1
                else:
                    reasons[resp.json()["reason"]] += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    ms = sorted(1000 * x for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "requests": len(ms),
        "requests_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(q[49], 2),
        "p95_ms": round(q[94], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(ms[-1], 2),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(ms)), 3),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "answers_by_reason": dict(reasons),
    }


def run_catalogue(name: str, home: Path, bundle: Path, users: list[str], args: argparse.Namespace) -> dict[str, Any]:
    env = {"RECSYS_CACHE_TTL_S": str(args.cache_ttl), "RECSYS_MODEL_TIMEOUT_MS": str(args.model_timeout_ms),
           "RECSYS_ORT_INTRA_THREADS": str(args.intra_threads)}
    server = Server(home, bundle, env)
    try:
        started = time.perf_counter()
        server.wait_ready()
        ready_s = time.perf_counter() - started
        runs = []
        for c in args.concurrency:
            cpu_before = server.cpu_seconds()
            result = asyncio.run(drive(server.url, users, c, args.duration, args.seed))
            # CPU the server used per request: independent of what else runs on the machine, so
            # 1000 * cores / server_cpu_ms_per_request bounds the req/s of dedicated cores.
            result["server_cpu_ms_per_request"] = round(
                1000 * (server.cpu_seconds() - cpu_before) / max(1, result["requests"]), 3
            )
            print(f"[{name}] {json.dumps(result)}", flush=True)
            runs.append(result)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        ratio = [line for line in metrics.splitlines() if line.startswith("recsys_cache_hit_ratio")]
    finally:
        server.stop()
    return {"catalogue": name, "bundle": str(bundle), "server_ready_s": round(ready_s, 1), "runs": runs,
            "server_cache_hit_ratio": ratio[0].split()[-1] if ratio else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beauty", type=Path, default=BEAUTY)
    parser.add_argument("--model-dir", type=Path, default=None, help="BERT4Rec trained on Beauty (save_model dir)")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--large-items", type=int, default=2_000_000)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--cache-ttl", type=float, default=0.001, help="answer cache TTL (s); tiny = uncached")
    parser.add_argument("--model-timeout-ms", type=float, default=1000.0)
    parser.add_argument("--intra-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="serve_latency_"))
    home = work / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    os.environ["RECSYS_HOME"] = str(home)  # Feast paths and the bundles follow it
    data = SequenceData.from_sasrec_txt(args.beauty)
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                              "duration_s": args.duration, "cache_ttl_s": args.cache_ttl,
                              "ort_intra_threads": args.intra_threads}

    if args.model_dir:
        model, config = load_model(args.model_dir)
        report["beauty_weights"] = f"trained ({args.model_dir})"
    else:
        preset = get_preset("beauty").model
        config = BERT4RecConfig(vocab_size=data.vocab_size, **{k: preset[k] for k in ("hidden", "layers", "heads", "max_len")})
        torch.manual_seed(args.seed)
        model = BERT4Rec(config).eval()
        report["beauty_weights"] = "random (no --model-dir): same network as the beauty preset, same latency"
    report["beauty_model"] = config.model_dump()
    t = time.perf_counter()
    beauty_bundle = build_bundle(home / "bundles", work / "beauty", model, config, data, "beauty")
    print(f"beauty bundle in {time.perf_counter() - t:.1f}s", flush=True)
    median_len = int(statistics.median(min(len(s), config.max_len - 1) for s in data.tokens)) + 1
    report["beauty_batch1"] = [
        batch1_latency(model, beauty_bundle / "model.onnx", [], n, threads=1).model_dump()
        for n in sorted({median_len, config.max_len})
    ]
    print(f"batch-1 ORT vs torch (12k): {report['beauty_batch1']}", flush=True)
    t = time.perf_counter()
    report["feature_store_users"] = load_feature_store_with_beauty(data, home, config.max_len)
    print(f"feature store loaded in {time.perf_counter() - t:.1f}s", flush=True)
    users = list(data.user_ids)
    report["beauty"] = run_catalogue("beauty_12k", home, beauty_bundle, users, args)

    if not args.skip_large:
        big = BERT4RecConfig(**{**config.model_dump(), "vocab_size": args.large_items + 2})
        torch.manual_seed(args.seed)
        big_model = BERT4Rec(big).eval()
        t = time.perf_counter()
        big_bundle = build_bundle(home / "bundles", work / "large", big_model, big, data, "large")
        print(f"{args.large_items:,}-item bundle in {time.perf_counter() - t:.1f}s", flush=True)
        report["large_batch1"] = [batch1_latency(big_model, big_bundle / "model.onnx", [], median_len, repeats=20,
                                                 threads=1).model_dump()]
        del big_model
        report["large"] = run_catalogue(f"random_{args.large_items}", home, big_bundle, users, args)
    report["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
