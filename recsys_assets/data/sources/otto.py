"""otto: the OTTO session JSON lines, ``{"session": id, "events": [{"aid", "ts", "type"}]}``."""

from __future__ import annotations

import json

from recsys_assets.data.sources.core import (
    Parsed,
    SourceFile,
    SourceFormatError,
    epoch_ms,
    lit,
    map_event,
    null_columns,
    register_text,
    rows,
    text_lines,
    unparsable,
)

_SCHEMA = '{"session": "VARCHAR", "events": [{"aid": "VARCHAR", "ts": "VARCHAR", "type": "VARCHAR"}]}'
EVENTS = {"clicks": "view", "carts": "cart", "orders": "purchase"}


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """The session is both user_id and session_id; ts in ms; clicks/carts/orders -> view/cart/purchase."""
    expected = 'JSON lines {"session": id, "events": [{"aid": id, "ts": ms, "type": "clicks|carts|orders"}]}'
    for line_no, text in text_lines(head):
        try:
            obj = json.loads(text)
        except ValueError:
            continue  # a malformed line is a row-level problem; look for a line that is JSON
        if not (isinstance(obj, dict) and "session" in obj and "events" in obj):
            raise SourceFormatError(file.path, line_no, expected, text)
        break
    # from_json parses each line once; a line that is not such an object yields a single row.
    typed = f"""
      SELECT line_no, CASE WHEN bad_line OR e IS NULL THEN raw ELSE CAST(to_json(e) AS VARCHAR) END AS raw,
        j IS NULL AS not_json, bad_line, e IS NULL AS no_event,
        CAST(j.session AS VARCHAR) AS user_id, CAST(e.aid AS VARCHAR) AS item_id,
        {map_event("e.type", EVENTS)} AS event_type,
        e.ts AS ts_raw, {epoch_ms("e.ts")} AS ts, CAST(j.session AS VARCHAR) AS session_id,
        {null_columns("category", "device", "segment", "price")}
      FROM (
        SELECT line_no, raw, j, bad_line, unnest(CASE WHEN bad_line THEN [NULL] ELSE j.events END) AS e
        FROM (
          SELECT line_no, line AS raw, j, j IS NULL OR j.session IS NULL OR j.events IS NULL AS bad_line
          FROM (SELECT line_no, line, try(from_json(line, {lit(_SCHEMA)})) AS j FROM lines)
        )
      )"""
    checks = [
        ("not_json", "'malformed: invalid JSON'"),
        ("bad_line", "'malformed: expected {\"session\": ..., \"events\": [...]}'"),
        ("no_event", "'malformed: event is not an object'"),
        unparsable("ts", "ts_raw", "ts"),
    ]
    return Parsed(rows(typed, checks), expected)


register_text("otto", parse)
