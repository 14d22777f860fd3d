"""sasrec: the SASRec sequence files, one ``user item item ...`` line per user, in time order."""

from __future__ import annotations

from recsys_assets.data.sources.core import (
    Parsed,
    SourceFile,
    SourceFormatError,
    null_columns,
    register_text,
    rows,
    text_lines,
)

EPOCH = "2000-01-01 00:00:00"


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """Whitespace separated; every event is a ``purchase``. The file has no times, so ts is
    synthetic: ``EPOCH + k seconds`` for the user's k-th item (k from 0)."""
    expected = "'user item item ...' separated by spaces"
    first = text_lines(head)[:1]
    if first and any(sep in first[0][1] for sep in (",", ";", "{")):
        raise SourceFormatError(file.path, first[0][0], expected, first[0][1])
    # One row per item; a line without items is a single malformed row ([NULL] keeps it).
    typed = f"""
      SELECT line_no, raw, len(t) AS n, p,
        CAST(t[1] AS VARCHAR) AS user_id, CAST(t[p] AS VARCHAR) AS item_id, 'purchase' AS event_type,
        TIMESTAMP '{EPOCH}' + to_seconds(p - 2) AS ts,
        {null_columns("session_id", "category", "device", "segment", "price")}
      FROM (
        SELECT line_no, line AS raw, t,
          unnest(CASE WHEN len(t) >= 2 THEN generate_series(2, len(t)) ELSE [NULL::BIGINT] END) AS p
        FROM (SELECT line_no, line, list_filter(regexp_split_to_array(line, '\\s+'), lambda v: v <> '') AS t
              FROM lines)
      )"""
    checks = [("n < 2", "'malformed: expected a user id and at least one item, got ' || n || ' field'")]
    return Parsed(rows(typed, checks), expected)


register_text("sasrec", parse)
