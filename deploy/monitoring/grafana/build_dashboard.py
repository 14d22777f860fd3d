"""Generate the recommender's Grafana dashboard (recsys-dashboard.json) with grafana-foundation-sdk.

    .venv/bin/python deploy/monitoring/grafana/build_dashboard.py          # rewrite the JSON
    .venv/bin/python deploy/monitoring/grafana/build_dashboard.py --check  # exit 1 if it is stale

The JSON is committed so it can be imported or provisioned as is; tests/test_monitoring.py checks it
equals this script's output. Every query reads the series of the BentoML service (job "recsys") or
of the Pushgateway (recsys_assets/monitoring/pushgateway.py) from a Prometheus data source chosen
with the dashboard's `datasource` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

OUTPUT = Path(__file__).with_name("recsys-dashboard.json")
UID = "recsys-overview"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
RETRAIN_JOB = "retrain_job"  # the Dagster job whose outcome the run-failure sensor pushes
MODEL_AGE_LIMIT_S = 8 * 86400  # as the RecsysModelTooOld alert


def _query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def _thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=value, color=color) for value, color in steps]
    )


def _states(**texts: tuple[str, str]) -> list[model.ValueMapping]:
    """Value -> (text, colour) mappings for 0/1 gauges."""
    return [model.ValueMap(options={value: model.ValueMappingResult(text=text, color=color, index=i)
                                    for i, (value, (text, color)) in enumerate(texts.items())})]


def _timeseries(title: str, description: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .line_width(1)
        .fill_opacity(10)
        .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True))
    )
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _stat(title: str, description: str, query: prometheus.Dataquery, unit: str = "none", span: int = 6,
          text_mode: common.BigValueTextMode = common.BigValueTextMode.VALUE) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query)
        .unit(unit)
        .height(5)
        .span(span)
        .text_mode(text_mode)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def latency_quantile(q: float) -> str:
    return (f'histogram_quantile({q}, sum by (le) (rate(recsys_request_latency_seconds_bucket'
            f'{{job="recsys", endpoint="recommend"}}[{RATE}])))')


def build() -> model.Dashboard:
    retrain_failed = (
        f'(max(recsys_pipeline_last_failure_timestamp_seconds{{job="{RETRAIN_JOB}"}}) or vector(0))'
        f' > bool (max(recsys_pipeline_last_success_timestamp_seconds{{job="{RETRAIN_JOB}"}}) or vector(0))'
    )
    builder = (
        dash.Dashboard("Recommender: serving, model, drift, retraining")
        .uid(UID)
        .description("BERT4Rec recommender: traffic and latency, fallbacks and cache, the served model, "
                     "drift reports and retraining (deploy/monitoring/).")
        .tags(["recsys", "bentoml", "prometheus"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("utc")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        # -- traffic and latency
        .with_row(dash.Row("Traffic and latency"))
        .with_panel(_timeseries(
            "Request rate by outcome", "API requests per second by endpoint and outcome (model, cache, "
            "fallback, rejected = 4xx, error = 5xx).", "reqps",
            _query(f'sum by (endpoint, outcome) (rate(recsys_requests_total{{job="recsys"}}[{RATE}]))',
                   "{{endpoint}} {{outcome}}")))
        .with_panel(_timeseries(
            "/recommend latency p50 / p95 / p99", "Server-side latency of /recommend (body parsing "
            "included); the RecsysLatencyP99High alert fires over 70 ms for 5 minutes.", "s",
            _query(latency_quantile(0.5), "p50", "A"),
            _query(latency_quantile(0.95), "p95", "B"),
            _query(latency_quantile(0.99), "p99", "C"))
            .thresholds(_thresholds((None, "green"), (0.07, "red")))
            .thresholds_style(common_builders.GraphThresholdsStyleConfig()
                              .mode(common.GraphThresholdsStyleMode.LINE)))
        .with_panel(_timeseries(
            "HTTP 5xx (BentoML)", "Server errors on the API routes as BentoML counts them, including "
            "failures before the service's handlers.", "reqps",
            _query('sum by (endpoint, http_response_code) (rate(bentoml_service_request_total{job="recsys", '
                   f'endpoint=~"/recommend|/events", http_response_code=~"5.."}}[{RATE}]))',
                   "{{endpoint}} {{http_response_code}}")))
        .with_panel(_timeseries(
            "Events logged", "Events appended to the durable log per second (POST /events).", "ops",
            _query(f'sum(rate(recsys_events_logged_total{{job="recsys"}}[{RATE}]))', "events")))
        # -- fallbacks and cache
        .with_row(dash.Row("Fallbacks and cache"))
        .with_panel(_timeseries(
            "Fallbacks by reason", "Answers from the popularity fallback per second, by reason; "
            "unknown_user and cold_start are expected for new shoppers, the others are faults.", "reqps",
            _query(f'sum by (reason) (rate(recsys_fallbacks_total{{job="recsys"}}[{RATE}]))', "{{reason}}"))
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)))
        .with_panel(_timeseries(
            "Cache hit rate", "Share of answer-cache lookups that hit.", "percentunit",
            _query(f'sum(rate(recsys_cache_hits_total{{job="recsys"}}[{RATE}])) / '
                   f'(sum(rate(recsys_cache_hits_total{{job="recsys"}}[{RATE}])) + '
                   f'sum(rate(recsys_cache_misses_total{{job="recsys"}}[{RATE}])))', "hit rate"))
            .min(0).max(1))
        .with_panel(_timeseries(
            "Answer log drops", "Answers not written to the answer log (the prediction-drift input), by "
            "reason; requests never fail for it.", "ops",
            _query(f'sum by (reason) (rate(recsys_answer_log_dropped_total{{job="recsys"}}[{RATE}]))',
                   "{{reason}}")).span(24))
        # -- the served model
        .with_row(dash.Row("Model"))
        .with_panel(_stat(
            "Model version", "Bundle version and ONNX Runtime provider being served ('none' when no bundle is).",
            _query('max by (model_version, provider) (recsys_model_info{job="recsys"}) == 1',
                   "{{model_version}} ({{provider}})", instant=True),
            text_mode=common.BigValueTextMode.NAME))
        .with_panel(_stat(
            "Model age", "Time since the served bundle was created (the oldest any worker serves); "
            "the RecsysModelTooOld alert fires over 8 days.",
            _query('time() - min(recsys_model_created_timestamp_seconds{job="recsys"} != 0)', instant=True), unit="s")
            .thresholds(_thresholds((None, "green"), (MODEL_AGE_LIMIT_S, "red"))))
        .with_panel(_stat(
            "Degraded", "Whether the service answers from its fallback only (no usable bundle).",
            _query('max(recsys_degraded{job="recsys"})', instant=True))
            .mappings(_states(**{"0": ("OK", "green"), "1": ("DEGRADED", "red")})))
        .with_panel(_stat(
            "Model loaded", "When the served bundle was loaded by the service.",
            _query('max(recsys_model_loaded_timestamp_seconds{job="recsys"}) * 1000', instant=True),
            unit="dateTimeFromNow"))
        .with_panel(_timeseries(
            "Model switches", "Bundle switches by outcome: switched, or refused (the previous bundle "
            "stays in service).", "short",
            _query(f'sum by (outcome) (increase(recsys_model_switches_total{{job="recsys"}}[{RATE}]))',
                   "{{outcome}}")).span(24))
        # -- drift
        .with_row(dash.Row("Drift"))
        .with_panel(_stat(
            "Drift detected", "Verdict of the last drift report (drift_report asset).",
            _query("max(recsys_drift_detected)", instant=True))
            .mappings(_states(**{"0": ("NO DRIFT", "green"), "1": ("DRIFT", "red")})))
        .with_panel(_stat(
            "Share of drifted signals", "Share of the monitored signals that drifted in the last report.",
            _query("max(recsys_drift_share_drifted_signals)", instant=True), unit="percentunit")
            .thresholds(_thresholds((None, "green"), (0.5, "red"))))
        .with_panel(_stat(
            "Performance drop", "Drop of the model's quality metric against the reference.",
            _query("max(recsys_drift_performance_drop)", instant=True)))
        .with_panel(_stat(
            "Last drift report", "When the last drift report was pushed.",
            _query("max(recsys_drift_report_timestamp_seconds) * 1000", instant=True), unit="dateTimeFromNow"))
        .with_panel(_timeseries(
            "Drift statistic by signal", "Each signal's drift statistic; the signal drifted when it "
            "crosses its threshold (dashed).", "short",
            _query("max by (signal) (recsys_drift_signal_statistic)", "{{signal}}", "A"),
            _query("max by (signal) (recsys_drift_signal_threshold)", "{{signal}} threshold", "B"))
            .override_by_query("B", [model.DynamicConfigValue(id_val="custom.lineStyle",
                                                              value={"fill": "dash", "dash": [10, 10]})]))
        .with_panel(_stat(
            "Drifted signals", "Per signal: whether it drifted in the last report.",
            _query("max by (signal) (recsys_drift_signal_drifted)", "{{signal}}", instant=True), span=12,
            text_mode=common.BigValueTextMode.VALUE_AND_NAME)
            .height(8)
            .mappings(_states(**{"0": ("stable", "green"), "1": ("drifted", "red")})))
        # -- retraining
        .with_row(dash.Row("Retraining"))
        .with_panel(_stat(
            "Retrain status", "FAILING while the last retrain_job failure is newer than its last success.",
            _query(retrain_failed, instant=True), span=8)
            .mappings(_states(**{"0": ("OK", "green"), "1": ("FAILING", "red")})))
        .with_panel(_stat(
            "Last successful retrain", "When retrain_job last succeeded.",
            _query(f'max(recsys_pipeline_last_success_timestamp_seconds{{job="{RETRAIN_JOB}"}}) * 1000',
                   instant=True), unit="dateTimeFromNow", span=8))
        .with_panel(_stat(
            "Last failed retrain", "When retrain_job last failed.",
            _query(f'max(recsys_pipeline_last_failure_timestamp_seconds{{job="{RETRAIN_JOB}"}}) * 1000',
                   instant=True), unit="dateTimeFromNow", span=8))
    )
    built = builder.build()
    # the builders leave panel ids unset (rows at 0); Grafana links and alerts need unique ones
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def expressions(dashboard_json: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard's panels (rows included)."""
    panels = list(dashboard_json.get("panels", []))
    for row in list(panels):
        panels.extend(row.get("panels", []))
    return [target["expr"] for panel in panels for target in panel.get("targets", []) if "expr" in target]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run {Path(__file__).name} to regenerate it", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
