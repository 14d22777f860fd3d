"""A corpus of bad event files in the canonical CSV schema (the synthetic generator's format).

Each problem file holds the same well-formed events plus the problem's bad lines, so a test can
check that every bad line is quarantined with its reason and every good line is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

HEADER = b"user_id,item_id,event_type,ts,session_id,category,device,segment,price"
NOW = datetime(2024, 6, 1)  # cleaning's "now": later timestamps are in the future
BASE = datetime(2024, 3, 1, 12, 0, 0)
CLEAN_USERS = 5
CLEAN_EVENTS_PER_USER = 6
CLEAN_TYPES = ("view", "view", "cart", "view", "purchase", "view")


def iso(ts: datetime) -> str:
    text = ts.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.microsecond:
        text += f".{ts.microsecond // 1000:03d}"
    return text + "Z"


def event(
    user: str,
    item: str,
    event_type: str = "view",
    ts: datetime | str = BASE,
    session: str = "s1",
    category: str = "c1",
    device: str = "mobile",
    segment: str = "new",
    price: str = "9.99",
) -> bytes:
    stamp = iso(ts) if isinstance(ts, datetime) else ts
    return ",".join([user, item, event_type, stamp, session, category, device, segment, price]).encode()


def clean_rows(ns: str = "") -> list[bytes]:
    """Well-formed events no cleaning rule touches (with k-core 1): distinct, spaced, known types.
    `ns` prefixes user ids so that several files of one corpus do not duplicate each other."""
    rows = []
    for u in range(CLEAN_USERS):
        for j in range(CLEAN_EVENTS_PER_USER):
            ts = BASE + timedelta(minutes=5 * j, seconds=u)
            rows.append(event(f"{ns}u{u}", f"i{(u + j) % 6}", CLEAN_TYPES[j], ts, session=f"s{u}"))
    return rows


@dataclass(frozen=True)
class Problem:
    name: str
    make: Callable[[str], list[bytes]]  # the bad lines, for a user-id namespace
    reason: str  # the quarantine reason every bad line must get
    truncated: bool = False  # the bad lines end the file, the last one without a newline
    parse_error: str | None = None  # a substring every bad line's parse_error must hold

    def bad(self, ns: str = "") -> list[bytes]:
        return self.make(ns)


def _bot_burst(ns: str) -> list[bytes]:
    # 150 events inside one calendar minute (limit 100 a minute), items never repeated back to back.
    return [event(f"{ns}bot-burst", f"b{k % 10}", ts=BASE + timedelta(milliseconds=300 * k)) for k in range(150)]


def _bot_volume(ns: str) -> list[bytes]:
    # 400 events, one every 2 minutes (limit 300 a user): a crawler, not a burst.
    return [event(f"{ns}bot-volume", f"v{k % 10}", ts=BASE + timedelta(minutes=2 * k)) for k in range(400)]


PROBLEMS: list[Problem] = [
    Problem("bot_burst", _bot_burst, "bot"),
    Problem("bot_volume", _bot_volume, "bot"),
    Problem("duplicates", lambda ns: [clean_rows(ns)[2], clean_rows(ns)[7]], "duplicate"),
    Problem(
        "repeated_view",
        lambda ns: [event(f"{ns}u0", "i0", "view", BASE + timedelta(seconds=30), session="s0")],
        "repeated_view",
    ),
    Problem(
        "malformed",
        lambda ns: [
            f"{ns}u1,i1,view".encode(),  # too few fields
            event(f"{ns}u1", "i1", ts="yesterday"),  # unparsable timestamp
            event(f"{ns}u1", "i1", price="abc"),  # unparsable number
            f'{ns}u1,"i1,view,2024-03-01T12:00:00Z,s1,c1,mobile,new,9.99'.encode(),  # unbalanced quote
            event(f"{ns}u1", "i1") + b",surplus",  # too many fields
        ],
        "malformed",
        parse_error="malformed: ",
    ),
    Problem("null_ids", lambda ns: [event("", "i1"), event(f"{ns}u1", ""), event("", "")], "null_id"),
    Problem(
        "unknown_event_types",
        lambda ns: [
            event(f"{ns}u2", "i2", "remove_from_cart"),
            event(f"{ns}u2", "i3", "wishlist"),
            event(f"{ns}u2", "i4", "VIEW"),  # kept as read: types are case-sensitive
        ],
        "unknown_event_type",
    ),
    Problem("null_timestamp", lambda ns: [event(f"{ns}u3", "i3", ts="")], "null_timestamp"),
    Problem(
        "future_timestamps",
        lambda ns: [event(f"{ns}u3", "i3", ts=datetime(2030, 1, 1)), event(f"{ns}u3", "i4", ts=NOW + timedelta(seconds=1))],
        "future_timestamp",
    ),
    Problem(
        "truncated_last_line",
        lambda ns: [f"{ns}u4,i2,vi".encode()],
        "malformed",
        truncated=True,
        parse_error="expected 9 fields, got 3",
    ),
    Problem(
        "wrong_delimiter",
        lambda ns: [event(f"{ns}u1", "i1").replace(b",", b";"), event(f"{ns}u1", "i2").replace(b",", b"\t")],
        "malformed",
        parse_error="expected 9 fields, got 1",
    ),
    Problem(
        "non_utf8",
        lambda ns: [
            event(f"{ns}u1", "i1").replace(b"i1", b"i\xff1"),
            event(f"{ns}u1", "i2").replace(b"u1", b"u\xc3("),
            b"\xfe\xfe,\x80",
        ],
        "malformed",
        parse_error="not UTF-8",
    ),
]


def write_problem(path: Path, problem: Problem, insert_at: int = 10, ns: str = "") -> dict[int, str]:
    """Write the clean rows with the problem's lines (in the middle, or last when truncated);
    returns {1-based line: expected reason} for the bad lines."""
    rows = clean_rows(ns)
    bad = problem.bad(ns)
    bad_at = len(rows) if problem.truncated else insert_at
    lines = [HEADER, *rows[:bad_at], *bad, *rows[bad_at:]]
    body = b"\n".join(lines) + (b"" if problem.truncated else b"\n")
    path.write_bytes(body)
    first_bad = 2 + bad_at  # line 1 is the header
    return {first_bad + k: problem.reason for k in range(len(bad))}
