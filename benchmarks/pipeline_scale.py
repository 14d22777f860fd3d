"""Scale benchmark of the data pipeline: generate -> load -> clean -> tokenize, out of core.

Runs the project's own stage functions (the ones the Dagster assets wrap) on synthetic data of the
requested size and prints a markdown table with, per stage, wall time, rows per second and the peak
RSS of this process and its children (generator workers included), plus the slowest SQL statements
of each stage so a bottleneck can be named.

    python benchmarks/pipeline_scale.py                                   # 10M users x 2M items x 100M events
    python benchmarks/pipeline_scale.py --users 100000 --items 20000 --events 1000000
    python benchmarks/pipeline_scale.py --stages generate --events 10000000 --users 1000000

DuckDB gets a `memory_limit` and a `temp_directory` under --workdir so the SQL stages spill to disk
instead of growing; the goal on 2 cores / 24 GB is the whole run <= 10 min and peak RSS < 12 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import duckdb
import psutil

from recsys_assets.data import cleaning, sequences, sources
from recsys_assets.data.synthetic import GenerationSummary, SyntheticConfig, generate_events

STAGES: tuple[str, ...] = ("generate", "load", "clean", "sequences")


class PeakRss:
    """Samples the RSS of this process plus all its children on a thread.

    Sampling (not `ru_maxrss`) because the generator's worker processes and DuckDB's memory both
    count, and ru_maxrss reports the largest single process only.
    """

    def __init__(self, interval_s: float = 0.2, spill_dir: Path | None = None) -> None:
        self.interval_s = interval_s
        self.spill_dir = spill_dir
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stage_peak = 0
        self._stage_spill = 0
        self.overall_peak = 0
        self.overall_spill = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _rss(self) -> int:
        total = 0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that just exited
        return total

    def _spill(self) -> int:
        if self.spill_dir is None or not self.spill_dir.exists():
            return 0
        total = 0
        for entry in os.scandir(self.spill_dir):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # DuckDB removed it meanwhile
        return total

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            rss = self._rss()
            spill = self._spill() if tick % 5 == 0 else 0  # a directory scan is dearer: every 5th sample
            with self._lock:
                self._stage_peak = max(self._stage_peak, rss)
                self._stage_spill = max(self._stage_spill, spill)
                self.overall_peak = max(self.overall_peak, rss)
                self.overall_spill = max(self.overall_spill, spill)
            tick += 1
            self._stop.wait(self.interval_s)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset_stage(self) -> None:
        with self._lock:
            self._stage_peak = self._rss()
            self._stage_spill = 0

    def stage(self) -> tuple[int, int]:
        with self._lock:
            return max(self._stage_peak, self._rss()), self._stage_spill


class TimedConnection:
    """A DuckDB connection that records how long each statement takes (first 90 chars kept).

    The stage functions only call `execute(...)` (and read results from what it returns), so
    forwarding everything else keeps them unaware of the timing.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, echo_over_s: float | None = None) -> None:
        self._con = con
        self.echo_over_s = echo_over_s
        self.statements: list[tuple[float, str]] = []

    def execute(self, query: str, parameters: Any = None) -> duckdb.DuckDBPyConnection:
        started = time.perf_counter()
        result = self._con.execute(query, parameters) if parameters is not None else self._con.execute(query)
        seconds = time.perf_counter() - started
        text = " ".join(query.split())[:90]
        self.statements.append((seconds, text))
        if self.echo_over_s is not None and seconds >= self.echo_over_s:
            # Printed as it happens, so a run killed by a timeout still shows where the time went.
            print(f"    {seconds:8.1f}s  {text}", flush=True)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


@dataclass
class StageResult:
    stage: str
    seconds: float
    rows: int
    peak_rss: int
    spill: int
    detail: str = ""
    slowest: list[tuple[float, str]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def generation_config(args: argparse.Namespace) -> SyntheticConfig:
    """Events per human user chosen so that the total (bots and duplicates included) hits --events."""
    bots = args.users * args.bot_user_rate * args.bot_events_mean
    duplicate_rate = 0.005
    per_user = (args.events / (1 + duplicate_rate) - bots) / (args.users * (1 - args.bot_user_rate))
    if per_user < 1:
        raise SystemExit(f"--events {args.events:,} is too few for --users {args.users:,} (and their bots)")
    return SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        n_categories=args.categories or max(1, args.items // 200),
        events_per_user_mean=per_user,
        seed=args.seed,
        output_format="parquet",
        malformed_rate=0.0,  # parquet holds typed columns only
        duplicate_rate=duplicate_rate,
        bot_user_rate=args.bot_user_rate,
        bot_events_mean=args.bot_events_mean,
        chunk_users=args.chunk_users,
        workers=args.workers,
    )


def _slowest(statements: list[tuple[float, str]], top: int = 4) -> list[tuple[float, str]]:
    """The statements that took longest, repeats of one statement (per file, per k-core round)
    summed under one entry as `<n>x <text>`."""
    groups: dict[str, list[float]] = {}
    for seconds, text in statements:
        groups.setdefault(re.sub(r"\d+", "N", text)[:70], []).append(seconds)
    ranked = sorted(((sum(v), f"{len(v)}x {k}" if len(v) > 1 else k) for k, v in groups.items()), reverse=True)
    return ranked[:top]


def _run_stage(
    name: str, monitor: PeakRss, fn: Callable[[], tuple[int, str]], con: TimedConnection | None = None
) -> StageResult:
    monitor.reset_stage()
    first_statement = len(con.statements) if con else 0
    started = time.perf_counter()
    rows, detail = fn()
    seconds = time.perf_counter() - started
    peak, spill = monitor.stage()
    slowest = _slowest(con.statements[first_statement:]) if con else []
    result = StageResult(name, seconds, rows, peak, spill, detail, slowest)
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:,.1f}s, {rows:,} rows ({result.rate:,.0f}/s), "
        f"peak RSS {_gb(peak)} GB, spill {_gb(spill)} GB {detail}",
        flush=True,
    )
    return result


def _connect(args: argparse.Namespace) -> TimedConnection:
    db = args.workdir / "warehouse.duckdb"
    if "load" in args.stages:
        for stale in (db, db.with_name(db.name + ".wal")):
            stale.unlink(missing_ok=True)
    elif not db.exists():
        raise SystemExit(f"{db} does not exist: run with the load stage first (and --keep)")
    tmp = args.workdir / "duckdb_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    con = duckdb.connect(str(db))
    con.execute(f"SET memory_limit = '{args.memory_limit}'")
    con.execute(f"SET temp_directory = '{tmp}'")
    con.execute(f"SET threads = {args.threads}")
    con.execute("SET max_temp_directory_size = '200GB'")
    return TimedConnection(con, echo_over_s=args.echo_over)


def run(args: argparse.Namespace) -> list[StageResult]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    events_dir = args.workdir / "events"
    marker = events_dir / "_generation.json"
    gen_cfg = generation_config(args)
    monitor = PeakRss(spill_dir=args.workdir / "duckdb_tmp").start()
    results: list[StageResult] = []
    try:
        if "generate" in args.stages:
            reuse = (
                args.reuse
                and marker.exists()
                and json.loads(marker.read_text()).get("config") == json.loads(gen_cfg.model_dump_json())
            )
            if reuse:
                print(f"reusing events in {events_dir} (same generator config)")
            else:

                def generate() -> tuple[int, str]:
                    summary: GenerationSummary = generate_events(events_dir, gen_cfg)
                    marker.write_text(
                        json.dumps({"config": json.loads(gen_cfg.model_dump_json()), "summary": summary.model_dump()})
                    )
                    size = sum(Path(f).stat().st_size for f in summary.files)
                    return summary.events, f"({len(summary.files)} files, {_gb(size)} GB, {gen_cfg.workers} workers)"

                results.append(_run_stage("generate", monitor, generate))
        if set(args.stages) & {"load", "clean", "sequences"}:
            _sql_stages(args, events_dir, monitor, results)
    finally:
        monitor.stop()
    results.append(
        StageResult("total", sum(r.seconds for r in results), 0, monitor.overall_peak, monitor.overall_spill)
    )
    return results


def _sql_stages(args: argparse.Namespace, events_dir: Path, monitor: PeakRss, results: list[StageResult]) -> None:
    timed = _connect(args)
    con = cast(duckdb.DuckDBPyConnection, timed)  # the stage functions only call what it forwards
    try:

        def load() -> tuple[int, str]:
            return sources.load_events(con, events_dir, "parquet", table="raw_events"), ""

        def clean() -> tuple[int, str]:
            summary = cleaning.clean_events(con, cleaning.CleaningConfig())
            reasons = {k: v for k, v in summary.by_reason.items() if v}
            return summary.raw, f"(cleaned {summary.cleaned:,}, users {summary.users:,}, items {summary.items:,}, {reasons})"

        def tokenize() -> tuple[int, str]:
            items = sequences.build_item_vocabulary(con)
            sequences.build_context_vocabulary(con)
            summary = sequences.tokenize_sequences(con)
            return summary.interactions, f"(users {summary.users:,}, items {items:,}, lengths {summary.length_quantiles})"

        for name, fn in (("load", load), ("clean", clean), ("sequences", tokenize)):
            if name in args.stages:
                results.append(_run_stage(name, monitor, fn, timed))
    finally:
        con.close()


def markdown(results: list[StageResult], header: str) -> str:
    lines = [
        header,
        "",
        "| stage | seconds | rows | rows/s | peak RSS (GB) | peak spill (GB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows = f"{r.rows:,}" if r.rows else ""
        rate = f"{r.rate:,.0f}" if r.rows else ""
        lines.append(f"| {r.stage} | {r.seconds:,.1f} | {rows} | {rate} | {_gb(r.peak_rss)} | {_gb(r.spill)} |")
    details = [f"- {r.stage}: {r.detail}" for r in results if r.detail]
    slow = [
        f"- {r.stage}: " + "; ".join(f"{s:.1f}s `{q}`" for s, q in r.slowest) for r in results if r.slowest
    ]
    return "\n".join(lines + ["", *details, "", "Slowest statements:", *slow])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--events", type=int, default=100_000_000, help="Target rows, noise included.")
    parser.add_argument("--categories", type=int, default=None, help="Default: items / 200.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bot-user-rate", type=float, default=0.002)
    parser.add_argument("--bot-events-mean", type=float, default=300.0)
    parser.add_argument("--chunk-users", type=int, default=100_000, help="Users per generated chunk file.")
    parser.add_argument("--workers", type=int, default=2, help="Generator processes.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recsys_scale"))
    parser.add_argument("--memory-limit", default="8GB", help="DuckDB memory_limit.")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads.")
    parser.add_argument(
        "--stages", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(STAGES),
        help=f"Comma-separated subset of {','.join(STAGES)}.",
    )
    parser.add_argument(
        "--echo-over", type=float, default=5.0, help="Print each SQL statement taking at least this many seconds."
    )
    parser.add_argument("--reuse", action="store_true", help="Skip generation when --workdir holds the same data.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here (benchmarks/cost_growth.py reads it).")
    parser.add_argument(
        "--keep", action="store_true",
        help="Keep the DuckDB file afterwards, so later runs can start at a later stage (e.g. --stages clean,sequences).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {STAGES}")
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = run(args)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    header = (
        f"## Pipeline scale: {args.users:,} users x {args.items:,} items x ~{args.events:,} events\n\n"
        f"{psutil.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; DuckDB {duckdb.__version__} memory_limit "
        f"{args.memory_limit}, threads {args.threads}; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f} (the CPUs may be shared); wall {wall:,.1f}s"
    )
    report = markdown(results, header)
    print("\n" + report)
    (args.workdir / "results.md").write_text(report + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "users": args.users, "items": args.items, "events": args.events, "wall_s": round(wall, 1),
            "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
            "stages": [
                {"stage": r.stage, "seconds": round(r.seconds, 2), "rows": r.rows, "peak_rss_gb": round(r.peak_rss / 1e9, 3),
                 "spill_gb": round(r.spill / 1e9, 3), "detail": r.detail}
                for r in results
            ],
        }, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir / "duckdb_tmp", ignore_errors=True)
        for leftover in args.workdir.glob("warehouse.duckdb*"):
            leftover.unlink()


if __name__ == "__main__":  # the generator's workers are spawned: they import this module
    main()
