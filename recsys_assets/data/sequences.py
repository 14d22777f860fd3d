"""Cleaned interactions -> item vocabulary, context vocabulary and tokenized per-user sequences.

All three are SQL inside DuckDB, so they run out of core on 100M+ interactions.
Layout of the tables: docs/DATA_CONTRACTS.md; token constants: `schema.py`.
"""

from __future__ import annotations

import time

import duckdb
from pydantic import BaseModel

from recsys_serving.contract import (
    EVENT_TYPE_TOKENS,
    FIRST_ITEM_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TIME_OF_DAY_BUCKETS,
    time_of_day_sql,
)

CONTEXT_KINDS: tuple[str, ...] = ("device", "segment")


class SequenceSummary(BaseModel):
    users: int
    items: int
    interactions: int
    users_with_test_item: int
    length_quantiles: dict[str, float]
    seconds: float


def build_item_vocabulary(
    con: duckdb.DuckDBPyConnection,
    cleaned_table: str = "cleaned_interactions",
    vocab_table: str = "item_vocabulary",
) -> int:
    """Item id <-> token, most popular item first; returns the number of items (special tokens apart)."""
    specials = " UNION ALL ".join(
        f"SELECT {tok}::INTEGER AS token, '{name}' AS item_id, NULL::VARCHAR AS category, "
        "0::BIGINT AS count, true AS is_special"
        for tok, name in sorted(SPECIAL_TOKENS.items())
    )
    con.execute(
        f"""
        CREATE OR REPLACE TABLE "{vocab_table}" AS
        {specials}
        UNION ALL
        SELECT ({FIRST_ITEM_TOKEN - 1} + row_number() OVER (ORDER BY count DESC, item_id))::INTEGER,
               item_id, category, count, false
        FROM (SELECT item_id, count(*) AS count, mode(category) AS category
              FROM "{cleaned_table}" GROUP BY item_id)
        ORDER BY 1
        """
    )
    return con.execute(f'SELECT count(*) FROM "{vocab_table}" WHERE NOT is_special').fetchall()[0][0]


def build_context_vocabulary(
    con: duckdb.DuckDBPyConnection,
    cleaned_table: str = "cleaned_interactions",
    context_table: str = "context_vocabulary",
) -> dict[str, int]:
    """Device and segment values -> tokens from 1 (0 = unknown), most frequent first."""
    parts = [
        f"""SELECT '{kind}' AS kind, value,
                   row_number() OVER (ORDER BY n DESC, value)::SMALLINT AS token
            FROM (SELECT {kind} AS value, count(*) AS n FROM "{cleaned_table}"
                  WHERE {kind} IS NOT NULL AND trim({kind}) <> '' GROUP BY {kind})"""
        for kind in CONTEXT_KINDS
    ]
    con.execute(f'CREATE OR REPLACE TABLE "{context_table}" AS ' + " UNION ALL ".join(parts))
    return dict(con.execute(f'SELECT kind, count(*) FROM "{context_table}" GROUP BY kind').fetchall())


# Interactions per tokenization partition: bounds the memory of the per-user ordered aggregate.
PARTITION_ROWS = 10_000_000


def tokenize_sequences(
    con: duckdb.DuckDBPyConnection,
    cleaned_table: str = "cleaned_interactions",
    vocab_table: str = "item_vocabulary",
    context_table: str = "context_vocabulary",
    sequences_table: str = "tokenized_sequences",
    partition_rows: int = PARTITION_ROWS,
) -> SequenceSummary:
    """One row per user: chronological tokens, per-position context and the leave-one-out split.

    The full history is kept (models truncate their input to `max_len`) because evaluation must
    remove every item the user has seen, not only the latest `max_len`.
    """
    started = time.perf_counter()
    event_case = " ".join(f"WHEN '{name}' THEN {tok}" for name, tok in EVENT_TYPE_TOKENS.items())
    # One sorted list of structs per user, then one column per field: a single sort per user.
    # DuckDB cannot spill an ordered list aggregate, so large tables are tokenized in hash
    # partitions of users of about PARTITION_ROWS interactions each (one partition: sorted by user_id).
    # The joins run once, into integer columns that each partition then scans: re-reading the
    # string ids and re-joining the vocabulary per partition cost four times the aggregates.
    rows = con.execute(f'SELECT count(*) FROM "{cleaned_table}"').fetchall()[0][0]
    partitions = max(1, -(-rows // partition_rows))
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _tokens AS
        SELECT c.user_id, (hash(c.user_id) % {partitions})::INTEGER AS part, c.event_id, c.ts AS event_ts,
          v.token AS t,
          (CASE c.event_type {event_case} ELSE 0 END)::TINYINT AS et,
          {time_of_day_sql('c.ts')}::TINYINT AS tod,
          coalesce(d.token, 0)::SMALLINT AS d,
          coalesce(s.token, 0)::SMALLINT AS s
        FROM "{cleaned_table}" c
        JOIN "{vocab_table}" v ON v.item_id = c.item_id AND NOT v.is_special
        LEFT JOIN "{context_table}" d ON d.kind = 'device' AND d.value = c.device
        LEFT JOIN "{context_table}" s ON s.kind = 'segment' AND s.value = c.segment
        """
    )
    statement = f"""
        WITH events AS (
          SELECT user_id,
            list({{'t': t, 'et': et, 'tod': tod, 'd': d, 's': s, 'ts': epoch(event_ts)::BIGINT}} ORDER BY event_ts, event_id) AS e
          FROM _tokens WHERE part = $partition
          GROUP BY user_id
        ),
        seq AS (
          SELECT user_id,
            list_transform(e, lambda x: x.t) AS tokens,
            list_transform(e, lambda x: x.et) AS event_types,
            list_transform(e, lambda x: x.tod) AS tod,
            list_transform(e, lambda x: x.d) AS devices,
            list_transform(e, lambda x: x.s) AS segments,
            list_transform(e, lambda x: x.ts) AS ts
          FROM events
        )
        SELECT user_id, tokens, event_types, tod, devices, segments, ts,
          len(tokens)::INTEGER AS n_items,
          CASE WHEN len(tokens) >= 3 THEN list_slice(tokens, 1, len(tokens) - 2) ELSE tokens END AS train_tokens,
          CASE WHEN len(tokens) >= 3 THEN tokens[-2] END AS valid_item,
          CASE WHEN len(tokens) >= 3 THEN tokens[-1] END AS test_item
        FROM seq
        ORDER BY user_id
        """
    for partition in range(partitions):
        params = {"partition": partition}
        if partition == 0:
            con.execute(f'CREATE OR REPLACE TABLE "{sequences_table}" AS {statement}', params)
        else:
            con.execute(f'INSERT INTO "{sequences_table}" {statement}', params)
    con.execute("DROP TABLE _tokens")
    users, interactions, with_test = con.execute(
        f'SELECT count(*), coalesce(sum(n_items), 0), count(test_item) FROM "{sequences_table}"'
    ).fetchall()[0]
    items = con.execute(f'SELECT count(*) FROM "{vocab_table}" WHERE NOT is_special').fetchall()[0][0]
    q = con.execute(
        f"""SELECT quantile_cont(n_items, 0.5), quantile_cont(n_items, 0.9), quantile_cont(n_items, 0.99),
                   max(n_items) FROM "{sequences_table}" """
    ).fetchall()[0]
    return SequenceSummary(
        users=users,
        items=items,
        interactions=int(interactions),
        users_with_test_item=with_test,
        length_quantiles={"p50": q[0] or 0, "p90": q[1] or 0, "p99": q[2] or 0, "max": q[3] or 0},
        seconds=round(time.perf_counter() - started, 3),
    )


__all__ = [
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SequenceSummary",
    "build_context_vocabulary",
    "build_item_vocabulary",
    "tokenize_sequences",
]
