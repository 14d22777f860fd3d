"""Events logged by the serving API (POST /events) flow back into training through raw_events."""

from __future__ import annotations

from pathlib import Path

import duckdb

from recsys_assets.config import recsys_home
from recsys_serving.contract import CANONICAL_COLUMNS, SERVED_EVENTS_DIR
from recsys_assets.data.schema import RAW_EVENTS_COLUMNS


def served_events_dir() -> Path:
    """Where the serving API appends the events it receives, as canonical JSON lines."""
    return recsys_home() / SERVED_EVENTS_DIR


def append_served_events(con: duckdb.DuckDBPyConnection, files: list[Path], table: str = "raw_events") -> int:
    """Append the logged events to `table` with fresh event ids after the source's; returns rows added."""
    if not files:
        return 0
    columns = ", ".join(f"'{c}': '{t}'" for c, t in CANONICAL_COLUMNS.items())
    file_list = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    offset = con.execute(f'SELECT coalesce(max(event_id), -1) + 1 FROM "{table}"').fetchall()[0][0]
    before = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
    select = ", ".join(
        {
            "event_id": f"{offset} + row_number() OVER (ORDER BY filename, ts) - 1",
            "source": "parse_filename(filename)",
            "source_line": "NULL",
            "parse_error": "NULL",
            "raw_line": "NULL",
        }.get(c, f'"{c}"')
        + f' AS "{c}"'
        for c in RAW_EVENTS_COLUMNS
    )
    con.execute(
        f"""INSERT INTO "{table}"
            SELECT {select} FROM read_json({file_list}, columns = {{{columns}}},
                                           format = 'newline_delimited', filename = true)"""
    )
    return con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0] - before
