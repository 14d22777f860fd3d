"""Stage 3: cleaned interactions -> item vocabulary, context vocabulary, tokenized sequences."""


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    MetadataValue,
    asset,
    asset_check,
)

from recsys_assets.assets.metadata import figure_markdown, table_markdown
from recsys_serving.contract import FIRST_ITEM_TOKEN
from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary, tokenize_sequences
from recsys_assets.io_manager import TableQuery, TableRef
from recsys_assets.resources import WarehouseResource


@asset(
    group_name="sequences",
    io_manager_key="warehouse_io_manager",
    description="Item id <-> token ([PAD]=0, [MASK]=1, items from 2 by decreasing popularity), category.",
)
def item_vocabulary(
    context: AssetExecutionContext, warehouse: WarehouseResource, cleaned_interactions: TableRef
) -> TableQuery:
    with warehouse.connect() as con:
        n_items = build_item_vocabulary(con, cleaned_interactions.table, "item_vocabulary")
        top = con.sql("SELECT token, item_id, category, count FROM item_vocabulary WHERE NOT is_special LIMIT 10").pl()
        counts = con.sql("SELECT count FROM item_vocabulary WHERE NOT is_special ORDER BY count DESC").pl()["count"]
    total = max(int(counts.sum()), 1)
    head_items = int((counts.cum_sum() <= 0.5 * total).sum()) + 1
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.loglog(range(1, len(counts) + 1), counts.to_list())
    ax.set(xlabel="item popularity rank", ylabel="interactions", title="Item popularity (log-log)")
    context.add_output_metadata(
        {
            "items": n_items,
            "items_covering_half_of_interactions": head_items,
            "top_items": table_markdown(top),
            "popularity_curve": figure_markdown(fig, "popularity"),
        }
    )
    return TableQuery()


@asset(
    group_name="sequences",
    io_manager_key="warehouse_io_manager",
    description="Device and segment values -> context tokens (0 = unknown).",
)
def context_vocabulary(
    context: AssetExecutionContext, warehouse: WarehouseResource, cleaned_interactions: TableRef
) -> TableQuery:
    with warehouse.connect() as con:
        sizes = build_context_vocabulary(con, cleaned_interactions.table, "context_vocabulary")
    context.add_output_metadata({"values_by_kind": MetadataValue.json(sizes)})
    return TableQuery()


@asset(
    group_name="sequences",
    io_manager_key="warehouse_io_manager",
    description="Per user: chronological item tokens, per-position context, leave-one-out split.",
)
def tokenized_sequences(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    cleaned_interactions: TableRef,
    item_vocabulary: TableRef,
    context_vocabulary: TableRef,
) -> TableQuery:
    with warehouse.connect() as con:
        summary = tokenize_sequences(
            con, cleaned_interactions.table, item_vocabulary.table, context_vocabulary.table, "tokenized_sequences"
        )
        lengths = con.sql("SELECT n_items FROM tokenized_sequences").pl()["n_items"]
        preview = con.sql(
            "SELECT user_id, n_items, tokens, tod, devices, valid_item, test_item FROM tokenized_sequences LIMIT 8"
        ).pl()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths.clip(upper_bound=100).to_list(), bins=50)
    ax.set(xlabel="items per user (clipped at 100)", ylabel="users", title="Sequence lengths")
    context.log.info(f"{summary.users:,} sequences, {summary.interactions:,} tokens in {summary.seconds}s")
    context.add_output_metadata(
        {
            "users": summary.users,
            "items": summary.items,
            "interactions": summary.interactions,
            "users_with_test_item": summary.users_with_test_item,
            "length_quantiles": MetadataValue.json(summary.length_quantiles),
            "length_histogram": figure_markdown(fig, "lengths"),
            "preview": table_markdown(preview),
        }
    )
    return TableQuery()


@asset_check(asset=item_vocabulary, blocking=True, description="Tokens unique and contiguous; every item has one.")
def vocabulary_complete(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        n, distinct, lo, hi = con.execute(
            "SELECT count(*), count(DISTINCT token), min(token), max(token) FROM item_vocabulary"
        ).fetchall()[0]
        uncovered = con.execute(
            "SELECT count(DISTINCT item_id) FROM cleaned_interactions ANTI JOIN item_vocabulary USING (item_id)"
        ).fetchall()[0][0]
    return AssetCheckResult(
        passed=n == distinct and lo == 0 and hi == n - 1 and uncovered == 0,
        metadata={"tokens": n, "max_token": hi, "items_without_token": uncovered},
    )


@asset_check(asset=tokenized_sequences, blocking=True, description="Valid tokens, aligned context, time order.")
def sequences_valid(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.connect() as con:
        max_token = con.execute("SELECT max(token) FROM item_vocabulary").fetchall()[0][0]
        bad_tokens, misaligned, unordered, null_users = con.execute(
            f"""SELECT
                  count(*) FILTER (WHERE list_min(tokens) < {FIRST_ITEM_TOKEN} OR list_max(tokens) > {max_token}),
                  count(*) FILTER (WHERE len(tod) <> len(tokens) OR len(devices) <> len(tokens)
                                     OR len(segments) <> len(tokens) OR len(event_types) <> len(tokens)
                                     OR len(ts) <> len(tokens)),
                  count(*) FILTER (WHERE ts <> list_sort(ts)),
                  count(*) FILTER (WHERE user_id IS NULL)
                FROM tokenized_sequences"""
        ).fetchall()[0]
    return AssetCheckResult(
        passed=bad_tokens == misaligned == unordered == null_users == 0,
        metadata={
            "sequences_with_unknown_tokens": bad_tokens,
            "sequences_with_misaligned_context": misaligned,
            "sequences_out_of_time_order": unordered,
            "null_user_ids": null_users,
        },
    )


assets = [item_vocabulary, context_vocabulary, tokenized_sequences]
asset_checks = [vocabulary_complete, sequences_valid]
