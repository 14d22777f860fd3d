"""Hyper-parameter sweep on Amazon Beauty under the tuning protocol (not a test).

Each configuration is the `beauty` preset plus overrides, trained in its own process (so many run
at once on a machine with cores and a GPU to spare). Tuning protocol: fit = all but the last three
items, figures on the second-to-last item; test items are never loaded, so choosing by these
figures cannot leak the test set. fp32 throughout (`amp=none`). Prints one line per epoch and a
DONE line per configuration, best validation NDCG@10 first at the end.

    python benchmarks/beauty_tuning_sweep.py --device cuda --out /tmp/sweep            # all
    python benchmarks/beauty_tuning_sweep.py --device cpu --names len50,len50_noprev   # a few

The figures in the README's "What made the difference" were measured with `--device cuda` on an
H200 (16 configurations' processes at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"
L50 = {"max_len": 50}
CLIENT = {**L50, "hidden": 256, "layers": 4, "heads": 8, "dropout": 0.2}
# name -> (model overrides, training overrides) on top of the `beauty` preset
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "len3": ({"hidden": 64, "layers": 1, "heads": 2, "max_len": 3, "dropout": 0.1},
             {"lr": 3e-3, "epochs": 6}),
    "len50": ({**L50, "hidden": 64, "layers": 1, "heads": 2, "dropout": 0.1}, {"lr": 3e-3, "epochs": 6}),
    "len50_noprev": ({**L50, "hidden": 64, "layers": 1, "heads": 2, "dropout": 0.1, "previous_item_input": False},
                     {"lr": 3e-3, "epochs": 6}),
    "len50_mask015": ({**L50, "hidden": 64, "layers": 1, "heads": 2, "dropout": 0.1},
                      {"lr": 3e-3, "epochs": 6, "batching.mask_prob": 0.15}),
    "len50_mask03": ({**L50, "hidden": 64, "layers": 1, "heads": 2, "dropout": 0.1},
                     {"lr": 3e-3, "epochs": 6, "batching.mask_prob": 0.3}),
    "len50_cloze_last": ({**L50, "hidden": 64, "layers": 1, "heads": 2, "dropout": 0.1},
                         {"lr": 1e-3, "epochs": 60, "batching.windows": "last", "batching.mask_prob": 0.3,
                          "batching.mask_last_prob": 0.5}),
    "client_e4": (CLIENT, {"lr": 1e-3, "epochs": 4}),
    "client_e6": (CLIENT, {"lr": 1e-3, "epochs": 6}),
    "client_e6_seed1": (CLIENT, {"lr": 1e-3, "epochs": 6, "seed": 1}),
    "client_e6_d03": ({**CLIENT, "dropout": 0.3}, {"lr": 1e-3, "epochs": 6}),
    "h128_l4": ({**CLIENT, "hidden": 128}, {"lr": 1e-3, "epochs": 6}),
}


def run_one(name: str, data_path: Path, device: str) -> None:
    import torch

    from recsys_assets.bert4rec.data import SequenceData
    from recsys_assets.bert4rec.presets import build_configs
    from recsys_assets.bert4rec.train import TrainEvent, train

    torch.set_num_threads(1)
    data = SequenceData.from_sasrec_txt(data_path)
    split = data.tuning_split()
    model_over, train_over = CONFIGS[name]
    train_over = {**train_over, "fit": "train", "device": device, "amp": "none", "num_threads": 1,
                  "patience": None, "checkpoint_every": None, "resume": False}
    model_cfg, train_cfg = build_configs("beauty", data.vocab_size, {}, model_over, train_over)
    started = time.time()

    def progress(event: TrainEvent) -> None:
        if event.kind == "epoch" and event.record is not None:
            r = event.record
            print(f"[{name}] epoch {r['epoch']} loss {r['train_loss']:.4f} {r['seconds']:.1f}s "
                  f"valid HR@10 {r.get('valid_HR@10', float('nan')):.4f} "
                  f"NDCG@10 {r.get('valid_NDCG@10', float('nan')):.4f}", flush=True)

    result = train(model_cfg, train_cfg, split, Path("/tmp") / "beauty_sweep_models" / name, progress=progress)
    best = result.best_valid or {}
    print(f"[{name}] DONE best_epoch {result.best_epoch} HR@10 {best.get('HR@10', float('nan')):.4f} "
          f"NDCG@10 {best.get('NDCG@10', float('nan')):.4f} s/epoch {result.seconds_per_epoch:.1f} "
          f"total {time.time() - started:.0f}s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BEAUTY)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--names", default=",".join(CONFIGS), help="comma-separated subset of the configurations")
    parser.add_argument("--out", type=Path, default=REPO / ".recsys" / "reports" / "beauty_sweep")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.data, args.device)
        return 0
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {sorted(CONFIGS)}")
    if not args.data.exists():
        parser.error(f"{args.data} not found (see ../shared/data/README.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        log = open(args.out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        cmd = [sys.executable, __file__, "--one", name, "--data", str(args.data), "--device", args.device]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    results = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        done = [line for line in (args.out / f"{name}.log").read_text().splitlines() if " DONE " in line]
        results.append((done[-1] if done else f"[{name}] failed (exit {proc.returncode}); see {args.out / name}.log"))
    results.sort(key=lambda line: -float(line.split("NDCG@10 ")[1].split()[0]) if "NDCG@10 " in line else 0.0)
    print("\n".join(results))
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    return 0 if all(" DONE " in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
