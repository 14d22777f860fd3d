"""Stage 4: BERT4Rec training (a thin wrapper over the plain library recsys_assets.bert4rec)."""


import json
import time
from typing import Any, Literal

from dagster import AssetExecutionContext, Config, MetadataValue, asset
from pydantic import Field

from recsys_assets.assets.metadata import figure_markdown
from recsys_assets.bert4rec.data import SequenceData
from recsys_assets.bert4rec.model import load_model
from recsys_assets.bert4rec.presets import PRESETS, build_configs
from recsys_assets.bert4rec.train import TrainEvent, train
from recsys_assets.config import models_dir
from recsys_assets.k8s import TrainingLauncherSettings, train_on_kubernetes, training_pod_request
from recsys_serving.contract import EVENT_TYPE_TOKENS, TIME_OF_DAY_BUCKETS
from recsys_assets.io_manager import TableRef


class BERT4RecTrainingConfig(Config):
    """Training knobs; anything left empty comes from the preset."""

    preset: str = Field("synthetic", description=f"one of {sorted(PRESETS)}")
    fit: Literal["train", "train+valid"] = Field(
        "train", description="train: learn all but the last two items, early-stop on validation; "
        "train+valid: learn all but the last item for a fixed number of epochs (final model)"
    )
    run_id: str = Field("", description="model directory name under $RECSYS_HOME/models (default: the Dagster run id)")
    epochs: int | None = Field(None, ge=1)
    hidden: int | None = Field(None, ge=8)
    layers: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    max_len: int | None = Field(None, ge=2)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)
    mask_prob: float | None = Field(None, ge=0.0, le=1.0)
    windows: Literal["", "last", "prefixes"] = Field("", description="last | prefixes (empty: the preset's)")
    loss: Literal["", "full", "sampled"] = Field("", description="full | sampled (empty: the preset's)")
    num_negatives: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)
    seed: int | None = None
    num_threads: int | None = Field(None, ge=1)
    device: Literal["", "auto", "cpu", "cuda"] = Field("", description="auto | cpu | cuda (empty: the preset's)")
    model_overrides_json: str = Field("", description='any other model field, e.g. {"ffn_mult": 2}')
    train_overrides_json: str = Field("", description='any other training field, e.g. {"label_smoothing": 0.1}')
    log_every_steps: int = Field(200, ge=1, description="progress lines in the run log")
    launcher: Literal["", "local", "k8s"] = Field(
        "", description="local: in this process; k8s: a GPU pod of its own through Dagster Pipes "
        "(recsys_assets/k8s.py); empty: RECSYS_TRAINING_LAUNCHER, default local"
    )

    def overrides(self) -> tuple[dict[str, Any], dict[str, Any]]:
        model = {k: getattr(self, k) for k in ("hidden", "layers", "heads", "max_len", "dropout")}
        trainer: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("epochs", "lr", "loss", "num_negatives", "patience", "seed", "num_threads", "device")
        }
        trainer["fit"] = self.fit
        batching = {"batch_size": self.batch_size, "mask_prob": self.mask_prob, "windows": self.windows}
        trainer.update({f"batching.{k}": v for k, v in batching.items()})
        # None / "" = not set here: the preset decides (TrainConfig validates the values)
        model = {k: v for k, v in model.items() if v is not None}
        trainer = {k: v for k, v in trainer.items() if v is not None and v != ""}
        model.update(_json_dict(self.model_overrides_json, "model_overrides_json"))
        trainer.update(_json_dict(self.train_overrides_json, "train_overrides_json"))
        return model, trainer


def _json_dict(text: str, name: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def context_sizes(context_vocabulary: TableRef) -> dict[str, int]:
    """Embedding table sizes from the vocabularies (token 0 = unknown counts)."""
    with context_vocabulary.connect(read_only=True) as con:
        rows = con.execute(
            f'SELECT kind, max(token) FROM "{context_vocabulary.table}" GROUP BY kind'
        ).fetchall()
    found = {kind: int(top) + 1 for kind, top in rows}
    return {
        "tod": TIME_OF_DAY_BUCKETS + 1,
        "event_types": max(EVENT_TYPE_TOKENS.values()) + 1,
        "devices": found.get("device", 1),
        "segments": found.get("segment", 1),
    }


def training_curve(log: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    epochs = [r["epoch"] for r in log]
    ax.plot(epochs, [r["train_loss"] for r in log], color="tab:blue", marker="o", ms=3, label="train loss")
    ax.set(xlabel="epoch", ylabel="train loss", title="BERT4Rec training")
    valid = [(r["epoch"], r["valid_NDCG@10"], r["valid_HR@10"]) for r in log if "valid_NDCG@10" in r]
    if valid:
        ax2 = ax.twinx()
        ax2.plot([v[0] for v in valid], [v[1] for v in valid], color="tab:red", marker="s", ms=3, label="valid NDCG@10")
        ax2.plot([v[0] for v in valid], [v[2] for v in valid], color="tab:orange", marker="^", ms=3, label="valid HR@10")
        ax2.set_ylabel("validation")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [str(line.get_label()) for line in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    return fig


@asset(
    group_name="training",
    io_manager_key="artifact_io_manager",
    description="BERT4Rec trained on tokenized_sequences: safetensors weights + config.json + training_log.json "
    "under $RECSYS_HOME/models/<run_id>/.",
)
def bert4rec_model(
    context: AssetExecutionContext,
    config: BERT4RecTrainingConfig,
    tokenized_sequences: TableRef,
    item_vocabulary: TableRef,
    context_vocabulary: TableRef,
) -> dict[str, Any]:
    data = SequenceData.from_duckdb(tokenized_sequences.database, tokenized_sequences.table, item_vocabulary.table)
    model_over, train_over = config.overrides()
    model_cfg, train_cfg = build_configs(
        config.preset, data.vocab_size, context_sizes(context_vocabulary), model_over, train_over
    )
    run_id = config.run_id or context.run.run_id
    launcher = TrainingLauncherSettings(**({"launcher": config.launcher} if config.launcher else {}))
    pod = None
    if launcher.launcher == "k8s":
        pod = training_pod_request(
            launcher, run_id=run_id, preset=config.preset, model_config=model_cfg, train_overrides=train_over
        )
    out = models_dir() / run_id
    context.log.info(
        f"training {len(data)} sequences, vocab {data.vocab_size}, fit={train_cfg.fit} -> {out}\n"
        f"model: {model_cfg.model_dump_json()}\ntrain: {train_cfg.model_dump_json()}"
    )
    started = time.perf_counter()

    def progress(event: TrainEvent) -> None:
        if event.kind == "step" and event.global_step % config.log_every_steps == 0:
            context.log.info(f"step {event.global_step}/{event.total_steps} loss {event.loss:.4f}")
        elif event.kind == "epoch" and event.record is not None:
            r = event.record
            valid = ", ".join(f"{k[6:]} {v:.4f}" for k, v in r.items() if k in ("valid_HR@10", "valid_NDCG@10"))
            context.log.info(
                f"epoch {r['epoch']}: loss {r['train_loss']:.4f}, lr {r['lr']:.2e}, {r['seconds']:.1f}s"
                + (f", {valid}" if valid else "")
            )

    if pod is None:
        result = train(model_cfg, train_cfg, data, out, progress=progress, extra={"run_id": run_id})
    else:
        result = train_on_kubernetes(context, launcher, pod, out)
    total = time.perf_counter() - started
    metadata: dict[str, Any] = {
        "path": str(out),
        "fit": train_cfg.fit,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch if result.best_epoch is not None else -1,
        "seconds_per_epoch": round(result.seconds_per_epoch, 2),
        "seconds_total": round(total, 1),
        "parameters": sum(p.numel() for p in load_model(out)[0].parameters()),
    }
    if result.best_valid:
        metadata.update({f"valid_{k}": float(v) for k, v in result.best_valid.items() if k in ("HR@10", "NDCG@10", "MRR")})
    if result.log:
        metadata["training_curve"] = figure_markdown(training_curve(result.log), "training curve")
        metadata["training_log"] = MetadataValue.json(result.log)
    context.add_output_metadata(metadata)
    return {
        "path": str(out),
        "run_id": run_id,
        "config": result.config.model_dump(),
        "train_config": json.loads(result.train_config.model_dump_json()),
        "best_valid": result.best_valid,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "seconds_per_epoch": result.seconds_per_epoch,
        "fit": train_cfg.fit,
    }


assets = [bert4rec_model]
asset_checks: list[Any] = []
