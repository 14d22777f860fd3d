"""Stage 4: BERT4Rec training (a thin wrapper over the plain library recsys_assets.bert4rec)."""


import json
import os
import time
from typing import Any, Literal

from dagster import AssetExecutionContext, Config, MetadataValue, asset
from pydantic import Field

from recsys_assets.assets.ingest import GENERATOR_SOURCE, latest_source
from recsys_assets.assets.metadata import figure_markdown
from recsys_assets.bert4rec.data import SequenceData
from recsys_assets.bert4rec.model import load_model
from recsys_assets.bert4rec.presets import PRESETS, build_configs
from recsys_assets.bert4rec.sizing import train_sized
from recsys_assets.bert4rec.train import TrainEvent, train
from recsys_assets.config import models_dir
from recsys_assets.k8s import TrainingLauncherSettings, train_on_kubernetes, training_pod_request
from recsys_serving.contract import EVENT_TYPE_TOKENS, TIME_OF_DAY_BUCKETS
from recsys_assets.io_manager import TableRef
from recsys_assets.resources import PredictionTargetResource


AUTO = "auto"
BUDGET_ENV = "RECSYS_TRAINING_BUDGET_MINUTES"
DEFAULT_BUDGET_MINUTES = 60.0
# The built-in generator is a demo: `make run`'s whole graph stays within 5 minutes on 2 cores.
GENERATOR_BUDGET_MINUTES = 3.0


class BERT4RecTrainingConfig(Config):
    """Training knobs; anything left empty comes from the preset (or, for `auto`, from the sizing)."""

    preset: str = Field(
        AUTO, description=f"auto: network and epochs sized by the data and the time budget, then a refit on "
        f"train+valid (recsys_assets/bert4rec/sizing.py); or a named preset, one of {sorted(PRESETS)}"
    )
    budget_minutes: float | None = Field(
        None, gt=0, description=f"auto: the training time budget; default ${BUDGET_ENV}, else "
        f"{DEFAULT_BUDGET_MINUTES:g} ({GENERATOR_BUDGET_MINUTES:g} on the built-in generator's data)"
    )
    fit: Literal["train", "train+valid"] = Field(
        "train", description="named presets: train = learn all but the last two items, early-stop on validation; "
        "train+valid = learn all but the last item for a fixed number of epochs. auto does both itself"
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


def training_budget(config: BERT4RecTrainingConfig, context: AssetExecutionContext) -> tuple[float, str]:
    """-> (minutes, where that figure came from)."""
    if config.budget_minutes is not None:
        return config.budget_minutes, "run config budget_minutes"
    if os.environ.get(BUDGET_ENV):
        try:
            return float(os.environ[BUDGET_ENV]), f"${BUDGET_ENV}"
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}={os.environ[BUDGET_ENV]!r} is not a number of minutes") from None
    source = latest_source(context.instance)
    if source is not None and source[0] == GENERATOR_SOURCE:
        return GENERATOR_BUDGET_MINUTES, "the default for the built-in generator's data"
    return DEFAULT_BUDGET_MINUTES, "the default"


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


def training_curve(log: list[dict[str, Any]], title: str = "BERT4Rec training") -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    epochs = [r["epoch"] for r in log]
    ax.plot(epochs, [r["train_loss"] for r in log], color="tab:blue", marker="o", ms=3, label="train loss")
    ax.set(xlabel="epoch", ylabel="train loss", title=title)
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
    prediction_target: PredictionTargetResource,
) -> dict[str, Any]:
    data = SequenceData.from_duckdb(tokenized_sequences.database, tokenized_sequences.table, item_vocabulary.table)
    model_over, train_over = config.overrides()
    target = prediction_target.resolve()
    train_over["target"] = target.to_dict()
    run_id = config.run_id or context.run.run_id
    out = models_dir() / run_id
    launcher = TrainingLauncherSettings(**({"launcher": config.launcher} if config.launcher else {}))
    preset = config.preset
    if preset == AUTO and launcher.launcher == "k8s":
        # sizing measures the machine it runs on, and this is not the GPU pod
        preset = "default"
        context.log.info("preset auto with the k8s launcher: the GPU pod trains the client's network (preset default)")
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

    metadata: dict[str, Any] = {}
    sizing: dict[str, Any] | None = None
    if preset == AUTO:
        if config.fit != "train":
            raise ValueError("preset auto searches on validation and refits on train+valid itself; leave fit at its default")
        train_over.pop("fit", None)
        budget, budget_source = training_budget(config, context)
        context.log.info(f"target {target.label()}; sizing {len(data)} sequences, vocab {data.vocab_size}, budget {budget:g} min ({budget_source}) -> {out}")
        sized = train_sized(
            data, out, budget * 60, model_over, train_over, progress=progress, log=context.log.info,
            extra={"run_id": run_id}, context_sizes=context_sizes(context_vocabulary),
        )
        result, search = sized.final, sized.search
        decision = sized.decision
        sizing = json.loads(decision.model_dump_json())
        metadata.update({
            "sizing": MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "sizing_network": decision.network,
            "sizing_budget_minutes": float(budget),
            "sizing_budget_source": budget_source,
            "sizing_max_epochs": decision.max_epochs,
            "sizing_probe_seconds": decision.probe_seconds,
            "sizing_costs": MetadataValue.json([c.model_dump() for c in decision.costs]),
            "search_epochs": search.epochs,
        })
        if search.log:
            metadata["search_curve"] = figure_markdown(training_curve(search.log, "search (tuning split)"), "search curve")
        best_valid, best_epoch = search.best_valid, search.best_epoch
        train_cfg = result.train_config
    else:
        model_cfg, train_cfg = build_configs(
            preset, data.vocab_size, context_sizes(context_vocabulary), model_over, train_over
        )
        pod = None
        if launcher.launcher == "k8s":
            pod = training_pod_request(
                launcher, run_id=run_id, preset=preset, model_config=model_cfg, train_overrides=train_over
            )
        context.log.info(
            f"training {len(data)} sequences for {target.label()}, vocab {data.vocab_size}, fit={train_cfg.fit} -> {out}\n"
            f"model: {model_cfg.model_dump_json()}\ntrain: {train_cfg.model_dump_json()}"
        )
        if pod is None:
            result = train(model_cfg, train_cfg, data, out, progress=progress, extra={"run_id": run_id})
        else:
            result = train_on_kubernetes(context, launcher, pod, out)
        best_valid, best_epoch = result.best_valid, result.best_epoch
    total = time.perf_counter() - started
    metadata.update({
        "path": str(out),
        "preset": preset,
        "target": target.label(),
        "fit": train_cfg.fit,
        "network": f"{result.config.hidden} hidden, {result.config.layers} layers, {result.config.heads} heads, "
        f"length {result.config.max_len}",
        "epochs": result.epochs,
        "best_epoch": best_epoch if best_epoch is not None else -1,
        "seconds_per_epoch": round(result.seconds_per_epoch, 2),
        "seconds_total": round(total, 1),
        "parameters": sum(p.numel() for p in load_model(out)[0].parameters()),
    })
    if best_valid:
        metadata.update({f"valid_{k}": float(v) for k, v in best_valid.items() if k in ("HR@10", "NDCG@10", "MRR")})
    if result.log:
        metadata["training_curve"] = figure_markdown(training_curve(result.log), "training curve")
        metadata["training_log"] = MetadataValue.json(result.log)
    context.add_output_metadata(metadata)
    return {
        "path": str(out),
        "run_id": run_id,
        "config": result.config.model_dump(),
        "train_config": json.loads(result.train_config.model_dump_json()),
        "best_valid": best_valid,
        "best_epoch": best_epoch,
        "epochs": result.epochs,
        "seconds_per_epoch": result.seconds_per_epoch,
        "fit": train_cfg.fit,
        "target": target.to_dict(),
        "preset": preset,
        "sizing": sizing,
    }


assets = [bert4rec_model]
asset_checks: list[Any] = []
