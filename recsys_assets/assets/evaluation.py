"""Stage 5: baselines and the evaluation report (thin wrappers over recsys_assets.evaluation)."""

import base64
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, cast

import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from recsys_serving.bundle import BundleRefused
from recsys_serving.contract import CURRENT_BUNDLE, FIRST_ITEM_TOKEN, PredictionTarget
from recsys_assets.assets.ingest import latest_source, source_name
from recsys_assets.config import bundles_dir, report_url
from recsys_assets.evaluation.baselines import BASELINES, fit_baselines
from recsys_assets.evaluation.bundle_scorer import BundleScorer
from recsys_assets.evaluation.metrics import DEFAULT_KS
from recsys_assets.evaluation.protocol import (
    fit_description,
    EvalSet,
    FitData,
    Split,
    EvaluationResult,
    as_scorer,
    bert4rec_scorer,
    eval_set_fingerprint,
    evaluate,
    evaluate_many,
    feasible_protocols,
    make_eval_set,
    parse_protocol,
    sample_negatives_for,
    split_rows,
)
from recsys_assets.evaluation.report import (
    BASELINE_NAMES,
    CHAMPION_NAME,
    HEADLINE_METRICS,
    MODEL_NAME,
    gate_decision,
    gate_passes,
    headline_markdown,
    summary_sentences,
    write_report,
)
from recsys_assets.export.bundle import current_version
from recsys_assets.io_manager import TableRef
from recsys_assets.resources import PredictionTargetResource



class _EvalKnobs(Config):
    protocols: list[str] = Field(["full", "sampled_pop100"], description="'full' and/or 'sampled_pop<n>'")
    ks: list[int] = Field(list(DEFAULT_KS), description="cut-offs of HR@k and NDCG@k")
    seed: int = Field(0, description="negative sampling and bootstrap seed")
    n_bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for 95% CIs")
    batch_size: int = Field(1024, ge=1, description="users scored at once")


class BaselinesConfig(_EvalKnobs):
    pass


GATE_TOLERANCE = 0.02  # default of EvaluationConfig.gate_tolerance


class EvaluationConfig(_EvalKnobs):
    # Literal fields: Dagster's config schema makes them enums, checked when the run is launched.
    split: Split = Field("test", description="'valid' or 'test'")
    # Dagster config has no Optional[Literal]: "" stands for "not set".
    fit: Literal["", "train", "train+valid"] = Field(
        "", description="'train' or 'train+valid'; default (and required): the fit the model was trained on"
    )
    dataset_name: str = Field("", description="shown in the report; default: the source raw_events read (file name or the generator)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto', 'cpu' or 'cuda'")
    model_batch_size: int = Field(512, ge=1, description="users per BERT4Rec forward pass")
    gate_tolerance: float = Field(
        GATE_TOLERANCE, ge=0.0, lt=1.0,
        description="allowed relative NDCG@10 drop vs the champion scored in the same report (so a retrain "
        "that ties it still replaces it); recorded in the report, and model_bundle's promotion gate uses the same",
    )
    champion_threads: int = Field(2, ge=1, description="ONNX Runtime threads scoring the champion bundle")


def report_gate_tolerance(evaluation_report: Mapping[str, Any]) -> float:
    """The gate tolerance an evaluation_report value was produced with (model_bundle gates with it);
    the default for reports written before it was recorded."""
    return float(evaluation_report.get("gate_tolerance", GATE_TOLERANCE))


def load_vocabulary(item_vocabulary: TableRef) -> tuple[np.ndarray, np.ndarray, int]:
    """(item_counts[token], category[token] (None where unknown), vocab size) from item_vocabulary."""
    vocab = item_vocabulary.to_polars(["token", "count", "category"])
    if vocab.height == 0:
        raise ValueError(f"{item_vocabulary.table} is empty")
    tokens = vocab["token"].to_numpy().astype(np.int64)
    size = int(tokens.max()) + 1
    counts = np.zeros(size, dtype=np.float64)
    counts[tokens] = vocab["count"].fill_null(0).to_numpy()
    categories = np.full(size, None, dtype=object)
    categories[tokens] = vocab["category"].to_list()
    return counts, categories, size


def load_item_ids(item_vocabulary: TableRef) -> list[str]:
    """Item ids by token (item_ids[token - FIRST_ITEM_TOKEN]): the token space a bundle is mapped into."""
    rows = item_vocabulary.to_polars(["token", "item_id", "is_special"]).filter(~pl.col("is_special")).sort("token")
    tokens = rows["token"].to_numpy().astype(np.int64)
    if not np.array_equal(tokens, np.arange(FIRST_ITEM_TOKEN, FIRST_ITEM_TOKEN + len(tokens))):
        raise ValueError(f"{item_vocabulary.table}: item tokens are not contiguous from {FIRST_ITEM_TOKEN}")
    return [str(i) for i in rows["item_id"].to_list()]


def load_context_values(context_vocabulary: TableRef) -> dict[str, dict[int, str]]:
    """{kind: {token: value}} of context_vocabulary (device, segment)."""
    out: dict[str, dict[int, str]] = {}
    for row in context_vocabulary.to_polars(["kind", "value", "token"]).iter_rows():
        out.setdefault(str(row[0]), {})[int(row[2])] = str(row[1])
    return out


# eval-set context field -> (context_vocabulary kind, slice name)
CONTEXT_SLICES: dict[str, tuple[str, str]] = {"devices": ("device", "device"), "segments": ("segment", "segment")}


def context_slice_labels(eval_set: EvalSet, context_values: dict[str, dict[int, str]]) -> dict[str, np.ndarray]:
    """{slice: label per user} from the request context at each target (its last context entry):
    the device and segment names; only fields the data has more than one value of."""
    out: dict[str, np.ndarray] = {}
    for field, (kind, name) in CONTEXT_SLICES.items():
        values = eval_set.context.get(field)
        if not values:
            continue
        names = context_values.get(kind, {})
        labels = np.array([names.get(int(v[-1]), "unknown") if len(v) else "unknown" for v in values], dtype=object)
        if len(set(labels.tolist())) > 1:
            out[name] = labels
    return out


def load_sequence_rows(tokenized_sequences: TableRef) -> pl.DataFrame:
    rows = tokenized_sequences.to_polars()
    if rows.height == 0:
        raise ValueError(f"{tokenized_sequences.table} is empty: nothing to evaluate")
    # SQL gives no row order: sort so negatives, bootstrap and fingerprint are reproducible.
    return rows.sort("user_id")


def _png_markdown(path: Path, title: str) -> MetadataValue:
    data = base64.b64encode(path.read_bytes()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{data})")


def _protocols(context: AssetExecutionContext, wanted: list[str], eval_set: EvalSet, counts: np.ndarray) -> list[str]:
    kept, dropped = feasible_protocols(wanted, eval_set, counts)
    if dropped:
        context.log.warning(f"protocols {dropped} dropped: the catalogue has too few items outside some histories")
    if not kept:
        raise ValueError(f"none of the protocols {wanted} can be run on this data")
    return kept


def _summaries(results: dict[str, EvaluationResult]) -> dict[str, Any]:
    return {name: r.to_dict() for name, r in results.items()}


@asset(
    group_name="evaluation",
    io_manager_key="artifact_io_manager",
    description="Popularity, item-kNN and last-item baselines fitted on train_tokens, scored on validation.",
)
def baselines(
    context: AssetExecutionContext,
    config: BaselinesConfig,
    tokenized_sequences: TableRef,
    item_vocabulary: TableRef,
    prediction_target: PredictionTargetResource,
) -> dict[str, Any]:
    for p in config.protocols:
        parse_protocol(p)
    started = time.perf_counter()
    target = prediction_target.resolve()
    counts, categories, vocab_size = load_vocabulary(item_vocabulary)
    rows = load_sequence_rows(tokenized_sequences)
    fit_split = split_rows(rows, "train", with_context=False, target=target)
    train = fit_split.sequences
    eval_set = make_eval_set(rows, "valid", target)
    models = fit_baselines(train, vocab_size, target_masks=fit_split.target_masks)
    context.log.info(
        f"fitted {list(models)} for {target.label()} on {len(train):,} sequences; validating on {len(eval_set):,} users"
    )
    protocols = _protocols(context, config.protocols, eval_set, counts)
    results = evaluate_many(
        {name: as_scorer(m) for name, m in models.items()}, eval_set, counts, config.ks, protocols,
        config.batch_size, config.seed, config.n_bootstrap, categories,
    )
    doc = {"models": {n: r.metrics for n, r in results.items()}, "ci": {n: r.to_dict()["ci"] for n, r in results.items()}}
    context.add_output_metadata(
        {
            "users_evaluated": len(eval_set),
            "target": target.label(),
            "fit": fit_description("train", target),
            "metrics": MetadataValue.md(headline_markdown(doc)),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return {
        "split": "valid",
        "fit": "train",
        "target": target.to_dict(),
        "fit_description": fit_description("train", target),
        "vocab_size": vocab_size,
        "n_fit_sequences": len(train),
        "n_users": len(eval_set),
        "eval_fingerprint": eval_set_fingerprint(eval_set),
        "protocols": protocols,
        # The fitted state is cheap to rebuild (seconds) and depends on the fit option, so the
        # report refits on the model's own fit data instead of storing matrices here.
        "metrics": {n: r.metrics for n, r in results.items()},
        "results": _summaries(results),
    }


def _model_info(bert4rec_model: dict[str, Any]) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """(model dir, training info, epoch records) from the bert4rec_model artifact."""
    raw = bert4rec_model.get("path") or bert4rec_model.get("model_dir")
    if not raw:
        raise ValueError(f"bert4rec_model has no 'path' (or 'model_dir'): keys {sorted(bert4rec_model)}")
    model_dir = Path(raw)
    extra_path = model_dir / "extra.json"
    info: dict[str, Any] = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    info = {**info, **{k: v for k, v in bert4rec_model.items() if k in ("fit", "target", "best_epoch", "best_valid")}}
    log = bert4rec_model.get("log")
    log_path = model_dir / "training_log.json"
    if log is None and log_path.exists():
        log = json.loads(log_path.read_text())
    return model_dir, info, list(log or [])


def score_champion(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    eval_set: EvalSet,
    item_ids: list[str],
    context_values: dict[str, dict[int, str]],
    counts: np.ndarray,
    categories: np.ndarray,
    protocols: list[str],
    context_labels: dict[str, np.ndarray] | None = None,
    target: PredictionTarget | None = None,
) -> tuple[EvaluationResult | None, dict[str, Any]]:
    """The served bundle (bundles/current) scored on the challenger's eval set with the same
    negatives and bootstrap, and what the report records about it. A champion that does not load
    or score is recorded with the reason (the gate then compares with the baselines only)."""
    root = bundles_dir()
    version = current_version(root)
    if version is None:
        return None, {"status": "none", "version": None, "reason": f"no bundle promoted under {root}"}
    try:
        scorer = BundleScorer(root / CURRENT_BUNDLE, intra_threads=config.champion_threads)
    except BundleRefused as exc:
        context.log.warning(f"champion {version} cannot be loaded ({exc.reason}): the gate compares with baselines only")
        return None, {"status": "refused", "version": version, "reason": exc.reason}
    target = target or PredictionTarget()
    if scorer.target != target:
        reason = f"it predicts {scorer.target.label()}, this report {target.label()}: not comparable"
        context.log.warning(f"champion {version}: {reason}; the gate compares with baselines only")
        return None, {"status": "other_target", "version": version, "reason": reason}
    negatives = {
        n: sample_negatives_for(eval_set, counts, n, config.seed) for n in map(parse_protocol, protocols) if n is not None
    }
    try:
        result = evaluate(
            scorer.scorer(item_ids, context_values), eval_set, counts, config.ks, protocols, config.batch_size,
            config.seed, config.n_bootstrap, categories, negatives, context_labels,
        )
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; any failure is the champion's
        reason = f"scoring failed: {type(exc).__name__}: {exc}"
        context.log.warning(f"champion {scorer.version}: {reason}; the gate compares with baselines only")
        return None, {"status": "refused", "version": scorer.version, "reason": reason}
    known = scorer.bundle.vocabulary.item_to_token
    unknown = np.array([item_ids[t - FIRST_ITEM_TOKEN] not in known for t in eval_set.targets.tolist()])
    return result, {
        **scorer.describe(),
        "status": "scored",
        "reason": None,
        "unknown_target_share": float(unknown.mean()),
        "cold_start_share": scorer.cold_start_users / len(eval_set),
    }


@asset(
    group_name="evaluation",
    io_manager_key="artifact_io_manager",
    description="BERT4Rec vs the served champion bundle and the baselines on the same held-out items, same fit "
    "data: metrics.json, HTML report, gate verdict.",
)
def evaluation_report(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    tokenized_sequences: TableRef,
    item_vocabulary: TableRef,
    context_vocabulary: TableRef,
    bert4rec_model: dict[str, Any],
    baselines: dict[str, Any],
    prediction_target: PredictionTargetResource,
) -> dict[str, Any]:
    import torch

    from recsys_assets.bert4rec import load_model

    for p in config.protocols:
        parse_protocol(p)
    started = time.perf_counter()
    model_dir, info, training_log = _model_info(bert4rec_model)
    model_fit = info.get("fit")
    fit = config.fit or model_fit
    if fit is None:
        raise ValueError(f"{model_dir}: the model does not record its fit data; set config 'fit'")
    if model_fit is not None and fit != model_fit:
        raise ValueError(
            f"config fit {fit!r} differs from the model's fit {model_fit!r}: baselines and model must learn "
            "from the same data"
        )
    if config.split == "valid" and fit == "train+valid":
        raise ValueError("split 'valid' with fit 'train+valid' would score items the models learned from")

    target = prediction_target.resolve()
    model_target = PredictionTarget.from_dict(info.get("target"))
    if model_target != target:
        raise ValueError(
            f"the model was trained for {model_target.label()} but this run evaluates {target.label()}: "
            "train and evaluate with the same prediction_target"
        )
    counts, categories, vocab_size = load_vocabulary(item_vocabulary)
    rows = load_sequence_rows(tokenized_sequences)
    eval_set: EvalSet = make_eval_set(rows, cast(Split, config.split), target)
    fit_split = split_rows(rows, cast(FitData, fit), with_context=False, target=target)
    train = fit_split.sequences
    models = fit_baselines(train, vocab_size, target_masks=fit_split.target_masks)

    device = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    model, model_config = load_model(model_dir, map_location=device)
    if model_config.vocab_size != vocab_size:
        raise ValueError(
            f"model vocabulary ({model_config.vocab_size}) differs from item_vocabulary ({vocab_size}): "
            "the model was trained on another vocabulary"
        )
    scorers = {MODEL_NAME: bert4rec_scorer(model, model_config.max_len, config.model_batch_size, device)}
    scorers.update({name: as_scorer(m) for name, m in models.items()})
    context.log.info(f"evaluating {list(scorers)} on {len(eval_set):,} users ({config.split}, fit {fit}, {device})")
    protocols = _protocols(context, config.protocols, eval_set, counts)
    context_values = load_context_values(context_vocabulary)
    context_labels = context_slice_labels(eval_set, context_values)
    scored = evaluate_many(
        scorers, eval_set, counts, config.ks, protocols, config.batch_size, config.seed,
        config.n_bootstrap, categories, context_labels,
    )
    champion_result, champion = score_champion(
        context, config, eval_set, load_item_ids(item_vocabulary), context_values,
        counts, categories, protocols, context_labels, target,
    )
    results = {MODEL_NAME: scored.pop(MODEL_NAME)}
    if champion_result is not None:
        results[CHAMPION_NAME] = champion_result
    results.update(scored)

    db = Path(tokenized_sequences.database)
    dataset = {
        "name": config.dataset_name or source_name(latest_source(context.instance)) or db.stem,
        "warehouse": str(db),
        "table": tokenized_sequences.table,
        "fingerprint": eval_set_fingerprint(eval_set),
        "n_sequences": rows.height,
        "n_users_evaluated": len(eval_set),
        "n_items": int((counts[FIRST_ITEM_TOKEN:] > 0).sum()),
        "vocab_size": vocab_size,
        "n_fit_interactions": int(sum(len(s) for s in train)),
    }
    report_config = {
        "split": config.split,
        "target": target.to_dict(),
        "target_label": target.label(),
        "fit": fit,
        "fit_description": fit_description(fit, target),
        "protocols": protocols,
        "ks": list(config.ks),
        "seed": config.seed,
        "n_bootstrap": config.n_bootstrap,
        "negatives_popularity": "item_vocabulary counts (all interactions)",
        "history_removed": target.removes_history,
        "ties": "pessimistic",
        "model_dir": str(model_dir),
        "model": model_config.model_dump(),
        "best_epoch": info.get("best_epoch"),
        "bert4rec_best_valid": info.get("best_valid"),
        "sizing": info.get("sizing"),
        "baselines_valid": baselines.get("metrics"),
        "gate_tolerance": config.gate_tolerance,
        "champion": champion.get("version"),
    }
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{context.run.run_id[:8]}"
    doc, paths = write_report(
        results,
        dataset=dataset,
        config=report_config,
        training_log=training_log,
        run_id=run_id,
        gate=partial(gate_decision, tolerance=config.gate_tolerance),
        user_ids=eval_set.user_ids,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
        champion=champion,
    )
    gate = doc["gate"]
    (context.log.info if gate["passed"] else context.log.warning)(f"gate {'passed' if gate['passed'] else 'failed'}: {gate['reasons']}")
    metadata: dict[str, Any] = {
        "summary": MetadataValue.md(" ".join(summary_sentences(doc))),
        "report_url": MetadataValue.url(report_url(paths.report_html)),
        "headline": MetadataValue.md(headline_markdown(doc)),
        "gate_passed": gate["passed"],
        "gate_reasons": MetadataValue.md("\n".join(f"- {r}" for r in gate["reasons"])),
        "target": target.label(),
        "fit": fit_description(fit, target),
        "users_evaluated": len(eval_set),
        "report": MetadataValue.path(str(paths.report_html)),
        "seconds": round(time.perf_counter() - started, 1),
        "champion": MetadataValue.text(
            f"{champion['version']} ({champion['status']})" + (f": {champion['reason']}" if champion.get("reason") else "")
            if champion.get("version") else "none promoted"
        ),
    }
    # Every model's headline figures (the challenger and the champion under those names) and
    # BERT4Rec's lifts, numeric: the UI charts them across retrains.
    prefixes = {MODEL_NAME: "challenger", CHAMPION_NAME: "champion"}
    for name, per_protocol in doc["models"].items():
        for metric, value in per_protocol.get("full", {}).items():
            if metric in HEADLINE_METRICS and value is not None:
                metadata[f"{prefixes.get(name, name)}_{_key(metric)}"] = MetadataValue.float(float(value))
    for other, per_protocol in doc["lift"].items():
        for metric in ("HR@10", "NDCG@10"):
            rel = per_protocol.get("full", {}).get(metric, {}).get("relative")
            if rel is not None:
                metadata[f"lift_{_key(metric)}_vs_{other}"] = MetadataValue.float(float(rel))
    for key, path in paths.plots.items():
        metadata[f"plot_{key}"] = _png_markdown(path, key)
    context.add_output_metadata(metadata)
    return {
        "run_id": run_id,
        "split": config.split,
        "fit": fit,
        "target": target.to_dict(),
        "metrics": doc["models"],
        "lift": doc["lift"],
        "gate": gate,
        "gate_tolerance": config.gate_tolerance,
        "champion": doc.get("champion"),
        "dataset": dataset,
        "report": paths.to_dict(),
        "metrics_json": str(paths.metrics_json),
    }


@asset_check(
    asset=evaluation_report,
    description="BERT4Rec beats every baseline on full NDCG@10 and reaches the champion's x (1 - gate_tolerance), "
    "the champion scored on the same data in the same report.",
)
def evaluation_gate(context: AssetCheckExecutionContext, evaluation_report: dict[str, Any]) -> AssetCheckResult:
    gate = evaluation_report.get("gate") or {}
    metadata: dict[str, Any] = {"reasons": MetadataValue.md("\n".join(f"- {r}" for r in gate.get("reasons", [])))}
    # the figures the verdict rests on: the challenger, the best baseline, the champion and the margin
    full = {name: per_p.get("full", {}) for name, per_p in (evaluation_report.get("metrics") or {}).items()}
    baselines = {n: v.get("NDCG@10") for n, v in full.items() if n in BASELINE_NAMES and v.get("NDCG@10") is not None}
    if baselines:
        best = max(baselines, key=lambda n: baselines[n])
        metadata["best_baseline"] = best
        metadata["best_baseline_ndcg10"] = MetadataValue.float(float(baselines[best]))
    for key in ("challenger", "champion", "threshold", "margin"):
        if gate.get(key) is not None:
            metadata[f"{key}_ndcg10" if key in ("challenger", "champion") else key] = MetadataValue.float(float(gate[key]))
    if gate.get("tolerance") is not None:
        metadata["tolerance"] = MetadataValue.float(float(gate["tolerance"]))
    return AssetCheckResult(
        passed=bool(gate.get("passed")),
        severity=AssetCheckSeverity.WARN,  # a failed gate blocks promotion (model_bundle), not the run
        metadata=metadata,
    )


def _key(metric: str) -> str:
    return metric.lower().replace("@", "")


assets = [baselines, evaluation_report]
asset_checks = [evaluation_gate]

__all__ = [
    "BASELINES", "BASELINE_NAMES", "assets", "asset_checks", "gate_passes", "load_context_values", "load_item_ids",
    "load_vocabulary", "report_gate_tolerance",
]
