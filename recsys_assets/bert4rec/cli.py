"""Command line training, also the entry point for ``torchrun`` (DDP: gloo on CPU, NCCL on GPU).

    python -m recsys_assets.bert4rec.cli --data .recsys/warehouse.duckdb --preset synthetic
    python -m recsys_assets.bert4rec.cli --data Beauty.txt --preset auto --budget-minutes 60 --out /tmp/auto
    torchrun --nproc_per_node 2 -m recsys_assets.bert4rec.cli --data Beauty.txt --preset beauty \\
        --set train.batching.batch_size=256 --out /tmp/beauty
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from recsys_assets.bert4rec.data import SequenceData
from recsys_assets.bert4rec.distributed import init_distributed, shutdown
from recsys_assets.bert4rec.presets import PRESETS, build_configs
from recsys_assets.bert4rec.sizing import train_sized
from recsys_assets.bert4rec.train import TrainEvent, evaluate, train
from recsys_serving.contract import TARGET_NAMES, PredictionTarget


def load_data(path: str, table: str = "tokenized_sequences") -> SequenceData:
    """A DuckDB warehouse (``.duckdb``/``.db``) or a SASRec-style ``user item item ...`` text file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    if p.suffix in {".duckdb", ".db"}:
        return SequenceData.from_duckdb(p, table=table)
    return SequenceData.from_sasrec_txt(p)


def parse_overrides(pairs: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.hidden=128`` / ``train.batching.mask_prob=0.3`` (values parsed as JSON when they can be)."""
    model: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: expected model.<field>=<value> or train.<field>=<value>")
        scope, field = key.split(".", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if scope == "model":
            model[field] = value
        elif scope == "train":
            trainer[field] = value
        else:
            raise SystemExit(f"--set {pair!r}: scope must be 'model' or 'train', not {scope!r}")
    return model, trainer


class TqdmProgress:
    """A progress bar over optimizer steps (main process only), one line per epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: TrainEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.kind == "start":
            if event.global_step > 0:  # also what tells a restarted pod's log that it did not start over
                print(f"resuming from the checkpoint at step {event.global_step} of {event.total_steps}", flush=True)
            self.bar = tqdm(total=event.total_steps, initial=event.global_step, unit="step", dynamic_ncols=True)
        elif event.kind == "step" and self.bar is not None:
            self.bar.update(event.global_step - self.bar.n)
            self.bar.set_postfix(epoch=event.epoch + 1, loss=f"{event.loss:.4f}", refresh=False)
        elif event.kind == "epoch" and event.record is not None:
            r = event.record
            valid = "".join(f" {k[6:]} {v:.4f}" for k, v in r.items() if k in ("valid_HR@10", "valid_NDCG@10"))
            (self.bar.write if self.bar is not None else print)(
                f"epoch {r['epoch']}: loss {r['train_loss']:.4f} lr {r['lr']:.2e} {r['seconds']:.1f}s{valid}"
            )
        elif event.kind == "stop" and self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train BERT4Rec (single process or under torchrun).")
    parser.add_argument("--data", required=True, help="warehouse .duckdb or SASRec-style .txt")
    parser.add_argument("--table", default="tokenized_sequences")
    parser.add_argument("--preset", default="default", choices=["auto", *sorted(PRESETS)],
                        help="auto: network and epochs sized by the data and --budget-minutes, then a refit on "
                        "train+valid (one process only)")
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="--preset auto: the time budget")
    parser.add_argument("--out", required=True, help="model directory (checkpoints, weights, training_log.json)")
    parser.add_argument("--fit", choices=["train", "train+valid"], default=None)
    parser.add_argument("--target", choices=list(TARGET_NAMES), default=None,
                        help="next_item (default) or next_purchase: only target events are learned and held out")
    parser.add_argument("--target-event-types", default="", help="next_purchase: e.g. cart,purchase (default purchase)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    parser.add_argument("--set", action="append", default=[], metavar="SCOPE.FIELD=VALUE")
    parser.add_argument("--test", action="store_true", help="report test metrics at the end")
    args = parser.parse_args(argv)

    model_over, train_over = parse_overrides(args.set)
    for key, value in (("fit", args.fit), ("epochs", args.epochs), ("num_threads", args.threads), ("device", args.device)):
        if value is not None:
            train_over[key] = value
    if args.no_resume:
        train_over["resume"] = False
    if args.target or args.target_event_types:
        train_over["target"] = PredictionTarget.parse(args.target or "next_purchase", args.target_event_types).to_dict()
    ctx = init_distributed(train_over.get("device", "auto"))
    try:
        data = load_data(args.data, args.table)
        started = time.perf_counter()
        if args.preset == "auto":
            if ctx.enabled:
                raise SystemExit("--preset auto measures one process; under torchrun choose a named preset")
            if "fit" in train_over:
                raise SystemExit("--preset auto searches on validation and refits on train+valid itself; drop --fit")
            result = train_sized(data, args.out, args.budget_minutes * 60, model_over, train_over,
                                 progress=TqdmProgress(True)).final
            train_cfg = result.train_config
        else:
            model_cfg, train_cfg = build_configs(args.preset, data.vocab_size, data.context_sizes(), model_over, train_over)
            result = train(model_cfg, train_cfg, data, args.out, progress=TqdmProgress(ctx.is_main))
        summary: dict[str, Any] = {
            "path": result.path,
            "fit": train_cfg.fit,
            "target": train_cfg.target.label(),
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "best_valid": result.best_valid,
            "seconds_per_epoch": round(result.seconds_per_epoch, 3),
            "seconds_total": round(time.perf_counter() - started, 1),
        }
        if args.test and ctx.is_main:
            from recsys_assets.bert4rec.model import load_model

            model, cfg = load_model(result.path)
            summary["test"] = evaluate(model, data.split(train_cfg.fit, train_cfg.target).test, cfg.max_len)
        if ctx.is_main:
            print(json.dumps(summary, indent=2))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
