"""diginetica: the CIKM Cup 2016 (DIGINETICA) ``;``-separated files, told apart by their headers."""

from __future__ import annotations

import uuid

import duckdb

from recsys_assets.data.sources.core import (
    Checked,
    Parsed,
    Parser,
    SourceFile,
    SourceFormatError,
    csv_header,
    delimited,
    header,
    is_empty,
    lit,
    load_text,
    nz,
    quietly,
    read_head,
    register,
)

# Headers, compared lower-cased with underscores removed (snake_case spellings are accepted).
PURCHASES = ("sessionid", "userid", "timeframe", "eventdate", "ordernumber", "itemid")
VIEWS = ("sessionid", "userid", "itemid", "timeframe", "eventdate")
CATEGORIES = ("itemid", "categoryid")
_KINDS = {PURCHASES: "purchase", VIEWS: "view", CATEGORIES: "category"}


def load(con: duckdb.DuckDBPyConnection, files: list[SourceFile], table: str) -> int:
    """Purchase and view files become events; an ``itemId;categoryId`` file in the same input
    (e.g. the dataset directory) is joined as their category."""
    expected = (
        "a diginetica header: sessionId;userId;timeframe;eventdate;ordernumber;itemId, "
        "sessionId;userId;itemId;timeframe;eventdate or itemId;categoryId"
    )
    kinds: list[tuple[SourceFile, str]] = []
    for file in files:
        head = read_head(file)
        if is_empty(head):
            continue
        line = header(file, head, expected)
        kind = _KINDS.get(tuple(n.replace("_", "") for n in csv_header(line, ";")))
        if kind is None:
            raise SourceFormatError(file.path, 1, expected, line)
        kinds.append((file, kind))

    category_table = None
    category_files = [f for f, kind in kinds if kind == "category"]
    if category_files:
        category_table = f"_src_categories_{uuid.uuid4().hex}"
        paths = "[" + ", ".join(lit(str(f.path)) for f in category_files) + "]"
        try:
            con.execute(
                f"""
                CREATE TEMP TABLE {category_table} AS
                SELECT item_id, min(category) AS category
                FROM read_csv({paths}, delim = ';', header = true, auto_detect = false, quote = '',
                              columns = {{'item_id': 'VARCHAR', 'category': 'VARCHAR'}})
                WHERE item_id IS NOT NULL AND category IS NOT NULL
                GROUP BY item_id"""
            )
        except duckdb.Error as exc:
            raise SourceFormatError(category_files[0].path, None, "itemId;categoryId rows", str(exc).splitlines()[0]) from exc
    try:
        total = 0
        for file, kind in kinds:
            if kind != "category":
                total += load_text(con, file, table, total, _parser(kind), category_table)
    finally:
        if category_table:
            quietly(con, f"DROP TABLE IF EXISTS {category_table}")
    return total


def _parser(kind: str) -> Parser:
    """user_id = userId, or ``s<sessionId>`` when it is NA; ts = eventdate + timeframe milliseconds."""
    names = PURCHASES if kind == "purchase" else VIEWS
    pos = {name: i + 1 for i, name in enumerate(names)}  # 1-based field positions
    session, user = nz(f"f[{pos['sessionid']}]"), nz(f"f[{pos['userid']}]")
    date_raw, frame_raw = nz(f"f[{pos['eventdate']}]"), nz(f"f[{pos['timeframe']}]")
    columns: dict[str, str | Checked] = {
        "session_id": session,
        "user_id": f"CASE WHEN {user} IS NULL OR {user} = 'NA' THEN 's' || {session} ELSE {user} END",
        "item_id": nz(f"f[{pos['itemid']}]"),
        "event_type": lit(kind),
        "date": Checked("eventdate", date_raw, lambda d: f"TRY_CAST({d} AS DATE)"),
        "frame": Checked("timeframe", frame_raw, lambda t: f"TRY_CAST({t} AS BIGINT)"),
        "ts": f"try(TRY_CAST({date_raw} AS DATE) + to_milliseconds(TRY_CAST({frame_raw} AS BIGINT)))",
    }
    n = len(names)

    def parse(file: SourceFile, head: list[bytes]) -> Parsed:
        return delimited(";", n, columns, f"{n} ';'-separated diginetica fields", quoted=False)

    return parse


register("diginetica", load)
