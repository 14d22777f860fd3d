"""rees46: the REES46 e-commerce CSV export (``event_time,event_type,product_id,...``)."""

from __future__ import annotations

from recsys_assets.data.sources.core import (
    Checked,
    Parsed,
    SourceFile,
    delimited,
    expect_header,
    nz,
    register_text,
    to_double,
)

HEADER = (
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
_TIME_FORMATS = "['%Y-%m-%d %H:%M:%S UTC', '%Y-%m-%d %H:%M:%S']"  # strptime formats, as a DuckDB list


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """``event_time`` like ``2019-10-01 00:00:00 UTC``; category = category_code, else
    category_id; brand is dropped; event types are kept as read."""
    expect_header(file, head, "rees46", HEADER)
    columns: dict[str, str | Checked] = {
        "ts": Checked("event_time", nz("f[1]"), lambda t: f"try_strptime({t}, {_TIME_FORMATS})"),
        "event_type": nz("f[2]"),
        "item_id": nz("f[3]"),
        "category": f"coalesce({nz('f[5]')}, {nz('f[4]')})",
        "price": Checked("price", nz("f[7]"), to_double),
        "user_id": nz("f[8]"),
        "session_id": nz("f[9]"),
    }
    return delimited(",", len(HEADER), columns, "9 comma-separated rees46 fields")


register_text("rees46", parse)
