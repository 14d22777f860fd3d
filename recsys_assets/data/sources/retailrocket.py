"""retailrocket: the RetailRocket ``events.csv`` (``timestamp,visitorid,event,itemid,transactionid``)."""

from __future__ import annotations

from recsys_assets.data.sources.core import (
    Checked,
    Parsed,
    SourceFile,
    delimited,
    epoch_ms,
    expect_header,
    map_event,
    nz,
    register_text,
)

HEADER = ("timestamp", "visitorid", "event", "itemid", "transactionid")
EVENTS = {"view": "view", "addtocart": "cart", "transaction": "purchase"}


def parse(file: SourceFile, head: list[bytes]) -> Parsed:
    """timestamp in ms; view/addtocart/transaction -> view/cart/purchase; transactionid is dropped."""
    expect_header(file, head, "retailrocket", HEADER)
    columns: dict[str, str | Checked] = {
        "ts": Checked("timestamp", nz("f[1]"), epoch_ms),
        "user_id": nz("f[2]"),
        "event_type": map_event(nz("f[3]"), EVENTS),
        "item_id": nz("f[4]"),
    }
    return delimited(",", len(HEADER), columns, "5 comma-separated retailrocket fields")


register_text("retailrocket", parse)
