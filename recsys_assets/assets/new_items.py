"""New items stage: the served bundle grown by the items it has never seen, without a full retrain.

`new_item_bundle` takes the promoted bundle's model, appends the current data's new items
(`recsys_assets.export.new_items`: what is new, its peers), fits only their rows
(`recsys_assets.bert4rec.new_items`), exports and parity-checks it, scores it beside the champion
and item-kNN on the same held-out items, and promotes it through a gate as any bundle.
`new_items_job` (recsys_assets.automation) runs it after the data stages, with no training.

No `from __future__ import annotations` here: Dagster 1.13 reads the `config` annotation off the
signature and cannot resolve it from a string.
"""


import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
from dagster import AssetExecutionContext, MetadataValue, asset
from pydantic import Field

from recsys_assets.assets.evaluation import (
    GATE_TOLERANCE,
    load_context_values,
    load_item_ids,
    load_sequence_rows,
    load_vocabulary,
)
from recsys_assets.assets.export import ModelBundleConfig
from recsys_assets.bert4rec.new_items import NewItemFitConfig
from recsys_assets.config import bundles_dir, models_dir
from recsys_assets.io_manager import TableRef
from recsys_assets.resources import PredictionTargetResource
from recsys_serving.bundle import BundleRefused, Vocabulary, load_bundle
from recsys_serving.contract import (
    CONTEXT_FIELDS,
    CURRENT_BUNDLE,
    FEATURE_VIEW,
    FIRST_ITEM_TOKEN,
    sequence_length_mismatch,
)

GROUP = "export"
UPTAKE_MODELS = ("grown", "champion", "item_knn")  # grown = the champion with the new items


_FIT = NewItemFitConfig.model_fields


class NewItemBundleConfig(ModelBundleConfig):
    max_new_items: int = Field(100_000, ge=1, description="at most this many new items, most interacted first")
    # the fit's knobs, defaults from the library's NewItemFitConfig (chosen on the valid split)
    epochs: int = Field(_FIT["epochs"].default, ge=0, description=_FIT["epochs"].description)
    lr: float = Field(_FIT["lr"].default, gt=0, description=_FIT["lr"].description)
    prior_weight: float = Field(_FIT["prior_weight"].default, ge=0, description=_FIT["prior_weight"].description)
    gate_tolerance: float = Field(
        GATE_TOLERANCE, ge=0.0, lt=1.0,
        description="promoted when its full NDCG@10 >= the champion's x (1 - tolerance) on the same items",
    )
    split: Literal["valid", "test"] = Field(
        "test", description="the held-out items of the gate; valid fits on all but each user's last two "
        "(where the fit settings are chosen), test on all but the last"
    )
    n_bootstrap: int = Field(200, ge=0)
    seed: int = 0


def _champion(root: Path) -> Any:
    from recsys_assets.export.bundle import current_version

    version = current_version(root)
    if version is None:
        raise ValueError(f"no bundle is promoted under {root}: the first one comes from retrain_job")
    try:
        return load_bundle(root / CURRENT_BUNDLE)
    except BundleRefused as exc:
        raise ValueError(f"the served bundle {version} cannot be loaded: {exc.reason}") from exc


@asset(
    group_name=GROUP,
    io_manager_key="artifact_io_manager",
    description="The served bundle with the items it has never seen: their rows started at their category's "
    "mean and fitted on their events (the rest of the network frozen), gated against the champion on the same "
    "held-out items and promoted like any bundle. Nothing new: no bundle.",
)
def new_item_bundle(
    context: AssetExecutionContext,
    config: NewItemBundleConfig,
    tokenized_sequences: TableRef,
    item_vocabulary: TableRef,
    context_vocabulary: TableRef,
    cleaned_interactions: TableRef,
    feast_online_store: dict[str, Any],
    prediction_target: PredictionTargetResource,
) -> dict[str, Any]:
    import torch

    from recsys_assets.bert4rec.data import SequenceData
    from recsys_assets.bert4rec.model import load_model, save_model
    from recsys_assets.bert4rec.new_items import add_items, fit_new_items
    from recsys_assets.evaluation.baselines import fit_baselines
    from recsys_assets.evaluation.bundle_scorer import BundleScorer
    from recsys_assets.evaluation.protocol import as_scorer, evaluate_many, make_eval_set, recommended_items, split_rows
    from recsys_assets.evaluation.report import CHAMPION_NAME, MODEL_NAME, gate_decision
    from recsys_assets.export.bundle import GateDecision, current_version, model_spec_for, promote, write_bundle
    from recsys_assets.export.new_items import (
        UPTAKE_K,
        find_new_items,
        grown_vocabulary_document,
        new_item_uptake,
        to_vocabulary_space,
    )
    from recsys_assets.export.onnx_export import export_onnx
    from recsys_assets.export.signing import load_or_create_signing_key, signing_key_path
    from recsys_assets.export.verification import parity_check, validation_batches

    torch.set_num_threads(2)
    root = bundles_dir()
    champion = _champion(root)
    manifest = champion.manifest
    target = prediction_target.resolve()
    if manifest.model.prediction_target != target:
        raise ValueError(
            f"the served bundle predicts {manifest.model.prediction_target.label()}, this run {target.label()}"
        )
    model_dir = Path(str(manifest.export.get("model_dir") or ""))
    if not manifest.export.get("model_dir") or not model_dir.is_dir():
        raise ValueError(f"the served bundle {champion.version} names no model directory that exists ({model_dir}): "
                         "new items need the trained PyTorch model; run retrain_job")
    item_table = (manifest.export.get("onnx") or {}).get("item_table", "fp32")
    if item_table != "fp32":
        # onnx_model exports fp32 only; a quantized or ANN bundle was built outside the graph
        raise ValueError(f"the served bundle {champion.version} ranks with item_table={item_table!r}; new items "
                         "are added to the fp32 bundles that retrain_job builds")
    model, model_config = load_model(model_dir)
    if model_config.vocab_size != champion.vocabulary.vocab_size:
        raise ValueError(f"{model_dir} has {model_config.vocab_size} tokens, the bundle {champion.vocabulary.vocab_size}")
    mismatch = sequence_length_mismatch(model_config.max_len, int(feast_online_store["max_len"]))
    if mismatch:
        raise ValueError(f"the bundle cannot be served from the feature view {FEATURE_VIEW!r}: {mismatch}")

    item_ids = load_item_ids(item_vocabulary)
    counts, categories, vocab_size = load_vocabulary(item_vocabulary)
    new = find_new_items(
        champion.vocabulary, item_ids, list(categories[FIRST_ITEM_TOKEN:]), counts[FIRST_ITEM_TOKEN:].astype(np.int64),
        config.max_new_items,
    )
    context.log.info(f"{len(new.item_ids):,} new items to add to {champion.version}; left out: {new.left_out}")
    if not new.item_ids:
        context.add_output_metadata({"status": "nothing new", "champion": champion.version, "added": 0,
                                     "left_out": MetadataValue.json(new.left_out)})
        return {"status": "nothing_new", "champion": champion.version, "added": 0, "left_out": new.left_out,
                "promoted": False, "run_id": context.run.run_id}

    # Fit data: every event before each user's held-out item (the gate's), in the bundle's tokens.
    grown = add_items(model, new.peers)
    vocabulary_doc = grown_vocabulary_document(champion.vocabulary, new)
    grown_vocabulary = Vocabulary.from_json(vocabulary_doc)
    rows = load_sequence_rows(tokenized_sequences)
    fit_split = split_rows(rows, "train" if config.split == "valid" else "train+valid", target=target)
    context_values = load_context_values(context_vocabulary)
    model_inputs = {name: fit_split.contexts[name] for name in CONTEXT_FIELDS if name in fit_split.contexts}
    sequences, contexts, masks = to_vocabulary_space(
        fit_split.sequences, model_inputs, fit_split.target_masks, item_ids, context_values, grown_vocabulary
    )
    fit_cfg = NewItemFitConfig(epochs=config.epochs, lr=config.lr, prior_weight=config.prior_weight, seed=config.seed)
    fitted = fit_new_items(
        grown, model_config.vocab_size, sequences, contexts, fit_cfg, masks,
        progress=lambda epoch, loss: context.log.info(f"new items: epoch {epoch}/{fit_cfg.epochs}, loss {loss:.4f}"),
    )
    out_dir = models_dir() / "new_items" / context.run.run_id
    extra_path = model_dir / "extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    save_model(out_dir, grown, grown.config, extra={
        **extra, "grown_from": {"model_dir": str(model_dir), "bundle": champion.version, "new_items": len(new.item_ids)},
    })

    report = export_onnx(
        grown, grown.config, out_dir / "onnx" / "model.onnx", contexts=manifest.model.config.get("contexts"),
        top_k=manifest.model.top_k,
    )
    parity_data = SequenceData(
        user_ids=[str(i) for i in range(len(sequences))], tokens=sequences, vocab_size=grown.config.vocab_size,
        contexts=contexts,
    )
    parity = parity_check(grown, report.path, list(validation_batches(parity_data, grown.config.max_len, report.contexts, 1000)))
    if not parity.passed:
        raise RuntimeError(f"ONNX parity check of the grown model failed: {parity.model_dump()}")

    with duckdb.connect(item_vocabulary.database, read_only=True) as con:
        popularity = config.popularity(con, cleaned_interactions.table, target)
    spec = model_spec_for(grown.config, report, target)
    external = Path(report.path).with_name(report.external_data) if report.external_data else None
    export_info = {
        "onnx": report.model_dump(), "parity": parity.model_dump(), "model_dir": str(out_dir),
        "new_items": {"base_version": champion.version, "added": len(new.item_ids), "left_out": new.left_out,
                      "fit": fitted.model_dump()},
    }
    signing_key = load_or_create_signing_key(signing_key_path())

    # Score the candidate from a scratch root first: the bundle written under bundles/ records its gate.
    eval_set = make_eval_set(rows, config.split, target)
    is_new = np.zeros(vocab_size, dtype=bool)
    added = set(new.item_ids)
    is_new[FIRST_ITEM_TOKEN:] = [i in added for i in item_ids]
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        candidate = write_bundle(Path(scratch), Path(report.path), vocabulary_doc, popularity, spec,
                                 external_data=external, data_window=manifest.data_window, export=export_info)
        # the baselines refit on the current data, so item-kNN knows the new items as well
        baselines = fit_baselines(fit_split.sequences, vocab_size, target_masks=fit_split.target_masks)
        scorers = {
            "grown": BundleScorer(Path(candidate.path)).scorer(item_ids, context_values),
            "champion": BundleScorer(root / CURRENT_BUNDLE).scorer(item_ids, context_values),
            **{name: as_scorer(m) for name, m in baselines.items()},
        }
        results = evaluate_many(scorers, eval_set, counts, (1, 5, UPTAKE_K, 20), ("full",), seed=config.seed,
                                n_bootstrap=config.n_bootstrap, item_categories=categories)
        uptake = {
            name: new_item_uptake(recommended_items(scorers[name], eval_set, UPTAKE_K), eval_set,
                                  results[name].ranks["full"], is_new)
            for name in UPTAKE_MODELS
        }
    metrics = {
        "models": {MODEL_NAME if name == "grown" else name: r.to_dict()["metrics"] for name, r in results.items()},
        "champion": {"version": champion.version, "status": "scored"},
        "new_items": uptake,
        "n_users_evaluated": len(eval_set),
    }
    # The alternative to this bundle is the champion it grew from, so the champion is the bar; the
    # baselines (refit on the current data) are reported beside it.
    decided = gate_decision(metrics, config.gate_tolerance, baselines=())
    decision = GateDecision(
        passed=bool(decided["passed"]), reasons=list(decided["reasons"]), champion=champion.version,
        tolerance=config.gate_tolerance, champion_status="scored", metric="full NDCG@10",
        challenger_value=decided["challenger"], champion_value=decided["champion"], margin=decided["margin"],
        figures={"challenger": metrics["models"][MODEL_NAME], "champion": metrics["models"][CHAMPION_NAME]},
    )
    info = write_bundle(root, Path(report.path), vocabulary_doc, popularity, spec, external_data=external,
                        data_window=manifest.data_window, metrics=metrics, gate=decision.model_dump(),
                        export=export_info, signing_key=signing_key)
    promoted = False
    if decision.passed and config.promote:
        if current_version(root) != champion.version:
            decision.reasons.append(f"the served bundle changed to {current_version(root)} while this ran: not promoted")
        else:
            promote(root, info.version, reasons=[f"new items: {len(new.item_ids)} added", *decision.reasons])
            promoted = True
    (context.log.info if promoted else context.log.warning)(
        f"new-item bundle {info.version}: {'promoted' if promoted else 'NOT promoted'}; {decision.reasons}"
    )
    context.add_output_metadata({
        "status": "promoted" if promoted else "not promoted",
        "version": info.version,
        "path": MetadataValue.path(info.path),
        "champion": champion.version,
        "added": len(new.item_ids),
        "left_out": MetadataValue.json(new.left_out),
        "fit_windows": fitted.n_windows,
        "fit_seconds": fitted.seconds,
        "gate_passed": decision.passed,
        "gate_reasons": MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
        "uptake": MetadataValue.md(_uptake_table(uptake, results)),
        **{f"{name}_{key}": MetadataValue.float(float(value))
           for name, figures in uptake.items() for key, value in figures.items()},
        **{f"{name}_ndcg10": MetadataValue.float(float(r.metrics["full"]["NDCG@10"])) for name, r in results.items()},
    })
    return {
        "status": "promoted" if promoted else "not_promoted",
        "version": info.version,
        "path": info.path,
        "champion": champion.version,
        "added": len(new.item_ids),
        "left_out": new.left_out,
        "promoted": promoted,
        "gate": decision.model_dump(),
        "new_items": uptake,
        "run_id": context.run.run_id,
    }


def _uptake_table(uptake: dict[str, dict[str, float]], results: dict[str, Any]) -> str:
    lines = ["| model | NDCG@10 | HR@10, next item new | HR@10, next item known | slots with a new item "
             "| users shown one | shown new items that were next |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in uptake.items():
        lines.append(
            f"| {name} | {results[name].metrics['full']['NDCG@10']:.4f} | {f.get('HR@10_new_targets', 0.0):.4f} | "
            f"{f.get('HR@10_old_targets', 0.0):.4f} | {f['new_item_slot_share']:.3f} | {f['users_shown_new_item']:.3f} | "
            f"{f['new_item_precision']:.3f} |"
        )
    return "\n".join(lines)


assets = [new_item_bundle]
asset_checks: list[Any] = []
