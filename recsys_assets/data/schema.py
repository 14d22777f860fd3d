"""The layout of the `raw_events` table: the canonical event columns plus bookkeeping columns."""

from __future__ import annotations

from recsys_serving.contract import CANONICAL_COLUMNS

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
