"""Raw events -> cleaned interactions + quarantined events, inside DuckDB (out of core).

Every raw row ends in exactly one of the two output tables; a quarantined row keeps all its raw
columns plus a `reason` (see `REASONS`) and a human-readable `detail`.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import duckdb
from pydantic import BaseModel, Field, field_validator

from recsys_serving.contract import (
    CANONICAL_COLUMNS,
    DEFAULT_REPEATED_VIEW_WINDOW_S,
    EARLIEST_EVENT_TS,
    EVENT_TYPES,
    RepeatedViewRule,
)
from recsys_assets.data.schema import RAW_EVENTS_COLUMNS

# In the order they are checked: a row gets the first reason that applies.
REASONS: tuple[str, ...] = (
    "malformed",
    "null_id",
    "unknown_event_type",
    "null_timestamp",
    "future_timestamp",
    "ancient_timestamp",
    "excluded_event_type",
    "duplicate",
    "repeated_view",
    "bot",
    "below_k_core",
)


class CleaningConfig(BaseModel):
    """What counts as a usable interaction."""

    event_types: list[str] = Field(
        default_factory=lambda: list(EVENT_TYPES),
        description="Event types that become tokens; the type itself stays a feature.",
    )
    dedupe_repeated_views: bool = Field(
        True, description="Drop a view of the item the user viewed just before (page reloads)."
    )
    repeated_view_window_s: int = Field(
        DEFAULT_REPEATED_VIEW_WINDOW_S, ge=0, description="Max gap of a repeated view, seconds."
    )
    bot_max_events_per_user: int = Field(20_000, ge=1, description="More events than this: a bot.")
    bot_max_events_per_minute: int = Field(
        100, ge=1, description="More events than this in one calendar minute: a bot."
    )
    min_user_interactions: int = Field(5, ge=1, description="k-core: interactions per user.")
    min_item_interactions: int = Field(5, ge=1, description="k-core: interactions per item.")
    max_k_core_rounds: int = Field(50, ge=1)
    now: datetime | None = Field(None, description="Timestamps after this are 'future' (default: now).")
    earliest_ts: datetime = Field(
        EARLIEST_EVENT_TS, description="Timestamps before this (naive UTC) are 'ancient': clock or parsing errors."
    )

    @property
    def repeated_view_rule(self) -> RepeatedViewRule:
        """The rule as serving applies it to pushed events (off when dedupe is off)."""
        return RepeatedViewRule(self.repeated_view_window_s if self.dedupe_repeated_views else None)

    @field_validator("event_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(EVENT_TYPES))
        if unknown or not value:
            raise ValueError(f"event_types must be a non-empty subset of {EVENT_TYPES}, got {value}")
        return value


class CleaningSummary(BaseModel):
    raw: int
    cleaned: int
    quarantined: int
    by_reason: dict[str, int]
    users: int
    items: int
    k_core_rounds: int
    seconds: float

    @property
    def reconciles(self) -> bool:
        return self.raw == self.cleaned + self.quarantined


def _k_core(con: duckdb.DuckDBPyConnection, min_user: int, min_item: int, max_rounds: int) -> int:
    """The k-core of `_core(event_id, u, i)`: users with >= min_user and items with >= min_item rows
    among the rows of users and items that stay.

    Incremental peeling: degrees are counted once, then each round removes the users and items
    below k and subtracts only the interactions they take from the others (one scan of the integer
    pairs against two small sets), instead of re-aggregating the whole table every round. The
    power-law tail of a large catalogue needs 15+ rounds.
    Degree -1 in `_udeg` / `_ideg` marks a removed user or item (`_core` itself is left as it
    is). Returns the number of rounds.
    """
    con.execute("CREATE OR REPLACE TEMP TABLE _udeg AS SELECT u, count(*)::BIGINT AS n FROM _core GROUP BY u")
    con.execute("CREATE OR REPLACE TEMP TABLE _ideg AS SELECT i, count(*)::BIGINT AS n FROM _core GROUP BY i")
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        con.execute(f"CREATE OR REPLACE TEMP TABLE _bad_u AS SELECT u FROM _udeg WHERE n >= 0 AND n < {min_user}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE _bad_i AS SELECT i FROM _ideg WHERE n >= 0 AND n < {min_item}")
        bad_u, bad_i = con.execute(
            "SELECT (SELECT count(*) FROM _bad_u), (SELECT count(*) FROM _bad_i)"
        ).fetchall()[0]
        if bad_u == 0 and bad_i == 0:
            break
        con.execute("UPDATE _udeg SET n = -1 FROM _bad_u b WHERE _udeg.u = b.u")
        con.execute("UPDATE _ideg SET n = -1 FROM _bad_i b WHERE _ideg.i = b.i")
        # rows of a removed user or item; their other side loses them only while it is still in
        # (a row whose other side was removed earlier left then, and that side is at -1)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _hit AS SELECT u, i FROM _core "
            "WHERE u IN (SELECT u FROM _bad_u) OR i IN (SELECT i FROM _bad_i)"
        )
        con.execute(
            "UPDATE _udeg SET n = _udeg.n - h.c FROM (SELECT u, count(*) AS c FROM _hit GROUP BY u) h "
            "WHERE _udeg.u = h.u AND _udeg.n >= 0"
        )
        con.execute(
            "UPDATE _ideg SET n = _ideg.n - h.c FROM (SELECT i, count(*) AS c FROM _hit GROUP BY i) h "
            "WHERE _ideg.i = h.i AND _ideg.n >= 0"
        )
    return rounds


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def clean_events(
    con: duckdb.DuckDBPyConnection,
    config: CleaningConfig | None = None,
    raw_table: str = "raw_events",
    cleaned_table: str = "cleaned_interactions",
    quarantine_table: str = "quarantined_events",
) -> CleaningSummary:
    """Write `cleaned_table` and `quarantine_table` from `raw_table`; return the counts."""
    config = config or CleaningConfig()
    started = time.perf_counter()
    now = config.now or datetime.now(timezone.utc)
    if now.tzinfo is not None:  # the warehouse stores naive UTC
        now = now.astimezone(timezone.utc).replace(tzinfo=None)
    missing = set(RAW_EVENTS_COLUMNS) - {r[0] for r in con.execute(f'DESCRIBE "{raw_table}"').fetchall()}
    if missing:
        raise ValueError(f"table {raw_table!r} lacks columns {sorted(missing)}; see docs/DATA_CONTRACTS.md")

    known = _sql_list(list(EVENT_TYPES))
    kept_types = _sql_list(config.event_types)
    # 1. Row-level checks, in REASONS order. Only the failing rows are stored (about 1 %); the
    #    next statement reads the raw table again with the same test instead of a 100M-row copy.
    row_reason = f"""CASE
            WHEN parse_error IS NOT NULL THEN 'malformed'
            WHEN user_id IS NULL OR trim(user_id) = '' OR item_id IS NULL OR trim(item_id) = '' THEN 'null_id'
            WHEN event_type IS NULL OR event_type NOT IN ({known}) THEN 'unknown_event_type'
            WHEN ts IS NULL THEN 'null_timestamp'
            WHEN ts > $now::TIMESTAMP THEN 'future_timestamp'
            WHEN ts < $earliest::TIMESTAMP THEN 'ancient_timestamp'
            WHEN event_type NOT IN ({kept_types}) THEN 'excluded_event_type'
          END"""
    bounds = {"now": now, "earliest": config.earliest_ts}
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _invalid AS
        SELECT event_id, reason,
          CASE reason
            WHEN 'malformed' THEN parse_error
            WHEN 'null_id' THEN CASE WHEN user_id IS NULL OR trim(user_id) = '' THEN 'user_id is null or empty'
                                     ELSE 'item_id is null or empty' END
            WHEN 'unknown_event_type'
              THEN 'event_type ' || coalesce('''' || event_type || '''', 'NULL') || ' is not one of {known.replace("'", "")}'
            WHEN 'null_timestamp' THEN 'ts is null'
            WHEN 'future_timestamp' THEN 'ts ' || ts::VARCHAR || ' is after ' || $now_text
            WHEN 'ancient_timestamp' THEN 'ts ' || ts::VARCHAR || ' is before ' || $earliest_text
            WHEN 'excluded_event_type' THEN 'event_type ' || event_type || ' is not configured as a token'
          END AS detail
        FROM (SELECT *, {row_reason} AS reason FROM "{raw_table}")
        WHERE reason IS NOT NULL
        """,
        {**bounds, "now_text": now.isoformat(sep=" "), "earliest_text": config.earliest_ts.isoformat(sep=" ")},
    )
    # 2. Duplicates and repeated views: one sort per user puts exact duplicates next to each other
    #    (same ts, item, type) and a reload right after the view it repeats.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _sequenced AS
        SELECT event_id, user_id, item_id, ts,
          CASE
            WHEN prev_item = item_id AND prev_type = event_type AND prev_ts = ts THEN 'duplicate'
            WHEN {config.repeated_view_rule.sql()} THEN 'repeated_view'
          END AS reason
        FROM (
          SELECT event_id, user_id, item_id, event_type, ts,
            lag(item_id) OVER w AS prev_item, lag(event_type) OVER w AS prev_type, lag(ts) OVER w AS prev_ts
          FROM "{raw_table}" WHERE ({row_reason}) IS NULL
          WINDOW w AS (PARTITION BY user_id ORDER BY ts, item_id, event_type, event_id)
        )
        """,
        bounds,
    )
    # 3. Bots: total volume or burst rate of the user's well-formed events (reloads count: bots
    #    reload). Either needs more events in all than the smaller limit, so the per-minute counts
    #    are taken for those users only.
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _user_events AS SELECT user_id, count(*) AS total FROM _sequenced GROUP BY user_id"
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _bots AS
        SELECT user_id, max(n) AS burst, any_value(total) AS total
        FROM (SELECT s.user_id, any_value(u.total) AS total, count(*) AS n
              FROM _sequenced s JOIN _user_events u USING (user_id)
              WHERE u.total > {min(config.bot_max_events_per_user, config.bot_max_events_per_minute)}
              GROUP BY s.user_id, date_trunc('minute', s.ts))
        GROUP BY user_id
        HAVING any_value(total) > {config.bot_max_events_per_user} OR max(n) > {config.bot_max_events_per_minute}
        """
    )
    # 4. Iterative k-core over the survivors: dropping items can push users below k and back.
    #    Integer codes instead of the string ids make each round's aggregates and semi-joins cheap.
    #    Every user with well-formed events keeps their first one (no duplicate or reload), so the
    #    survivors' users are those users less the bots.
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _users AS SELECT user_id, (row_number() OVER ())::INTEGER AS u "
        "FROM _user_events ANTI JOIN _bots USING (user_id)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _items AS SELECT item_id, (row_number() OVER ())::INTEGER AS i "
        "FROM (SELECT DISTINCT item_id FROM _sequenced)"
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _core AS
        SELECT s.event_id, u.u, i.i FROM _sequenced s JOIN _users u USING (user_id) JOIN _items i USING (item_id)
        WHERE s.reason IS NULL
        """
    )
    rounds = _k_core(con, config.min_user_interactions, config.min_item_interactions, config.max_k_core_rounds)

    # 5. One verdict per quarantined row (about a sixth of them): the quarantine is the raw rows
    #    with a verdict, the cleaned table the others, both hash joins against this small table.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _verdict AS
        SELECT event_id, reason, detail FROM _invalid
        UNION ALL
        SELECT event_id, reason,
          CASE reason WHEN 'duplicate' THEN 'same user, item, type and ts as an earlier event'
                      ELSE 'view of the item viewed just before, within {config.repeated_view_window_s}s' END
        FROM _sequenced WHERE reason IS NOT NULL
        UNION ALL
        SELECT s.event_id, 'bot', 'user has ' || b.total || ' events, up to ' || b.burst || ' in one minute'
        FROM _sequenced s JOIN _bots b USING (user_id) WHERE s.reason IS NULL
        UNION ALL
        SELECT c.event_id, 'below_k_core',
          'user or item below {config.min_user_interactions}/{config.min_item_interactions} interactions'
        FROM _core c JOIN _udeg du USING (u) JOIN _ideg di USING (i) WHERE du.n < 0 OR di.n < 0
        """
    )
    raw_cols = ", ".join(f'r."{c}"' for c in RAW_EVENTS_COLUMNS)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE "{quarantine_table}" AS
        SELECT {raw_cols}, v.reason, v.detail FROM "{raw_table}" r JOIN _verdict v USING (event_id)
        """
    )
    # No stored order: sorting 80M+ rows costs more than it saves its readers, which each order
    # what they read (docs/DATA_CONTRACTS.md).
    canonical = ", ".join(f'r."{c}"' for c in CANONICAL_COLUMNS)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE "{cleaned_table}" AS
        SELECT r.event_id, {canonical} FROM "{raw_table}" r ANTI JOIN _verdict v USING (event_id)
        """
    )
    for temp in ("_invalid", "_sequenced", "_user_events", "_bots", "_users", "_items", "_core",
                 "_udeg", "_ideg", "_bad_u", "_bad_i", "_hit", "_verdict"):
        con.execute(f"DROP TABLE IF EXISTS {temp}")

    raw = con.execute(f'SELECT count(*) FROM "{raw_table}"').fetchall()[0][0]
    cleaned, users, items = con.execute(
        f'SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id) FROM "{cleaned_table}"'
    ).fetchall()[0]
    by_reason = dict(
        con.execute(f'SELECT reason, count(*) FROM "{quarantine_table}" GROUP BY reason').fetchall()
    )
    return CleaningSummary(
        raw=raw,
        cleaned=cleaned,
        quarantined=sum(by_reason.values()),
        by_reason={r: int(by_reason.get(r, 0)) for r in REASONS},
        users=users,
        items=items,
        k_core_rounds=rounds,
        seconds=round(time.perf_counter() - started, 3),
    )
