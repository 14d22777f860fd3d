"""Stage 2: raw events -> cleaned interactions + quarantined events (nothing silently dropped)."""


from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset_check,
    multi_asset,
)
from pydantic import Field

from recsys_assets.assets.metadata import table_markdown
from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.schema import EVENT_TYPES
from recsys_assets.io_manager import TableQuery, TableRef
from recsys_assets.resources import WarehouseResource


class CleaningRunConfig(Config):
    event_types: list[str] = Field(default_factory=lambda: list(EVENT_TYPES))
    dedupe_repeated_views: bool = True
    repeated_view_window_s: int = 1800
    bot_max_events_per_user: int = 20_000
    bot_max_events_per_minute: int = 100
    min_user_interactions: int = 5
    min_item_interactions: int = 5


@multi_asset(
    group_name="ingest",
    outs={
        "cleaned_interactions": AssetOut(
            io_manager_key="warehouse_io_manager",
            description="Usable interactions in stable chronological order (user, ts, event_id).",
        ),
        "quarantined_events": AssetOut(
            io_manager_key="warehouse_io_manager",
            description="Every raw row that was not kept, with its reason and a detail.",
        ),
    },
)
def clean_raw_events(
    context: AssetExecutionContext,
    config: CleaningRunConfig,
    warehouse: WarehouseResource,
    raw_events: TableRef,
):
    with warehouse.connect() as con:
        summary = clean_events(con, CleaningConfig(**config.model_dump()), raw_table=raw_events.table)
        preview = con.sql("SELECT * EXCLUDE (raw_line) FROM quarantined_events USING SAMPLE 10 ROWS (reservoir, 7)").pl()
    context.log.info(
        f"{summary.raw:,} raw -> {summary.cleaned:,} cleaned + {summary.quarantined:,} quarantined "
        f"({summary.users:,} users, {summary.items:,} items) in {summary.seconds}s"
    )
    by_reason = {k: v for k, v in summary.by_reason.items() if v}
    yield Output(
        TableQuery(sql=None),
        output_name="cleaned_interactions",
        metadata={
            "raw_rows": summary.raw,
            "users": summary.users,
            "items": summary.items,
            "kept_share": round(summary.cleaned / max(summary.raw, 1), 4),
            "k_core_rounds": summary.k_core_rounds,
            "seconds": summary.seconds,
        },
    )
    yield Output(
        TableQuery(sql=None),
        output_name="quarantined_events",
        metadata={
            "rows_by_reason": MetadataValue.json(by_reason),
            **{f"reason/{k}": v for k, v in by_reason.items()},
            "sample": table_markdown(preview),
        },
    )


@asset_check(asset="cleaned_interactions", blocking=True, description="raw = cleaned + quarantined.")
def counts_reconcile(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        raw, cleaned, quarantined = con.execute(
            """SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM cleaned_interactions),
                      (SELECT count(*) FROM quarantined_events)"""
        ).fetchall()[0]
        overlap = con.execute(
            "SELECT count(*) FROM cleaned_interactions c SEMI JOIN quarantined_events q USING (event_id)"
        ).fetchall()[0][0]
    return AssetCheckResult(
        passed=raw == cleaned + quarantined and overlap == 0,
        metadata={"raw": raw, "cleaned": cleaned, "quarantined": quarantined, "in_both": overlap},
    )


@asset_check(asset="cleaned_interactions", blocking=True, description="No null ids, types or timestamps.")
def no_null_ids(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        nulls = con.execute(
            """SELECT count(*) FROM cleaned_interactions
               WHERE user_id IS NULL OR item_id IS NULL OR event_type IS NULL OR ts IS NULL"""
        ).fetchall()[0][0]
    return AssetCheckResult(passed=nulls == 0, metadata={"rows_with_nulls": nulls})


@asset_check(asset="cleaned_interactions", description="Rows are in per-user chronological order.")
def time_ordered(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        # rowid follows insertion order, which is the stored order.
        out_of_order = con.execute(
            """SELECT count(*) FROM (
                 SELECT ts < lag(ts) OVER (PARTITION BY user_id ORDER BY rowid) AS back
                 FROM cleaned_interactions) WHERE back"""
        ).fetchall()[0][0]
    return AssetCheckResult(
        passed=out_of_order == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"rows_before_their_predecessor": out_of_order},
    )


assets = [clean_raw_events]
asset_checks = [counts_reconcile, no_null_ids, time_ordered]
