"""Monitoring: the drift report of the live traffic against the served model's training window.

A thin wrapper over recsys_assets.monitoring.drift (figures) and drift_report (files). It reads the cleaned events and, at run time,
the bundle that `$RECSYS_HOME/bundles/current` points to; it trains nothing, so drift_job makes it
and retrain_job leaves it out (recsys_assets/automation.py). No `from __future__ import
annotations` here: Dagster 1.13 reads the `config` annotation off the signature.
"""

from typing import Any

from dagster import AssetExecutionContext, Config, MetadataValue, asset
from pydantic import Field

from recsys_assets.assets.metadata import DRIFT_VERDICT_METADATA, figure_markdown
from recsys_assets.config import bundles_dir, recsys_home
from recsys_assets.io_manager import TableRef
from recsys_assets.monitoring.drift import DriftConfig, compute_drift
from recsys_assets.monitoring.drift_report import popularity_figure, write_drift_report
from recsys_assets.monitoring.pushgateway import push_drift
from recsys_assets.resources import WarehouseResource
from recsys_serving.contract import CURRENT_BUNDLE, DRIFT_REPORTS_DIR, SERVED_ANSWERS_DIR



class DriftReportConfig(Config, DriftConfig):
    """The library's DriftConfig (thresholds, sample sizes, windows: defined once, there) as Dagster
    run config, plus where the reports go."""

    keep_reports: int = Field(30, ge=1, description="report directories kept under reports/drift (newest first)")


def _signals_markdown(signals: dict[str, Any]) -> str:
    lines = ["| signal | unit | statistic | threshold | drifted | note |", "|---|---|---|---|---|---|"]
    for name, s in signals.items():
        stat = "–" if s.statistic is None else f"{s.statistic:.4f}"
        threshold = "–" if s.threshold is None else f"{s.threshold:g}"
        drifted = ("**yes**" if s.drifted else "no") if s.evaluated else "not judged"
        lines.append(f"| {name} | {s.unit} | {stat} | {threshold} | {drifted} | {s.note.replace('|', '/')} |")
    return "\n".join(lines)


@asset(
    group_name="monitoring",
    io_manager_key="artifact_io_manager",
    description="Drift of the events after the served model's training window against that window (Evidently): "
    "item popularity, vocabulary, sequence length, event/category/device/segment mix, time of day, what the "
    "service recommended, and the bundle's HR/NDCG; a verdict for the drift sensor. "
    "HTML + JSON under $RECSYS_HOME/reports/drift/<run id>/ (and latest/).",
)
def drift_report(
    context: AssetExecutionContext,
    config: DriftReportConfig,
    warehouse: WarehouseResource,
    cleaned_interactions: TableRef,
) -> dict[str, Any]:
    home = recsys_home()
    bundle_dir = bundles_dir() / CURRENT_BUNDLE  # read at run time: the bundle served now
    with warehouse.connect() as con:
        result = compute_drift(
            con, cleaned_interactions.table, bundle_dir, home / SERVED_ANSWERS_DIR,
            DriftConfig.model_validate(config.model_dump(exclude={"keep_reports"})), log=context.log.info,
        )
    summary = result.summary
    paths = write_drift_report(result, home / DRIFT_REPORTS_DIR, context.run.run_id, keep=config.keep_reports)
    context.log.info(f"verdict {summary.verdict}: {'; '.join(summary.reasons)} -> {paths.report_html}")
    pushed = push_drift(summary.model_dump(mode="json"))  # no-op unless RECSYS_PUSHGATEWAY_URL is set
    windows = {k: v.model_dump() for k, v in summary.windows.items()}
    metadata: dict[str, Any] = {
        DRIFT_VERDICT_METADATA: MetadataValue.text(summary.verdict),
        "report": MetadataValue.url(paths.report_html.resolve().as_uri()),
        "report_path": MetadataValue.path(str(paths.report_html)),
        "summary_path": MetadataValue.path(str(paths.summary_json)),
        "reasons": MetadataValue.md("\n".join(f"- {r}" for r in summary.reasons)),
        "bundle_version": str(summary.bundle.get("version", "none")),
        "windows": MetadataValue.json(windows),
        "current_events": MetadataValue.int(summary.windows["current"].events if "current" in summary.windows else 0),
        "drifted_signals": MetadataValue.int(summary.drifted_signals),
        "evaluated_signals": MetadataValue.int(summary.evaluated_signals),
        "pushed_to_pushgateway": pushed,
        "seconds": summary.seconds,
    }
    # Numeric only when there is a number: the UI charts these across materializations.
    if summary.share_drifted is not None:
        metadata["share_drifted"] = MetadataValue.float(summary.share_drifted)
    if "current" in summary.out_of_vocabulary_share:
        metadata["out_of_vocabulary_share"] = MetadataValue.float(summary.out_of_vocabulary_share["current"])
    if summary.performance is not None and summary.performance.drop is not None:
        metadata["performance_drop"] = MetadataValue.float(summary.performance.drop)
    if summary.signals:
        metadata["signals"] = MetadataValue.md(_signals_markdown(summary.signals))
    if summary.popularity_deciles:
        metadata["popularity_deciles"] = figure_markdown(popularity_figure(summary), "traffic per popularity decile")
    context.add_output_metadata(metadata)
    return {
        "verdict": summary.verdict,
        "run_id": context.run.run_id,
        "report_html": str(paths.report_html),
        "summary_json": str(paths.summary_json),
        "latest_dir": str(paths.latest_dir),
        "bundle_version": summary.bundle.get("version"),
        "share_drifted": summary.share_drifted,
        "performance_drop": summary.performance.drop if summary.performance else None,
    }


assets = [drift_report]
asset_checks: list[Any] = []
