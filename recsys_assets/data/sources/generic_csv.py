"""csv: comma-separated files in the canonical schema, columns found by their header names."""

from __future__ import annotations

from recsys_serving.contract import CANONICAL_COLUMNS
from recsys_assets.data.sources.core import (
    OPTIONAL_CANONICAL,
    REQUIRED_CANONICAL,
    Checked,
    Parsed,
    SourceFile,
    SourceFormatError,
    csv_header,
    delimited,
    header,
    iso_ts,
    nz,
    register_text,
    to_double,
)


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """Columns in any order, extra ones ignored, optional ones missing -> NULL. ts is ISO-8601
    (``2024-03-01T12:34:56Z``, ``2024-03-01 12:34:56``, offsets converted to UTC)."""
    expected = "a CSV header naming " + ", ".join(REQUIRED_CANONICAL) + " (optional: " + ", ".join(OPTIONAL_CANONICAL) + ")"
    line = header(file, head, expected)
    names = csv_header(line)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing = [c for c in REQUIRED_CANONICAL if c not in names]
    if missing or duplicated:
        problem = f"missing {missing}" if missing else f"duplicated {duplicated}"
        raise SourceFormatError(file.path, 1, expected, f"{line} ({problem})")
    pos = {n: i + 1 for i, n in enumerate(names)}
    raw = {c: nz(f"f[{pos[c]}]") if c in pos else "NULL" for c in CANONICAL_COLUMNS}
    columns: dict[str, str | Checked] = dict(raw)
    columns["ts"] = Checked("ts", raw["ts"], iso_ts)
    columns["price"] = Checked("price", raw["price"], to_double)
    return delimited(",", len(names), columns, f"{len(names)} comma-separated fields")


register_text("csv", parse)
