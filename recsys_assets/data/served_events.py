"""Events logged by the serving API (POST /events) flow back into training through raw_events."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import duckdb

from recsys_assets.config import recsys_home
from recsys_serving.contract import CANONICAL_COLUMNS, SERVED_EVENTS_DIR
from recsys_serving.event_log import EVENT_ID_FIELD, LOG_GLOB
from recsys_assets.data.schema import RAW_EVENTS_COLUMNS


def served_events_dir() -> Path:
    """Where the serving API appends the events it receives, as canonical JSON lines."""
    return recsys_home() / SERVED_EVENTS_DIR


def served_event_files() -> list[Path]:
    """Every log file under the directory, subdirectories included (one per replica when several
    serving pods share the volume, each with its own id index)."""
    return sorted(served_events_dir().rglob(LOG_GLOB))


class ServedEvents(NamedTuple):
    rows: int  # events appended
    duplicates: int  # further lines of an event id already appended (a retry logged on another host)


def append_served_events(
    con: duckdb.DuckDBPyConnection, files: list[Path], table: str = "raw_events"
) -> ServedEvents:
    """Append the logged events to `table`, one row per served event id (lines written before event
    ids existed are all kept), numbered after the source's own event ids."""
    if not files:
        return ServedEvents(0, 0)
    columns = ", ".join(f"'{c}': '{t}'" for c, t in {EVENT_ID_FIELD: "VARCHAR", **CANONICAL_COLUMNS}.items())
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
    # The log's id field is read as served_event_id: event_id is raw_events' own row number.
    logged = f"""SELECT * FROM read_json({file_list}, columns = {{{columns}}}, format = 'newline_delimited',
                                         filename = true)"""
    lines = con.execute(f"SELECT count(*) FROM ({logged})").fetchall()[0][0]
    con.execute(
        f"""INSERT INTO "{table}"
            SELECT {select} FROM (
                SELECT * RENAME ("{EVENT_ID_FIELD}" AS served_event_id) FROM ({logged})
                QUALIFY served_event_id IS NULL
                     OR row_number() OVER (PARTITION BY served_event_id ORDER BY filename, ts) = 1
            )"""
    )
    rows = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0] - before
    return ServedEvents(rows, lines - rows)
