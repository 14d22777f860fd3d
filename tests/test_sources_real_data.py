"""The source readers on the real public datasets of shared/data: exact counts, 0 parse errors.

Expected figures are those of ../shared/data/README.md, except two rees46 figures: the README's
view count (17,056) and user count (4,505) still include the partial last line that was removed
from the file (its type counts sum to 17,435 rows for a 17,434-row file); the file itself holds
17,055 views and 4,504 users (checked independently with Python's csv module).
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from recsys_assets.data.schema import RAW_EVENTS_COLUMNS
from recsys_assets.data.sources import load_events

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the repo's sibling shared/ checkout


def _need(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real dataset {path} is not available")
    return path


@pytest.fixture(autouse=True)
def _recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))


@pytest.fixture()
def con() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    yield connection
    connection.close()


def _stats(con: duckdb.DuckDBPyConnection) -> dict:
    row = con.execute(
        """SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id), count(DISTINCT session_id),
                  count(parse_error), min(ts), max(ts), count(DISTINCT event_id), min(event_id), max(event_id)
           FROM raw_events"""
    ).fetchall()[0]
    keys = ("rows", "users", "items", "sessions", "errors", "min_ts", "max_ts", "ids", "min_id", "max_id")
    stats = dict(zip(keys, row))
    stats["types"] = dict(con.execute("SELECT event_type, count(*) FROM raw_events GROUP BY 1").fetchall())
    return stats


def _assert_bookkeeping(con: duckdb.DuckDBPyConnection, stats: dict) -> None:
    """Exact schema, dense unique event ids, every row parsed."""
    described = con.execute("DESCRIBE raw_events").fetchall()
    assert [(r[0], r[1]) for r in described] == list(RAW_EVENTS_COLUMNS.items())
    assert stats["errors"] == 0
    assert stats["ids"] == stats["rows"] and stats["min_id"] == 0 and stats["max_id"] == stats["rows"] - 1


def test_rees46_october_head(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("rees46/2019-Oct_head.csv.gz")  # gzip, CRLF line endings
    assert load_events(con, path, "rees46") == 17_434
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert stats["rows"] == 17_434
    assert stats["items"] == 6_493
    assert stats["users"] == 4_504  # README: 4,505 counts the removed partial line (see module doc)
    assert stats["sessions"] == 5_066
    assert stats["types"] == {"view": 17_055, "cart": 165, "purchase": 214}
    assert (stats["min_ts"], stats["max_ts"]) == (datetime(2019, 10, 1, 0, 0), datetime(2019, 10, 1, 2, 50))
    first_two = con.execute(
        "SELECT source, source_line, user_id, item_id, category, price, session_id FROM raw_events "
        "WHERE event_id < 2 ORDER BY event_id"
    ).fetchall()
    # category = category_code, else category_id (the first row has no category_code).
    assert first_two == [
        ("2019-Oct_head.csv.gz", 2, "541312140", "44600062", "2103807459595387724", 35.79,
         "72d76fde-8bb3-4e00-8c23-a032dfed738c"),
        ("2019-Oct_head.csv.gz", 3, "554748717", "3900821", "appliances.environment.water_heater", 33.2,
         "9333dfbd-b87a-4708-9857-6336556b0fcc"),
    ]
    # One event a line: the last row sits on the file's last line.
    assert con.execute("SELECT max(source_line) FROM raw_events").fetchall()[0][0] == 17_435


def test_otto_sessions(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("otto/otto_train_first20_sessions.jsonl")
    assert load_events(con, path, "otto") == 862
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert (stats["rows"], stats["sessions"], stats["items"]) == (862, 20, 510)
    assert stats["users"] == 20  # the session is the user
    assert stats["types"] == {"view": 800, "cart": 52, "purchase": 10}
    assert stats["min_ts"].replace(microsecond=0) == datetime(2022, 7, 31, 22, 0, 0)
    assert stats["max_ts"].replace(microsecond=0) == datetime(2022, 8, 28, 21, 59, 57)
    # Events keep the file's order: event ids follow lines, and time within each session line.
    out_of_order = con.execute(
        """SELECT count(*) FROM (
             SELECT source_line, ts, lag(source_line) OVER (ORDER BY event_id) AS prev_line,
                    lag(ts) OVER (ORDER BY event_id) AS prev_ts FROM raw_events)
           WHERE source_line < prev_line OR (source_line = prev_line AND ts < prev_ts)"""
    ).fetchall()[0][0]
    assert out_of_order == 0
    assert con.execute("SELECT count(*) FROM raw_events WHERE user_id <> session_id").fetchall()[0][0] == 0


def test_amazon_grocery_tsv_with_header(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("amazon_grocery_rechorus/train.csv.gz")
    assert load_events(con, path, "amazon") == 121_892
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert (stats["rows"], stats["users"], stats["items"]) == (121_892, 14_681, 8_687)
    assert stats["types"] == {"purchase": 121_892}
    assert stats["min_ts"].date().isoformat() == "2000-08-09"
    assert stats["max_ts"].date().isoformat() == "2014-07-22"
    # The header `user_id item_id time` is skipped; line 2 is the first event.
    assert con.execute("SELECT source_line, user_id, item_id, ts FROM raw_events WHERE event_id = 0").fetchall() == [
        (2, "2177", "3", datetime(2000, 8, 9))
    ]


def test_beauty_sasrec_sequences(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("amazon_beauty/Beauty.txt")
    assert load_events(con, path, "sasrec") == 198_502
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert (stats["rows"], stats["users"], stats["items"]) == (198_502, 22_363, 12_101)
    assert stats["types"] == {"purchase": 198_502}
    # Order is time: a sampled user's items come back in file order with increasing synthetic ts.
    lines = path.read_text().splitlines()
    for sampled in (lines[1], lines[12_345], max(lines, key=len)):
        user, *items = sampled.split()
        got = con.execute(
            "SELECT item_id, ts FROM raw_events WHERE user_id = ? ORDER BY ts", [user]
        ).fetchall()
        assert [item for item, _ in got] == items
        assert [(ts - datetime(2000, 1, 1)).total_seconds() for _, ts in got] == list(range(len(items)))
        by_id = con.execute("SELECT item_id FROM raw_events WHERE user_id = ? ORDER BY event_id", [user]).fetchall()
        assert [r[0] for r in by_id] == items


def test_diginetica_purchases(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("diginetica/train-purchases.csv")
    assert load_events(con, path, "diginetica") == 18_025
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert (stats["rows"], stats["sessions"], stats["items"]) == (18_025, 12_630, 11_244)
    assert stats["types"] == {"purchase": 18_025}
    known, anonymous_rows = con.execute(
        "SELECT count(DISTINCT user_id) FILTER (WHERE user_id NOT LIKE 's%'), "
        "count(*) FILTER (WHERE user_id = 's' || session_id) FROM raw_events"
    ).fetchall()[0]
    assert (known, anonymous_rows) == (4_425, 11_322)  # userId NA -> 's<sessionId>'
    assert stats["min_ts"].date().isoformat() == "2016-01-02"
    # ts = eventdate + timeframe ms; first row: 2016-05-06 + 17,100,868 ms.
    assert con.execute("SELECT ts FROM raw_events WHERE event_id = 0").fetchall()[0][0] == datetime(
        2016, 5, 6, 4, 45, 0, 868_000
    )


def test_diginetica_views_sample(con: duckdb.DuckDBPyConnection) -> None:
    path = _need("diginetica/sample_train-item-views.csv")
    assert load_events(con, path, "diginetica") == 12_391
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert (stats["rows"], stats["sessions"], stats["items"]) == (12_391, 2_986, 7_139)
    assert stats["types"] == {"view": 12_391}
    known = con.execute("SELECT count(DISTINCT user_id) FROM raw_events WHERE user_id NOT LIKE 's%'").fetchall()[0][0]
    assert known == 1_270
    assert (stats["min_ts"].date().isoformat(), stats["max_ts"].date().isoformat()) == ("2016-01-03", "2016-06-01")


def test_diginetica_directory_joins_categories(con: duckdb.DuckDBPyConnection) -> None:
    folder = _need("diginetica")
    assert load_events(con, folder, "diginetica") == 18_025 + 12_391
    stats = _stats(con)
    _assert_bookkeeping(con, stats)
    assert stats["types"] == {"purchase": 18_025, "view": 12_391}
    # Files in sorted order: sample_train-item-views.csv (views) before train-purchases.csv.
    order = con.execute("SELECT source, min(event_id), max(event_id) FROM raw_events GROUP BY 1 ORDER BY 2").fetchall()
    assert order == [("sample_train-item-views.csv", 0, 12_390), ("train-purchases.csv", 12_391, 30_415)]
    with open(folder / "product-categories.csv", newline="") as fh:
        categories = {row["itemId"]: row["categoryId"] for row in csv.DictReader(fh, delimiter=";")}
    got = con.execute("SELECT item_id, category FROM raw_events").fetchall()
    assert all(category == categories.get(item) for item, category in got)
    assert sum(category is not None for _, category in got) == len(got)  # the map covers every item
    # A glob over the same files reads the same events.
    assert load_events(con, str(folder / "*.csv"), "diginetica") == 30_416
