"""The evaluation report: metrics.json, plots, a self-contained HTML page, and the promotion gate.

Layout under ``$RECSYS_HOME/reports/evaluation/``: ``<run id>/`` holds ``metrics.json``,
``report.html`` (plots embedded, so the page is one file), the PNG plots and ``ranks.npz``
(per-user ranks, for paired comparisons later); ``latest/`` is a copy of the newest run, swapped in
atomically (a symlink replaced with ``os.replace`` pointing at a private copy), so a reader never
sees half a report.

metrics.json::

    {"run_id", "created_at", "dataset": {...}, "config": {...},
     "models": {model: {protocol: {metric: value}}},
     "ci": {model: {protocol: {metric: [low, high]}}},          # 95% percentile bootstrap
     "slices": {model: {protocol: {kind: {slice: {"n_users", metric: value}}}}},
     "lift": {other model: {protocol: {metric: {"model", "baseline", "relative", "ci"}}}},
     "champion": {"status", "version", "reason", ...} (when given), "training": [epoch records],
     "gate": {"passed", "reasons", "challenger", "champion", "margin", ...} (when given)}

The champion (the bundle ``bundles/current`` serves) is one more model, ``"champion"``, scored by
the same code on the same eval set, negatives and bootstrap as the challenger; the gate compares
the two figures of this one document (`gate_decision`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: reports are rendered in workers without a display
import matplotlib.pyplot as plt
import numpy as np

from recsys_assets.config import reports_dir
from recsys_assets.evaluation.metrics import bootstrap_means, lift_samples
from recsys_assets.evaluation.protocol import EvaluationResult
from recsys_serving.contract import PredictionTarget

MODEL_NAME = "bert4rec"
CHAMPION_NAME = "champion"  # the served bundle, scored beside the challenger (never a baseline)
BASELINE_NAMES: tuple[str, ...] = ("popularity", "item_knn", "last_item")
HEADLINE_METRICS: tuple[str, ...] = ("HR@10", "NDCG@10", "MRR")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _clean(obj: Any) -> Any:
    """JSON-able copy: numpy scalars to Python, NaN/inf to None (JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def relative_lift(
    results: Mapping[str, EvaluationResult],
    model: str = MODEL_NAME,
    metrics: Sequence[str] = HEADLINE_METRICS,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{baseline: {protocol: {metric: {model, baseline, relative, ci}}}}: relative = model / baseline
    - 1, with a paired bootstrap CI over the same users (one resampling shared by every column)."""
    if model not in results:
        raise ValueError(f"no results for model {model!r}; have {sorted(results)}")
    ours = results[model]
    others = {n: r for n, r in results.items() if n != model}
    for name, other in others.items():
        if other.n_users != ours.n_users:
            raise ValueError(f"{name!r} was evaluated on {other.n_users} users, {model!r} on {ours.n_users}")
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {name: {} for name in others}
    alpha = (1 - level) / 2
    for protocol in ours.ranks:
        names = [n for n, r in others.items() if protocol in r.ranks]
        if not names:
            continue
        columns = [ours.per_user(protocol)] + [others[n].per_user(protocol) for n in names]
        values = np.stack([c[m] for c in columns for m in metrics], axis=1)  # [N, (1 + B) * M]
        means = bootstrap_means(values, n_bootstrap, seed)
        point = values.mean(axis=0)
        k = len(metrics)
        for j, name in enumerate(names, start=1):
            out[name][protocol] = {}
            for i, metric in enumerate(metrics):
                m, b = float(point[i]), float(point[j * k + i])
                lift = lift_samples(means[:, i], means[:, j * k + i])
                ci = np.nanquantile(lift, [alpha, 1 - alpha]).tolist() if np.isfinite(lift).any() else [None, None]
                out[name][protocol][metric] = {
                    "model": m, "baseline": b, "relative": m / b - 1.0 if b > 0 else None, "ci": ci,
                }
    return out


def build_metrics_document(
    results: Mapping[str, EvaluationResult],
    *,
    run_id: str,
    dataset: Mapping[str, Any],
    config: Mapping[str, Any],
    training_log: Sequence[Mapping[str, Any]] | None = None,
    model: str = MODEL_NAME,
    n_bootstrap: int = 1000,
    seed: int = 0,
    champion: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json (see module docstring); `champion` describes the champion
    (status "scored" | "refused" | "other_target" | "none", version, reason), whose figures are in `results`."""
    if not results:
        raise ValueError("no evaluation results to report")
    doc: dict[str, Any] = {
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dict(dataset),
        "config": dict(config),
        "models": {name: r.metrics for name, r in results.items()},
        "ci": {name: r.to_dict()["ci"] for name, r in results.items()},
        "slices": {name: r.slices for name, r in results.items()},
        "n_users": {name: r.n_users for name, r in results.items()},
        "lift": relative_lift(results, model, n_bootstrap=n_bootstrap, seed=seed) if model in results else {},
        "training": list(training_log or []),
    }
    if champion is not None:
        doc["champion"] = dict(champion)
    return _clean(doc)


# --------------------------------------------------------------------------- gate


def gate_decision(
    metrics: Mapping[str, Any],
    tolerance: float = 0.0,
    model: str = MODEL_NAME,
    protocol: str = "full",
    metric: str = "NDCG@10",
    baselines: Sequence[str] | None = None,
    champion: str = CHAMPION_NAME,
) -> dict[str, Any]:
    """The promotion rule, on one metrics.json document: `model` (the challenger) is promoted only
    if its `protocol` `metric` beats every baseline and is >= the champion's x (1 - tolerance),
    the champion having been scored in the same document (same eval set, negatives, bootstrap).

    The tolerance (relative, e.g. 0.02 = 2%) lets a fresh retrain that ties the champion replace
    it, so the served model keeps up with the data instead of an old one holding on by noise.
    Where no champion is promoted, or it could not be loaded or scored (`metrics["champion"]`
    says why), the gate compares against the baselines only and says so. ``baselines=()``: the
    champion alone is the bar (a bundle grown from the champion only has to improve on it).

    Returns {"passed", "reasons" (one per check, passed or not), "protocol", "metric", "tolerance",
    "challenger", "champion" (its figure or None), "champion_version", "champion_status",
    "threshold" (champion x (1 - tolerance)), "margin" (challenger / champion - 1; the champion
    check passes when margin >= -tolerance)}.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    models = metrics.get("models", {})
    info = metrics.get("champion") or {}
    version = info.get("version")

    def value(name: str) -> float | None:
        v = models.get(name, {}).get(protocol, {}).get(metric)
        return None if v is None else float(v)

    ours = value(model)
    out: dict[str, Any] = {
        "passed": False, "reasons": [], "protocol": protocol, "metric": metric, "tolerance": tolerance,
        "challenger": ours, "champion": None, "champion_version": version,
        "champion_status": info.get("status", "scored" if champion in models else "none"),
        "threshold": None, "margin": None,
    }
    reasons: list[str] = out["reasons"]
    if ours is None:
        reasons.append(f"no {protocol} {metric} for {model!r} in the report")
        return out
    names = list(baselines) if baselines is not None else [n for n in models if n not in (model, champion)]
    if not names and baselines is None:
        reasons.append("no baselines in the report: nothing to beat")
        return out
    passed = True
    for name in names:
        theirs = value(name)
        if theirs is None:
            passed = False
            reasons.append(f"baseline {name!r} has no {protocol} {metric}")
        elif ours > theirs:
            reasons.append(f"beats {name}: {protocol} {metric} {ours:.4f} > {theirs:.4f}")
        else:
            passed = False
            reasons.append(f"does not beat {name}: {protocol} {metric} {ours:.4f} <= {theirs:.4f}")
    champ = value(champion)
    label = f"champion {version}" if version else "the champion"
    if champ is not None:
        threshold = champ * (1.0 - tolerance)
        out.update(champion=champ, champion_status="scored", threshold=threshold,
                   margin=ours / champ - 1.0 if champ > 0 else None)
        if ours >= threshold:
            reasons.append(f"holds up against {label} on the same data: {protocol} {metric} {ours:.4f} >= "
                           f"{champ:.4f} x (1 - {tolerance}) = {threshold:.4f}")
        else:
            passed = False
            reasons.append(f"below {label} on the same data: {protocol} {metric} {ours:.4f} < "
                           f"{champ:.4f} x (1 - {tolerance}) = {threshold:.4f}; the champion keeps serving")
    elif out["champion_status"] == "refused":
        reasons.append(f"{label} could not be scored ({info.get('reason')}): compared with the baselines only")
    elif out["champion_status"] == "other_target":
        reasons.append(f"{label} is not comparable ({info.get('reason')}): compared with the baselines only")
    elif out["champion_status"] == "scored":
        passed = False
        reasons.append(f"{label} was scored but the report has no {protocol} {metric} for {champion!r}")
    else:
        reasons.append("no champion promoted yet: compared with the baselines only")
    out["passed"] = passed
    return out


def gate_passes(metrics: Mapping[str, Any], tolerance: float = 0.0, **kwargs: Any) -> tuple[bool, list[str]]:
    """(passed, reasons) of `gate_decision` (same arguments)."""
    decision = gate_decision(metrics, tolerance, **kwargs)
    return bool(decision["passed"]), list(decision["reasons"])


# --------------------------------------------------------------------------- plots


def plot_training_curve(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Train loss and validation metrics per epoch; None when there is nothing to plot."""
    rows = [r for r in records if "epoch" in r]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if any("train_loss" in r for r in rows):
        ax.plot(epochs, [r.get("train_loss", np.nan) for r in rows], color="tab:gray", label="train loss")
        ax.set_ylabel("train loss")
    valid_keys = [k for k in ("valid_NDCG@10", "valid_HR@10", "valid_MRR") if any(k in r for r in rows)]
    handles, labels = ax.get_legend_handles_labels()
    if valid_keys:
        ax2 = ax.twinx()
        for key in valid_keys:
            ax2.plot(epochs, [r.get(key, np.nan) for r in rows], marker=".", label=key.replace("valid_", "valid "))
        ax2.set_ylabel("validation metric")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_xlabel("epoch")
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    ax.set_title("Training curve")
    return _save(fig, path)


def plot_model_metrics(doc: Mapping[str, Any], path: Path, metrics: Sequence[str] = HEADLINE_METRICS) -> Path:
    """Grouped bars: metric x model, one panel per protocol, 95% CI error bars."""
    models = list(doc["models"])
    protocols = sorted({p for m in models for p in doc["models"][m]}, key=lambda p: (p != "full", p))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 3.8), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, protocol in zip(axes[0], protocols):
        x = np.arange(len(metrics))
        for i, name in enumerate(models):
            vals = [doc["models"][name].get(protocol, {}).get(m) for m in metrics]
            cis = [doc["ci"].get(name, {}).get(protocol, {}).get(m) for m in metrics]
            heights = [v if v is not None else 0.0 for v in vals]
            err = np.array(
                [[max(h - c[0], 0.0), max(c[1] - h, 0.0)] if c and None not in c else [0.0, 0.0] for h, c in zip(heights, cis)]
            ).T
            ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, yerr=err, capsize=2, label=name)
        ax.set_xticks(x, list(metrics))
        ax.set_title(f"{protocol} ranking")
    _legend_below(fig, axes[0][0], len(models))
    return _save(fig, path)


def plot_slices(doc: Mapping[str, Any], path: Path, protocol: str = "full", metric: str = "NDCG@10") -> Path | None:
    """`metric` per slice (history length, target popularity, category) for every model."""
    models = list(doc["slices"])
    kinds = sorted({k for m in models for k in doc["slices"][m].get(protocol, {})})
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, kind in zip(axes[0], kinds):
        names: list[str] = []
        for m in models:
            for s in doc["slices"][m].get(protocol, {}).get(kind, {}):
                if s not in names:
                    names.append(s)
        x = np.arange(len(names))
        for i, m in enumerate(models):
            sl = doc["slices"][m].get(protocol, {}).get(kind, {})
            ax.bar(x + (i - (len(models) - 1) / 2) * width, [sl.get(s, {}).get(metric) or 0.0 for s in names], width, label=m)
        n_users = doc["slices"][models[0]].get(protocol, {}).get(kind, {})
        many = len(names) > 4
        ax.set_xticks(x, [f"{s}\n(n={n_users.get(s, {}).get('n_users', 0)})" for s in names], fontsize=7 if many else 8,
                      rotation=35 if many else 0, ha="right" if many else "center")
        ax.set_title(f"{metric} by {kind.replace('_', ' ')} ({protocol})")
    _legend_below(fig, axes[0][0], len(models))
    return _save(fig, path)


def _legend_below(fig: Any, ax: Any, n: int) -> None:
    """One legend for the figure, under the panels, so it never covers a bar."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(n, 6), fontsize=8, frameon=False)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0.1 if fig.legends else 0, 1, 1))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- html


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def headline_rows(doc: Mapping[str, Any], metrics: Sequence[str] = HEADLINE_METRICS) -> list[list[Any]]:
    """[model, protocol, metric values..., (CI as text)] for every model and protocol."""
    rows = []
    for name, per_protocol in doc["models"].items():
        for protocol, values in per_protocol.items():
            cis = doc["ci"].get(name, {}).get(protocol, {})
            row: list[Any] = [name, protocol]
            for m in metrics:
                ci = cis.get(m)
                v = values.get(m)
                row.append(f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if v is not None and ci and None not in ci else v)
            rows.append(row)
    return rows


def headline_markdown(doc: Mapping[str, Any], metrics: Sequence[str] = HEADLINE_METRICS) -> str:
    """The headline table as markdown (Dagster metadata)."""
    lines = ["| model | protocol | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in headline_rows(doc, metrics):
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    return "\n".join(lines)


MODEL_LABELS: dict[str, str] = {
    MODEL_NAME: "BERT4Rec", CHAMPION_NAME: "the served model (champion)", "popularity": "popularity",
    "item_knn": "item-kNN collaborative filtering", "last_item": "the last-item transition baseline",
}
METRIC_DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("HR@K (hit rate)", "the share of users whose held-out item is among the model's top K."),
    ("NDCG@K", "like HR@K, but a hit at rank r counts 1 / log2(r + 1): a hit at rank 1 counts 1, at rank 10 "
               "about 0.29. The headline metric, and the one the gate compares."),
    ("MRR", "the mean of 1 / rank of the held-out item over all users (ranked against every item)."),
    ("full / sampled_pop<n>", "full ranks the held-out item against every item of the catalogue; sampled_pop<n> "
                              "only against n items drawn by popularity, which is easier and ranks models differently."),
    ("95% interval", "from resampling the users 1,000 times (bootstrap): the range the figure would move in "
                     "with another sample of users of the same kind."),
    ("lift", "the relative difference of BERT4Rec's figure from another model's (+25% = a quarter higher)."),
)


def summary_sentences(doc: Mapping[str, Any], metric: str = "NDCG@10") -> list[str]:
    """The report's opening in plain language: what was compared, who won by how much, the gate."""
    models = doc.get("models", {})
    full = {name: per_p.get("full", {}) for name, per_p in models.items() if per_p.get("full")}
    ds, cfg = doc.get("dataset", {}), doc.get("config", {})
    others = [n for n in full if n != MODEL_NAME]
    n_users = ds.get("n_users_evaluated") or doc.get("n_users", {}).get(MODEL_NAME)
    held_out = {"test": "last", "valid": "second-to-last"}.get(str(cfg.get("split")), "held-out")
    target = PredictionTarget.from_dict(cfg.get("target"))
    what = "item" if target.every_event else f"{' or '.join(target.event_types)} event"
    users = f"{n_users:,} users" if isinstance(n_users, int) else "the users"
    out = [
        f"BERT4Rec was compared with {', '.join(MODEL_LABELS.get(n, n) for n in others)} on the {held_out} {what} of "
        f"{users} of {ds.get('name', 'the data')}, each item ranked against the whole catalogue"
        + ("." if target.every_event else f" (target {target.name}: every event is an input, only "
           f"{' and '.join(target.event_types)} events are predicted).")
    ]
    ours = full.get(MODEL_NAME, {}).get(metric)
    rivals = [(n, full[n].get(metric)) for n in others if full[n].get(metric) is not None]
    if ours is not None and rivals:
        best, value = max(rivals, key=lambda r: r[1])
        lift = doc.get("lift", {}).get(best, {}).get("full", {}).get(metric, {})
        ci = lift.get("ci") or [None, None]
        rel = lift.get("relative")
        interval = f" (95% interval {ci[0]:+.1%} to {ci[1]:+.1%})" if None not in ci else ""
        if rel is not None:
            verdict = "ahead of" if rel > 0 else "behind"
            out.append(f"On {metric}, BERT4Rec scores {ours:.4f} against {value:.4f} for the best other model, "
                       f"{MODEL_LABELS.get(best, best)}: {rel:+.1%}{interval}, so BERT4Rec is {verdict} it.")
        hr = [(n, full[n].get("HR@10")) for n in others if full[n].get("HR@10") is not None]
        if full.get(MODEL_NAME, {}).get("HR@10") is not None and hr:
            hbest, hval = max(hr, key=lambda r: r[1])
            out.append(f"On HR@10: {full[MODEL_NAME]['HR@10']:.4f} against {hval:.4f} ({MODEL_LABELS.get(hbest, hbest)}).")
    gate = doc.get("gate")
    if gate:
        if gate.get("passed"):
            out.append("The evaluation gate passed: this model may be promoted and served.")
        else:
            failing = [r for r in gate.get("reasons", []) if r.startswith(("does not", "below", "no ", "baseline "))
                       and not r.startswith("no champion promoted yet")]
            out.append("The evaluation gate failed, so this model is not promoted: "
                       + ("; ".join(failing) if failing else "; ".join(gate.get("reasons", []))) + ".")
    return out


def _slice_table(doc: Mapping[str, Any], protocol: str = "full", metric: str = "NDCG@10") -> str:
    """Every slice of every kind in one table, one column per model: metric [95% interval]."""
    models = [m for m in doc.get("slices", {}) if doc["slices"][m].get(protocol)]
    if not models:
        return ""
    first = doc["slices"][models[0]][protocol]
    rows = []
    for kind, per_slice in first.items():
        for name, values in per_slice.items():
            row: list[Any] = [kind.replace("_", " "), name, values.get("n_users")]
            for m in models:
                v = doc["slices"][m][protocol].get(kind, {}).get(name, {})
                ci = (v.get("ci") or {}).get(metric)
                row.append(f"{v[metric]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if v.get(metric) is not None and ci
                           else v.get(metric))
            rows.append(row)
    return _table(["slice", "value", "users", *[f"{m} {metric}" for m in models]], rows)


def render_html(doc: Mapping[str, Any], images: Mapping[str, Path]) -> str:
    """A single self-contained page: tables plus the plots as inline base64 PNG."""
    cfg, ds = doc.get("config", {}), doc.get("dataset", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation {html.escape(str(doc.get('run_id')))}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}.pass{color:#070}.fail{color:#a00}</style></head><body>",
        f"<h1>Evaluation report <small>{html.escape(str(doc.get('run_id')))}</small></h1>",
        "<h2>Summary</h2><p class='summary'>" + " ".join(html.escape(x) for x in summary_sentences(doc)) + "</p>",
        f"<p>Created {html.escape(str(doc.get('created_at')))}. Dataset: <b>{html.escape(str(ds.get('name', '?')))}</b>. "
        f"Split: <b>{html.escape(str(cfg.get('split', '?')))}</b>. Fit data: <b>{html.escape(str(cfg.get('fit', '?')))}</b> "
        f"({html.escape(str(cfg.get('fit_description', '')))}); models and baselines learn from the same data. "
        f"Target: <b>{html.escape(PredictionTarget.from_dict(cfg.get('target')).label())}</b>.</p>",
        "<p>Leave-one-out; <i>full</i> ranks the target against every item, <i>sampled_pop&lt;n&gt;</i> against n "
        "popularity-sampled negatives (never the user's own items, the same for every model). "
        + ("Items already in the history are removed (the target stays rankable)"
           if cfg.get("history_removed", True) else
           "Items already in the history stay rankable (a shopper often buys what they viewed)")
        + "; ties count against the model. Brackets: 95% bootstrap interval over users.</p>",
    ]
    gate = doc.get("gate")
    if gate:
        cls = "pass" if gate.get("passed") else "fail"
        parts.append(f"<h2>Gate: <span class='{cls}'>{'passed' if gate.get('passed') else 'failed'}</span></h2><ul>")
        parts += [f"<li>{html.escape(r)}</li>" for r in gate.get("reasons", [])]
        parts.append("</ul>")
    sizing = cfg.get("sizing")
    if sizing:
        parts.append("<h2>How the model was sized</h2><p>The network and the number of epochs were chosen from "
                     f"the data and a training budget of {float(sizing.get('budget_seconds', 0)) / 60:g} minutes "
                     f"(network: <b>{html.escape(str(sizing.get('network')))}</b>):</p><ul>")
        parts += [f"<li>{html.escape(str(r))}</li>" for r in sizing.get("reasons", [])]
        best = cfg.get("best_epoch")
        parts.append(f"<li>Validation chose {html.escape(str(best))} epoch(s); the evaluated model was then trained "
                     "again from scratch for that many epochs on all but each user's last item.</li></ul>")
    champion = doc.get("champion")
    if champion:
        parts.append("<h2>Champion</h2>")
        status = champion.get("status")
        if status == "scored":
            parts.append(
                f"<p>The served bundle <b>{html.escape(str(champion.get('version')))}</b> is scored as "
                f"<i>{CHAMPION_NAME}</i> on this eval set, with the same negatives and bootstrap as every model "
                f"({html.escape(str(champion.get('scores', '')))}). Targets it does not know: "
                f"{_fmt(champion.get('unknown_target_share'))}; users with no history item it knows: "
                f"{_fmt(champion.get('cold_start_share'))} (both rank as misses).</p>"
            )
        elif status == "other_target":
            parts.append(
                f"<p>The served bundle {html.escape(str(champion.get('version')))} is not scored: "
                f"{html.escape(str(champion.get('reason')))}. The gate compares with the baselines only.</p>"
            )
        elif status == "refused":
            parts.append(
                f"<p class='fail'>The served bundle {html.escape(str(champion.get('version')))} could not be scored: "
                f"{html.escape(str(champion.get('reason')))}. The gate compares with the baselines only.</p>"
            )
        else:
            parts.append("<p>No bundle is promoted yet: the gate compares with the baselines only.</p>")
    parts.append("<h2>Headline metrics</h2>")
    parts.append(_table(["model", "protocol", *HEADLINE_METRICS], headline_rows(doc)))
    if doc.get("lift"):
        parts.append(f"<h2>Relative lift of {MODEL_NAME} over each other model</h2>")
        rows = [
            [base, protocol, metric, v["model"], v["baseline"],
             f"{v['relative']:+.1%}" if v["relative"] is not None else None,
             f"[{v['ci'][0]:+.1%}, {v['ci'][1]:+.1%}]" if v["ci"] and None not in v["ci"] else None]
            for base, per_p in doc["lift"].items()
            for protocol, per_m in per_p.items()
            for metric, v in per_m.items()
        ]
        parts.append(_table(["compared with", "protocol", "metric", MODEL_NAME, "other", "lift", "95% CI"], rows))
    for key, title in (("metrics", "Metrics per model"), ("slices", "NDCG@10 by slice (full ranking)"),
                       ("training", "Training curve")):
        if key in images:
            data = base64.b64encode(Path(images[key]).read_bytes()).decode()
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{data}'>")
    table = _slice_table(doc)
    if table:
        parts.append("<h2>NDCG@10 by slice (full ranking, 95% intervals)</h2><p>History length: items before the "
                     "held-out one. Popularity: head = the most interacted-with items making the first 50% of "
                     "interactions, torso = up to 80%, tail = the rest. Device and segment: the request's.</p>")
        parts.append(table)
    parts.append("<h2>What the figures mean</h2><dl>")
    parts += [f"<dt><b>{html.escape(t)}</b></dt><dd>{html.escape(d)}</dd>" for t, d in METRIC_DEFINITIONS]
    parts.append("</dl>")
    parts.append("<details><summary>Configuration (raw)</summary><pre>"
                 + html.escape(json.dumps({"dataset": ds, "config": cfg}, indent=2)) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ReportPaths:
    run_dir: Path
    metrics_json: Path
    report_html: Path
    latest_dir: Path
    plots: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "metrics_json": str(self.metrics_json),
            "report_html": str(self.report_html),
            "latest_dir": str(self.latest_dir),
            "plots": {k: str(v) for k, v in self.plots.items()},
        }


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def write_report(
    results: Mapping[str, EvaluationResult],
    *,
    dataset: Mapping[str, Any],
    config: Mapping[str, Any],
    training_log: Sequence[Mapping[str, Any]] | None = None,
    run_id: str | None = None,
    root: Path | None = None,
    gate: Callable[[Mapping[str, Any]], tuple[bool, list[str]] | Mapping[str, Any]] | None = None,
    user_ids: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    champion: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], ReportPaths]:
    """Write the report of one evaluation run and make it `latest`; returns (metrics doc, paths).

    `gate`, if given, is called with the metrics document (e.g. a partial of `gate_decision`, or
    anything returning (passed, reasons)) and its verdict is stored under "gate" and shown at the
    top of the page. `champion`: see `build_metrics_document`."""
    run_id = run_id or default_run_id()
    if not _RUN_ID.match(run_id) or run_id == "latest":
        raise ValueError(f"run_id {run_id!r} must be a plain name ([A-Za-z0-9._-], not 'latest')")
    root = Path(root) if root is not None else reports_dir() / "evaluation"
    run_dir = root / run_id
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: a report is written once, use a new run id")
    staging = root / f".{run_id}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        doc = build_metrics_document(
            results, run_id=run_id, dataset=dataset, config=config, training_log=training_log,
            n_bootstrap=n_bootstrap, seed=seed, champion=champion,
        )
        if gate is not None:
            verdict = gate(doc)
            if isinstance(verdict, Mapping):
                doc["gate"] = _clean({**verdict, "passed": bool(verdict["passed"]), "reasons": list(verdict["reasons"])})
            else:
                passed, reasons = verdict
                doc["gate"] = {"passed": bool(passed), "reasons": list(reasons)}
        images: dict[str, Path] = {"metrics": plot_model_metrics(doc, staging / "metrics.png")}
        slices = plot_slices(doc, staging / "slices.png")
        if slices is not None:
            images["slices"] = slices
        curve = plot_training_curve(doc["training"], staging / "training_curve.png")
        if curve is not None:
            images["training"] = curve
        (staging / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False))
        (staging / "report.html").write_text(render_html(doc, images))
        ranks = {f"{m}/{p}": r.ranks[p] for m, r in results.items() for p in r.ranks}
        if user_ids is not None:
            ranks["user_ids"] = np.asarray(user_ids).astype(str)
        np.savez_compressed(staging / "ranks.npz", **ranks)  # type: ignore[arg-type]  # stubs type 1st kwarg
        staging.rename(run_dir)  # the run directory appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    latest = publish_latest(run_dir, root)
    paths = ReportPaths(
        run_dir=run_dir,
        metrics_json=run_dir / "metrics.json",
        report_html=run_dir / "report.html",
        latest_dir=latest,
        plots={k: run_dir / v.name for k, v in images.items()},
    )
    return doc, paths


def publish_latest(run_dir: Path, root: Path) -> Path:
    """Make `root/latest` a copy of `run_dir`, switched atomically.

    The copy lives in a private `.latest-<id>` directory and `latest` is a symlink to it replaced
    with os.replace (atomic on POSIX): readers see the old report or the new one, never a mix.
    The previous private copy is removed afterwards.
    """
    latest = root / "latest"
    copy = root / f".latest-{run_dir.name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(run_dir, copy)
    previous = latest.resolve() if latest.is_symlink() else None
    if latest.exists() and not latest.is_symlink():
        # A plain directory from elsewhere: move it aside first (the only non-atomic case).
        shutil.rmtree(latest)
    link = root / f".latest-link-{uuid.uuid4().hex[:6]}"
    link.symlink_to(copy.name, target_is_directory=True)  # relative: the tree stays movable
    os.replace(link, latest)
    if previous is not None and previous != copy.resolve() and previous.parent == root.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return latest
