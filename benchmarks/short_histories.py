"""Users with 1 to 3 events, answered by the model: HR@10 against popularity and item-kNN.

The model needs no user embedding, so a user with a single event already gets its answer. After
the default 5-core every user has at least 4 items before the test item, so the report's "1-3"
history slice is empty on such data; here each test user's input is cut to their latest 1, 2 or
3 items (the test item stays held out, nothing is learned from it), as a user who has just
arrived would have it. The baselines see the same cut histories.

    python benchmarks/short_histories.py --model .recsys/models/beauty-small-full-final

The model comes from `benchmarks/quality_beauty.py --protocol final` (fit on all but the last item).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import load_model  # noqa: E402
from recsys_assets.data.split import EvalSet  # noqa: E402
from recsys_assets.evaluation.baselines import fit_baselines  # noqa: E402
from recsys_assets.evaluation.protocol import as_scorer, bert4rec_scorer, evaluate  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"


def cut(eval_set: EvalSet, n: int) -> EvalSet:
    """The same users and targets with only their latest `n` history items (and its context)."""
    return EvalSet(
        split=eval_set.split,
        user_ids=eval_set.user_ids,
        histories=[h[-n:] for h in eval_set.histories],
        targets=eval_set.targets,
        source_rows=eval_set.source_rows,
        context={k: [v[-(min(n, len(h)) + 1):] for v, h in zip(vals, eval_set.histories)] for k, vals in eval_set.context.items()},
        removes_history=eval_set.removes_history,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    data = SequenceData.from_sasrec_txt(args.data)
    split = data.split("train+valid")
    model, config = load_model(args.model)
    scorers = {"bert4rec": bert4rec_scorer(model, config.max_len)}
    scorers.update({name: as_scorer(m) for name, m in fit_baselines(split.sequences, data.vocab_size).items()})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in (1, 2, 3, None):
        label = f"latest {n}" if n else "whole history"
        eval_set = split.test if n is None else cut(split.test, n)
        out[label] = {}
        for name, scorer in scorers.items():
            m = evaluate(scorer, eval_set, split.item_counts, (10,), ("full",), n_bootstrap=200).metrics["full"]
            out[label][name] = {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"]}
        print(f"{label}: " + ", ".join(f"{k} {v['HR@10']:.4f}" for k, v in out[label].items()), flush=True)
    names = list(scorers)
    print(f"\n{len(split.test):,} test users\n")
    print("| history | " + " | ".join(f"{n} HR@10 / NDCG@10" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, row in out.items():
        print(f"| {label} | " + " | ".join(f"{row[n]['HR@10']:.4f} / {row[n]['NDCG@10']:.4f}" for n in names) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n_users": len(split.test), "figures": out, "model": str(args.model)}, indent=1))


if __name__ == "__main__":
    main()
