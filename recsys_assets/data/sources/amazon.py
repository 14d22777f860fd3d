"""amazon: Amazon review ratings as events, ``user,item[,rating],timestamp``, comma or tab separated."""

from __future__ import annotations

import csv
import re

from recsys_assets.data.sources.core import (
    Checked,
    Parsed,
    SourceFile,
    SourceFormatError,
    decode,
    delimited,
    nz,
    register_text,
    to_double,
)


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """The delimiter is detected per file from its first line; the header is optional (a first
    line whose last field is not a number); unix seconds (fractions allowed); every event is a
    ``purchase``; rating is checked to be a number, then dropped (the canonical schema has none)."""
    expected = "user,item[,rating],timestamp (3 or 4 comma- or tab-separated fields)"
    first_no, first = next(
        ((i + 1, t) for i, raw in enumerate(head) if raw.strip() and (t := decode(raw, i == 0)) is not None),
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
    columns: dict[str, str | Checked] = {"user_id": nz("f[1]"), "item_id": nz("f[2]"), "event_type": "'purchase'"}
    columns["ts"] = Checked("timestamp", nz(f"f[{n}]"), _epoch_s)
    if n == 4:
        columns["rating"] = Checked("rating", nz("f[3]"), to_double)
    return delimited(delim, n, columns, expected, quoted=delim == ",", header_lines=int(has_header))


def _epoch_s(expr: str) -> str:
    return f"try(make_timestamp(TRY_CAST(round(TRY_CAST({expr} AS DOUBLE) * 1000000) AS BIGINT)))"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


register_text("amazon", parse)
