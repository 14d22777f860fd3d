"""Quality on every real dataset at hand, through the path a user takes (not a test).

For each dataset: `make run` with `RECSYS_EVENTS_FORMAT` / `RECSYS_EVENTS_PATH` pointing at it and
a fresh `RECSYS_HOME`, nothing else: the pipeline's defaults (cleaning, tokenizing, training sized
by the data within its 60-minute budget, evaluation). The figures are the evaluation report's
(`reports/evaluation/latest/metrics.json`): leave-one-out, full ranking, the model refit on all
but each user's last item against baselines fit on the same data.

Bars per dataset: BERT4Rec beats item-kNN by >= +25 % HR@10 and >= +18 % NDCG@10, and the
last-item baseline by >= +10 % NDCG@10.

Datasets (../shared/data, README there): those with at least 4,000 users or sessions after
cleaning. Left out: REES46's head (4,505 users, 1,141 with 5 or more events: under 4,000 after the
5-core) and OTTO's 20 sessions.

The next purchase (`--target next_purchase`, the pipeline's RECSYS_TARGET): every event is an
input, the held-out item is each user's last purchase. Datasets with purchases among other events:
the built-in generator (purchase funnels planted), REES46's head and Diginetica's views and purchases.

    python benchmarks/quality_datasets.py                      # every dataset, one after another
    python benchmarks/quality_datasets.py --only beauty --out /tmp/quality.json
    python benchmarks/quality_datasets.py --target next_purchase   # generator, rees46, diginetica
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"

# name -> (RECSYS_EVENTS_FORMAT, path under ../shared/data); the generator: the pipeline's default
DATASETS: dict[str, tuple[str, str]] = {
    "generator": ("", ""),
    "rees46": ("rees46", "rees46/2019-Oct_head.csv.gz"),
    "beauty": ("sasrec", "amazon_beauty/Beauty.txt"),
    "grocery": ("amazon", "amazon_grocery_rechorus/train.csv.gz"),
    # SessionId, ItemId, Time (unix seconds): the amazon reader's user, item, timestamp
    "yoochoose": ("amazon", "yoochoose/yoochoose-clicks-100k_train_full.txt.gz"),
    "diginetica": ("diginetica", "diginetica"),
}
# what each target is measured on by default
DEFAULT_DATASETS: dict[str, list[str]] = {
    "next_item": ["beauty", "grocery", "yoochoose", "diginetica"],
    "next_purchase": ["generator", "rees46", "diginetica"],
}
BARS = {("item_knn", "HR@10"): 0.25, ("item_knn", "NDCG@10"): 0.18, ("last_item", "NDCG@10"): 0.10}
MIN_USERS = 4000


def run_dataset(
    name: str, home: Path, budget_minutes: float | None, target: str = "next_item", target_event_types: str = ""
) -> dict[str, Any]:
    fmt, rel = DATASETS[name]
    env = {**os.environ, "RECSYS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "RECSYS_TARGET": target, "RECSYS_TARGET_EVENT_TYPES": target_event_types}
    if fmt:
        path = SHARED / rel
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (see ../shared/data/README.md)")
        env.update(RECSYS_EVENTS_FORMAT=fmt, RECSYS_EVENTS_PATH=str(path))
    else:
        for key in ("RECSYS_EVENTS_FORMAT", "RECSYS_EVENTS_PATH"):
            env.pop(key, None)
    if budget_minutes is not None:
        env["RECSYS_TRAINING_BUDGET_MINUTES"] = str(budget_minutes)
    log = home / "make-run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(["make", "run"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    metrics = home / "reports" / "evaluation" / "latest" / "metrics.json"
    if not metrics.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{name}: make run exited {rc} without an evaluation report; log tail:\n{tail}")
    doc = json.loads(metrics.read_text())
    models = doc["models"]
    row: dict[str, Any] = {
        "dataset": name,
        "format": fmt or "generator",
        "target": doc["config"].get("target_label", "next_item"),
        "make_run_rc": rc,
        "make_run_seconds": round(seconds, 1),
        "users": doc["dataset"].get("n_sequences"),
        "users_evaluated": doc["dataset"].get("n_users_evaluated"),
        "items": doc["dataset"].get("n_items"),
        "fit": doc["config"].get("fit"),
        "network": (doc["config"].get("sizing") or {}).get("network"),
        "sizing_reasons": (doc["config"].get("sizing") or {}).get("reasons"),
        "best_epoch": doc["config"].get("best_epoch"),
        "valid_NDCG@10": (doc["config"].get("bert4rec_best_valid") or {}).get("NDCG@10"),
        "gate": doc.get("gate", {}).get("passed"),
        "full": {m: {k: models[m]["full"][k] for k in ("HR@10", "NDCG@10", "MRR")} for m in models if "full" in models[m]},
    }
    lifts = {}
    for (baseline, metric), bar in BARS.items():
        b4r, base = models["bert4rec"]["full"][metric], models[baseline]["full"][metric]
        lift = b4r / base - 1 if base > 0 else None
        lifts[f"{metric} vs {baseline}"] = {"lift": lift, "bar": bar, "met": lift is not None and lift >= bar}
    row["lifts"] = lifts
    row["bars_met"] = all(v["met"] for v in lifts.values())
    row["included"] = (row["users"] or 0) >= MIN_USERS
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(DATASETS),
                        help="a dataset (repeatable; default: those of the target, DEFAULT_DATASETS)")
    parser.add_argument("--target", choices=sorted(DEFAULT_DATASETS), default="next_item", help="RECSYS_TARGET")
    parser.add_argument("--target-event-types", default="", help="RECSYS_TARGET_EVENT_TYPES, e.g. cart,purchase")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="RECSYS_TRAINING_BUDGET_MINUTES (default: the pipeline's, 60)")
    parser.add_argument("--keep", type=Path, default=None, help="keep each RECSYS_HOME under this directory")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or DEFAULT_DATASETS[args.target]:
        home = (args.keep / name) if args.keep else Path(tempfile.mkdtemp(prefix=f"quality-{name}-"))
        if home.exists() and args.keep:
            shutil.rmtree(home)
        home.mkdir(parents=True, exist_ok=True)
        try:
            row = run_dataset(name, home, args.budget_minutes, args.target, args.target_event_types)
        finally:
            if not args.keep:
                shutil.rmtree(home, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=2))
    print("| dataset | target | users | evaluated | network | BERT4Rec HR@10 / NDCG@10 | item-kNN | last-item | lifts (HR@10 vs kNN, NDCG@10 vs kNN, NDCG@10 vs last) | bars |")
    for r in rows:
        f = r["full"]
        lifts = ", ".join(f"{v['lift']:+.1%}" if v["lift"] is not None else "-" for v in r["lifts"].values())
        print(f"| {r['dataset']} | {r['target']} | {r['users']} | {r['users_evaluated']} | {r['network']} | {f['bert4rec']['HR@10']:.4f} / {f['bert4rec']['NDCG@10']:.4f} "
              f"| {f['item_knn']['HR@10']:.4f} / {f['item_knn']['NDCG@10']:.4f} | {f['last_item']['HR@10']:.4f} / "
              f"{f['last_item']['NDCG@10']:.4f} | {lifts} | {'met' if r['bars_met'] else 'not met'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
