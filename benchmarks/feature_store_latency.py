"""Online read latency of the feature store for one user: SQLite vs Redis (p50 / p99), and push latency.

Builds a cleaned_interactions table of `--users` users x `--events-per-user` events in DuckDB (or
takes the one in `--warehouse`, e.g. the 100M-event run of `pipeline_scale.py --keep`), runs the
real pipeline (build_user_sequence_features -> feast apply -> materialize_latest) into each online
store, then times FeatureStoreClient.get_user_sequence (what serving calls per /recommend) for random
users and push_event (per POST /events). Time and peak RSS (this process and its children, a private
redis-server included) are recorded per phase, with the online store's size. Redis:
`--redis-connection host:port`, else a private redis-server on a free port when the binary is
installed, else that store is skipped (said so).

    python benchmarks/feature_store_latency.py --users 5000 --reads 3000
    python benchmarks/feature_store_latency.py --warehouse /path/to/scale/warehouse.duckdb --reads 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline_scale import PeakRss  # noqa: E402  (this script's own directory is on sys.path)

from recsys_assets.data.user_features import (  # noqa: E402
    FEATURE_FILE,
    UserFeaturesConfig,
    apply_feature_repo,
    build_user_sequence_features,
    materialize_latest,
)
from recsys_serving.feature_client import FeatureStoreClient, PushedEvent, load_feature_store  # noqa: E402

FEATURE_REPO = REPO / "feature_repo"


def make_interactions(con: duckdb.DuckDBPyConnection, users: int, events_per_user: int, seed: int) -> int:
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    con.execute(
        f"""CREATE OR REPLACE TABLE cleaned_interactions AS
            SELECT 'u' || (i // {events_per_user}) AS user_id,
                   'i' || CAST(floor(pow(random(), 3) * 20000) AS BIGINT) AS item_id,
                   CASE WHEN random() < 0.85 THEN 'view' WHEN random() < 0.8 THEN 'cart' ELSE 'purchase' END AS event_type,
                   TIMESTAMP '2024-01-01' + to_seconds(CAST((i % {events_per_user}) * 3600 + (i // {events_per_user}) % 3600 AS BIGINT)) AS ts,
                   's' || (i // 7) AS session_id, 'c' AS category,
                   ['web', 'ios', 'android'][1 + CAST(i % 3 AS INTEGER)] AS device,
                   ['new', 'regular', 'vip'][1 + CAST((i // {events_per_user}) % 3 AS INTEGER)] AS segment,
                   1.0 AS price, i AS event_id
            FROM range({users * events_per_user}) r(i)"""
    )
    return users * events_per_user


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {
        "n": len(samples_ms),
        "p50_ms": round(qs[49], 3),
        "p95_ms": round(qs[94], 3),
        "p99_ms": round(qs[98], 3),
        "mean_ms": round(statistics.fmean(samples_ms), 3),
    }


def time_calls(fn, args: list, warmup: int) -> list[float]:
    for a in args[:warmup]:
        fn(a)
    samples = []
    for a in args[warmup:]:
        t = time.perf_counter()
        fn(a)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def sample_users(feature_path: Path, n: int, seed: int) -> list[str]:
    """`n` user ids drawn with replacement from the feature table (ids need not follow a pattern)."""
    with duckdb.connect() as con:
        ids = [r[0] for r in con.execute(
            f"SELECT DISTINCT user_id FROM read_parquet(?) USING SAMPLE reservoir({n} ROWS) REPEATABLE ({seed})",
            [str(feature_path)],
        ).fetchall()]
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(n)]


def online_store_bytes(store, kind: str, connection: str) -> int:
    if kind == "redis":
        import redis

        host, port = connection.rsplit(":", 1)
        return int(redis.Redis(host=host, port=int(port)).info("memory")["used_memory"])
    db = Path(store.config.online_store.path)  # the path feature_store.yaml resolves to; journal files beside it
    return sum(f.stat().st_size for f in db.parent.glob(db.name + "*"))


def bench_store(
    kind: str, feature_path: Path, reads: int, pushes: int, max_len: int, seed: int, monitor: PeakRss,
    connection: str,
) -> dict:
    store = load_feature_store(FEATURE_REPO, kind)
    apply_feature_repo(store, FEATURE_REPO, max_len=max_len)
    monitor.reset_stage()
    t = time.perf_counter()
    stats = materialize_latest(store, feature_path)
    materialize_s = time.perf_counter() - t
    materialize_rss, _ = monitor.stage()
    size = online_store_bytes(store, kind, connection)
    print(f"{kind}: materialized {stats.written:,} users in {materialize_s:.1f}s, peak RSS "
          f"{materialize_rss / 1e9:.2f} GB, online store {size / 1e9:.2f} GB", flush=True)
    client = FeatureStoreClient(FEATURE_REPO, online_store=kind)
    warmup = min(200, reads // 5)
    single_pushes, batches_of_8 = pushes + 20, pushes // 8 + 5  # warm-up included (20 and 5)
    ids = sample_users(feature_path, reads + warmup + single_pushes + 8 * batches_of_8, seed)
    assert client.get_user_sequence(ids[0]) is not None
    read = percentiles(time_calls(client.get_user_sequence, ids[: reads + warmup], warmup))
    others = iter(ids[reads + warmup:])
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    events = [(next(others), i) for i in range(single_pushes)]
    push = percentiles(
        time_calls(lambda e: client.push_event(e[0], f"i{e[1]}", "cart", t0 + timedelta(seconds=e[1])), events, 20)
    )
    # what the service's event writer does under load: one read and one write per batch of 8 events,
    # on a connection of its own (FeatureStoreClient.for_writes)
    batches = [
        [PushedEvent(user_id=next(others), item_id=f"i{n}", event_type="cart",
                     ts=t0 + timedelta(days=1, seconds=b * 8 + n)) for n in range(8)]
        for b in range(batches_of_8)
    ]
    batch8 = percentiles(time_calls(client.for_writes().push_events, batches, 5))
    return {
        "online_store": kind,
        "materialized_users": stats.written,
        "materialize_s": round(materialize_s, 2),
        "materialize_peak_rss_gb": round(materialize_rss / 1e9, 2),
        "online_store_gb": round(size / 1e9, 3),
        "users_per_s": round(stats.written / max(materialize_s, 1e-9)),
        "get_user_sequence": read,
        "push_event": push,
        "push_events_batch_of_8": batch8,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            redis.Redis(host="127.0.0.1", port=port).ping()
            return proc, f"127.0.0.1:{port}"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("redis-server did not start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--events-per-user", type=int, default=60)
    parser.add_argument(
        "--warehouse", type=Path, default=None,
        help="DuckDB file whose cleaned_interactions to use (read only) instead of generating --users",
    )
    parser.add_argument("--memory-limit", default="8GB", help="DuckDB memory_limit of the feature table build.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the stores live (default: a temporary dir).")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--redis-connection", default="", help="host:port of a running Redis (default: start one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if args.reads < 2 or args.pushes < 16:  # percentiles need two timed calls; pushes are also timed in batches of 8
        parser.error("--reads must be at least 2 and --pushes at least 16")
    if args.warehouse is not None and not args.warehouse.is_file():
        parser.error(f"--warehouse {args.warehouse}: no such DuckDB file (pipeline_scale.py --keep leaves one)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    monitor = PeakRss().start()
    with tempfile.TemporaryDirectory(prefix="recsys-bench-", dir=args.workdir) as tmp:
        home = Path(tmp)
        os.environ["RECSYS_HOME"] = str(home)
        db = args.warehouse or home / "warehouse.duckdb"
        with duckdb.connect(str(db), read_only=args.warehouse is not None) as con:
            con.execute(f"SET memory_limit = '{args.memory_limit}'")
            con.execute(f"SET temp_directory = '{home / 'duckdb_tmp'}'")
            if args.warehouse is None:
                n_events = make_interactions(con, args.users, args.events_per_user, args.seed)
            else:
                n_events = con.execute("SELECT count(*) FROM cleaned_interactions").fetchall()[0][0]
            monitor.reset_stage()
            t = time.perf_counter()
            table = build_user_sequence_features(
                con, "cleaned_interactions", home / "features" / FEATURE_FILE, UserFeaturesConfig(max_len=args.max_len)
            )
            build_s = time.perf_counter() - t
            build_rss, _ = monitor.stage()
        feature_path = home / "features" / FEATURE_FILE
        print(f"feature table: {table.rows:,} rows of {table.users:,} users from {n_events:,} events in "
              f"{build_s:.1f}s, peak RSS {build_rss / 1e9:.2f} GB, {feature_path.stat().st_size / 1e9:.2f} GB",
              flush=True)
        results: dict = {
            "users": table.users,
            "events": n_events,
            "max_len": args.max_len,
            "feature_table": {
                "rows": table.rows, "build_s": round(build_s, 2), "build_peak_rss_gb": round(build_rss / 1e9, 2),
                "parquet_gb": round(feature_path.stat().st_size / 1e9, 3),
            },
            "stores": [],
            "skipped": {},
        }
        redis_proc = None
        for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
            connection = ""
            if kind == "redis":
                connection = args.redis_connection
                if not connection:
                    started = start_redis(home)
                    if started is None:
                        results["skipped"]["redis"] = "redis-server not found (apt-get install -y redis-server)"
                        print("redis: skipped, redis-server not found", file=sys.stderr)
                        continue
                    redis_proc, connection = started
                os.environ["RECSYS_REDIS_CONNECTION"] = connection
            try:
                results["stores"].append(
                    bench_store(kind, feature_path, args.reads, args.pushes, args.max_len, args.seed, monitor,
                                connection)
                )
            finally:
                if redis_proc is not None:
                    redis_proc.terminate()
                    redis_proc.wait(timeout=60)
                    redis_proc = None
    monitor.stop()

    print(f"{n_events:,} events, {table.users:,} users, max_len {args.max_len}; feature table {table.rows:,} rows "
          f"in {build_s:.1f}s")
    print(f"{'store':8} {'op':22} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}   materialize")
    for r in results["stores"]:
        for op in ("get_user_sequence", "push_event", "push_events_batch_of_8"):
            q = r[op]
            extra = (
                f"{r['materialized_users']:,} users in {r['materialize_s']}s, peak RSS "
                f"{r['materialize_peak_rss_gb']} GB, store {r['online_store_gb']} GB"
                if op == "get_user_sequence" else ""
            )
            print(f"{r['online_store']:8} {op:22} {q['p50_ms']:8.3f} {q['p95_ms']:8.3f} {q['p99_ms']:8.3f} "
                  f"{q['mean_ms']:8.3f}   {extra}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
