"""What every source format shares: `load_events`, the format registry, file resolution and sniffing,
SQL helpers, and loading line-based files (with DuckDB's rejected lines put back as malformed rows)."""

from __future__ import annotations

import csv
import glob
import gzip
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb

from recsys_assets.data.schema import RAW_EVENTS_COLUMNS
from recsys_serving.contract import CANONICAL_COLUMNS

FORMATS: tuple[str, ...] = ("rees46", "retailrocket", "otto", "sasrec", "amazon", "diginetica", "parquet", "csv")

REQUIRED_CANONICAL: tuple[str, ...] = ("user_id", "item_id", "event_type", "ts")
OPTIONAL_CANONICAL: tuple[str, ...] = tuple(c for c in CANONICAL_COLUMNS if c not in REQUIRED_CANONICAL)

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
class SourceFile:
    path: Path
    name: str  # what `source` holds: the path relative to the input root
    gzip: bool


@dataclass(frozen=True)
class Parsed:
    """A format's parse of one file: SQL over `lines(line_no, line)` yielding
    `line_no, parse_error, raw_line` and the canonical columns, in line order."""

    sql: str
    expected: str  # what a good line looks like, for SourceFormatError
    header_lines: int = 0


# A line-based format: (file, its first lines) -> its parse; raises SourceFormatError for a wrong file.
Parser = Callable[[SourceFile, list[bytes]], Parsed]
# A format's loader: appends the events of the files to the table, returns the rows added.
Loader = Callable[[duckdb.DuckDBPyConnection, list[SourceFile], str], int]

# Format name -> loader. Each format module registers itself; the package imports them all, and
# importing this module imports the package first, so the registry is complete before any load.
LOADERS: dict[str, Loader] = {}


def register(fmt: str, loader: Loader) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not listed in FORMATS")
    LOADERS[fmt] = loader


def register_text(fmt: str, parse: Parser) -> None:
    """Register a format whose files each load on their own, one line-based parse per file."""

    def load(con: duckdb.DuckDBPyConnection, files: list[SourceFile], table: str) -> int:
        total = 0
        for file in files:
            total += load_text(con, file, table, total, parse)
        return total

    register(fmt, load)


# --------------------------------------------------------------------------------------------
# Public entry point


def load_events(
    con: duckdb.DuckDBPyConnection, path: str | Path, fmt: str, table: str = "raw_events"
) -> int:
    """(Re)create `table` from the events at `path` (file, directory or glob) read as `fmt`.

    Returns the number of rows written. Row-level problems become rows with `parse_error`;
    file-level problems raise `SourceFormatError` and leave any previous `table` untouched.

    `path` is a file, a directory of chunk files (recursively, in sorted path order, skipping names
    that start with ``.`` or ``_`` such as ``_SUCCESS``) or a glob, gzip or plain; `table` gets
    exactly the columns of ``schema.RAW_EVENTS_COLUMNS``. Everything runs in DuckDB's own readers
    and SQL, out of core: Python only reads the first lines of each file (header and format
    checks), re-reads the few lines DuckDB could not decode (to keep their bytes) and, for a file
    mixing line endings, streams a normalised copy.

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
      yields an empty table; the ingest asset check reports that.
    * ``event_id`` is the 0-based position of the event in the source: files in sorted order, then
      lines, then (for otto / sasrec, several events a line) the order within the line. Dense.
    * ``source`` is the file's path relative to the directory or glob root (its name for a file).
    * Each line is one record: a quoted CSV field holding a newline is not supported (its lines
      become malformed rows). LF, CRLF and CR files are read as such; a file that mixes them is
      read through a normalised copy (under ``$TMPDIR``) whose lines are those of Python's
      universal newlines (any CR, LF or CRLF ends a line).
    * Call it outside an explicit transaction, or the caller's transaction owns the outcome: the
      table is built under a staging name and swapped in at the end.
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
        total = LOADERS[fmt](con, files, staging)
        con.execute(f'DROP TABLE IF EXISTS "{table}"')
        con.execute(f'ALTER TABLE "{staging}" RENAME TO "{table}"')
    except BaseException:
        quietly(con, f'DROP TABLE IF EXISTS "{staging}"')
        raise
    return total


def quietly(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Best-effort cleanup that must not hide the error being raised (e.g. in an aborted transaction)."""
    try:
        con.execute(sql)
    except duckdb.Error:
        pass


# --------------------------------------------------------------------------------------------
# Files


def _resolve_files(path: str | Path) -> list[SourceFile]:
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
    return [SourceFile(p, name, _is_gzip(p)) for p, name in found]


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def read_head(file: SourceFile) -> list[bytes]:
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


def decode(raw: bytes, first: bool) -> str | None:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        return None


def text_lines(head: list[bytes]) -> list[tuple[int, str]]:
    """The first lines that decode and are not blank, as (1-based line number, text)."""
    texts = ((i + 1, decode(raw, i == 0)) for i, raw in enumerate(head))
    return [(no, text) for no, text in texts if text and text.strip()]


def header(file: SourceFile, head: list[bytes], expected: str) -> str:
    """Line 1 as text; a header format must have its header there."""
    text = decode(head[0], first=True) if head else None
    if text is None:
        raise SourceFormatError(file.path, 1, expected, "bytes that are not UTF-8 text")
    return text


def csv_header(line: str, delim: str = ",") -> list[str]:
    return [c.strip().lower() for c in next(csv.reader([line], delimiter=delim), [])]


def expect_header(file: SourceFile, head: list[bytes], fmt: str, names: tuple[str, ...]) -> None:
    """A format with a fixed comma-separated header: line 1 must name exactly `names`."""
    expected = f"the {fmt} header " + ",".join(names)
    text = header(file, head, expected)
    if tuple(csv_header(text)) != names:
        raise SourceFormatError(file.path, 1, expected, text)


def is_empty(head: list[bytes]) -> bool:
    return len(head) < _HEAD_LINES and not any(line.strip() for line in head)


# --------------------------------------------------------------------------------------------
# SQL snippets


def lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def nz(expr: str) -> str:
    """Empty text reads as NULL."""
    return f"nullif({expr}, '')"


def to_double(expr: str) -> str:
    return f"TRY_CAST({expr} AS DOUBLE)"


# A CSV field (RFC 4180, on one line): quoted with doubled quotes inside, or unquoted without quotes.
_CSV_FIELD = '("(?:[^"]|"")*"|[^{d}"]*)'


def _split(delim: str, quoted: bool) -> tuple[str, str]:
    """SQL for the fields of `line` and for whether its quoting is well formed.

    DuckDB's CSV reader cannot say which line a parsed row came from (no file_row_number for CSV
    in 2.0.1) and silently skips blank lines, so lines are read whole and split here; quoted
    fields go through a regex only on the rare lines holding a quote.
    """
    plain = f"string_split(line, {lit(delim)})"
    if not quoted:
        return plain, "true"
    field = _CSV_FIELD.format(d=re.escape(delim))
    whole = f"^{field}(?:{re.escape(delim)}{field})*$"
    unquote = "lambda v: CASE WHEN starts_with(v, '\"') THEN replace(v[2:-2], '\"\"', '\"') ELSE v END"
    fields = (
        f"CASE WHEN contains(line, '\"') THEN list_transform("
        f"regexp_extract_all(line || {lit(delim)}, {lit(field + re.escape(delim))}, 1), {unquote}) "
        f"ELSE {plain} END"
    )
    valid = f"CASE WHEN contains(line, '\"') THEN regexp_full_match(line, {lit(whole)}) ELSE true END"
    return fields, valid


def iso_ts(expr: str) -> str:
    """ISO-8601 text -> naive UTC TIMESTAMP. A TIMESTAMP cast ignores an offset, so text with one
    (a '+' or '-' after the date, or a UTC suffix) goes through TIMESTAMPTZ; 'Z' casts either way.
    Plain string tests, not a regex: this runs once per event."""
    after_date = f"substr({expr}, 11)"
    return (
        f"CASE WHEN contains({after_date}, '+') OR contains({after_date}, '-') OR ends_with({expr}, 'UTC') "
        f"THEN TRY_CAST({expr} AS TIMESTAMPTZ) AT TIME ZONE 'UTC' "
        f"ELSE TRY_CAST({expr} AS TIMESTAMP) END"
    )


def epoch_ms(expr: str) -> str:
    return f"try(epoch_ms(TRY_CAST({expr} AS BIGINT)))"


def unparsable(name: str, raw: str, parsed: str) -> tuple[str, str]:
    """A check: `raw` is present but did not parse."""
    return (
        f"{raw} IS NOT NULL AND {parsed} IS NULL",
        f"'malformed: unparsable {name} ' || '''' || left({raw}, 40) || ''''",
    )


def null_columns(*names: str) -> str:
    """Select-list items for canonical columns a format never has: typed NULLs."""
    return ", ".join(f'CAST(NULL AS {CANONICAL_COLUMNS[c]}) AS "{c}"' for c in names)


def map_event(expr: str, mapping: dict[str, str]) -> str:
    """Source event names -> canonical ones; anything else is kept as read (cleaning quarantines it)."""
    whens = " ".join(f"WHEN {lit(k)} THEN {lit(v)}" for k, v in mapping.items())
    return f"CASE {expr} {whens} ELSE {expr} END"


def rows(typed_sql: str, checks: list[tuple[str, str]]) -> str:
    """Wrap a typed select (line_no, raw + canonical columns + helpers) into the parse contract:
    the first failing check becomes `parse_error`; a malformed row keeps only its raw text."""
    error = "CASE " + " ".join(f"WHEN {cond} THEN {msg}" for cond, msg in checks) + " END"
    canonical = ", ".join(f'CASE WHEN err IS NULL THEN "{c}" END AS "{c}"' for c in CANONICAL_COLUMNS)
    return f"""
      SELECT line_no, err AS parse_error, CASE WHEN err IS NOT NULL THEN raw END AS raw_line, {canonical}
      FROM (SELECT *, {error} AS err FROM ({typed_sql}))"""


@dataclass(frozen=True)
class Checked:
    """A column read from text that must parse: a row whose `raw` text (SQL) is present but whose
    `parse(raw)` is NULL is malformed, ``unparsable <label>``."""

    label: str
    raw: str
    parse: Callable[[str], str]


def delimited(
    delim: str,
    n_fields: int,
    columns: dict[str, str | Checked],
    expected: str,
    *,
    quoted: bool = True,
    header_lines: int = 1,
) -> Parsed:
    """The parse of a file of `delim`-separated lines of `n_fields` fields each.

    `columns` maps canonical columns (absent ones are NULL) and helper columns to SQL over the
    field list `f` (1-based, e.g. ``nz("f[2]")``). The checks, first failing one wins: quoting
    (when `quoted`: RFC 4180 fields), the field count, then the `Checked` columns in order.
    """
    fields, valid = _split(delim, quoted)
    exprs: dict[str, str] = {c: "NULL" for c in CANONICAL_COLUMNS}
    checks = [("NOT quotes_ok", "'malformed: unbalanced quotes'")] if quoted else []
    checks.append((f"len(f) <> {n_fields}", f"'malformed: expected {n_fields} fields, got ' || len(f)"))
    for name, spec in columns.items():
        if isinstance(spec, Checked):
            exprs[f"{name}_raw"] = spec.raw
            exprs[name] = spec.parse(spec.raw)
            checks.append(unparsable(spec.label, f"{name}_raw", name))
        else:
            exprs[name] = spec
    casts = {c: f"CAST({e} AS {CANONICAL_COLUMNS[c]})" if c in CANONICAL_COLUMNS else e for c, e in exprs.items()}
    body = ", ".join(f'{e} AS "{c}"' for c, e in casts.items())
    typed = (
        f"SELECT line_no, raw, f, quotes_ok, {body} "
        f"FROM (SELECT line_no, line AS raw, {fields} AS f, {valid} AS quotes_ok FROM lines)"
    )
    return Parsed(rows(typed, checks), expected, header_lines)


# --------------------------------------------------------------------------------------------
# Loading line-based files


def load_text(
    con: duckdb.DuckDBPyConnection,
    file: SourceFile,
    table: str,
    first_id: int,
    parse: Parser,
    category_table: str | None = None,
) -> int:
    """Append one line-based file to `table`; returns its rows. `category_table` (item_id,
    category), when given, fills the category of events that have none."""
    first = read_head(file)
    if is_empty(first):
        return 0
    parsed = parse(file, first)
    try:
        added = _insert_lines(con, file, file.path, file.gzip, table, first_id, parsed, category_table)
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
            added = _insert_lines(con, file, plain, False, table, first_id, parsed, category_table)
    except duckdb.IOException as exc:
        raise SourceFormatError(file.path, None, "a readable (gzip) text file", str(exc).splitlines()[0]) from exc
    _check_something_parsed(con, file, table, first_id, parsed.expected)
    return added


def _normalize_newlines(file: SourceFile, target: Path) -> None:
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
    file: SourceFile,
    scan_path: Path,
    compressed: bool,
    table: str,
    first_id: int,
    parsed: Parsed,
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
          FROM read_csv({lit(str(scan_path))}, columns = {{'line': 'VARCHAR'}}, header = false,
                        auto_detect = false, delim = {lit(_LINE_DELIM)}, quote = '', escape = '',
                        compression = '{"gzip" if compressed else "none"}', store_rejects = true,
                        rejects_table = '{rejects}', rejects_scan = '{rejects}_scan')
        )
        WHERE line_no > {parsed.header_lines}
          AND CASE WHEN ascii(line) > 32 THEN true ELSE trim(line, ' ' || chr(9) || chr(13)) <> '' END
      )"""
    canonical = ", ".join(f'"{c}"' for c in CANONICAL_COLUMNS)
    numbered = f"""
      SELECT {first_id} + row_number() OVER () - 1 AS event_id, {lit(file.name)} AS source,
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
        quietly(con, f"DROP TABLE IF EXISTS {rejects}")
        quietly(con, f"DROP TABLE IF EXISTS {rejects}_scan")


def _merge_rejects(
    con: duckdb.DuckDBPyConnection,
    file: SourceFile,
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
            SELECT {first_id + good} + j - 1, {lit(file.name)}, line, {reason},
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
        quietly(con, f"DROP TABLE IF EXISTS {shifted}")


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
        quietly(con, f"DROP TABLE IF EXISTS {recovered}")


def _check_something_parsed(
    con: duckdb.DuckDBPyConnection, file: SourceFile, table: str, first_id: int, expected: str
) -> None:
    """A file with rows but not one that parses is the wrong format, not bad rows."""
    total, good, line, error, raw = con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE parse_error IS NULL),
                   arg_min(source_line, event_id), arg_min(parse_error, event_id), arg_min(raw_line, event_id)
            FROM "{table}" WHERE event_id >= {first_id}"""
    ).fetchall()[0]
    if total and not good:
        raise SourceFormatError(file.path, line, expected, f"{raw} ({error})")


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
