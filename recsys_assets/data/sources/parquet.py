"""parquet: Parquet files in the canonical schema, columns found by name (rows have no ``source_line``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from recsys_serving.contract import CANONICAL_COLUMNS
from recsys_assets.data.sources.core import (
    REQUIRED_CANONICAL,
    SourceFile,
    SourceFormatError,
    iso_ts,
    lit,
    nz,
    register,
    to_double,
    unparsable,
)

_NUMERIC = re.compile(r"^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|UHUGEINT|FLOAT|DOUBLE|DECIMAL.*)$")


def _select(con: duckdb.DuckDBPyConnection, file: SourceFile) -> tuple[str, str]:
    """The file's canonical projection (SQL over its columns and `err`) and its row-check SQL,
    from its schema; raises `SourceFormatError` naming the file when the schema cannot work.
    ts may be TIMESTAMP, TIMESTAMPTZ, DATE or ISO-8601 text; price a number or its text."""
    src = f"read_parquet({lit(str(file.path))})"
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
                exprs[col] = iso_ts(ref)
                checks.append(unparsable("ts", ref, iso_ts(ref)))
            else:
                raise SourceFormatError(file.path, None, "column ts as TIMESTAMP, DATE or ISO-8601 text", kind)
        elif col == "price":
            if _NUMERIC.match(kind):
                exprs[col] = f"CAST({ref} AS DOUBLE)"
            elif kind == "VARCHAR":
                exprs[col] = to_double(nz(ref))
                checks.append(unparsable("price", nz(ref), exprs[col]))
            else:
                raise SourceFormatError(file.path, None, "column price as a number", kind)
        else:
            exprs[col] = nz(f"CAST({ref} AS VARCHAR)")
    error = ("CASE " + " ".join(f"WHEN {c} THEN {m}" for c, m in checks) + " END") if checks else "NULL"
    present = ", ".join(f"'{c}': \"{schema[c][0]}\"" for c in CANONICAL_COLUMNS if c in schema)
    canonical = ", ".join(f'CASE WHEN err IS NULL THEN {exprs[c]} END AS "{c}"' for c in CANONICAL_COLUMNS)
    select = f"err, CASE WHEN err IS NOT NULL THEN CAST({{{present}}} AS VARCHAR) END, {canonical}"
    return select, error


def load(con: duckdb.DuckDBPyConnection, files: list[SourceFile], table: str) -> int:
    # Files with the same schema load in one statement: DuckDB then scans them in parallel (a
    # file written as one row group is otherwise read by one thread). event_id = the file's offset
    # + its row number, so ids are the same as loading file by file.
    plans = [(file, *_select(con, file)) for file in files]
    total = 0
    start = 0
    while start < len(plans):
        end = start + 1
        while end < len(plans) and plans[end][1:] == plans[start][1:]:
            end += 1
        group = plans[start:end]
        try:
            total += _insert_group(con, [g[0] for g in group], group[0][1], group[0][2], table, total)
        except SourceFormatError:
            raise
        except duckdb.Error as exc:
            # a failed INSERT leaves nothing behind; name the file by loading them one at a time
            if len(group) == 1:
                raise SourceFormatError(group[0][0].path, None, "a readable Parquet file", str(exc).splitlines()[0]) from exc
            for file, select, error in group:
                total += _insert_group(con, [file], select, error, table, total)
        start = end
    return total


def _insert_group(
    con: duckdb.DuckDBPyConnection, files: list[SourceFile], select: str, error: str, table: str, first_id: int
) -> int:
    paths = [str(f.path) for f in files]
    listed = "[" + ", ".join(lit(p) for p in paths) + "]"
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
    values = ", ".join(f"({lit(p)}, {lit(n)}, {o})" for p, n, o in offsets)
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
        rows, good, first_error, raw = found.get(file.name, (0, 0, None, None))
        if rows and not good:
            raise SourceFormatError(file.path, None, "canonical Parquet rows", f"{raw} ({first_error})")
    return int(inserted)


register("parquet", load)
