"""Stage 2: raw events -> cleaned interactions + quarantined events (nothing silently dropped)."""


from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    Config,
    MetadataValue,
    Output,
    asset_check,
    multi_asset,
)
from pydantic import Field

from recsys_assets.assets.metadata import REPEATED_VIEW_RULE_METADATA, table_markdown
from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_serving.contract import DEFAULT_REPEATED_VIEW_WINDOW_S, EVENT_TYPES
from recsys_assets.io_manager import TableQuery, TableRef
from recsys_assets.resources import WarehouseResource


class CleaningRunConfig(Config):
    event_types: list[str] = Field(default_factory=lambda: list(EVENT_TYPES))
    dedupe_repeated_views: bool = True
    repeated_view_window_s: int = DEFAULT_REPEATED_VIEW_WINDOW_S
    bot_max_events_per_user: int = 20_000
    bot_max_events_per_minute: int = 100
    min_user_interactions: int = 5
    min_item_interactions: int = 5


OUTPUTS = ("cleaned_interactions", "quarantined_events")

# Checked inside the cleaning pass: both tables of that pass exist there even when only one of
# them is selected (and so stored), which a separate check reading the stored tables cannot see.
counts_reconcile = AssetCheckSpec(
    "counts_reconcile",
    asset="cleaned_interactions",
    blocking=True,
    description="raw = cleaned + quarantined, and no event in both (of the same cleaning pass).",
)


@multi_asset(
    group_name="ingest",
    can_subset=True,
    outs={
        "cleaned_interactions": AssetOut(
            io_manager_key="warehouse_io_manager",
            is_required=False,
            description="Usable interactions (no stored order: readers order by user_id, ts, event_id).",
        ),
        "quarantined_events": AssetOut(
            io_manager_key="warehouse_io_manager",
            is_required=False,
            description="Every raw row that was not kept, with its reason and a detail.",
        ),
    },
    check_specs=[counts_reconcile],
)
def clean_raw_events(
    context: AssetExecutionContext,
    config: CleaningRunConfig,
    warehouse: WarehouseResource,
    raw_events: TableRef,
):
    # One SQL pass sorts every raw row into exactly one of the two tables, so both are always
    # computed. An output that is not selected goes to a scratch table, dropped afterwards: its
    # stored table stays the one its last materialization describes.
    selected = {key.path[-1] for key in context.selected_asset_keys}  # = the output names
    tables = {name: name if name in selected else f"_{name}_unselected" for name in OUTPUTS}
    cleaned_table, quarantine_table = tables["cleaned_interactions"], tables["quarantined_events"]
    with warehouse.connect() as con:
        try:
            summary = clean_events(
                con,
                CleaningConfig(**config.model_dump()),
                raw_table=raw_events.table,
                cleaned_table=cleaned_table,
                quarantine_table=quarantine_table,
            )
            overlap = con.execute(
                f'SELECT count(*) FROM "{cleaned_table}" SEMI JOIN "{quarantine_table}" USING (event_id)'
            ).fetchall()[0][0]
            preview = con.sql(
                f'SELECT * EXCLUDE (raw_line) FROM "{quarantine_table}" USING SAMPLE 10 ROWS (reservoir, 7)'
            ).pl()
        finally:
            for name, table in tables.items():
                if table != name:
                    con.execute(f'DROP TABLE IF EXISTS "{table}"')
    context.log.info(
        f"{summary.raw:,} raw -> {summary.cleaned:,} cleaned + {summary.quarantined:,} quarantined "
        f"({summary.users:,} users, {summary.items:,} items) in {summary.seconds}s; "
        f"stored: {sorted(n for n in OUTPUTS if n in selected)}"
    )
    by_reason = {k: v for k, v in summary.by_reason.items() if v}
    if "cleaned_interactions" in selected:
        yield Output(
            TableQuery(),
            output_name="cleaned_interactions",
            metadata={
                "raw_rows": summary.raw,
                "users": summary.users,
                "items": summary.items,
                "kept_share": round(summary.cleaned / max(summary.raw, 1), 4),
                "k_core_rounds": summary.k_core_rounds,
                "seconds": summary.seconds,
                # Read by the feature store, so that serving dedupes pushed views by the same rule.
                REPEATED_VIEW_RULE_METADATA: CleaningConfig(**config.model_dump()).repeated_view_rule.tag(),
            },
        )
    if "quarantined_events" in selected:
        yield Output(
            TableQuery(),
            output_name="quarantined_events",
            metadata={
                "rows_by_reason": MetadataValue.json(by_reason),
                **{f"reason/{k}": v for k, v in by_reason.items()},
                "sample": table_markdown(preview),
            },
        )
    if counts_reconcile.key in context.selected_asset_check_keys:
        yield AssetCheckResult(
            check_name=counts_reconcile.name,
            asset_key=counts_reconcile.asset_key,
            passed=summary.reconciles and overlap == 0,
            metadata={
                "raw": summary.raw,
                "cleaned": summary.cleaned,
                "quarantined": summary.quarantined,
                "in_both": int(overlap),
            },
        )


@asset_check(asset="cleaned_interactions", blocking=True, description="No null ids, types or timestamps.")
def no_null_ids(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        nulls = con.execute(
            """SELECT count(*) FROM cleaned_interactions
               WHERE user_id IS NULL OR item_id IS NULL OR event_type IS NULL OR ts IS NULL"""
        ).fetchall()[0][0]
    return AssetCheckResult(passed=nulls == 0, metadata={"rows_with_nulls": nulls})


@asset_check(
    asset="cleaned_interactions",
    description="No two rows share user, item, event type and timestamp: duplicates are quarantined.",
)
def no_duplicate_events(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        repeated = con.execute(
            """SELECT count(*), coalesce(sum(n - 1), 0) FROM (
                 SELECT count(*) AS n FROM cleaned_interactions
                 GROUP BY user_id, item_id, event_type, ts HAVING count(*) > 1)"""
        ).fetchall()[0]
    return AssetCheckResult(
        passed=repeated[0] == 0,
        severity=AssetCheckSeverity.ERROR,
        metadata={"repeated_events": int(repeated[0]), "extra_rows": int(repeated[1])},
    )


assets = [clean_raw_events]
# counts_reconcile is a check spec of clean_raw_events (above).
asset_checks = [no_null_ids, no_duplicate_events]
