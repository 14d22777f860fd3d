"""New items between retrains, on the built-in generator: how often the grown bundle shows them
and how accurately, against the champion it grew from and item-kNN refit on the same data.

1. `retrain_job` on the generator's base window with the `--preset` network (default `synthetic`:
   fixed size and epochs, so the figures do not depend on how busy the machine is; `auto` sizes it
   by the data and a time budget as `make run` does): the champion.
2. `new_items_job` on the base window plus one following period with `--new-items` trending items
   outside the catalogue taking `--new-item-share` of the fresh views: `new_item_bundle` grows the
   champion by the new items and gates it on each user's last event (the period's, for most).

    python benchmarks/new_items.py --out .recsys/reports/new_items.json

Prints a markdown table and writes every figure to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _run(job: str, run_config: dict[str, Any]) -> Any:
    from dagster import DagsterInstance

    from recsys_assets.definitions import defs

    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(job).execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    if not result.success:
        raise SystemExit(f"{job} failed: {[e.message for e in result.all_events if e.is_failure]}")
    return result


def markdown(out: dict[str, Any]) -> str:
    rows = [
        "| model | NDCG@10, all users | HR@10, next item new | NDCG@10, next item new | HR@10, next item known "
        "| answer slots with a new item | users shown one | shown new items that were next |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("grown", "grown bundle (champion + new items)"), ("champion", "champion (before)"),
                        ("item_knn", "item-kNN, refit on the same data")):
        u, ndcg = out["new_items"][name], out["ndcg10"][name]
        rows.append(
            f"| {label} | {ndcg:.4f} | {u.get('HR@10_new_targets', 0):.4f} | {u.get('NDCG@10_new_targets', 0):.4f} | "
            f"{u.get('HR@10_old_targets', 0):.4f} | {u['new_item_slot_share']:.3f} | {u['users_shown_new_item']:.3f} | "
            f"{u['new_item_precision']:.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-items", type=int, default=100)
    parser.add_argument("--new-item-share", type=float, default=0.3)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--preset", default="synthetic", help="bert4rec_model preset of the champion (auto: sized)")
    parser.add_argument("--home", type=Path, default=None, help="RECSYS_HOME (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="recsys-new-items-"))
    os.environ["RECSYS_HOME"] = str(home)
    os.environ.setdefault("BENTOML_HOME", str(home / "bentoml"))
    for name in ("RECSYS_EVENTS_PATH", "RECSYS_EVENTS_FORMAT", "RECSYS_SYNTHETIC_PERIODS"):
        os.environ.pop(name, None)
    period = [{"days": args.days, "new_items": args.new_items, "new_item_share": args.new_item_share}]

    started = time.perf_counter()
    champion = _run("retrain_job", {"ops": {"bert4rec_model": {"config": {"preset": args.preset}}}}).output_for_node("model_bundle")
    retrain_s = time.perf_counter() - started
    print(f"champion {champion['version']} in {retrain_s:.0f}s", flush=True)
    started = time.perf_counter()
    grown = _run(
        "new_items_job", {"ops": {"raw_events": {"config": {"synthetic_periods_json": json.dumps(period)}}}}
    ).output_for_node("new_item_bundle")
    new_items_s = time.perf_counter() - started
    if grown["status"] == "nothing_new":
        raise SystemExit("new_items_job found nothing new")
    gate = grown["gate"]
    metrics = json.loads((Path(grown["path"]) / "manifest.json").read_text())["metrics"]
    out = {
        "period": period[0],
        "preset": args.preset,
        "champion": champion["version"],
        "grown": grown["version"],
        "added": grown["added"],
        "left_out": grown["left_out"],
        "promoted": grown["promoted"],
        "gate_reasons": gate["reasons"],
        "retrain_job_s": round(retrain_s, 1),
        "new_items_job_s": round(new_items_s, 1),
        "n_users_evaluated": metrics["n_users_evaluated"],
        "ndcg10": {"grown": metrics["models"]["bert4rec"]["full"]["NDCG@10"],
                   "champion": metrics["models"]["champion"]["full"]["NDCG@10"],
                   "item_knn": metrics["models"]["item_knn"]["full"]["NDCG@10"]},
        "baselines_ndcg10": {k: v["full"]["NDCG@10"] for k, v in metrics["models"].items()},
        "new_items": grown["new_items"],
        "fit": json.loads((Path(grown["path"]) / "manifest.json").read_text())["export"]["new_items"]["fit"],
    }
    print(markdown(out))
    print(json.dumps({k: out[k] for k in ("added", "left_out", "promoted", "retrain_job_s", "new_items_job_s",
                                          "n_users_evaluated", "baselines_ndcg10", "fit")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
