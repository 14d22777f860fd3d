"""Export stage: onnx_model -> tensorrt_engine -> model_bundle (gate + promotion) -> bento.

Thin Dagster wrappers over recsys_assets.export (the library) and recsys_serving.bundle (the format).
No `from __future__ import annotations` here: Dagster 1.13 reads the `config` annotation off the
signature and cannot resolve it from a string.
"""


import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
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

from recsys_assets.assets.evaluation import report_gate_tolerance
from recsys_assets.config import REPO_ROOT, bundles_dir, models_dir, recsys_home
from recsys_assets.export.bundle import PRIOR_EVENTS
from recsys_assets.io_manager import TableRef
from recsys_serving.contract import FEATURE_VIEW, SERVICE_NAME, PredictionTarget, sequence_length_mismatch

GROUP = "export"


# --------------------------------------------------------------------------- onnx_model


class OnnxModelConfig(Config):
    parity_sequences: int = Field(2000, ge=1, description="validation sequences compared with PyTorch")
    min_parity_sequences: int = Field(
        1000, ge=1, description="fail when fewer are compared, unless that is every evaluable user of the data"
    )
    tolerance: float = Field(1e-4, gt=0, description="max |score difference| allowed in fp32")
    top_k: int = Field(100, ge=1, le=1000, description="top-K width inside the graph (largest k served)")


def _validation_data(tokenized_sequences: TableRef, vocab_size: int, n: int) -> tuple[Any, list[str]]:
    """The first `n` evaluable users (>= 3 items) as SequenceData, and the context columns present."""
    from recsys_assets.bert4rec.data import CONTEXT_FIELDS, SequenceData

    with tokenized_sequences.connect(read_only=True) as con:
        columns = {r[0] for r in con.execute(f'DESCRIBE "{tokenized_sequences.table}"').fetchall()}
        ctx = [c for c in CONTEXT_FIELDS if c in columns]
        select = ", ".join(f'"{c}"' for c in ["user_id", "tokens", *ctx])
        frame = con.execute(
            f'SELECT {select} FROM "{tokenized_sequences.table}" WHERE len(tokens) >= 3 ORDER BY user_id LIMIT ?',
            [n],
        ).to_arrow_table()
    assert frame is not None

    def lists(name: str) -> list[np.ndarray]:
        return [np.asarray(v if v is not None else [], dtype=np.int64) for v in frame.column(name).to_pylist()]

    data = SequenceData(
        user_ids=[str(u) for u in frame.column("user_id").to_pylist()],
        tokens=lists("tokens"),
        vocab_size=vocab_size,
        contexts={c: lists(c) for c in ctx},
    )
    return data, ctx


@asset(
    group_name=GROUP,
    io_manager_key="artifact_io_manager",
    description="BERT4Rec exported to ONNX (dynamic batch/length, context inputs, history masking and top-K in "
    "the graph), onnx.checker-validated and parity-checked against PyTorch on real validation sequences.",
)
def onnx_model(
    context: AssetExecutionContext,
    config: OnnxModelConfig,
    bert4rec_model: dict[str, Any],
    tokenized_sequences: TableRef,
) -> dict[str, Any]:
    import torch

    from recsys_assets.bert4rec.model import load_model
    from recsys_assets.export.onnx_export import export_onnx, model_contexts
    from recsys_assets.export.verification import parity_check, validation_batches

    torch.set_num_threads(2)
    model_dir = Path(bert4rec_model["path"])
    model, model_config = load_model(model_dir)
    data, available = _validation_data(tokenized_sequences, model_config.vocab_size, config.parity_sequences)
    contexts = model_contexts(model_config, available)
    out_dir = models_dir() / "onnx" / context.run.run_id
    report = export_onnx(model, model_config, out_dir / "model.onnx", contexts=contexts, top_k=config.top_k)
    context.log.info(f"exported {report.bytes / 1e6:.1f} MB in {report.seconds:.1f}s, inputs {report.inputs}")

    batches = list(validation_batches(data, model_config.max_len, contexts, config.parity_sequences))
    n = sum(len(b.tokens) for b in batches)
    every_user = len(data) < config.parity_sequences  # the table has no more evaluable users
    if n == 0 or (n < config.min_parity_sequences and not every_user):
        raise ValueError(
            f"only {n} validation sequences in {tokenized_sequences.table}; the parity check needs "
            f">= {config.min_parity_sequences} (config min_parity_sequences)"
        )
    if n < config.min_parity_sequences:
        # a small dataset: checking every sequence it has is as far as parity can go
        context.log.warning(f"parity checked on all {n} validation sequences, fewer than min_parity_sequences")
    parity = parity_check(model, report.path, batches, tolerance=config.tolerance)
    context.add_output_metadata(
        {
            "onnx_path": MetadataValue.path(report.path),
            "bytes": report.bytes,
            "inputs": MetadataValue.json(report.inputs),
            "outputs": MetadataValue.json(report.outputs),
            "parity_sequences": parity.n_sequences,
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_mean_abs_diff": parity.mean_abs_diff,
            "parity_top10_identical": f"{parity.top10_identical}/{parity.n_sequences} "
            f"(+{parity.top10_tie_swaps} tie swaps)",
            "parity_graph_topk_identical": f"{parity.topk_head_identical}/{parity.n_sequences} "
            f"(+{parity.topk_head_tie_swaps} tie swaps)",
            "parity_passed": parity.passed,
        }
    )
    if not parity.passed:
        raise RuntimeError(f"ONNX parity check failed: {parity.model_dump()}")
    return {
        "path": report.path,
        "run_id": context.run.run_id,
        "model_dir": str(model_dir),
        "config": model_config.model_dump(),
        "export": report.model_dump(),
        "parity": parity.model_dump(),
    }


# --------------------------------------------------------------------------- tensorrt_engine


class TensorRTConfig(Config):
    fp16: bool = True
    max_exclude: int = Field(512, ge=1, description="longest history masked by the engine (profile max)")
    parity_sequences: int = Field(2000, ge=1)
    min_top10_overlap: float = Field(0.9, gt=0, le=1)


@asset(
    group_name=GROUP,
    io_manager_key="artifact_io_manager",
    description="TensorRT fp16 engine (online and batch optimization profiles) built with the TensorRT Python "
    "API from onnx_model, parity-checked against ONNX Runtime. Without CUDA or tensorrt it records why not.",
)
def tensorrt_engine(
    context: AssetExecutionContext,
    config: TensorRTConfig,
    onnx_model: dict[str, Any],
    tokenized_sequences: TableRef,
) -> dict[str, Any]:
    from recsys_assets.export.tensorrt_engine import (
        build_engine,
        default_profiles,
        parity_check_tensorrt,
        tensorrt_available,
    )
    from recsys_assets.export.verification import validation_batches

    ok, why = tensorrt_available()
    if not ok:
        context.log.warning(f"TensorRT engine NOT built: {why}. Serving uses ONNX Runtime.")
        context.add_output_metadata({"built": False, "reason": why})
        return {"built": False, "reason": why, "path": None, "run_id": context.run.run_id}
    max_len = int(onnx_model["config"]["max_len"])
    profiles = default_profiles(max_len, config.max_exclude)
    plan = Path(onnx_model["path"]).with_name("model.plan")
    engine = build_engine(onnx_model["path"], plan, profiles, fp16=config.fp16)
    data, _ = _validation_data(tokenized_sequences, int(onnx_model["config"]["vocab_size"]), config.parity_sequences)
    contexts = onnx_model["export"]["contexts"]
    batches = list(validation_batches(data, max_len, contexts, config.parity_sequences, batch_size=profiles[1].batch[2]))
    parity = parity_check_tensorrt(
        plan, onnx_model["path"], batches, profile_index=1, max_exclude=config.max_exclude,
        min_top10_overlap=config.min_top10_overlap,
    )
    context.add_output_metadata(
        {
            "built": True,
            "plan_path": MetadataValue.path(str(plan)),
            "device": engine.device,
            "tensorrt_version": engine.tensorrt_version,
            "build_seconds": engine.build_seconds,
            "parity": MetadataValue.json(parity.model_dump()),
        }
    )
    if not parity.passed:
        raise RuntimeError(f"TensorRT parity check failed: {parity.model_dump()}")
    return {
        "built": True,
        "reason": None,
        "path": str(plan),
        "engine": engine.model_dump(),
        "parity": parity.model_dump(),
        "run_id": context.run.run_id,
    }


@asset_check(
    asset=tensorrt_engine,
    description="A TensorRT engine was built. Warns (model_bundle still runs, serving uses ONNX Runtime) "
    "where CUDA or tensorrt is missing, so the UI does not show a plain green materialization.",
)
def tensorrt_engine_built(tensorrt_engine: dict[str, Any]) -> AssetCheckResult:
    if tensorrt_engine.get("built"):
        return AssetCheckResult(passed=True, metadata={"plan_path": MetadataValue.path(str(tensorrt_engine["path"]))})
    reason = str(tensorrt_engine.get("reason"))
    return AssetCheckResult(
        passed=False, severity=AssetCheckSeverity.WARN, description=f"no TensorRT engine: {reason}", metadata={"reason": reason}
    )


# --------------------------------------------------------------------------- model_bundle


class ModelBundleConfig(Config):
    # The gate's tolerance is evaluation_report's `gate_tolerance` (one setting for both gates).
    popularity_window_days: int = Field(30, ge=0, description="popularity over the last N days (0 = all data)")
    popularity_top_global: int = Field(1000, ge=100)
    popularity_top_group: int = Field(300, ge=100)
    popularity_min_group_events: int = Field(100, ge=1)
    popularity_max_groups: int = Field(
        200, ge=0, description="most context lists per combination of device/segment/time of day (the largest)"
    )
    popularity_prior_events: float = Field(
        PRIOR_EVENTS, ge=0, description="shrinkage of a context list towards global, in events (0 = none)"
    )
    promote: bool = Field(True, description="switch bundles/current when the gate passes")

    def popularity(self, con: duckdb.DuckDBPyConnection, cleaned_table: str, target: PredictionTarget) -> dict[str, Any]:
        """The bundle's fallback lists (popularity.json) from `cleaned_table` with these settings."""
        from recsys_assets.export.bundle import popularity_document

        return popularity_document(
            con,
            cleaned_table,
            window_days=self.popularity_window_days or None,
            top_global=self.popularity_top_global,
            top_group=self.popularity_top_group,
            min_group_events=self.popularity_min_group_events,
            target=target,
            max_groups=self.popularity_max_groups,
            prior_events=self.popularity_prior_events,
        )


@asset(
    group_name=GROUP,
    io_manager_key="artifact_io_manager",
    description="Versioned write-once bundle ($RECSYS_HOME/bundles/<version>): model.onnx (+ model.plan), "
    "vocabulary, popularity fallback, manifest with checksums, signed (manifest.sig, Ed25519) with the key "
    "of RECSYS_BUNDLE_SIGNING_KEY_FILE; promoted atomically if the gate passes.",
)
def model_bundle(
    context: AssetExecutionContext,
    config: ModelBundleConfig,
    onnx_model: dict[str, Any],
    tensorrt_engine: dict[str, Any],
    evaluation_report: dict[str, Any],
    item_vocabulary: TableRef,
    context_vocabulary: TableRef,
    cleaned_interactions: TableRef,
    feast_online_store: dict[str, Any],
) -> dict[str, Any]:
    from recsys_assets.bert4rec.model import BERT4RecConfig
    from recsys_assets.export.bundle import (
        current_version,
        data_window,
        evaluate_gate,
        model_spec_for,
        popularity_summary,
        promote,
        vocabulary_document,
        write_bundle,
    )
    from recsys_assets.export.onnx_export import ExportReport
    from recsys_assets.export.signing import load_or_create_signing_key, public_key_path, signing_key_path

    model_config = BERT4RecConfig.model_validate(onnx_model["config"])
    target = PredictionTarget.from_dict(evaluation_report.get("target"))
    mismatch = sequence_length_mismatch(model_config.max_len, int(feast_online_store["max_len"]))
    if mismatch:
        raise ValueError(f"the bundle cannot be served from the feature view {FEATURE_VIEW!r}: {mismatch}")
    root = bundles_dir()
    metrics = json.loads(Path(evaluation_report["metrics_json"]).read_text())
    decision = evaluate_gate(root, metrics, report_gate_tolerance(evaluation_report))
    with duckdb.connect(item_vocabulary.database, read_only=True) as con:
        vocabulary = vocabulary_document(con, item_vocabulary.table, context_vocabulary.table)
        popularity = config.popularity(con, cleaned_interactions.table, target)
        window = data_window(con, cleaned_interactions.table)
    export = ExportReport.model_validate(onnx_model["export"])
    n_tokens = len(vocabulary["items"]) + 2
    if n_tokens != model_config.vocab_size:
        raise ValueError(
            f"{item_vocabulary.table} has {n_tokens} tokens but the model was trained with "
            f"{model_config.vocab_size}: the vocabulary changed after training"
        )
    plan = Path(tensorrt_engine["path"]) if tensorrt_engine.get("built") else None
    key_file = signing_key_path()
    signing_key = load_or_create_signing_key(key_file)
    info = write_bundle(
        root,
        Path(onnx_model["path"]),
        vocabulary,
        popularity,
        model_spec_for(model_config, export, target),
        plan_path=plan,
        external_data=Path(onnx_model["path"]).with_name(export.external_data) if export.external_data else None,
        data_window=window,
        metrics=metrics,
        gate=decision.model_dump(),
        export={
            "onnx": export.model_dump(),
            "parity": onnx_model.get("parity"),
            "tensorrt": {k: tensorrt_engine.get(k) for k in ("built", "reason", "engine", "parity")},
            "model_dir": onnx_model.get("model_dir"),
            "evaluation_run": evaluation_report.get("run_id"),
        },
        signing_key=signing_key,
    )
    promoted = False
    if decision.passed and config.promote:
        promote(root, info.version, reasons=decision.reasons)
        promoted = True
        context.log.info(f"promoted {info.version}: {decision.reasons}")
    else:
        context.log.warning(
            f"bundle {info.version} written but NOT promoted ({'gate failed' if not decision.passed else 'promote=False'}): "
            f"{decision.reasons}; current stays {current_version(root)}"
        )
    context.add_output_metadata(
        {
            "version": info.version,
            "path": MetadataValue.path(info.path),
            "bytes": info.bytes,
            "files": MetadataValue.json({k: v.model_dump() for k, v in info.files.items()}),
            "gate_passed": decision.passed,
            "gate_reasons": MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "champion_before": str(decision.champion),
            "champion_status": decision.champion_status,
            # the gate's figures, challenger and champion scored in the same report (same data)
            **{key: MetadataValue.float(v) for key, v in (
                ("challenger_ndcg10", decision.challenger_value), ("champion_ndcg10", decision.champion_value),
                ("margin", decision.margin)) if v is not None},
            "promoted": promoted,
            "current": str(current_version(root)),
            "tensorrt_plan": "included" if plan else f"not built: {tensorrt_engine.get('reason')}",
            "signed_by": str(info.signed_by),  # key id; serving verifies with the public key below
            "public_key": MetadataValue.path(str(public_key_path(key_file))),
            "popularity_lists": popularity_summary(popularity),
        }
    )
    return {
        "version": info.version,
        "path": info.path,
        "promoted": promoted,
        "current": current_version(root),
        "signed_by": info.signed_by,
        "gate": decision.model_dump(),
        "run_id": context.run.run_id,
    }


@asset_check(
    asset=model_bundle,
    description="The serving reader accepts the bundle: signature (with the configured public keys), format, "
    "checksums, a warm-up inference.",
)
def bundle_loads_in_serving(context: AssetCheckExecutionContext, model_bundle: dict[str, Any]) -> AssetCheckResult:
    from recsys_serving.bundle import BundleRefused, configured_public_keys, load_bundle
    from recsys_serving.model import OnnxRanker

    try:
        bundle = load_bundle(Path(model_bundle["path"]), public_keys=configured_public_keys())
        ranker = OnnxRanker(bundle, intra_threads=1, use_gpu=False, cache_dir=recsys_home() / "cache" / "tensorrt")
    except BundleRefused as exc:
        return AssetCheckResult(passed=False, metadata={"reason": exc.reason})
    return AssetCheckResult(
        passed=True,
        metadata={"version": bundle.version, "providers": MetadataValue.json(ranker.providers),
                  "signature_verified_with": str(bundle.signed_by)},
    )


# --------------------------------------------------------------------------- bento


class BentoConfig(Config):
    bentoml_home: str = Field("", description="bento store; default $BENTOML_HOME, else $RECSYS_HOME/bentoml")
    timeout_s: int = Field(900, ge=60)


SERVING_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("recsys_serving", ("*.py",)),
    ("feature_repo", ("*.py", "*.yaml")),
    # bentofile.yaml's requirements_txt, dockerfile_template and the CUDA variant's requirements
    ("deploy/serving", ("*.txt", "*.template")),
)


def stage_build_context(bundle_dir: Path, staging: Path) -> Path:
    """A clean build context: the serving package, the Feast repo, bentofile.yaml and the bundle as bundle/."""
    staging.mkdir(parents=True)
    for folder, patterns in SERVING_SOURCES:
        (staging / folder).mkdir(parents=True)
        for pattern in patterns:
            for src in sorted((REPO_ROOT / folder).glob(pattern)):
                shutil.copy2(src, staging / folder / src.name)
    shutil.copy2(REPO_ROOT / "bentofile.yaml", staging / "bentofile.yaml")
    shutil.copytree(bundle_dir, staging / "bundle")
    return staging


@asset(
    group_name=GROUP,
    io_manager_key="artifact_io_manager",
    description="`bentoml build` of recsys_serving with the promoted bundle embedded (its signature "
    "manifest.sig included); records the bento tag.",
)
def bento(context: AssetExecutionContext, config: BentoConfig, model_bundle: dict[str, Any]) -> dict[str, Any]:
    from recsys_assets.export.bundle import current_version
    from recsys_serving.bundle import SIGNATURE_FILE, configured_public_keys, verify_bundle

    root = bundles_dir()
    version = current_version(root)
    if version is None:
        # Like tensorrt_engine without a GPU: say why nothing was built instead of failing the retrain.
        why = f"no promoted bundle in {root}: the evaluation gate has never passed (see model_bundle)"
        context.log.warning(why)
        context.add_output_metadata({"built": False, "reason": why})
        return {"built": False, "reason": why, "tag": None, "run_id": context.run.run_id}
    if version != model_bundle["version"]:
        context.log.warning(f"this run's bundle {model_bundle['version']} was not promoted; building {version}")
    bundle_dir = root / version
    verify_bundle(bundle_dir, configured_public_keys())
    signed = (bundle_dir / SIGNATURE_FILE).is_file()  # copied into the bento with the bundle
    home = config.bentoml_home or os.environ.get("BENTOML_HOME") or str(recsys_home() / "bentoml")
    env = {**os.environ, "BENTOML_HOME": home, "BENTOML_DO_NOT_TRACK": "True"}
    existing = _bento_in_store(f"{SERVICE_NAME}:{version.lower()}", env, config.timeout_s)
    if existing is not None:
        # Bentos are write-once like bundles: a run whose bundle was not promoted keeps the champion's.
        context.log.info(f"bento {existing} of bundle {version} is already built: reusing it")
        return _bento_result(context, existing, version, home, built=False, signed=signed)
    # BentoML refuses bentofile.yaml's file paths (requirements_txt, dockerfile_template) outside the
    # working directory or under a hidden one, like the default RECSYS_HOME .recsys/: stage in the
    # system's temporary directory and build from inside it.
    staging = Path(tempfile.mkdtemp(prefix=f"recsys-bento-build-{uuid.uuid4().hex[:8]}-")) / "context"
    try:
        stage_build_context(bundle_dir, staging)
        cmd = [sys.executable, "-m", "bentoml", "build", str(staging), "-f", str(staging / "bentofile.yaml"),
               "--version", version.lower(), "-o", "tag"]
        result = subprocess.run(cmd, env=env, cwd=staging, capture_output=True, text=True, timeout=config.timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"bentoml build failed ({result.returncode}): {result.stderr[-2000:]}")
        tag = result.stdout.strip().splitlines()[-1].strip()
        if tag.startswith("__tag__:"):
            tag = tag.split(":", 1)[1]
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    context.log.info(f"built bento {tag} with bundle {version}")
    return _bento_result(context, tag, version, home, built=True, signed=signed)




def _bento_in_store(tag: str, env: dict[str, str], timeout_s: int) -> str | None:
    """The tag if the bento store already holds it (`bentoml get`), else None."""
    result = subprocess.run([sys.executable, "-m", "bentoml", "get", tag, "-o", "json"], env=env,
                            capture_output=True, text=True, timeout=timeout_s)
    return tag if result.returncode == 0 else None


def _bento_result(
    context: AssetExecutionContext, tag: str, version: str, home: str, built: bool, signed: bool
) -> dict[str, Any]:
    serve = f"BENTOML_HOME={home} bentoml serve {tag} --host 127.0.0.1 --port 3100"
    containerize = f"BENTOML_HOME={home} bentoml containerize {tag}"
    context.add_output_metadata(
        {"tag": tag, "bundle_version": version, "bundle_signed": signed, "bentoml_home": home, "newly_built": built,
         "serve": serve, "containerize": containerize}
    )
    return {
        "tag": tag,
        "bundle_version": version,
        "bundle_signed": signed,
        "bentoml_home": home,
        "newly_built": built,
        "serve": serve,
        "containerize": containerize,
        "run_id": context.run.run_id,
    }


assets = [onnx_model, tensorrt_engine, model_bundle, bento]
asset_checks = [tensorrt_engine_built, bundle_loads_in_serving]
