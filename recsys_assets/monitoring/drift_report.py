"""Writing a drift report: `reports/drift/<run id>/` (report.html, summary.json, one Evidently HTML
per unit, the popularity-decile plot), the `latest` copy, and the retention of old reports.

The figures come from recsys_assets.monitoring.drift (compute_drift); this module only renders
and stores them, as recsys_assets.evaluation.report does for the evaluation.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_assets.monitoring.drift import DECILES, DriftResult, DriftSummary

SUMMARY_FILE, REPORT_FILE, PLOT_FILE = "summary.json", "report.html", "popularity_deciles.png"


@dataclass(frozen=True)
class DriftReportPaths:
    run_dir: Path
    report_html: Path
    summary_json: Path
    evidently_html: dict[str, Path]
    latest_dir: Path


def popularity_figure(summary: DriftSummary) -> Any:
    """Bars of the share of traffic per reference popularity decile, reference against current."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    buckets = list(DECILES)
    x = np.arange(len(buckets))
    shares = summary.popularity_deciles
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for offset, side, color in ((-0.2, "reference", "#4d4d4d"), (0.2, "current", "#d62728")):
        ax.bar(x + offset, [shares.get(b, {}).get(side, 0.0) for b in buckets], width=0.4, label=side, color=color)
    ax.set_xticks(x, buckets)
    ax.set(xlabel="popularity decile of the item in the reference (01 = most popular tenth)", ylabel="share of events",
           title="Traffic per popularity decile")
    ax.legend()
    fig.tight_layout()
    return fig


def prune_reports(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` report directories under `root` (a daily report is about
    15 MB); `latest` and the staging directories are left alone. Returns what was deleted."""
    runs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
            and p.name != "latest" and (p / SUMMARY_FILE).exists()]
    runs.sort(key=lambda p: (p / SUMMARY_FILE).stat().st_mtime, reverse=True)
    doomed = runs[keep:]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_drift_report(result: DriftResult, root: Path, run_id: str, keep: int | None = None) -> DriftReportPaths:
    """Write `root/<run_id>/` (report.html, summary.json, one Evidently HTML per unit, the plot) and
    make `root/latest` a copy of it. The run directory appears complete or not at all. With `keep`,
    only the newest `keep` run directories stay (this one included)."""
    from recsys_assets.evaluation.report import publish_latest

    if not run_id or run_id == "latest" or Path(run_id).name != run_id or run_id.startswith("."):
        raise ValueError(f"run_id {run_id!r} must be a plain directory name other than 'latest'")
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / run_id
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: a report is written once, use a new run id")
    staging = root / f".{run_id}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        evidently = {}
        for unit, snapshot in result.snapshots.items():
            evidently[unit] = staging / f"evidently_{unit}.html"
            snapshot.save_html(str(evidently[unit]))
        plot = None
        if result.summary.popularity_deciles:
            import matplotlib.pyplot as plt

            fig = popularity_figure(result.summary)
            plot = staging / PLOT_FILE
            fig.savefig(plot, format="png", dpi=100)
            plt.close(fig)
        (staging / SUMMARY_FILE).write_text(result.summary.model_dump_json(indent=2))
        (staging / REPORT_FILE).write_text(render_html(result.summary, run_id, plot, {u: p.name for u, p in evidently.items()}))
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    latest = publish_latest(run_dir, root)
    if keep is not None:
        prune_reports(root, keep)
    return DriftReportPaths(
        run_dir=run_dir, report_html=run_dir / REPORT_FILE, summary_json=run_dir / SUMMARY_FILE,
        evidently_html={u: run_dir / p.name for u, p in evidently.items()}, latest_dir=latest,
    )


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"  # counts
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{row_class[i] if row_class else ''}'>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_UNIT_TITLES = {
    "events": "per event", "users": "per user", "recommendations": "per recommended item", "answers": "per answer",
}


def render_html(summary: DriftSummary, run_id: str, plot: Path | None, evidently: dict[str, str]) -> str:
    """Our page on top (verdict, windows, signals, performance), Evidently's reports below it: those
    alone lack the verdict, the windows and the performance figures."""
    verdict = summary.verdict
    css = "stable" if verdict == "stable" else "none" if verdict == "no_reference" else "alert"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Drift report {html.escape(run_id)}: {html.escape(verdict)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child{text-align:left}td:last-child{text-align:left;overflow-wrap:anywhere;max-width:24em}"
        "tr.drifted td{background:#fde8e8}"
        ".verdict{font-size:1.6em;padding:.2em .6em;border-radius:.3em}.stable{background:#e3f5e1}"
        ".alert{background:#fde8e8}.none{background:#eee}iframe{width:100%;height:1100px;border:1px solid #ccc}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>Drift report <small>{html.escape(run_id)}</small></h1>",
        f"<p>Verdict: <span id='verdict' class='verdict {css}'>{html.escape(verdict)}</span></p><ul>",
        *(f"<li>{html.escape(r)}</li>" for r in summary.reasons if r),
        "</ul>",
        f"<p>Created {html.escape(summary.created_at)} in {summary.seconds:.1f} s. Served bundle: "
        f"<b>{html.escape(str(summary.bundle.get('version', 'none')))}</b>. Reference = the events of its training "
        "window; current = the events after it.</p>",
    ]
    if summary.timings:
        parts.append("<p>Seconds per phase: " + html.escape(", ".join(f"{k} {v:.1f}" for k, v in summary.timings.items())) + ".</p>")
    if summary.windows:
        parts.append("<h2>Windows</h2>")
        parts.append(_table(
            ["window", "from", "to", "events", "users"],
            [[name, w.start, w.end, w.events, w.users] for name, w in summary.windows.items()],
        ))
    if summary.signals:
        parts.append(
            f"<h2>Signals</h2><p>{summary.drifted_signals} of {summary.evaluated_signals} judged signals drifted"
            + (f" ({summary.share_drifted:.0%})" if summary.share_drifted is not None else "")
            + f"; key signals: {html.escape(', '.join(summary.config.get('key_signals', [])))}. Statistics by "
            "Evidently on seeded samples (rows per side below).</p>"
        )
        names = list(summary.signals)
        parts.append(_table(
            ["signal", "unit", "kind", "method", "statistic", "threshold", "drifted", "reference rows", "current rows", "note"],
            [[n, s.unit, s.kind, s.method, s.statistic, s.threshold, s.drifted if s.evaluated else None,
              s.reference_rows, s.current_rows, s.note] for n, s in summary.signals.items()],
            ["drifted" if summary.signals[n].drifted else "" for n in names],
        ))
    perf = summary.performance
    if perf is not None:
        parts.append(f"<h2>Performance of the served bundle</h2><p>{html.escape(perf.note)}</p>")
        if perf.reference or perf.current:
            keys = [k for k in ("HR@10", "NDCG@10", "MRR", "n", "unknown_target_share") if k in perf.reference or k in perf.current]
            parts.append(_table(["window", *keys], [
                [side, *[figures.get(k) for k in keys]] for side, figures in (("reference", perf.reference), ("current", perf.current))
            ]))
    if summary.popularity_deciles:
        parts.append("<h2>Traffic per popularity decile</h2><p>Exact shares of all events of each window; "
                     "'unseen' = items without events in the reference.</p>")
        if plot is not None:
            data = base64.b64encode(plot.read_bytes()).decode()
            parts.append(f"<img alt='popularity deciles' src='data:image/png;base64,{data}'>")
        parts.append(_table(
            ["decile", "reference", "current"],
            [[b, v.get("reference"), v.get("current")] for b, v in summary.popularity_deciles.items()],
        ))
        oov = summary.out_of_vocabulary_share
        parts.append(f"<p>Events on items outside the served vocabulary: reference {oov.get('reference', 0):.2%}, "
                     f"current {oov.get('current', 0):.2%}.</p>")
    a = summary.answers
    parts.append("<h2>Answer log</h2>")
    parts.append(f"<p>{html.escape(a.note or 'Answers in both windows.')}</p>")
    parts.append(_table(
        ["files", "lines", "unreadable lines", "reference answers", "current answers", "fallback share ref / cur"],
        [[a.files, a.lines, a.unreadable_lines, a.reference, a.current,
          " / ".join("–" if a.fallback_share.get(s) is None else f"{a.fallback_share[s]:.1%}" for s in ("reference", "current"))]],
    ))
    versions = [[side, v, n] for side, per in a.model_versions.items() for v, n in per.items()]
    if versions:
        parts.append(_table(["window", "model version", "answers"], versions))
    if summary.sample_sizes:
        parts.append("<h2>Sample sizes</h2>")
        parts.append(_table(["unit", "reference", "current"],
                            [[u, s.get("reference"), s.get("current")] for u, s in summary.sample_sizes.items()]))
    for unit, name in evidently.items():
        title = _UNIT_TITLES.get(unit, unit)
        parts.append(f"<h2>Evidently: {html.escape(title)}</h2><p><a href='{html.escape(name)}'>{html.escape(name)}</a></p>"
                     f"<iframe src='{html.escape(name)}' title='{html.escape(title)}'></iframe>")
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(summary.config, indent=2)) + "</pre></body></html>")
    return "\n".join(parts)
