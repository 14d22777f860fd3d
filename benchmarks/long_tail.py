"""The long tail on Amazon Beauty: does BERT4Rec starve it, and what a popularity discount does.

Slices by target popularity (`recsys_assets.evaluation.protocol`: head = the most interacted items
making 50% of the fit interactions, torso up to 80%, tail the rest). Beside the metrics per slice,
the share of answer slots (top-10, history left out) that hold tail items, against the tail's
share of the targets.

Remedy tried: a popularity discount at ranking time, ``score - beta * log(1 + count)`` (count = the
item's fit interactions). It needs no retraining (in a bundle it folds into the output bias).
``beta`` is chosen on the tuning split's validation item with the tuning model (never test): the
largest value of `--betas` whose overall NDCG@10 stays within `--max-loss` of beta = 0. The final
model is then scored on test with beta = 0 and that beta.

    python benchmarks/long_tail.py --tuning-model .recsys/models/beauty-small-full-tuning \\
        --final-model .recsys/models/beauty-small-full-final --out .recsys/reports/long_tail.json

The models come from `benchmarks/quality_beauty.py --protocol tuning|final` (same preset).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import load_model  # noqa: E402
from recsys_assets.data.split import EvalSet  # noqa: E402
from recsys_assets.evaluation.baselines import fit_baselines  # noqa: E402
from recsys_assets.evaluation.protocol import (  # noqa: E402
    Scorer,
    as_scorer,
    bert4rec_scorer,
    evaluate,
    popularity_buckets,
    recommended_items,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"
SLICES = ("head", "torso", "tail")


def discounted(scorer: Scorer, counts: np.ndarray, beta: float) -> Scorer:
    penalty = (beta * np.log1p(np.asarray(counts, dtype=np.float64))).astype(np.float32)
    return lambda batch: np.asarray(scorer(batch), dtype=np.float32) - penalty[None, :]


def figures(scorer: Scorer, eval_set: EvalSet, counts: np.ndarray) -> dict[str, Any]:
    """Overall and per-slice HR@10 / NDCG@10, and the tail's share of the answers' slots."""
    result = evaluate(scorer, eval_set, counts, (10,), ("full",), n_bootstrap=20)
    buckets = popularity_buckets(counts)
    top = recommended_items(scorer, eval_set, 10)
    slices = result.slices["full"]["popularity"]
    return {
        "HR@10": result.metrics["full"]["HR@10"],
        "NDCG@10": result.metrics["full"]["NDCG@10"],
        "slices": {s: {m: slices.get(s, {}).get(m) for m in ("n_users", "HR@10", "NDCG@10")} for s in SLICES},
        "slot_share": {s: float((buckets[top] == s).mean()) for s in SLICES},
        "distinct_items_shown": int(len(np.unique(top))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tuning-model", type=Path, required=True)
    parser.add_argument("--final-model", type=Path, required=True)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--max-loss", type=float, default=0.01, help="relative overall NDCG@10 the discount may cost")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    data = SequenceData.from_sasrec_txt(args.data)

    def model_scorer(path: Path) -> Scorer:
        model, config = load_model(path)
        return bert4rec_scorer(model, config.max_len)

    # choose beta on the tuning split's validation item
    tuning = data.tuning_split()
    assert tuning.valid is not None
    base = model_scorer(args.tuning_model)
    curve = {beta: figures(discounted(base, tuning.item_counts, beta), tuning.valid, tuning.item_counts) for beta in args.betas}
    for beta, f in curve.items():
        print(f"valid beta {beta}: NDCG@10 {f['NDCG@10']:.4f}, tail NDCG@10 {f['slices']['tail']['NDCG@10']:.4f}, "
              f"tail slots {f['slot_share']['tail']:.3f}", flush=True)
    floor = curve[0.0]["NDCG@10"] * (1 - args.max_loss) if 0.0 in curve else -np.inf
    chosen = max(b for b, f in curve.items() if f["NDCG@10"] >= floor)

    # the final model on test, with and without the discount, beside the baselines
    final = data.split("train+valid")
    counts = final.item_counts
    rows: dict[str, dict[str, Any]] = {}
    ours = model_scorer(args.final_model)
    rows["bert4rec"] = figures(ours, final.test, counts)
    rows[f"bert4rec, beta {chosen}"] = figures(discounted(ours, counts, chosen), final.test, counts)
    for name, model in fit_baselines(final.sequences, data.vocab_size).items():
        rows[name] = figures(as_scorer(model), final.test, counts)
    target_share = {s: float((popularity_buckets(counts)[final.test.targets] == s).mean()) for s in SLICES}

    print(f"\nchosen on valid: beta = {chosen} (largest within {args.max_loss:.0%} of beta 0's NDCG@10)")
    print(f"test targets per slice: " + ", ".join(f"{s} {target_share[s]:.3f}" for s in SLICES))
    print("\n| model | NDCG@10 | HR@10 | head HR@10 | torso HR@10 | tail HR@10 | tail NDCG@10 | tail share of slots | items shown |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt: Callable[[Any], str] = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name, f in rows.items():
        s = f["slices"]
        print(f"| {name} | {f['NDCG@10']:.4f} | {f['HR@10']:.4f} | {fmt(s['head']['HR@10'])} | {fmt(s['torso']['HR@10'])} | "
              f"{fmt(s['tail']['HR@10'])} | {fmt(s['tail']['NDCG@10'])} | {f['slot_share']['tail']:.3f} | {f['distinct_items_shown']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"valid_curve": curve, "chosen_beta": chosen, "test": rows,
                                        "test_target_share": target_share, "max_loss": args.max_loss}, indent=1))


if __name__ == "__main__":
    main()
