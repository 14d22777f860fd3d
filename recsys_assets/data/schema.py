"""The canonical event schema and the token layout shared by training and serving."""

from __future__ import annotations

EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase")

# Canonical columns of `raw_events` (beside bookkeeping columns) in DuckDB types.
# `ts` is a naive TIMESTAMP holding UTC.
CANONICAL_COLUMNS: dict[str, str] = {
    "user_id": "VARCHAR",
    "item_id": "VARCHAR",
    "event_type": "VARCHAR",
    "ts": "TIMESTAMP",
    "session_id": "VARCHAR",
    "category": "VARCHAR",
    "device": "VARCHAR",
    "segment": "VARCHAR",
    "price": "DOUBLE",
}
# Bookkeeping columns every reader adds so that no row is ever lost without a trace:
# `event_id` (position in the source, stable), `source` (file name) and `source_line`,
# `parse_error` (NULL when the row parsed; else why not) and `raw_line` (the text of an unparsable row).
BOOKKEEPING_COLUMNS: dict[str, str] = {
    "event_id": "BIGINT",
    "source": "VARCHAR",
    "source_line": "BIGINT",
    "parse_error": "VARCHAR",
    "raw_line": "VARCHAR",
}
RAW_EVENTS_COLUMNS: dict[str, str] = {**BOOKKEEPING_COLUMNS, **CANONICAL_COLUMNS}

# Token layout: 0 is padding, 1 is the mask, items start at 2 ordered by popularity
# (so a token's popularity rank is token - FIRST_ITEM_TOKEN).
PAD_TOKEN = 0
MASK_TOKEN = 1
FIRST_ITEM_TOKEN = 2
SPECIAL_TOKENS: dict[int, str] = {PAD_TOKEN: "[PAD]", MASK_TOKEN: "[MASK]"}

# Context tokens: 0 always means "unknown / not in the source", so absent context is a no-op.
TIME_OF_DAY_BUCKETS = 6  # 4-hour buckets -> tokens 1..6
EVENT_TYPE_TOKENS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
