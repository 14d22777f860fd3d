"""Writing, promoting and rolling back model bundles under ``$RECSYS_HOME/bundles/``.

Layout::

    bundles/<version>/        write-once (staged, renamed into place, files made read-only), with
                              manifest.sig when written with a signing key (signing.py)
    bundles/current           symlink -> <version>, switched atomically (os.replace) on promotion
    bundles/promotions.jsonl  append-only history of every switch (promotion or rollback)

The file format itself (and the reader that verifies it) lives in ``recsys_serving.bundle``, so the
writer and the server cannot disagree about it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import duckdb
from pydantic import BaseModel

from recsys_serving.contract import CURRENT_BUNDLE, FIRST_ITEM_TOKEN, PredictionTarget, time_of_day_sql
from recsys_assets.evaluation.report import CHAMPION_NAME, MODEL_NAME, gate_decision
from recsys_serving.bundle import (
    BUNDLE_FORMAT_VERSION,
    CONTEXT_DIMENSIONS,
    MANIFEST_FILE,
    MODEL_FILE,
    PLAN_FILE,
    POPULARITY_CHOICE_ORDER,
    POPULARITY_FILE,
    SIGNATURE_FILE,
    VOCABULARY_FILE,
    BundleRefused,
    ContextDimension,
    FileEntry,
    Manifest,
    ModelSpec,
    Popularity,
    PublicKey,
    configured_public_keys,
    key_id_of,
    sha256_file,
    sign_manifest,
    verify_bundle,
)

if TYPE_CHECKING:  # onnx_export imports torch: only loaded when a bundle is exported
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from recsys_assets.export.ann_index import AnnOptions
    from recsys_assets.export.onnx_export import ItemTable

CURRENT = CURRENT_BUNDLE
PROMOTIONS_LOG = "promotions.jsonl"


# --------------------------------------------------------------------------- content


def vocabulary_document(con: duckdb.DuckDBPyConnection, vocab_table: str, context_table: str | None) -> dict[str, Any]:
    """item_vocabulary (+ context_vocabulary) -> vocabulary.json; tokens must be contiguous from 2."""
    rows = con.execute(
        f'SELECT token, item_id, category FROM "{vocab_table}" WHERE NOT is_special ORDER BY token'
    ).fetchall()
    for expected, (token, _, _) in enumerate(rows, start=FIRST_ITEM_TOKEN):
        if token != expected:
            raise ValueError(f"{vocab_table}: item tokens are not contiguous (expected {expected}, got {token})")
    context: dict[str, dict[str, int]] = {"device": {}, "segment": {}}
    if context_table is not None:
        for kind, value, token in con.execute(f'SELECT kind, value, token FROM "{context_table}"').fetchall():
            context.setdefault(kind, {})[str(value)] = int(token)
    categories = [c for _, _, c in rows]
    return {
        "items": [str(i) for _, i, _ in rows],
        "categories": categories if any(c is not None for c in categories) else None,
        "context": context,
    }


# How strongly a context list is shrunk towards global, in events (popularity_document). Measured by
# benchmarks/cold_start_users.py: on the built-in generator, where no context changes which items are
# popular, unshrunk lists of ~100-1,000 events lose 1.3 points of HR@10 against global (their ranking
# is noise); 1,000 brings them back to global and keeps most of the gain where context does matter.
PRIOR_EVENTS = 1000.0
# How each context dimension of the popularity lists is read from cleaned_interactions: time of day
# through the contract's bucketing, as serving buckets a request's ts.
_CONTEXT_SQL: dict[ContextDimension, str] = {
    "device": '"device"',
    "segment": '"segment"',
    "time_of_day": time_of_day_sql('"ts"'),
}


def popularity_document(
    con: duckdb.DuckDBPyConnection,
    cleaned_table: str,
    window_days: int | None = 30,
    top_global: int = 1000,
    top_group: int = 300,
    min_group_events: int = 100,
    target: PredictionTarget | None = None,
    max_groups: int = 200,
    prior_events: float = PRIOR_EVENTS,
) -> dict[str, Any]:
    """Most interacted items over the last `window_days` of the data (all of it when the data has
    no timestamps or the window is None), globally and per context: for every combination of
    dimensions in POPULARITY_CHOICE_ORDER (device, segment, time of day, their pairs and all three),
    each combination of values with at least `min_group_events` events; at most `max_groups` per
    combination of dimensions, those with the most events (a column of thousands of values cannot
    blow up the bundle). Global score = share of the window's events; for next_purchase, of its
    target events (the fallback answers the same question as the model). A context list's score is
    that share in its context shrunk towards the global share, (count + prior_events x global share)
    / (events + prior_events): a small context's list stays close to global unless its own counts
    differ clearly (its raw ranking is mostly noise), a large one's is its own."""
    (max_ts,) = con.execute(f'SELECT max(ts) FROM "{cleaned_table}"').fetchone() or (None,)
    where = "true"
    if target is not None and not target.every_event:
        where = "event_type IN (" + ", ".join(f"'{t}'" for t in target.event_types) + ")"
    window: dict[str, Any] = {"days": None, "end": None}
    if window_days is not None and max_ts is not None:
        where += f" AND ts > TIMESTAMP '{max_ts}' - INTERVAL {int(window_days)} DAY"
        window = {"days": window_days, "end": str(max_ts)}

    def ranked(dimensions: tuple[ContextDimension, ...], top: int) -> list[tuple[tuple[str, ...], list[dict[str, Any]]]]:
        """[(values, list)] of each group of `dimensions` (one group, key ('*',), for none)."""
        exprs = [f"CAST({_CONTEXT_SQL[d]} AS VARCHAR)" for d in dimensions] or ["'*'"]  # a constant key: NULL would not join
        cols = [f"g{i}" for i in range(len(exprs))]
        keys, by = ", ".join(f"{e} AS {c}" for e, c in zip(exprs, cols)), ", ".join(cols)
        present = " AND ".join(f"{c} IS NOT NULL AND trim({c}) <> ''" for c in cols)
        prior = float(prior_events) if dimensions else 0.0
        rows = con.execute(
            f"""
            WITH base AS (SELECT {keys}, item_id FROM "{cleaned_table}" WHERE {where}),
                 w AS (SELECT * FROM base WHERE {present}),
                 shares AS (SELECT item_id, count(*) / sum(count(*)) OVER () AS p FROM base GROUP BY item_id),
                 sizes AS (SELECT {by}, count(*) AS n FROM w GROUP BY {by} HAVING count(*) >= ?
                           ORDER BY n DESC, {by} LIMIT ?),
                 counts AS (SELECT {by}, item_id, count(*) AS c FROM w JOIN sizes USING ({by}) GROUP BY {by}, item_id),
                 -- shrunk towards global, a group's list can hold globally popular items it never saw
                 candidates AS (SELECT {by}, item_id FROM counts UNION
                                SELECT {by}, item_id FROM sizes CROSS JOIN
                                  (SELECT item_id FROM shares ORDER BY p DESC, item_id LIMIT ?)),
                 scored AS (SELECT {by}, item_id, (coalesce(c, 0) + ? * p) / (n + ?) AS score
                            FROM candidates JOIN sizes USING ({by}) JOIN shares USING (item_id)
                            LEFT JOIN counts USING ({by}, item_id)),
                 ranked AS (SELECT {by}, item_id, score,
                                   row_number() OVER (PARTITION BY {by} ORDER BY score DESC, item_id) AS r
                            FROM scored)
            SELECT {by}, item_id, score FROM ranked WHERE r <= ? ORDER BY {by}, r
            """,
            [min_group_events if dimensions else 1, max_groups if dimensions else 1, top if prior > 0 else 0,
             prior, prior, top],
        ).fetchall()
        out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for *values, item, score in rows:
            out.setdefault(tuple(str(v) for v in values), []).append({"item_id": str(item), "score": float(score)})
        return list(out.items())

    global_list = ranked((), top_global)
    if not global_list:
        raise ValueError(f"{cleaned_table} has no events in the popularity window {window}")
    doc = {
        "global": global_list[0][1],
        "groups": [
            {"context": dict(zip(dimensions, values)), "items": items}
            for dimensions in POPULARITY_CHOICE_ORDER
            for values, items in ranked(dimensions, top_group)
        ],
        "window": window,
    }
    Popularity.model_validate(doc)  # the reader's schema is the contract
    return doc


def popularity_summary(doc: Mapping[str, Any]) -> str:
    """How many lists a popularity document holds, per combination of dimensions (for people)."""
    counts: dict[str, int] = {}
    for group in doc.get("groups", []):
        name = "+".join(d for d in CONTEXT_DIMENSIONS if d in group["context"])
        counts[name] = counts.get(name, 0) + 1
    return ", ".join([f"global {len(doc['global'])} items"] + [f"{name} {n}" for name, n in counts.items()])


def data_window(con: duckdb.DuckDBPyConnection, cleaned_table: str) -> dict[str, Any]:
    row = con.execute(
        f'SELECT min(ts), max(ts), count(*), count(DISTINCT user_id), count(DISTINCT item_id) FROM "{cleaned_table}"'
    ).fetchone()
    assert row is not None  # an aggregate always returns one row
    start, end, events, users, items = row
    return {
        "start": str(start) if start is not None else None,
        "end": str(end) if end is not None else None,
        "interactions": int(events),
        "users": int(users),
        "items": int(items),
    }


# --------------------------------------------------------------------------- writing


class BundleInfo(BaseModel):
    version: str
    path: str
    files: dict[str, FileEntry]
    bytes: int
    signed_by: str | None = None  # key id of the signing key; None: unsigned


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=False, default=str))


def new_version(model_sha256: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}Z-{model_sha256[:8]}"


def write_bundle(
    root: Path,
    onnx_path: Path,
    vocabulary: Mapping[str, Any],
    popularity: Mapping[str, Any],
    model_spec: ModelSpec,
    *,
    plan_path: Path | None = None,
    external_data: Path | None = None,
    extra_files: tuple[Path, ...] = (),
    data_window: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
    version: str | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> BundleInfo:
    """Stage every file, checksum it, write the manifest (and, with `signing_key`, manifest.sig over
    its exact bytes), rename the directory into place (atomic), make it read-only and verify it with
    the serving reader (the signature too). Never overwrites a bundle. `extra_files`: further files
    the model needs under their own names (an ANN export's index and table, ModelSpec.ranking)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        shutil.copyfile(onnx_path, staging / MODEL_FILE)
        if external_data is not None:
            shutil.copyfile(external_data, staging / external_data.name)
        for extra in extra_files:
            if (staging / extra.name).exists():
                raise ValueError(f"{extra.name} would overwrite another bundle file")
            shutil.copyfile(extra, staging / extra.name)
        if plan_path is not None:
            shutil.copyfile(plan_path, staging / PLAN_FILE)
        _write_json(staging / VOCABULARY_FILE, vocabulary)
        _write_json(staging / POPULARITY_FILE, popularity)
        files = {
            p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size) for p in sorted(staging.iterdir())
        }
        version = version or new_version(files[MODEL_FILE].sha256)
        manifest = Manifest(
            format_version=BUNDLE_FORMAT_VERSION,
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model=model_spec,
            data_window=dict(data_window or {}),
            metrics=dict(metrics or {}),
            gate=dict(gate or {}),
            export=dict(export or {}),
            files=files,
        )
        _write_json(staging / MANIFEST_FILE, manifest.model_dump(mode="json"))
        if signing_key is not None:
            (staging / SIGNATURE_FILE).write_bytes(sign_manifest((staging / MANIFEST_FILE).read_bytes(), signing_key))
        target = root / version
        if target.exists():
            raise FileExistsError(f"bundle {target} exists: bundles are written once")
        for p in staging.iterdir():
            p.chmod(0o444)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    signed_by = None
    if signing_key is not None:
        public = signing_key.public_key()
        signed_by = key_id_of(public)
        verify_bundle(target, [PublicKey(key_id=signed_by, key=public)])
    else:
        verify_bundle(target)
    return BundleInfo(
        version=version,
        path=str(target),
        files=files,
        bytes=sum(f.bytes for f in files.values()),
        signed_by=signed_by,
    )


# --------------------------------------------------------------------------- promotion


class PromotionRecord(BaseModel):
    at: str
    action: str  # "promote" | "rollback"
    version: str
    previous: str | None
    reasons: list[str] = []


def current_version(root: Path) -> str | None:
    link = root / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def _switch(root: Path, version: str) -> str | None:
    """Point `current` at `version` atomically: a new symlink renamed over the old one."""
    previous = current_version(root)
    tmp = root / f".current-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(version, target_is_directory=True)  # relative: the tree stays movable
    os.replace(tmp, root / CURRENT)
    return previous


def _log(root: Path, record: PromotionRecord) -> None:
    with open(root / PROMOTIONS_LOG, "a") as fh:
        fh.write(record.model_dump_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def promote(
    root: Path,
    version: str,
    reasons: list[str] | None = None,
    action: str = "promote",
    public_keys: list[PublicKey] | None = None,
) -> PromotionRecord:
    """Verify the bundle (checksums included; its signature too where public keys are configured:
    `public_keys`, default `configured_public_keys()`) and switch `current` to it."""
    verify_bundle(root / version, configured_public_keys() if public_keys is None else public_keys)
    previous = _switch(root, version)
    record = PromotionRecord(
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        action=action,
        version=version,
        previous=previous,
        reasons=list(reasons or []),
    )
    _log(root, record)
    return record


def promotion_history(root: Path) -> list[PromotionRecord]:
    path = root / PROMOTIONS_LOG
    if not path.exists():
        return []
    return [PromotionRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def previous_champion(root: Path) -> str | None:
    """The bundle served before the current one: the champions in promotions.jsonl as a stack, where
    a promotion pushes and a rollback pops back to its target (so rolling back twice goes two
    champions back instead of undoing the first rollback)."""
    stack: list[str] = []
    for record in promotion_history(root):
        if record.action == "rollback" and record.version in stack:
            del stack[len(stack) - 1 - stack[::-1].index(record.version) :]  # pushed again below
        stack.append(record.version)
    current = current_version(root)
    return next((v for v in reversed(stack) if v != current), None)


def rollback(root: Path, to: str | None = None, reason: str | None = None) -> PromotionRecord:
    """Switch `current` back to `to`, or to the previous champion (`previous_champion`). The target is
    verified like a promotion, its signature included where public keys are configured (BundleRefused
    when it does not verify; `current` is then unchanged);
    a running service follows the switch as it follows a promotion."""
    current = current_version(root)
    if to is None:
        to = previous_champion(root)
        if to is None:
            raise ValueError(f"no earlier bundle to roll back to in {root / PROMOTIONS_LOG} (current: {current})")
    if Path(to).name != to or to.startswith(".") or to in (CURRENT, PROMOTIONS_LOG):
        raise ValueError(f"{to!r} is not a bundle version (a directory name under {root})")
    if to == current:
        raise ValueError(f"{to} is already the current bundle")
    if not (root / to).is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                           and not p.name.startswith(".")) if root.is_dir() else []
        raise ValueError(f"no bundle {to} under {root} (bundles there: {', '.join(available) or 'none'})")
    return promote(root, to, reasons=[reason or f"rollback from {current} to {to}"], action="rollback")


class GateDecision(BaseModel):
    """The promotion decision (evaluation.report.gate_decision) with both sides' figures, as the
    manifest's gate section records it."""

    passed: bool
    reasons: list[str]
    champion: str | None  # the version `current` pointed to when the bundle was gated
    tolerance: float
    champion_status: str = "none"  # "scored" | "refused" (did not load or score) | "none" (nothing promoted)
    metric: str = "full NDCG@10"
    challenger_value: float | None = None
    champion_value: float | None = None
    margin: float | None = None  # challenger / champion - 1; the champion check passes when >= -tolerance
    figures: dict[str, Any] = {}  # {"challenger" | "champion": {protocol: {metric: value}}}, the same report


def evaluate_gate(root: Path, metrics: Mapping[str, Any], tolerance: float) -> GateDecision:
    """The evaluation gate (evaluation.report.gate_decision) on the report `metrics`, which scored
    the champion beside the challenger on the same data; refused as well when `current` is no longer
    the champion that report scored (it was switched since: re-run the evaluation)."""
    decision = gate_decision(metrics, tolerance)
    passed, reasons = bool(decision["passed"]), list(decision["reasons"])
    current = current_version(root)
    evaluated = decision["champion_version"]
    if current != evaluated:
        passed = False
        reasons.append(
            f"the served bundle is {current or 'none'} but the report scored {evaluated or 'no champion'}: "
            "re-run evaluation_report against the current champion"
        )
    models = metrics.get("models", {})
    return GateDecision(
        passed=passed,
        reasons=reasons,
        champion=current,
        tolerance=tolerance,
        champion_status=decision["champion_status"],
        metric=f"{decision['protocol']} {decision['metric']}",
        challenger_value=decision["challenger"],
        champion_value=decision["champion"],
        margin=decision["margin"],
        figures={"challenger": models.get(MODEL_NAME), "champion": models.get(CHAMPION_NAME)},
    )


def model_spec_for(config: Any, export_report: Any, target: PredictionTarget | None = None) -> ModelSpec:
    """The manifest's model section from a BERT4RecConfig, an onnx_export.ExportReport and the
    target the model was trained for (with the ANN ranking stage of an item_table="ann" export)."""
    ann = getattr(export_report, "ann", None)
    return ModelSpec(
        architecture="bert4rec",
        max_len=config.max_len,
        vocab_size=config.vocab_size,
        top_k=export_report.top_k,
        inputs=export_report.inputs,
        outputs=export_report.outputs,
        opset=export_report.opset,
        target=(target or PredictionTarget()).to_dict(),
        config={**config.model_dump(), "contexts": export_report.contexts},
        ranking=ann.ranking() if ann is not None else None,
    )


def export_bundle(
    root: Path,
    model: Any,
    config: Any,
    vocabulary: Mapping[str, Any],
    popularity: Mapping[str, Any],
    workdir: Path,
    *,
    contexts: list[str] | None = None,
    top_k: int = 100,
    item_table: ItemTable = "fp32",
    rescore_candidates: int | None = None,
    ann: AnnOptions | None = None,
    ann_tuning_queries: np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    data_window: Mapping[str, Any] | None = None,
    version: str | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> BundleInfo:
    """Export `model` to ONNX in `workdir` and write a bundle from it (no parity check: the
    onnx_model asset does that on real data; this is for built-from-code bundles such as the
    latency benchmark's 2M-item catalogue and tests). `item_table`/`rescore_candidates`: see
    onnx_export.export_onnx (int8/int4: the quantized two-stage ranking head; ann: the ANN index,
    with `ann` and `ann_tuning_queries`)."""
    from recsys_assets.export.onnx_export import DEFAULT_RESCORE_CANDIDATES, export_onnx

    report = export_onnx(
        model,
        config,
        workdir / MODEL_FILE,
        contexts=contexts,
        top_k=top_k,
        item_table=item_table,
        rescore_candidates=rescore_candidates or DEFAULT_RESCORE_CANDIDATES,
        ann=ann,
        ann_tuning_queries=ann_tuning_queries,
    )
    external = workdir / report.external_data if report.external_data else None
    extra = tuple(workdir / name for name in (report.ann.index_file, report.ann.table_file)) if report.ann else ()
    return write_bundle(
        root,
        Path(report.path),
        vocabulary,
        popularity,
        model_spec_for(config, report),
        external_data=external,
        extra_files=extra,
        data_window=data_window,
        metrics=metrics,
        export={"onnx": report.model_dump()},
        version=version,
        signing_key=signing_key,
    )
