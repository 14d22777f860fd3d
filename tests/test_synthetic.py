"""The synthetic event generator: determinism, schema, noise, popularity and planted structure."""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from recsys_serving.contract import CANONICAL_COLUMNS, EVENT_TYPES
from recsys_assets.data.synthetic import (
    DEFAULT_CONFIG,
    NOISE_KINDS,
    GenerationSummary,
    UNKNOWN_EVENT_TYPES,
    SyntheticConfig,
    generate_events,
    main,
)

SMALL = SyntheticConfig(
    n_users=1200, n_items=1200, n_categories=30, events_per_user_mean=20, chunk_users=500, seed=11
)
CLEAN_SQL = f"""
    SELECT * FROM raw WHERE parse_error IS NULL AND user_id IS NOT NULL AND item_id IS NOT NULL
      AND event_type IN ({", ".join(repr(t) for t in EVENT_TYPES)}) AND ts <= TIMESTAMP '{SMALL.end}'
"""


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _raw(out: Path) -> duckdb.DuckDBPyConnection:
    """The generated CSV chunks as a table: every field as text plus parse_error, like any reader."""
    con = duckdb.connect()
    con.execute(
        f"""
        CREATE TABLE lines AS SELECT line FROM read_csv('{out}/events-*.csv.gz', columns={{'line': 'VARCHAR'}},
          header=true, auto_detect=false, delim=E'\\x1f', quote='', escape='')"""
    )
    con.execute(
        """
        CREATE TABLE raw AS SELECT string_split(line, ',') AS f, line,
          CASE WHEN len(string_split(line, ',')) <> 9 THEN 'fields'
               WHEN try_strptime(string_split(line, ',')[4], '%Y-%m-%d %H:%M:%S') IS NULL THEN 'ts'
               WHEN try_cast(string_split(line, ',')[9] AS DOUBLE) IS NULL THEN 'price' END AS parse_error
        FROM lines"""
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE raw AS SELECT row_number() OVER () AS event_id, parse_error, line,
          nullif(f[1], '') AS user_id, nullif(f[2], '') AS item_id, f[3] AS event_type,
          CASE WHEN parse_error IS NULL THEN strptime(f[4], '%Y-%m-%d %H:%M:%S') END AS ts,
          f[5] AS session_id, f[6] AS category, f[7] AS device, f[8] AS segment,
          CASE WHEN parse_error IS NULL THEN f[9]::DOUBLE END AS price
        FROM raw"""
    )
    return con


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerationSummary]:
    out = tmp_path_factory.mktemp("small")
    return out, generate_events(out, SMALL)


def _human_sequences(con: duckdb.DuckDBPyConnection) -> list[list[str]]:
    """Per user, the chronological items of the well-formed, non-bot events, repeats collapsed."""
    rows = con.execute(
        f"""
        WITH clean AS (SELECT DISTINCT user_id, item_id, event_type, ts FROM ({CLEAN_SQL})),
             humans AS (SELECT user_id FROM clean GROUP BY user_id HAVING count(*) <= 400)
        SELECT user_id, list(item_id ORDER BY ts, event_type) FROM clean SEMI JOIN humans USING (user_id)
        GROUP BY user_id"""
    ).fetchall()
    seqs = []
    for _, items in rows:
        seqs.append([item for k, item in enumerate(items) if k == 0 or items[k - 1] != item])
    return seqs


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / n for n in "abcd")
    first = generate_events(a, SMALL)
    generate_events(b, SMALL)
    generate_events(c, SMALL.model_copy(update={"seed": 12}))
    assert len(first.files) == 3 == SMALL.n_chunks
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)
    # Parallel workers write the same bytes as one process.
    generate_events(d, SMALL.model_copy(update={"workers": 2}))
    assert _digests(a) == _digests(d)


def test_csv_chunks_have_the_canonical_header_and_value_formats(small_csv: tuple[Path, GenerationSummary]) -> None:
    out, summary = small_csv
    assert sorted(p.name for p in out.iterdir()) == [f"events-{i:05d}.csv.gz" for i in range(3)]
    with gzip.open(out / "events-00000.csv.gz", "rt") as fh:
        assert fh.readline().rstrip("\n") == ",".join(CANONICAL_COLUMNS)
    con = _raw(out)
    assert con.execute("SELECT count(*) FROM raw").fetchone()[0] == summary.events
    bad = con.execute(
        f"""SELECT count(*) FROM ({CLEAN_SQL}) WHERE NOT (
              regexp_full_match(user_id, 'u[1-9][0-9]*') AND regexp_full_match(item_id, 'i[1-9][0-9]*')
              AND regexp_full_match(session_id, 's[1-9][0-9]*-[0-9]+') AND regexp_full_match(category, 'c[1-9][0-9]*')
              AND device IN ('mobile', 'desktop', 'tablet', 'app') AND segment IN ('new', 'regular', 'vip', 'lapsed')
              AND price > 0 AND ts >= TIMESTAMP '{SMALL.start}')"""
    ).fetchone()[0]
    assert bad == 0
    ts_text = con.execute("SELECT split_part(line, ',', 4) FROM raw WHERE parse_error IS NULL LIMIT 50").fetchall()
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", t) for (t,) in ts_text)
    users, items = con.execute(f"SELECT count(DISTINCT user_id), count(DISTINCT item_id) FROM ({CLEAN_SQL})").fetchone()
    assert users == SMALL.n_users and 0.5 * SMALL.n_items < items <= SMALL.n_items
    # An item always has the same category and price.
    assert con.execute(
        f"SELECT count(*) FROM (SELECT item_id FROM ({CLEAN_SQL}) GROUP BY 1 HAVING count(DISTINCT (category, price)) > 1)"
    ).fetchone()[0] == 0


def test_parquet_chunks_are_typed_canonical_columns(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"output_format": "parquet", "malformed_rate": 0.0})
    summary = generate_events(tmp_path / "pq", cfg)
    assert [Path(f).name for f in summary.files] == [f"events-{i:05d}.parquet" for i in range(3)]
    schema = pq.read_schema(summary.files[0])
    assert schema.names == list(CANONICAL_COLUMNS)
    assert str(schema.field("ts").type) == "timestamp[us]" and str(schema.field("price").type) == "double"
    assert all(str(schema.field(c).type) == "string" for c in CANONICAL_COLUMNS if c not in ("ts", "price"))
    rows = duckdb.sql(f"SELECT count(*), count(user_id), count(item_id) FROM '{tmp_path}/pq/*.parquet'").fetchall()[0]
    assert rows[0] == summary.events
    assert rows[0] - rows[1] + rows[0] - rows[2] == summary.noise["null_id"]


def test_noise_counts_match_the_files_and_the_configured_rates(tmp_path: Path) -> None:
    rates = {
        "duplicate_rate": 0.02, "malformed_rate": 0.015, "null_id_rate": 0.02,
        "unknown_type_rate": 0.01, "future_ts_rate": 0.01, "bot_user_rate": 0.01,
    }
    cfg = SMALL.model_copy(update={**rates, "n_users": 2500, "chunk_users": 1000, "bot_events_mean": 300})
    summary = generate_events(tmp_path / "noisy", cfg)
    assert set(summary.noise) == set(NOISE_KINDS)
    n = summary.events
    for kind, rate in (
        ("duplicate", "duplicate_rate"), ("malformed", "malformed_rate"), ("null_id", "null_id_rate"),
        ("unknown_event_type", "unknown_type_rate"), ("future_timestamp", "future_ts_rate"),
    ):
        expected = rates[rate] * n
        assert abs(summary.noise[kind] - expected) < 5 * np.sqrt(expected) + 5, (kind, summary.noise[kind], expected)
    bots = summary.noise["bot_users"]
    assert abs(bots - 0.01 * cfg.n_users) < 5 * np.sqrt(0.01 * cfg.n_users) + 2

    con = _raw(tmp_path / "noisy")
    found = con.execute(
        f"""SELECT count(*) FILTER (WHERE parse_error IS NOT NULL),
                   count(*) FILTER (WHERE parse_error IS NULL AND (user_id IS NULL OR item_id IS NULL)),
                   count(*) FILTER (WHERE parse_error IS NULL AND event_type IN {UNKNOWN_EVENT_TYPES}),
                   count(*) FILTER (WHERE parse_error IS NULL AND ts > TIMESTAMP '{cfg.end}')
            FROM raw"""
    ).fetchone()
    assert found == (
        summary.noise["malformed"], summary.noise["null_id"],
        summary.noise["unknown_event_type"], summary.noise["future_timestamp"],
    )
    assert con.execute("SELECT count(*) FROM raw WHERE parse_error = 'fields'").fetchone()[0] > 0
    assert con.execute("SELECT count(*) FROM raw WHERE parse_error = 'ts'").fetchone()[0] > 0
    assert con.execute("SELECT count(*) FROM raw WHERE parse_error = 'price'").fetchone()[0] > 0
    # Exact copies sit right after their original (bots may add a rare coincidental one).
    copies = con.execute(
        "SELECT count(*) FROM (SELECT line, lag(line) OVER (ORDER BY event_id) AS prev FROM raw) WHERE line = prev"
    ).fetchone()[0]
    assert summary.noise["duplicate"] <= copies <= summary.noise["duplicate"] * 1.02 + 3
    # Bots: hundreds of events, many a minute, spread over the catalogue.
    heavy = con.execute(
        f"""SELECT user_id, count(*) AS n, max(per_minute) FROM (
              SELECT user_id, count(*) OVER (PARTITION BY user_id, date_trunc('minute', ts)) AS per_minute
              FROM ({CLEAN_SQL})) GROUP BY user_id HAVING max(per_minute) > 100"""
    ).fetchall()
    assert len(heavy) == bots
    bot_rows = summary.noise["bot"]
    assert abs(bot_rows - bots * cfg.bot_events_mean) < 0.2 * bots * cfg.bot_events_mean


def test_item_popularity_is_heavy_tailed(small_csv: tuple[Path, GenerationSummary]) -> None:
    counts = Counter(item for seq in _human_sequences(_raw(small_csv[0])) for item in seq)
    ranked = np.sort(np.array(list(counts.values())))[::-1]
    top_decile = ranked[: len(ranked) // 10].sum() / ranked.sum()
    bottom_half = ranked[len(ranked) // 2 :].sum() / ranked.sum()
    assert top_decile > 0.4, top_decile
    assert bottom_half < 0.15, bottom_half
    # Roughly a power law: the log-log slope over the head is clearly negative.
    head = ranked[: len(ranked) // 2]
    slope = np.polyfit(np.log(np.arange(1, len(head) + 1)), np.log(head), 1)[0]
    assert slope < -0.6, slope


def test_planted_structure_makes_the_last_item_predictive(small_csv: tuple[Path, GenerationSummary]) -> None:
    """Leave-last-out: a last-item transition predictor hits at least 3x as often as popularity."""
    seqs = [s for s in _human_sequences(_raw(small_csv[0])) if len(s) >= 3]
    assert len(seqs) > 0.9 * SMALL.n_users * (1 - SMALL.bot_user_rate)
    popularity: Counter[str] = Counter()
    transitions: dict[str, Counter[str]] = defaultdict(Counter)
    for seq in seqs:
        train = seq[:-1]
        popularity.update(train)
        for prev, nxt in zip(train, train[1:]):
            transitions[prev][nxt] += 1
    top = [item for item, _ in popularity.most_common(10)]
    pop_hits = trans_hits = 0
    for seq in seqs:
        target, prev = seq[-1], seq[-2]
        ranked = [item for item, _ in transitions[prev].most_common(10)]
        ranked += [item for item in top if item not in ranked][: 10 - len(ranked)]
        pop_hits += target in top
        trans_hits += target in ranked
    pop_hr, trans_hr = pop_hits / len(seqs), trans_hits / len(seqs)
    assert pop_hr > 0.01  # popularity is a real (weak) signal, not zero
    assert trans_hr >= 3 * pop_hr, (trans_hr, pop_hr)


def test_devices_have_their_own_daily_rhythm_and_segments_differ(small_csv: tuple[Path, GenerationSummary]) -> None:
    con = _raw(small_csv[0])
    office = dict(
        con.execute(
            f"""SELECT device, avg((hour(ts) BETWEEN 9 AND 16)::INT) FROM ({CLEAN_SQL})
                WHERE event_type = 'view' GROUP BY device"""
        ).fetchall()
    )
    assert office["desktop"] > office["app"] + 0.2, office
    per_user = dict(
        con.execute(
            f"""SELECT segment, avg(n) FROM (SELECT user_id, any_value(segment) AS segment, count(*) AS n
                FROM ({CLEAN_SQL}) GROUP BY user_id HAVING count(*) <= 400) GROUP BY segment"""
        ).fetchall()
    )
    assert per_user["vip"] > 2 * per_user["new"], per_user
    # Funnel: every cart follows a view of the same item by the same user earlier in that session.
    orphan_carts = con.execute(
        f"""WITH c AS ({CLEAN_SQL})
            SELECT count(*) FROM c AS cart WHERE event_type = 'cart' AND NOT EXISTS (
              SELECT 1 FROM c AS v WHERE v.event_type = 'view' AND v.user_id = cart.user_id
                AND v.item_id = cart.item_id AND v.session_id = cart.session_id AND v.ts < cart.ts)"""
    ).fetchone()[0]
    carts = con.execute(f"SELECT count(*) FROM ({CLEAN_SQL}) WHERE event_type = 'cart'").fetchone()[0]
    assert carts > 0 and orphan_carts <= 0.05 * carts  # only views lost to injected noise


def test_default_data_survives_cleaning_with_most_users(tmp_path: Path) -> None:
    sources = pytest.importorskip("recsys_assets.data.sources")
    cleaning = pytest.importorskip("recsys_assets.data.cleaning")
    assert (DEFAULT_CONFIG.n_users, DEFAULT_CONFIG.n_items, DEFAULT_CONFIG.output_format) == (6000, 2000, "csv")
    for rate in ("bot_user_rate", "duplicate_rate", "malformed_rate", "null_id_rate", "unknown_type_rate", "future_ts_rate"):
        assert getattr(DEFAULT_CONFIG, rate) > 0, rate
    summary = generate_events(tmp_path / "default", DEFAULT_CONFIG)
    assert 130_000 < summary.events < 190_000
    con = duckdb.connect()
    assert sources.load_events(con, tmp_path / "default", "csv") == summary.events
    cleaned = cleaning.clean_events(con, cleaning.CleaningConfig(now=datetime(2026, 1, 1)))
    assert cleaned.reconciles
    for kind in ("malformed", "null_id", "unknown_event_type", "future_timestamp"):
        assert cleaned.by_reason[kind] == summary.noise[kind], kind
    assert cleaned.by_reason["duplicate"] >= summary.noise["duplicate"]
    assert cleaned.by_reason["bot"] > 0.9 * summary.noise["bot"]
    humans = DEFAULT_CONFIG.n_users - summary.noise["bot_users"]
    assert cleaned.users > 0.9 * humans, (cleaned.users, humans)
    assert cleaned.cleaned > 0.85 * summary.events


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"n_users": 0}, "n_users"),
        ({"duplicate_rate": 1.5}, "duplicate_rate"),
        ({"null_id_rate": -0.1}, "null_id_rate"),
        ({"n_categories": 5000}, "n_categories"),
        ({"output_format": "parquet"}, "malformed_rate"),
        ({"end": datetime(2020, 1, 1)}, "end"),
        ({"chunk_users": 2_000_000}, "chunk_users"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(update: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SyntheticConfig.model_validate({**DEFAULT_CONFIG.model_dump(), **update})


def test_generate_revalidates_an_unvalidated_copy(tmp_path: Path) -> None:
    bad = DEFAULT_CONFIG.model_copy(update={"n_users": -3})  # model_copy skips validation
    with pytest.raises(ValidationError, match="n_users"):
        generate_events(tmp_path, bad)
    assert not list(tmp_path.glob("events-*"))


def test_stale_chunks_are_replaced_and_other_files_kept(tmp_path: Path) -> None:
    generate_events(tmp_path, SMALL)
    (tmp_path / "_SUCCESS.json").write_text("{}")
    one_chunk = SMALL.model_copy(update={"chunk_users": SMALL.n_users})
    generate_events(tmp_path, one_chunk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_SUCCESS.json", "events-00000.csv.gz"]


def test_cli_writes_parquet_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path / "cli"), "--users", "300", "--items", "200", "--format", "parquet", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "wrote" in printed and "events" in printed
    files = sorted((tmp_path / "cli").glob("events-*.parquet"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    assert table.column_names == list(CANONICAL_COLUMNS)
    assert len(set(table.column("user_id").drop_null().to_pylist())) == 300
    with pytest.raises(SystemExit, match="n_users"):
        main(["--out", str(tmp_path / "bad"), "--users", "-5"])
