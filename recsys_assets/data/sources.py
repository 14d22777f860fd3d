"""Event-source readers: every supported source format -> the ``raw_events`` table, inside DuckDB.

``load_events(con, path, fmt)`` reads a file, a directory of chunk files (recursively, in sorted
path order, skipping names that start with ``.`` or ``_`` such as ``_SUCCESS``) or a glob, gzip
or plain, and (re)creates ``raw_events`` with exactly the columns of ``schema.RAW_EVENTS_COLUMNS``.
Everything runs in DuckDB's own readers (``read_csv`` / ``read_parquet``) and SQL, out of core.
Python only reads the first lines of each file (header and format checks), re-reads the few lines
DuckDB could not decode (to keep their bytes) and, for a file mixing line endings, streams a
normalised copy.

Rows and files
  * A line that cannot be parsed (wrong field count, wrong delimiter, unbalanced quotes,
    non-UTF-8 bytes, unparsable timestamp or number, a truncated last line, invalid JSON) is kept
    as a row with ``parse_error`` = ``malformed: <why>``, ``raw_line`` = its text (invalid bytes
    as ``\\xNN`` escapes; ``?`` in gzip files), ``source_line`` = its 1-based line and every
    canonical field NULL.
  * Values that parse but are semantically bad (empty ids, event types such as rees46
    ``remove_from_cart``, future timestamps) are kept as read; cleaning quarantines them.
    Empty fields read as NULL; nothing else is normalised.
  * Blank lines hold no event and are skipped (they still count in ``source_line``).
  * File-level problems raise ``SourceFormatError`` (file, line, what was expected): no such
    file, a header that is not the format's, a file where no line parses, a corrupt gzip stream,
    an unreadable Parquet file, a missing required column.
  * An empty file (0 bytes, blank lines only, or a header alone) is not an error: it adds 0 rows,
    because chunked exports legitimately contain empty chunks. A source that is all empty files
    yields an empty ``raw_events``; the ingest asset check reports that.
  * ``event_id`` is the 0-based position of the event in the source: files in sorted order, then
    lines, then (for otto / sasrec, several events a line) the order within the line. Dense.
  * ``source`` is the file's path relative to the directory or glob root (its name for a file).
  * Each line is one record: a quoted CSV field holding a newline is not supported (its lines
    become malformed rows). LF, CRLF and CR files are read as such; a file that mixes them is
    read through a normalised copy (under ``$TMPDIR``) whose lines are those of Python's
    universal newlines (any CR, LF or CRLF ends a line).
  * Call it outside an explicit transaction, or the caller's transaction owns the outcome: the
    table is built under a staging name and swapped in at the end.

Formats
  rees46       CSV ``event_time,event_type,product_id,category_id,category_code,brand,price,
               user_id,user_session``; ``event_time`` like ``2019-10-01 00:00:00 UTC``;
               category = category_code, else category_id; brand is dropped.
  retailrocket ``timestamp,visitorid,event,itemid,transactionid``, timestamp in ms;
               view/addtocart/transaction -> view/cart/purchase; transactionid is dropped.
  otto         JSON lines ``{"session": id, "events": [{"aid", "ts" (ms), "type"}]}``; the session
               is both user_id and session_id; clicks/carts/orders -> view/cart/purchase.
  sasrec       ``user item item ...`` one line per user, whitespace separated, in time order.
               Every event is a ``purchase``; the file has no times, so ts is synthetic:
               ``2000-01-01 00:00:00 + k seconds`` for the user's k-th item (k from 0).
  amazon       ``user,item[,rating],timestamp``, comma or tab separated (detected per file from
               its first line), header optional (a first line whose last field is not a number),
               unix seconds (fractions allowed); every event is a ``purchase``; rating is
               checked to be a number, then dropped (the canonical schema has no rating).
  diginetica   ``;`` separated, detected by header: ``sessionId;userId;timeframe;eventdate;
               ordernumber;itemId`` (purchases) or ``sessionId;userId;itemId;timeframe;eventdate``
               (item views; snake_case spellings accepted). user_id = userId, or ``s<sessionId>``
               when it is NA; ts = eventdate + timeframe milliseconds. A ``itemId;categoryId`` file
               in the same input (e.g. the dataset directory) is joined as category.
  parquet/csv  The canonical schema by column name (any order, extra columns ignored): required
               ``user_id, item_id, event_type, ts``; optional ``session_id, category, device,
               segment, price`` (missing -> NULL). CSV ts is ISO-8601 (``2024-03-01T12:34:56Z``,
               ``2024-03-01 12:34:56``, offsets converted to UTC); Parquet ts may also be a
               TIMESTAMP / TIMESTAMPTZ / DATE column. Parquet rows have ``source_line`` NULL.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb

from recsys_assets.data.schema import CANONICAL_COLUMNS, RAW_EVENTS_COLUMNS

FORMATS: tuple[str, ...] = ("rees46", "retailrocket", "otto", "sasrec", "amazon", "diginetica", "parquet", "csv")

REQUIRED_CANONICAL: tuple[str, ...] = ("user_id", "item_id", "event_type", "ts")
OPTIONAL_CANONICAL: tuple[str, ...] = tuple(c for c in CANONICAL_COLUMNS if c not in REQUIRED_CANONICAL)

REES46_HEADER = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
RETAILROCKET_HEADER = ("timestamp", "visitorid", "event", "itemid", "transactionid")
# Diginetica headers, compared lower-cased with underscores removed.
DIGINETICA_PURCHASES = ("sessionid", "userid", "timeframe", "eventdate", "ordernumber", "itemid")
DIGINETICA_VIEWS = ("sessionid", "userid", "itemid", "timeframe", "eventdate")
DIGINETICA_CATEGORIES = ("itemid", "categoryid")

SASREC_EPOCH = "2000-01-01 00:00:00"

_HEAD_LINES = 20  # lines sniffed from Python per file (header / delimiter / format checks)
_HEAD_BYTES = 1 << 20
_LINE_DELIM = "\x1f"  # never a field separator in these formats: each physical line is one value
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_RECOVERED = 10_000  # rejected lines whose exact bytes are re-read from a plain file


class SourceFormatError(ValueError):
    """A file-level problem: the message names the file, the line (1-based) and what was expected."""

    def __init__(self, path: str | Path, line: int | None, expected: str, got: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.expected = expected
        self.got = got
        where = f"{self.path}, line {line}" if line is not None else self.path
        message = f"{where}: expected {expected}"
        if got is not None:
            message += f"; got {_shorten(got)!r}"
        super().__init__(message)


@dataclass(frozen=True)
class _SourceFile:
    path: Path
    name: str  # what `source` holds: the path relative to the input root
    gzip: bool


@dataclass(frozen=True)
class _Parsed:
    """A format's parse of one file: SQL over `lines(line_no, line)` yielding
    `line_no, parse_error, raw_line` and the canonical columns, in line order."""

    sql: str
    expected: str  # what a good line looks like, for SourceFormatError
    header_lines: int = 0


# --------------------------------------------------------------------------------------------
# Public entry point


def load_events(
    con: duckdb.DuckDBPyConnection, path: str | Path, fmt: str, table: str = "raw_events"
) -> int:
    """(Re)create `table` from the events at `path` (file, directory or glob) read as `fmt`.

    Returns the number of rows written. Row-level problems become rows with `parse_error`;
    file-level problems raise `SourceFormatError` and leave any previous `table` untouched.
    """
    fmt = fmt.lower().strip()
    if fmt not in FORMATS:
        hint = " (synthetic data is written by the generator as csv/parquet chunks)" if fmt == "synthetic" else ""
        raise ValueError(f"unknown source format {fmt!r}{hint}; expected one of {FORMATS}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
        raise ValueError(f"table name {table!r} is not a plain identifier")
    files = _resolve_files(path)

    # Load into a staging table and swap it in at the end, so that a file-level error half way
    # through a chunk directory leaves the previous table as it was. (No BEGIN/COMMIT here: a
    # caller may hold a transaction, and DuckDB cannot tell us so without aborting it.)
    for (stale,) in con.execute(  # left by a process killed mid-load
        "SELECT table_name FROM duckdb_tables() WHERE NOT temporary AND starts_with(table_name, ?)",
        [f"_{table}_loading_"],
    ).fetchall():
        con.execute(f'DROP TABLE IF EXISTS "{stale}"')
    staging = f"_{table}_loading_{uuid.uuid4().hex[:12]}"
    columns = ", ".join(f'"{c}" {t}' for c, t in RAW_EVENTS_COLUMNS.items())
    con.execute(f'CREATE TABLE "{staging}" ({columns})')
    try:
        if fmt == "parquet":
            total = _load_parquet(con, files, staging)
        elif fmt == "diginetica":
            total = _load_diginetica(con, files, staging)
        else:
            total = 0
            for file in files:
                total += _load_text(con, file, staging, total, _TEXT_FORMATS[fmt])
        con.execute(f'DROP TABLE IF EXISTS "{table}"')
        con.execute(f'ALTER TABLE "{staging}" RENAME TO "{table}"')
    except BaseException:
        _quietly(con, f'DROP TABLE IF EXISTS "{staging}"')
        raise
    return total


def _quietly(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Best-effort cleanup that must not hide the error being raised (e.g. in an aborted transaction)."""
    try:
        con.execute(sql)
    except duckdb.Error:
        pass


# --------------------------------------------------------------------------------------------
# Files


def _resolve_files(path: str | Path) -> list[_SourceFile]:
    text = os.path.expanduser(str(path))
    target = Path(text)
    if target.is_file():
        found = [(target, target.name)]
    elif target.is_dir():
        found = [
            (f, f.relative_to(target).as_posix())
            for f in target.rglob("*")
            if f.is_file() and not any(p.startswith((".", "_")) for p in f.relative_to(target).parts)
        ]
    elif glob.has_magic(text):
        root = _glob_root(text)
        found = [
            (Path(m), Path(m).relative_to(root).as_posix() if Path(m).is_relative_to(root) else Path(m).name)
            for m in glob.glob(text, recursive=True)
            if Path(m).is_file()
        ]
    else:
        raise SourceFormatError(text, None, "an existing file, directory or glob", "no such file or directory")
    if not found:
        raise SourceFormatError(text, None, "at least one event file", "no files")
    found.sort(key=lambda item: item[1])
    return [_SourceFile(p, name, _is_gzip(p)) for p, name in found]


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _head(file: _SourceFile) -> list[bytes]:
    """The first lines of the file (raw bytes, line endings stripped), decompressed if gzip."""
    opener = gzip.open if file.gzip else open
    lines: list[bytes] = []
    try:
        with opener(file.path, "rb") as fh:
            for _ in range(_HEAD_LINES):
                raw = fh.readline(_HEAD_BYTES)
                if not raw:
                    break
                lines.append(raw.rstrip(b"\r\n"))
    except (OSError, EOFError) as exc:
        raise SourceFormatError(file.path, None, "a readable (gzip) text file", str(exc)) from exc
    return lines


def _decode(raw: bytes, first: bool) -> str | None:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        return None


def _header(file: _SourceFile, head: list[bytes], expected: str) -> str:
    """Line 1 as text; a header format must have its header there."""
    text = _decode(head[0], first=True) if head else None
    if text is None:
        raise SourceFormatError(file.path, 1, expected, "bytes that are not UTF-8 text")
    return text


def _is_empty(head: list[bytes]) -> bool:
    return len(head) < _HEAD_LINES and not any(line.strip() for line in head)


# --------------------------------------------------------------------------------------------
# SQL snippets


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _nz(expr: str) -> str:
    """Empty text reads as NULL."""
    return f"nullif({expr}, '')"


# A CSV field (RFC 4180, on one line): quoted with doubled quotes inside, or unquoted without quotes.
_CSV_FIELD = '("(?:[^"]|"")*"|[^{d}"]*)'


def _split(delim: str, quoted: bool) -> tuple[str, str]:
    """SQL for the fields of `line` and for whether its quoting is well formed.

    DuckDB's CSV reader cannot say which line a parsed row came from (no file_row_number for CSV
    in 2.0.1) and silently skips blank lines, so lines are read whole and split here; quoted
    fields go through a regex only on the rare lines holding a quote.
    """
    plain = f"string_split(line, {_lit(delim)})"
    if not quoted:
        return plain, "true"
    field = _CSV_FIELD.format(d=re.escape(delim))
    whole = f"^{field}(?:{re.escape(delim)}{field})*$"
    unquote = "lambda v: CASE WHEN starts_with(v, '\"') THEN replace(v[2:-2], '\"\"', '\"') ELSE v END"
    fields = (
        f"CASE WHEN contains(line, '\"') THEN list_transform("
        f"regexp_extract_all(line || {_lit(delim)}, {_lit(field + re.escape(delim))}, 1), {unquote}) "
        f"ELSE {plain} END"
    )
    valid = f"CASE WHEN contains(line, '\"') THEN regexp_full_match(line, {_lit(whole)}) ELSE true END"
    return fields, valid


def _iso_ts(expr: str) -> str:
    """ISO-8601 text -> naive UTC TIMESTAMP. A TIMESTAMP cast ignores an offset, so text with one
    (a '+' or '-' after the date, or a UTC suffix) goes through TIMESTAMPTZ; 'Z' casts either way.
    Plain string tests, not a regex: this runs once per event."""
    after_date = f"substr({expr}, 11)"
    return (
        f"CASE WHEN contains({after_date}, '+') OR contains({after_date}, '-') OR ends_with({expr}, 'UTC') "
        f"THEN TRY_CAST({expr} AS TIMESTAMPTZ) AT TIME ZONE 'UTC' "
        f"ELSE TRY_CAST({expr} AS TIMESTAMP) END"
    )


def _epoch_ms(expr: str) -> str:
    return f"try(epoch_ms(TRY_CAST({expr} AS BIGINT)))"


def _epoch_s(expr: str) -> str:
    return f"try(make_timestamp(TRY_CAST(round(TRY_CAST({expr} AS DOUBLE) * 1000000) AS BIGINT)))"


def _unparsable(name: str, raw: str, parsed: str) -> tuple[str, str]:
    """A check: `raw` is present but did not parse."""
    return (
        f"{raw} IS NOT NULL AND {parsed} IS NULL",
        f"'malformed: unparsable {name} ' || '''' || left({raw}, 40) || ''''",
    )


def _fields_check(expected: int) -> tuple[str, str]:
    return (f"len(f) <> {expected}", f"'malformed: expected {expected} fields, got ' || len(f)")


_QUOTES_CHECK = ("NOT quotes_ok", "'malformed: unbalanced quotes'")


def _rows(typed_sql: str, checks: list[tuple[str, str]]) -> str:
    """Wrap a typed select (line_no, raw + canonical columns + helpers) into the parse contract:
    the first failing check becomes `parse_error`; a malformed row keeps only its raw text."""
    error = "CASE " + " ".join(f"WHEN {cond} THEN {msg}" for cond, msg in checks) + " END"
    canonical = ", ".join(f'CASE WHEN err IS NULL THEN "{c}" END AS "{c}"' for c in CANONICAL_COLUMNS)
    return f"""
      SELECT line_no, err AS parse_error, CASE WHEN err IS NOT NULL THEN raw END AS raw_line, {canonical}
      FROM (SELECT *, {error} AS err FROM ({typed_sql}))"""


def _select(fields: str, valid: str, columns: dict[str, str]) -> str:
    """A typed select over `lines`: `f` is the field list, `columns` the canonical (and helper) exprs."""
    cols = {c: "NULL" for c in CANONICAL_COLUMNS} | columns
    casts = {c: f"CAST({expr} AS {CANONICAL_COLUMNS[c]})" if c in CANONICAL_COLUMNS else expr for c, expr in cols.items()}
    body = ", ".join(f'{expr} AS "{c}"' for c, expr in casts.items())
    return f"SELECT line_no, raw, f, quotes_ok, {body} FROM (SELECT line_no, line AS raw, {fields} AS f, {valid} AS quotes_ok FROM lines)"


def _map_event(expr: str, mapping: dict[str, str]) -> str:
    """Source event names -> canonical ones; anything else is kept as read (cleaning quarantines it)."""
    whens = " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in mapping.items())
    return f"CASE {expr} {whens} ELSE {expr} END"


# --------------------------------------------------------------------------------------------
# Line-based formats


def _csv_header(line: str, delim: str = ",") -> list[str]:
    return [c.strip().lower() for c in next(csv.reader([line], delimiter=delim), [])]


def _parse_rees46(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = "the rees46 header " + ",".join(REES46_HEADER)
    header = _header(file, head, expected)
    if tuple(_csv_header(header)) != REES46_HEADER:
        raise SourceFormatError(file.path, 1, expected, header)
    fields, valid = _split(",", quoted=True)
    typed = _select(
        fields,
        valid,
        {
            "ts_raw": _nz("f[1]"),
            "ts": f"try_strptime({_nz('f[1]')}, ['%Y-%m-%d %H:%M:%S UTC', '%Y-%m-%d %H:%M:%S'])",
            "event_type": _nz("f[2]"),
            "item_id": _nz("f[3]"),
            "category": f"coalesce({_nz('f[5]')}, {_nz('f[4]')})",
            "price_raw": _nz("f[7]"),
            "price": f"TRY_CAST({_nz('f[7]')} AS DOUBLE)",
            "user_id": _nz("f[8]"),
            "session_id": _nz("f[9]"),
        },
    )
    checks = [
        _QUOTES_CHECK,
        _fields_check(len(REES46_HEADER)),
        _unparsable("event_time", "ts_raw", "ts"),
        _unparsable("price", "price_raw", "price"),
    ]
    return _Parsed(_rows(typed, checks), "9 comma-separated rees46 fields", header_lines=1)


def _parse_retailrocket(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = "the retailrocket header " + ",".join(RETAILROCKET_HEADER)
    header = _header(file, head, expected)
    if tuple(_csv_header(header)) != RETAILROCKET_HEADER:
        raise SourceFormatError(file.path, 1, expected, header)
    fields, valid = _split(",", quoted=True)
    typed = _select(
        fields,
        valid,
        {
            "ts_raw": _nz("f[1]"),
            "ts": _epoch_ms(_nz("f[1]")),
            "user_id": _nz("f[2]"),
            "event_type": _map_event(_nz("f[3]"), {"view": "view", "addtocart": "cart", "transaction": "purchase"}),
            "item_id": _nz("f[4]"),
        },
    )
    checks = [_QUOTES_CHECK, _fields_check(5), _unparsable("timestamp", "ts_raw", "ts")]
    return _Parsed(_rows(typed, checks), "5 comma-separated retailrocket fields", header_lines=1)


def _parse_amazon(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = "user,item[,rating],timestamp (3 or 4 comma- or tab-separated fields)"
    first_no, first = next(
        ((i + 1, t) for i, raw in enumerate(head) if raw.strip() and (t := _decode(raw, i == 0)) is not None),
        (1, None),
    )
    if first is None:
        raise SourceFormatError(file.path, 1, expected, "no readable line")
    delim = "\t" if "\t" in first else ","
    names = first.split(delim) if delim == "\t" else next(csv.reader([first]))
    if len(names) not in (3, 4):
        raise SourceFormatError(file.path, first_no, expected, first)
    n = len(names)
    has_header = first_no == 1 and not _is_number(names[-1])
    if has_header and not all(re.fullmatch(r'\s*"?[A-Za-z_][\w ]*"?\s*', name) for name in names):
        raise SourceFormatError(file.path, first_no, expected, first)  # neither a header nor an event
    fields, valid = _split(delim, quoted=delim == ",")
    columns = {
        "user_id": _nz("f[1]"),
        "item_id": _nz("f[2]"),
        "event_type": "'purchase'",
        "ts_raw": _nz(f"f[{n}]"),
        "ts": _epoch_s(_nz(f"f[{n}]")),
    }
    checks = [_QUOTES_CHECK, _fields_check(n), _unparsable("timestamp", "ts_raw", "ts")]
    if n == 4:
        columns |= {"rating_raw": _nz("f[3]"), "rating": f"TRY_CAST({_nz('f[3]')} AS DOUBLE)"}
        checks.append(_unparsable("rating", "rating_raw", "rating"))
    return _Parsed(_rows(_select(fields, valid, columns), checks), expected, header_lines=int(has_header))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_sasrec(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = "'user item item ...' separated by spaces"
    for i, raw in enumerate(head):
        text = _decode(raw, i == 0)
        if text and text.strip():
            if any(sep in text for sep in (",", ";", "{")):
                raise SourceFormatError(file.path, i + 1, expected, text)
            break
    # One row per item; a line without items is a single malformed row ([NULL] keeps it).
    typed = f"""
      SELECT line_no, raw, len(t) AS n, p,
        CAST(t[1] AS VARCHAR) AS user_id, CAST(t[p] AS VARCHAR) AS item_id, 'purchase' AS event_type,
        TIMESTAMP '{SASREC_EPOCH}' + to_seconds(p - 2) AS ts, CAST(NULL AS VARCHAR) AS session_id,
        CAST(NULL AS VARCHAR) AS category, CAST(NULL AS VARCHAR) AS device, CAST(NULL AS VARCHAR) AS segment,
        CAST(NULL AS DOUBLE) AS price
      FROM (
        SELECT line_no, line AS raw, t,
          unnest(CASE WHEN len(t) >= 2 THEN generate_series(2, len(t)) ELSE [NULL::BIGINT] END) AS p
        FROM (SELECT line_no, line, list_filter(regexp_split_to_array(line, '\\s+'), lambda v: v <> '') AS t
              FROM lines)
      )"""
    checks = [("n < 2", "'malformed: expected a user id and at least one item, got ' || n || ' field'")]
    return _Parsed(_rows(typed, checks), expected)


_OTTO_SCHEMA = '{"session": "VARCHAR", "events": [{"aid": "VARCHAR", "ts": "VARCHAR", "type": "VARCHAR"}]}'


def _parse_otto(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = 'JSON lines {"session": id, "events": [{"aid": id, "ts": ms, "type": "clicks|carts|orders"}]}'
    for i, raw in enumerate(head):
        text = _decode(raw, i == 0)
        if not text or not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue  # a malformed line is a row-level problem; look for a line that is JSON
        if not (isinstance(obj, dict) and "session" in obj and "events" in obj):
            raise SourceFormatError(file.path, i + 1, expected, text)
        break
    # from_json parses each line once; a line that is not such an object yields a single row.
    typed = f"""
      SELECT line_no, CASE WHEN bad_line OR e IS NULL THEN raw ELSE CAST(to_json(e) AS VARCHAR) END AS raw,
        j IS NULL AS not_json, bad_line, e IS NULL AS no_event,
        CAST(j.session AS VARCHAR) AS user_id, CAST(e.aid AS VARCHAR) AS item_id,
        {_map_event("e.type", {"clicks": "view", "carts": "cart", "orders": "purchase"})} AS event_type,
        e.ts AS ts_raw, {_epoch_ms("e.ts")} AS ts, CAST(j.session AS VARCHAR) AS session_id,
        CAST(NULL AS VARCHAR) AS category, CAST(NULL AS VARCHAR) AS device, CAST(NULL AS VARCHAR) AS segment,
        CAST(NULL AS DOUBLE) AS price
      FROM (
        SELECT line_no, raw, j, bad_line, unnest(CASE WHEN bad_line THEN [NULL] ELSE j.events END) AS e
        FROM (
          SELECT line_no, line AS raw, j, j IS NULL OR j.session IS NULL OR j.events IS NULL AS bad_line
          FROM (SELECT line_no, line, try(from_json(line, {_lit(_OTTO_SCHEMA)})) AS j FROM lines)
        )
      )"""
    checks = [
        ("not_json", "'malformed: invalid JSON'"),
        ("bad_line", "'malformed: expected {\"session\": ..., \"events\": [...]}'"),
        ("no_event", "'malformed: event is not an object'"),
        _unparsable("ts", "ts_raw", "ts"),
    ]
    return _Parsed(_rows(typed, checks), expected)


def _parse_csv(file: _SourceFile, head: list[bytes]) -> _Parsed:
    expected = "a CSV header naming " + ", ".join(REQUIRED_CANONICAL) + " (optional: " + ", ".join(OPTIONAL_CANONICAL) + ")"
    header = _header(file, head, expected)
    names = _csv_header(header)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = [c for c in REQUIRED_CANONICAL if c not in names]
    if missing or duplicated:
        problem = f"missing {missing}" if missing else f"duplicated {duplicated}"
        raise SourceFormatError(file.path, 1, expected, f"{header} ({problem})")
    pos = {n: i + 1 for i, n in enumerate(names)}
    raw = {c: _nz(f"f[{pos[c]}]") if c in pos else "NULL" for c in CANONICAL_COLUMNS}
    fields, valid = _split(",", quoted=True)
    columns = {c: raw[c] for c in CANONICAL_COLUMNS} | {
        "ts_raw": raw["ts"],
        "ts": _iso_ts(raw["ts"]),
        "price_raw": raw["price"],
        "price": f"TRY_CAST({raw['price']} AS DOUBLE)",
    }
    checks = [
        _QUOTES_CHECK,
        _fields_check(len(names)),
        _unparsable("ts", "ts_raw", "ts"),
        _unparsable("price", "price_raw", "price"),
    ]
    return _Parsed(_rows(_select(fields, valid, columns), checks), f"{len(names)} comma-separated fields", header_lines=1)


_TEXT_FORMATS: dict[str, Callable[[_SourceFile, list[bytes]], _Parsed]] = {
    "rees46": _parse_rees46,
    "retailrocket": _parse_retailrocket,
    "otto": _parse_otto,
    "sasrec": _parse_sasrec,
    "amazon": _parse_amazon,
    "csv": _parse_csv,
}


def _load_text(
    con: duckdb.DuckDBPyConnection,
    file: _SourceFile,
    table: str,
    first_id: int,
    parse: Callable[[_SourceFile, list[bytes]], _Parsed],
    category_table: str | None = None,
) -> int:
    """Append one line-based file to `table`; returns its rows."""
    head = _head(file)
    if _is_empty(head):
        return 0
    parsed = parse(file, head)
    try:
        rows = _insert_lines(con, file, file.path, file.gzip, table, first_id, parsed, category_table)
    except duckdb.InvalidInputException as exc:
        if "state machine" not in str(exc):
            raise SourceFormatError(file.path, None, "a readable text file", str(exc).splitlines()[0]) from exc
        # DuckDB's strict reader refuses a file that mixes line endings (and its lenient mode counts a
        # CRLF as two breaks): read a copy where every CR, LF or CRLF is one LF, i.e. the lines
        # Python's universal newlines see. Rare, so a streamed copy (under $TMPDIR) is acceptable.
        with tempfile.TemporaryDirectory(prefix="recsys-lines-") as tmp:
            plain = Path(tmp) / "lines.txt"
            try:
                _normalize_newlines(file, plain)
            except (OSError, EOFError) as read_exc:
                raise SourceFormatError(file.path, None, "a readable (gzip) text file", str(read_exc)) from read_exc
            rows = _insert_lines(con, file, plain, False, table, first_id, parsed, category_table)
    except duckdb.IOException as exc:
        raise SourceFormatError(file.path, None, "a readable (gzip) text file", str(exc).splitlines()[0]) from exc
    _check_something_parsed(con, file, table, first_id, parsed.expected)
    return rows


def _normalize_newlines(file: _SourceFile, target: Path) -> None:
    opener = gzip.open if file.gzip else open
    with opener(file.path, "rb") as src, open(target, "wb") as dst:
        carry = b""
        while chunk := src.read(1 << 22):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""  # may be the first half of a CRLF
            if carry:
                chunk = chunk[:-1]
            dst.write(chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        if carry:
            dst.write(b"\n")


def _insert_lines(
    con: duckdb.DuckDBPyConnection,
    file: _SourceFile,
    scan_path: Path,
    compressed: bool,
    table: str,
    first_id: int,
    parsed: _Parsed,
    category_table: str | None,
) -> int:
    """Insert the parsed events of the lines of `scan_path` (the file, or its normalised copy)."""
    rejects = f"_src_rejects_{uuid.uuid4().hex}"
    # Every physical line as one VARCHAR (no quoting, a separator that never occurs): DuckDB's
    # parallel CSV scanner keeps line order, so row_number() is the line number. Lines it cannot
    # read (invalid UTF-8, over-long) land in the rejects table instead and are merged back after.
    lines = f"""
      lines AS (
        SELECT line_no, CASE WHEN line_no = 1 THEN trim(line, chr(65279) || chr(13))
                             WHEN ends_with(line, chr(13)) THEN rtrim(line, chr(13)) ELSE line END AS line
        FROM (
          SELECT row_number() OVER () AS line_no, line
          FROM read_csv({_lit(str(scan_path))}, columns = {{'line': 'VARCHAR'}}, header = false,
                        auto_detect = false, delim = {_lit(_LINE_DELIM)}, quote = '', escape = '',
                        compression = '{"gzip" if compressed else "none"}', store_rejects = true,
                        rejects_table = '{rejects}', rejects_scan = '{rejects}_scan')
        )
        WHERE line_no > {parsed.header_lines}
          AND CASE WHEN ascii(line) > 32 THEN true ELSE trim(line, ' ' || chr(9) || chr(13)) <> '' END
      )"""
    canonical = ", ".join(f'"{c}"' for c in CANONICAL_COLUMNS)
    numbered = f"""
      SELECT {first_id} + row_number() OVER () - 1 AS event_id, {_lit(file.name)} AS source,
        line_no AS source_line, parse_error, raw_line, {canonical}
      FROM ({parsed.sql})"""
    if category_table:  # joined after numbering: a join may reorder rows
        pick = ", ".join(
            'coalesce(n."category", c."category") AS "category"' if col == "category" else f'n."{col}"'
            for col in RAW_EVENTS_COLUMNS
        )
        numbered = f"""SELECT {pick} FROM ({numbered}) n LEFT JOIN {category_table} c ON c.item_id = n.item_id"""
    try:
        good = con.execute(f'INSERT INTO "{table}" WITH {lines} {numbered}').fetchall()[0][0]
        return good + _merge_rejects(con, file, None if compressed else scan_path, table, first_id, good, rejects)
    finally:
        _quietly(con, f"DROP TABLE IF EXISTS {rejects}")
        _quietly(con, f"DROP TABLE IF EXISTS {rejects}_scan")


def _merge_rejects(
    con: duckdb.DuckDBPyConnection,
    file: _SourceFile,
    plain: Path | None,
    table: str,
    first_id: int,
    good: int,
    rejects: str,
) -> int:
    """Put the lines DuckDB could not read back as malformed rows, at their place.

    Rows were numbered as if those lines did not exist; a rejected line L_j (j-th, in order) sits
    after the rows of the first L_j - j readable lines, so a row numbered k moves down by
    #{j : L_j - j < k}, and event ids of the rows from the first rejected line on are re-dealt.
    This path only runs for files holding such lines. Returns the rows added.
    """
    if con.execute(f"SELECT count(*) FROM {rejects}").fetchall()[0][0] == 0:
        return 0
    shifted = f"{rejects}_lines"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {shifted} AS
        SELECT line, row_number() OVER (ORDER BY line) AS j, error_type, text FROM (
          SELECT line, min(error_type) AS error_type, min(csv_line) AS text FROM {rejects} GROUP BY line
        )"""
    )
    try:
        if plain is not None:
            _recover_rejected_text(con, plain, rejects, shifted)
        first_line = con.execute(f"SELECT min(line) FROM {shifted}").fetchall()[0][0]
        con.execute(
            f"""
            UPDATE "{table}" t SET source_line = t.source_line
              + (SELECT count(*) FROM {shifted} r WHERE r.line - r.j < t.source_line)
            WHERE t.event_id >= {first_id} AND t.source_line >= {first_line}"""
        )
        reason = (
            "CASE error_type WHEN 'INVALID ENCODING' THEN 'malformed: bytes that are not UTF-8' "
            "WHEN 'LINE SIZE OVER MAXIMUM' THEN 'malformed: line too long' "
            "ELSE 'malformed: unreadable line (' || lower(error_type) || ')' END"
        )
        nulls = ", ".join("NULL" for _ in CANONICAL_COLUMNS)
        con.execute(
            f"""
            INSERT INTO "{table}"
            SELECT {first_id + good} + j - 1, {_lit(file.name)}, line, {reason},
              trim(text, chr(10) || chr(13)), {nulls}
            FROM {shifted}"""
        )
        tail = con.execute(
            f'SELECT min(event_id) FROM "{table}" WHERE event_id >= {first_id} AND source_line >= {first_line}'
        ).fetchall()[0][0]
        con.execute(
            f"""
            UPDATE "{table}" t SET event_id = r.new_id
            FROM (SELECT event_id AS old_id,
                         {tail} + row_number() OVER (ORDER BY source_line, event_id) - 1 AS new_id
                  FROM "{table}" WHERE event_id >= {tail}) r
            WHERE t.event_id = r.old_id AND r.old_id <> r.new_id"""
        )
        return con.execute(f"SELECT count(*) FROM {shifted}").fetchall()[0][0]
    finally:
        _quietly(con, f"DROP TABLE IF EXISTS {shifted}")


def _recover_rejected_text(con: duckdb.DuckDBPyConnection, plain: Path, rejects: str, shifted: str) -> None:
    """DuckDB shows undecodable bytes as '?' (and may swallow a separator with them); for a plain
    file, re-read those few lines by byte offset so `raw_line` shows them as \\xNN escapes.

    The reported offset may sit on the line break before the line or a byte into it, so the line
    is found around it; the re-read text is used only if it starts like DuckDB's (up to its '?').
    """
    spots = con.execute(
        f"SELECT line, min(line_byte_position), min(csv_line) FROM {rejects} GROUP BY line ORDER BY line "
        f"LIMIT {_MAX_RECOVERED}"
    ).fetchall()
    texts: list[tuple[int, str]] = []
    with open(plain, "rb") as fh:
        for line, offset, shown in spots:
            start = max(0, offset - 4096)
            fh.seek(start)
            window = fh.read(offset - start + _HEAD_BYTES)
            at = offset - start
            if window[at : at + 1] in (b"\r", b"\n"):
                while window[at : at + 1] in (b"\r", b"\n"):
                    at += 1
            else:
                at = window.rfind(b"\n", 0, at) + 1
            raw = window[at:].split(b"\n", 1)[0].rstrip(b"\r")
            text = raw.decode("utf-8", "backslashreplace")
            if text.startswith((shown or "").strip("\r\n").split("?", 1)[0]):
                texts.append((line, text))
    if not texts:
        return
    recovered = f"{shifted}_text"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {recovered} (line BIGINT, text VARCHAR)")
    try:
        con.executemany(f"INSERT INTO {recovered} VALUES (?, ?)", texts)
        con.execute(f"UPDATE {shifted} s SET text = r.text FROM {recovered} r WHERE s.line = r.line")
    finally:
        _quietly(con, f"DROP TABLE IF EXISTS {recovered}")


def _check_something_parsed(
    con: duckdb.DuckDBPyConnection, file: _SourceFile, table: str, first_id: int, expected: str
) -> None:
    """A file with rows but not one that parses is the wrong format, not bad rows."""
    total, good, line, error, raw = con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE parse_error IS NULL),
                   arg_min(source_line, event_id), arg_min(parse_error, event_id), arg_min(raw_line, event_id)
            FROM "{table}" WHERE event_id >= {first_id}"""
    ).fetchall()[0]
    if total and not good:
        raise SourceFormatError(file.path, line, expected, f"{raw} ({error})")


# --------------------------------------------------------------------------------------------
# Diginetica: several files told apart by header, one optional category map


def _load_diginetica(con: duckdb.DuckDBPyConnection, files: list[_SourceFile], table: str) -> int:
    expected = (
        "a diginetica header: sessionId;userId;timeframe;eventdate;ordernumber;itemId, "
        "sessionId;userId;itemId;timeframe;eventdate or itemId;categoryId"
    )
    kinds: list[tuple[_SourceFile, str]] = []
    for file in files:
        head = _head(file)
        if _is_empty(head):
            continue
        header = _header(file, head, expected)
        names = tuple(n.replace("_", "") for n in _csv_header(header, ";"))
        kind = {DIGINETICA_PURCHASES: "purchase", DIGINETICA_VIEWS: "view", DIGINETICA_CATEGORIES: "category"}.get(names)
        if kind is None:
            raise SourceFormatError(file.path, 1, expected, header)
        kinds.append((file, kind))

    category_table = None
    category_files = [f for f, kind in kinds if kind == "category"]
    if category_files:
        category_table = f"_src_categories_{uuid.uuid4().hex}"
        paths = "[" + ", ".join(_lit(str(f.path)) for f in category_files) + "]"
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
                total += _load_text(con, file, table, total, _diginetica_parser(kind), category_table)
    finally:
        if category_table:
            _quietly(con, f"DROP TABLE IF EXISTS {category_table}")
    return total


def _diginetica_parser(kind: str) -> Callable[[_SourceFile, list[bytes]], _Parsed]:
    # Column positions (1-based) of each file kind.
    pos = (
        {"session": 1, "user": 2, "timeframe": 3, "date": 4, "item": 6}
        if kind == "purchase"
        else {"session": 1, "user": 2, "item": 3, "timeframe": 4, "date": 5}
    )
    n = len(DIGINETICA_PURCHASES) if kind == "purchase" else len(DIGINETICA_VIEWS)

    def parse(file: _SourceFile, head: list[bytes]) -> _Parsed:
        session, user = _nz(f"f[{pos['session']}]"), _nz(f"f[{pos['user']}]")
        date_raw, frame_raw = _nz(f"f[{pos['date']}]"), _nz(f"f[{pos['timeframe']}]")
        fields, valid = _split(";", quoted=False)
        typed = _select(
            fields,
            valid,
            {
                "session_id": session,
                "user_id": f"CASE WHEN {user} IS NULL OR {user} = 'NA' THEN 's' || {session} ELSE {user} END",
                "item_id": _nz(f"f[{pos['item']}]"),
                "event_type": _lit(kind),
                "date_raw": date_raw,
                "date": f"TRY_CAST({date_raw} AS DATE)",
                "frame_raw": frame_raw,
                "frame": f"TRY_CAST({frame_raw} AS BIGINT)",
                "ts": f"try(TRY_CAST({date_raw} AS DATE) + to_milliseconds(TRY_CAST({frame_raw} AS BIGINT)))",
            },
        )
        checks = [
            _fields_check(n),
            _unparsable("eventdate", "date_raw", "date"),
            _unparsable("timeframe", "frame_raw", "frame"),
        ]
        return _Parsed(_rows(typed, checks), f"{n} ';'-separated diginetica fields", header_lines=1)

    return parse


# --------------------------------------------------------------------------------------------
# Parquet in the canonical schema

_NUMERIC = re.compile(r"^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|UHUGEINT|FLOAT|DOUBLE|DECIMAL.*)$")


def _parquet_select(con: duckdb.DuckDBPyConnection, file: _SourceFile) -> tuple[str, str]:
    """The file's canonical projection (SQL over its columns and `err`) and its row-check SQL,
    from its schema; raises `SourceFormatError` naming the file when the schema cannot work."""
    src = f"read_parquet({_lit(str(file.path))})"
    try:
        schema = {r[0].lower(): (r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    except duckdb.Error as exc:
        raise SourceFormatError(file.path, None, "a Parquet file", str(exc).splitlines()[0]) from exc
    missing = [c for c in REQUIRED_CANONICAL if c not in schema]
    if missing:
        raise SourceFormatError(
            file.path, None, f"Parquet columns {', '.join(REQUIRED_CANONICAL)}", f"no column {', '.join(missing)}"
        )
    exprs: dict[str, str] = {}
    checks: list[tuple[str, str]] = []
    for col, sql_type in CANONICAL_COLUMNS.items():
        if col not in schema:
            exprs[col] = f"CAST(NULL AS {sql_type})"
            continue
        name, kind = schema[col]
        ref = f'"{name}"'
        if col == "ts":
            if kind.startswith("TIMESTAMP WITH TIME ZONE"):
                exprs[col] = f"{ref} AT TIME ZONE 'UTC'"
            elif kind.startswith(("TIMESTAMP", "DATE")):
                exprs[col] = f"CAST({ref} AS TIMESTAMP)"
            elif kind == "VARCHAR":
                exprs[col] = _iso_ts(ref)
                checks.append(_unparsable("ts", ref, _iso_ts(ref)))
            else:
                raise SourceFormatError(file.path, None, "column ts as TIMESTAMP, DATE or ISO-8601 text", kind)
        elif col == "price":
            if _NUMERIC.match(kind):
                exprs[col] = f"CAST({ref} AS DOUBLE)"
            elif kind == "VARCHAR":
                exprs[col] = f"TRY_CAST({_nz(ref)} AS DOUBLE)"
                checks.append(_unparsable("price", _nz(ref), exprs[col]))
            else:
                raise SourceFormatError(file.path, None, "column price as a number", kind)
        else:
            exprs[col] = _nz(f"CAST({ref} AS VARCHAR)")
    error = ("CASE " + " ".join(f"WHEN {c} THEN {m}" for c, m in checks) + " END") if checks else "NULL"
    present = ", ".join(f"'{c}': \"{schema[c][0]}\"" for c in CANONICAL_COLUMNS if c in schema)
    canonical = ", ".join(f'CASE WHEN err IS NULL THEN {exprs[c]} END AS "{c}"' for c in CANONICAL_COLUMNS)
    select = f"err, CASE WHEN err IS NOT NULL THEN CAST({{{present}}} AS VARCHAR) END, {canonical}"
    return select, error


def _load_parquet(con: duckdb.DuckDBPyConnection, files: list[_SourceFile], table: str) -> int:
    # Files with the same schema load in one statement: DuckDB then scans them in parallel (a
    # file written as one row group is otherwise read by one thread). event_id = the file's offset
    # + its row number, so ids are the same as loading file by file.
    plans = [(file, *_parquet_select(con, file)) for file in files]
    total = 0
    start = 0
    while start < len(plans):
        end = start + 1
        while end < len(plans) and plans[end][1:] == plans[start][1:]:
            end += 1
        group = plans[start:end]
        try:
            total += _insert_parquet_group(con, [g[0] for g in group], group[0][1], group[0][2], table, total)
        except SourceFormatError:
            raise
        except duckdb.Error as exc:
            # a failed INSERT leaves nothing behind; name the file by loading them one at a time
            if len(group) == 1:
                raise SourceFormatError(group[0][0].path, None, "a readable Parquet file", str(exc).splitlines()[0]) from exc
            for file, select, error in group:
                total += _insert_parquet_group(con, [file], select, error, table, total)
        start = end
    return total


def _insert_parquet_group(
    con: duckdb.DuckDBPyConnection, files: list[_SourceFile], select: str, error: str, table: str, first_id: int
) -> int:
    paths = [str(f.path) for f in files]
    listed = "[" + ", ".join(_lit(p) for p in paths) + "]"
    try:
        counts = dict(
            con.execute(f"SELECT file_name, num_rows FROM parquet_file_metadata({listed})").fetchall()
        )
    except duckdb.Error as exc:
        if len(files) == 1:
            raise SourceFormatError(files[0].path, None, "a Parquet file", str(exc).splitlines()[0]) from exc
        raise
    offsets: list[tuple[str, str, int]] = []
    offset = first_id
    for f, p in zip(files, paths):
        offsets.append((p, f.name, offset))
        offset += int(counts.get(p, 0))
    values = ", ".join(f"({_lit(p)}, {_lit(n)}, {o})" for p, n, o in offsets)
    inserted = con.execute(
        f"""
        INSERT INTO "{table}"
        SELECT o.first_id + file_row_number, o.name, NULL, {select}
        FROM (SELECT *, {error} AS err FROM read_parquet({listed}, filename = '_recsys_file', file_row_number = true)) r
        JOIN (VALUES {values}) o(path, name, first_id) ON r._recsys_file = o.path"""
    ).fetchall()[0][0]
    if inserted != offset - first_id:
        raise SourceFormatError(
            files[0].path if len(files) == 1 else Path(os.path.commonpath(paths)), None,
            f"{offset - first_id} rows (Parquet metadata)", f"{inserted} rows read",
        )
    # one pass for the whole group: a file with rows but not one that parses is the wrong format
    found = {
        name: row
        for name, *row in con.execute(
            f"""SELECT source, count(*), count(*) FILTER (WHERE parse_error IS NULL),
                       arg_min(parse_error, event_id), arg_min(raw_line, event_id)
                FROM "{table}" WHERE event_id >= {first_id} GROUP BY source"""
        ).fetchall()
    }
    for file in files:
        rows, good, error, raw = found.get(file.name, (0, 0, None, None))
        if rows and not good:
            raise SourceFormatError(file.path, None, "canonical Parquet rows", f"{raw} ({error})")
    return int(inserted)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
