"""How cost grows from 1 % to 100 % of the client's scale: one table and one plot.

Reads the JSON reports of the benchmarks that measure each stage (R: the default `--reports`,
.recsys/reports/cost_growth), run once per scale
(1 %: 100k users x 20k items x 1M events; 10 %: 1M x 200k x 10M; 100 %: 10M x 2M x 100M):

    python benchmarks/pipeline_scale.py --users 100000 --items 20000 --events 1000000 --keep \\
        --workdir W1 --json R/pipeline_1.json                      # and 10 %, 100 % likewise
    python benchmarks/feature_store_latency.py --warehouse W1/warehouse.duckdb --stores sqlite \\
        --reads 5000 --pushes 200 --json R/features_1.json
    python benchmarks/train_scale.py --items 20000 200000 1190898 --loss sampled --budget-s 30 \\
        --out .recsys/reports/train_scale.json
    python benchmarks/serve_latency.py --large-items 20000 --large-item-tables fp32 --concurrency 1 \\
        --cached-concurrency --duration 30 --recall-sequences 200 --out R/serve_1.json
        # 10 %: --large-items 200000 (fp32); 100 %: --large-items 2000000 --large-item-tables int4
    python benchmarks/cost_growth.py --reports R --plot docs/cost_growth.png

Clean and tokenize come from the pipeline runs, materialization (build of user_sequence_features and
the SQLite load) from the feature-store runs on those warehouses, the training step (CPU, sampled
softmax) from train_scale at each scale's catalogue, and one served request (concurrency 1, uncached,
the server's CPU per request and a worker's RSS) from serve_latency's large catalogue. Nothing is
measured here: a missing report leaves its cells empty and is named.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCALES: dict[str, dict[str, int]] = {
    "1 %": {"users": 100_000, "items": 20_000, "events": 1_000_000},
    "10 %": {"users": 1_000_000, "items": 200_000, "events": 10_000_000},
    "100 %": {"users": 10_000_000, "items": 2_000_000, "events": 100_000_000},
}
FILE_SUFFIX = {"1 %": "1", "10 %": "10", "100 %": "100"}


@dataclass
class Cell:
    value: float | None = None  # the stage's time, in UNITS[stage] (seconds, or ms for one step or request)
    gb: float | None = None
    note: str = ""


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_cells(report: dict[str, Any] | None) -> tuple[Cell, Cell]:
    if report is None:
        return Cell(), Cell()
    stages = {s["stage"]: s for s in report["stages"]}
    clean, tok = stages.get("clean"), stages.get("sequences")
    return (
        Cell(clean["seconds"], clean["peak_rss_gb"]) if clean else Cell(),
        Cell(tok["seconds"], tok["peak_rss_gb"]) if tok else Cell(),
    )


def materialization_cell(report: dict[str, Any] | None) -> Cell:
    if report is None:
        return Cell()
    sqlite = next((s for s in report["stores"] if s["online_store"] == "sqlite"), None)
    if sqlite is None:
        return Cell()
    build = report["feature_table"]
    return Cell(
        build["build_s"] + sqlite["materialize_s"],
        max(build["build_peak_rss_gb"], sqlite["materialize_peak_rss_gb"]),
        f"{report['users']:,} users",
    )


def training_cell(report: dict[str, Any] | None, items: int) -> Cell:
    """The sampled-softmax step at the largest catalogue run up to `items`: at 100 % the 1,190,898
    items that cleaning leaves of 2M (the 2M step itself needs 22 GB: README, "Training at 2M items")."""
    if report is None:
        return Cell()
    runs = [r for r in report["results"] if r["loss"] == "sampled" and r.get("ms_per_step") and r["items"] <= items]
    if not runs:
        return Cell()
    run = max(runs, key=lambda r: r["items"])
    note = "" if run["items"] == items else f"{run['items']:,} items"
    return Cell(run["ms_per_step"], run["peak_rss_bytes"] / 1e9, note)


def serving_cell(report: dict[str, Any] | None) -> Cell:
    if report is None:
        return Cell()
    variant, result = next(iter(report["large"].items()))
    run = next((r for r in result["runs"] if r["concurrency"] == 1 and r["run"] == "uncached"), None)
    if run is None:
        return Cell()
    workers = [m for m in result["memory"]["uncached_after_runs"] if m["worker"]]
    rss = max(m["rss_mb"] for m in workers) / 1e3 if workers else None
    return Cell(
        run["p50_ms"], rss,
        f"p99 {run['p99_ms']:.1f} ms, {run['server_cpu_ms_per_request']:.1f} ms CPU, {variant}",
    )


def collect(reports: Path, train_report: Path) -> dict[str, dict[str, Cell]]:
    train = _load(train_report)
    table: dict[str, dict[str, Cell]] = {}
    for scale, size in SCALES.items():
        n = FILE_SUFFIX[scale]
        clean, tok = pipeline_cells(_load(reports / f"pipeline_{n}.json"))
        table[scale] = {
            "clean": clean,
            "tokenize": tok,
            "training step": training_cell(train, size["items"]),
            "materialization": materialization_cell(_load(reports / f"features_{n}.json")),
            "served request": serving_cell(_load(reports / f"serve_{n}.json")),
        }
    return table


UNITS = {"clean": "s", "tokenize": "s", "training step": "ms", "materialization": "s", "served request": "ms"}


def markdown(table: dict[str, dict[str, Cell]]) -> str:
    stages = list(UNITS)
    head = "| scale | " + " | ".join(f"{s} ({UNITS[s]}, peak GB)" for s in stages) + " |"
    lines = [head, "|---|" + "---:|" * len(stages)]
    for scale, cells in table.items():
        size = SCALES[scale]
        label = f"{scale}: {size['users'] / 1e6:g}M users, {size['items'] / 1e6:g}M items, {size['events'] / 1e6:g}M events"
        parts = []
        for s in stages:
            c = cells[s]
            if c.value is None:
                parts.append("not run")
                continue
            text = f"{c.value:,.1f} / {c.gb:.2f}" if c.gb is not None else f"{c.value:,.1f}"
            parts.append(text + (f" ({c.note})" if c.note else ""))
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(table: dict[str, dict[str, Cell]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [SCALES[s]["events"] for s in table]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage, unit in UNITS.items():
        points = [(xi, table[s][stage]) for xi, s in zip(x, table)]
        t = [(xi, c.value / (1000 if unit == "ms" else 1)) for xi, c in points if c.value is not None]
        m = [(xi, c.gb) for xi, c in points if c.gb is not None]
        label = stage + (" (one)" if unit == "ms" else "")
        if t:
            ax_t.plot(*zip(*t), marker="o", label=label)
        if m:
            ax_m.plot(*zip(*m), marker="o", label=stage + (" (one worker)" if stage == "served request" else ""))
    ref = [x[0], x[-1]]
    for ax, first in ((ax_t, 1.0), (ax_m, None)):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("scale (raw events; users and items grow alike)")
        ax.set_xticks(x, [f"{s}\n{e / 1e6:g}M" for s, e in zip(table, x)])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        if first is not None:
            ax.plot(ref, [first, first * ref[1] / ref[0]], ls=":", color="grey", label="linear (x100)")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("Time (2 CPU cores)")
    ax_m.set_ylabel("peak RSS (GB)")
    ax_m.set_title("Memory")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, default=Path(".recsys/reports/cost_growth"),
                        help="pipeline_<n>.json, features_<n>.json, serve_<n>.json for n in 1, 10, 100")
    parser.add_argument("--train", type=Path, default=Path(".recsys/reports/train_scale.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/cost_growth.png"))
    args = parser.parse_args(argv)
    table = collect(args.reports, args.train)
    missing = [f"{scale} {stage}" for scale, cells in table.items() for stage, c in cells.items() if c.value is None]
    print(markdown(table))
    if missing:
        print("\nnot run: " + ", ".join(missing))
    plot(table, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
