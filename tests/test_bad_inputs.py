"""Bad inputs through the readers and the cleaning stage: no crash, every bad row quarantined with
its reason, counts reconcile; file-level problems raise SourceFormatError naming file, line and
what was expected. Also pins each reader's contract on small generated files (formats without
real data here, such as retailrocket and the canonical parquet/csv)."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.schema import RAW_EVENTS_COLUMNS
from recsys_assets.data.sources import FORMATS, SourceFormatError, load_events
from _sources_corpus import (  # tests/ has no __init__.py: pytest puts it on sys.path
    CLEAN_EVENTS_PER_USER,
    CLEAN_USERS,
    HEADER,
    NOW,
    PROBLEMS,
    Problem,
    clean_rows,
    event,
    write_problem,
)

CLEAN = CLEAN_USERS * CLEAN_EVENTS_PER_USER
# k-core 1 so that the k-core filter never blurs which rule caught a row.
CONFIG = CleaningConfig(
    min_user_interactions=1,
    min_item_interactions=1,
    bot_max_events_per_user=300,
    bot_max_events_per_minute=100,
    now=NOW,
)


@pytest.fixture(autouse=True)
def _recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))


@pytest.fixture()
def con() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    yield connection
    connection.close()


def _quarantined(con: duckdb.DuckDBPyConnection) -> dict[int, str]:
    return dict(con.execute("SELECT source_line, reason FROM quarantined_events").fetchall())


def _raw(con: duckdb.DuckDBPyConnection, where: str = "true") -> list[tuple]:
    return con.execute(
        f"SELECT source_line, parse_error, raw_line, user_id, item_id, event_type, ts FROM raw_events "
        f"WHERE {where} ORDER BY event_id"
    ).fetchall()


# --------------------------------------------------------------------------------------------
# Row-level problems: one file each, then all of them together


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_each_bad_row_is_quarantined_with_its_reason(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, problem: Problem
) -> None:
    path = tmp_path / f"{problem.name}.csv"
    expected = write_problem(path, problem)

    rows = load_events(con, path, "csv")
    assert rows == CLEAN + len(problem.bad())  # nothing lost, nothing invented
    summary = clean_events(con, CONFIG)

    assert summary.raw == summary.cleaned + summary.quarantined == rows
    assert _quarantined(con) == expected  # exactly the bad lines, each with its reason
    assert summary.cleaned == CLEAN
    assert summary.by_reason[problem.reason] == len(problem.bad())
    if problem.parse_error:
        for line, error, raw_line, *canonical in _raw(con, "parse_error IS NOT NULL"):
            assert line in expected and problem.parse_error in error and error.startswith("malformed: ")
            assert raw_line and canonical == [None] * 4  # the text is kept, no half-parsed fields
    # event ids follow line order even where lines had to be merged back (non-UTF-8).
    lines = [r[0] for r in _raw(con)]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)


def test_non_utf8_rows_keep_their_bytes_and_line_numbers(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    problem = next(p for p in PROBLEMS if p.name == "non_utf8")
    path = tmp_path / "latin.csv"
    expected = write_problem(path, problem)
    load_events(con, path, "csv")
    bad = _raw(con, "parse_error IS NOT NULL")
    assert [r[0] for r in bad] == sorted(expected)
    assert [r[2] for r in bad] == [
        "u1,i\\xff1,view,2024-03-01T12:00:00Z,s1,c1,mobile,new,9.99",
        "u\\xc3(,i2,view,2024-03-01T12:00:00Z,s1,c1,mobile,new,9.99",
        "\\xfe\\xfe,\\x80",
    ]
    # The clean line after the bad ones is still numbered by its physical line.
    after = max(expected) + 1
    user, item = clean_rows()[10].decode().split(",")[:2]  # the first clean row written after the bad ones
    assert _raw(con, f"source_line = {after}")[0][3:5] == (user, item)
    assert con.execute("SELECT min(event_id), max(event_id), count(*) FROM raw_events").fetchall()[0] == (0, 32, 33)


def test_whole_corpus_directory_reconciles(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected: dict[tuple[str, int], str] = {}
    for k, problem in enumerate(PROBLEMS):
        name = f"chunk-{k:02d}-{problem.name}.csv"
        written = write_problem(corpus / name, problem, ns=f"f{k}-")  # users differ between files
        expected |= {(name, line): reason for line, reason in written.items()}
    (corpus / "chunk-90-empty.csv").write_bytes(b"")
    (corpus / "chunk-91-header-only.csv").write_bytes(HEADER + b"\r\n")
    (corpus / "chunk-92-blank.csv.gz").write_bytes(gzip.compress(b"\n\n"))
    (corpus / "_SUCCESS").write_text("{}")  # a marker file, not events

    rows = load_events(con, corpus, "csv")
    bad = sum(len(p.bad()) for p in PROBLEMS)
    assert rows == len(PROBLEMS) * CLEAN + bad
    summary = clean_events(con, CONFIG)
    assert summary.raw == summary.cleaned + summary.quarantined == rows
    got = {(s, line): r for s, line, r in con.execute("SELECT source, source_line, reason FROM quarantined_events").fetchall()}
    assert got == expected
    for reason in {p.reason for p in PROBLEMS}:
        assert summary.by_reason[reason] == sum(len(p.bad()) for p in PROBLEMS if p.reason == reason)
    # event_id: file order, then line order, dense from 0.
    ids = con.execute("SELECT source, source_line FROM raw_events ORDER BY event_id").fetchall()
    assert ids == sorted(ids) and con.execute("SELECT max(event_id) FROM raw_events").fetchall()[0][0] == rows - 1


def test_loading_is_deterministic(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    for k, problem in enumerate(PROBLEMS[:4]):
        write_problem(tmp_path / f"part-{k}.csv", problem)
    load_events(con, tmp_path, "csv")
    first = con.execute("SELECT * FROM raw_events ORDER BY event_id").fetchall()
    load_events(con, str(tmp_path / "part-*.csv"), "csv")
    assert con.execute("SELECT * FROM raw_events ORDER BY event_id").fetchall() == first


# --------------------------------------------------------------------------------------------
# Empty files: 0 rows, no error (chunked exports legitimately hold empty chunks)


@pytest.mark.parametrize(
    "content",
    [b"", HEADER + b"\n", HEADER, b"\n\r\n  \n"],
    ids=["zero-bytes", "header-only", "header-no-newline", "blank-lines"],
)
def test_empty_file_yields_zero_rows(con: duckdb.DuckDBPyConnection, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    assert load_events(con, path, "csv") == 0
    assert [r[0] for r in con.execute("DESCRIBE raw_events").fetchall()] == list(RAW_EVENTS_COLUMNS)
    summary = clean_events(con, CONFIG)
    assert (summary.raw, summary.cleaned, summary.quarantined) == (0, 0, 0)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "parquet"])
def test_empty_file_is_empty_in_every_text_format(con: duckdb.DuckDBPyConnection, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "empty.txt.gz"
    path.write_bytes(gzip.compress(b""))
    assert load_events(con, path, fmt) == 0


# --------------------------------------------------------------------------------------------
# File-level problems: a clear error naming file, line and what was expected


def _otto_file(path: Path) -> Path:
    sessions = [
        {"session": 1, "events": [{"aid": 10, "ts": 1659304800025, "type": "clicks"}]},
        {"session": 2, "events": [{"aid": 11, "ts": 1659304800026, "type": "orders"}]},
    ]
    path.write_text("".join(json.dumps(s) + "\n" for s in sessions))
    return path


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("rees46", "expected the rees46 header event_time,event_type,product_id"),
        ("retailrocket", "expected the retailrocket header timestamp,visitorid,event,itemid,transactionid"),
        ("csv", "expected a CSV header naming user_id, item_id, event_type, ts"),
        ("amazon", "expected user,item[,rating],timestamp"),
        ("sasrec", "expected 'user item item ...'"),
        ("diginetica", "expected a diginetica header"),
    ],
)
def test_wrong_format_names_file_line_and_expectation(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, fmt: str, expected: str
) -> None:
    path = _otto_file(tmp_path / "otto.jsonl")
    with pytest.raises(SourceFormatError) as info:
        load_events(con, path, fmt)
    message = str(info.value)
    assert str(path) in message and "line 1" in message and expected in message
    assert info.value.line == 1 and info.value.path == str(path)


def test_rees46_given_as_otto(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(b"event_time,event_type\n2019-10-01 00:00:00 UTC,view\n")
    with pytest.raises(SourceFormatError, match=r"events\.csv, line 1: expected JSON lines.*invalid JSON"):
        load_events(con, path, "otto")  # not one line is JSON: nothing parses


def test_whole_file_in_wrong_delimiter(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "semicolons.csv"
    path.write_bytes(b"\n".join([HEADER.replace(b",", b";"), *(r.replace(b",", b";") for r in clean_rows())]))
    with pytest.raises(SourceFormatError, match=r"semicolons\.csv, line 1: expected a CSV header .*missing"):
        load_events(con, path, "csv")


def test_file_where_nothing_parses(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "garbage.csv"
    path.write_bytes(b"\n".join([HEADER, event("u1", "i1", ts="not a time"), event("u2", "i2", ts="later")]))
    with pytest.raises(SourceFormatError, match=r"garbage\.csv, line 2: expected 9 comma-separated fields.*unparsable ts"):
        load_events(con, path, "csv")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_mixed_line_endings_lose_nothing(con: duckdb.DuckDBPyConnection, tmp_path: Path, compress: bool) -> None:
    # CRLF file with a bare LF line and a bare CR inside a line: lines as universal newlines see them.
    rows = [event("u1", f"i{k}", ts=f"2024-03-01 00:00:0{k}") for k in range(5)]
    body = HEADER + b"\r\n" + rows[0] + b"\r\n" + rows[1] + b"\n" + rows[2] + b"\r" + rows[3] + b"\r\n" + rows[4]
    body += b"\r\nu1,i\x1f9,view\r\n"  # a unit separator: DuckDB rejects the line, it stays a row
    path = tmp_path / ("mixed.csv.gz" if compress else "mixed.csv")
    path.write_bytes(gzip.compress(body) if compress else body)
    assert load_events(con, path, "csv") == 6
    got = [(r[0], r[4]) for r in _raw(con)]
    assert got == [(2, "i0"), (3, "i1"), (4, "i2"), (5, "i3"), (6, "i4"), (7, None)]
    assert _raw(con, "source_line = 7")[0][1:3] == ("malformed: unreadable line (too many columns)", "u1,i\x1f9,view")


def test_missing_paths(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    with pytest.raises(SourceFormatError, match="no such file or directory"):
        load_events(con, tmp_path / "nope.csv", "csv")
    with pytest.raises(SourceFormatError, match="no files"):
        load_events(con, str(tmp_path / "*.parquet"), "parquet")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / ".hidden").write_text("x")
    with pytest.raises(SourceFormatError, match="no files"):
        load_events(con, tmp_path / "only", "csv")
    with pytest.raises(ValueError, match="unknown source format 'synthetic'"):
        load_events(con, tmp_path, "synthetic")


def test_truncated_gzip_stream(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "events.csv.gz"
    rows = clean_rows() * 200
    path.write_bytes(gzip.compress(b"\n".join([HEADER, *rows]))[:-200])
    with pytest.raises(SourceFormatError, match=r"events\.csv\.gz: expected a readable \(gzip\) text file"):
        load_events(con, path, "csv")


def test_failed_load_leaves_previous_table(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    write_problem(good, PROBLEMS[2])
    assert load_events(con, good, "csv") == CLEAN + 2
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    write_problem(chunks / "a.csv", PROBLEMS[3])
    _otto_file(chunks / "b.csv")  # second chunk has the wrong header
    with pytest.raises(SourceFormatError, match=r"b\.csv, line 1"):
        load_events(con, chunks, "csv")
    assert con.execute("SELECT count(*), min(source) FROM raw_events").fetchall()[0] == (CLEAN + 2, "good.csv")


# --------------------------------------------------------------------------------------------
# The other readers on small generated files with their own kinds of bad rows


def test_rees46_crlf_gzip_with_bad_rows(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    header = b"event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    lines = [
        header,
        b"2019-10-01 00:00:00 UTC,view,1,100,electronics.phone,acme,10.50,7,sa",  # 2
        b"2019-10-01 00:00:01 UTC,remove_from_cart,1,100,,acme,10.50,7,sa",  # 3 unknown type
        b"2019-10-01 00:00:02 UTC,view,2,100,,\xe9lan,3.00,7,sa",  # 4 not UTF-8
        b"2019-10-01 00:00:03 UTC,cart,3,200,,,1e400x,8,sb",  # 5 bad price
        b'2019-10-01 00:00:04 UTC,purchase,4,200,"kids,toys",brand,2.00,8,sb',  # 6 quoted comma
        b"2019-10-01 00:00:05 UTC,view,5,200,,,2.00,,sb",  # 7 null user
        b"2031-01-01 00:00:00 UTC,view,6,200,,,2.00,8,sb",  # 8 future
        b"2019-10-01 00:00:06 UTC,view,7,200,,elenberg,25.71,52040330",  # 9 truncated last line
    ]
    path = tmp_path / "2019-Oct.csv.gz"
    path.write_bytes(gzip.compress(b"\r\n".join(lines)))
    assert load_events(con, path, "rees46") == 8
    raw = {r[0]: r for r in _raw(con)}
    assert raw[2][3:] == ("7", "1", "view", datetime(2019, 10, 1))
    assert con.execute("SELECT category, price FROM raw_events WHERE source_line IN (2, 6) ORDER BY 1").fetchall() == [
        ("electronics.phone", 10.5),
        ("kids,toys", 2.0),
    ]
    assert raw[4][1] == "malformed: bytes that are not UTF-8"
    assert raw[5][1] == "malformed: unparsable price '1e400x'"
    assert raw[9][1] == "malformed: expected 9 fields, got 8" and raw[9][2].endswith(",25.71,52040330")
    clean_events(con, CONFIG)
    assert _quarantined(con) == {
        3: "unknown_event_type",
        4: "malformed",
        5: "malformed",
        7: "null_id",
        8: "future_timestamp",
        9: "malformed",
    }


def test_timestamps_before_1990_are_quarantined(con: duckdb.DuckDBPyConnection) -> None:
    """Year-0001 and 1600 events (a clock or parsing error) never reach training: quarantined with
    their own reason, the bound being the one the API applies (contract.EARLIEST_EVENT_TS)."""
    from recsys_serving.contract import EARLIEST_EVENT_TS

    con.execute("CREATE TABLE raw_events (" + ", ".join(f"{c} {t}" for c, t in RAW_EVENTS_COLUMNS.items()) + ")")
    rows = [(1, "0001-01-01 00:00:00"), (2, "1600-01-01 00:00:00"), (3, str(EARLIEST_EVENT_TS)), (4, "2024-05-01 10:00:00")]
    for line, ts in rows:
        con.execute(
            "INSERT INTO raw_events (event_id, source_line, user_id, item_id, event_type, ts) VALUES (?, ?, 'u', 'i', 'view', ?)",
            [line, line, ts],
        )
    clean_events(con, CONFIG.model_copy(update={"min_user_interactions": 1, "min_item_interactions": 1,
                                                "dedupe_repeated_views": False}))
    quarantined = _quarantined(con)
    assert quarantined == {1: "ancient_timestamp", 2: "ancient_timestamp"}, quarantined
    detail = con.execute("SELECT detail FROM quarantined_events WHERE reason = 'ancient_timestamp' LIMIT 1").fetchall()[0][0]
    assert "is before 1990-01-01" in detail


def test_otto_bad_sessions(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    good = {"session": 5, "events": [{"aid": 1, "ts": 1659304800000, "type": "clicks"},
                                     {"aid": 2, "ts": 1659304801000, "type": "carts"},
                                     {"aid": 2, "ts": 1659304802000, "type": "orders"}]}
    lines = [
        json.dumps(good),  # 1: three events
        json.dumps({"session": 6, "events": [{"aid": 3, "ts": "soon", "type": "clicks"},  # 2: bad ts
                                             {"aid": None, "ts": 1659304800000, "type": "clicks"},  # null id
                                             {"aid": 4, "ts": 1659304800000, "type": "wishlist"}]}),  # unknown
        "not json at all",  # 3
        json.dumps({"session": 7, "events": []}),  # 4: no events, no rows
        json.dumps([1, 2, 3]),  # 5: JSON, wrong shape
        json.dumps(good)[:40],  # 6: truncated last line
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines))
    assert load_events(con, path, "otto") == 3 + 3 + 1 + 1 + 1
    errors = [(r[0], r[1]) for r in _raw(con, "parse_error IS NOT NULL")]
    assert errors == [
        (2, "malformed: unparsable ts 'soon'"),
        (3, "malformed: invalid JSON"),
        (5, 'malformed: expected {"session": ..., "events": [...]}'),
        (6, "malformed: invalid JSON"),
    ]
    assert [r[3:6] for r in _raw(con, "source_line = 1")] == [("5", "1", "view"), ("5", "2", "cart"), ("5", "2", "purchase")]
    clean_events(con, CONFIG)
    reasons = con.execute("SELECT reason, count(*) FROM quarantined_events GROUP BY 1").fetchall()
    assert dict(reasons) == {"malformed": 4, "null_id": 1, "unknown_event_type": 1}


def test_sasrec_lines(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_bytes(b"1 10 11 12\n2\n\n3\t13  10 \r\n4 \xff 14\n")
    assert load_events(con, path, "sasrec") == 3 + 1 + 2 + 1
    got = [(r[0], r[1], r[3], r[4], r[6]) for r in _raw(con)]
    t = lambda s: datetime(2000, 1, 1, 0, 0, s)  # noqa: E731 - synthetic ts = position seconds
    assert got == [
        (1, None, "1", "10", t(0)),
        (1, None, "1", "11", t(1)),
        (1, None, "1", "12", t(2)),
        (2, "malformed: expected a user id and at least one item, got 1 field", None, None, None),
        (4, None, "3", "13", t(0)),
        (4, None, "3", "10", t(1)),
        (5, "malformed: bytes that are not UTF-8", None, None, None),
    ]


def test_amazon_csv_without_header_and_tsv_with_one(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    csv_path = tmp_path / "ratings.csv"
    csv_path.write_text("A2SUAM1J3GNN3B,0000013714,5.0,1382400000\nA1,0000013714,great,1382400000\nA3,B1,4.0\n")
    assert load_events(con, csv_path, "amazon") == 3
    assert _raw(con) == [
        (1, None, None, "A2SUAM1J3GNN3B", "0000013714", "purchase", datetime(2013, 10, 22)),
        (2, "malformed: unparsable rating 'great'", "A1,0000013714,great,1382400000", None, None, None, None),
        (3, "malformed: expected 4 fields, got 3", "A3,B1,4.0", None, None, None, None),
    ]
    tsv_path = tmp_path / "train.tsv"
    tsv_path.write_text("user_id\titem_id\ttime\n1\t2\t965779200.5\n1\t3\n")
    assert load_events(con, tsv_path, "amazon") == 2
    assert [r[:2] for r in _raw(con)] == [(2, None), (3, "malformed: expected 3 fields, got 2")]
    assert _raw(con)[0][6] == datetime(2000, 8, 9, 0, 0, 0, 500_000)


def test_retailrocket_mapping(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433224214164,992329,addtocart,248676,\n"
        "1433221999827,111016,transaction,318965,4000\n"
        "14332x,1,view,2,\n"
        "1433221999827,111016,rate,318965,\n"
    )
    assert load_events(con, path, "retailrocket") == 5
    assert [(r[3], r[4], r[5]) for r in _raw(con)] == [
        ("257597", "355908", "view"),
        ("992329", "248676", "cart"),
        ("111016", "318965", "purchase"),
        (None, None, None),
        ("111016", "318965", "rate"),  # kept as read; cleaning quarantines it
    ]
    assert _raw(con)[0][6] == datetime(2015, 6, 2, 5, 2, 12, 117_000)
    assert _raw(con)[3][1] == "malformed: unparsable timestamp '14332x'"


def test_canonical_csv_by_column_name(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "\ufeffts,event_type,item_id,user_id,price,extra\n"  # BOM, any order, optional columns missing
        "2024-03-01T12:34:56Z,view,i1,u1,1.5,x\n"
        "2024-03-01 12:34:56,cart,i2,u1,,x\n"
        "2024-03-01T14:34:56+02:00,purchase,\"i,3\",u1,2,x\n"
        "2024-03-01T12:34:56.250-00:30,view,i4,u1,3,x\n"
    )
    assert load_events(con, path, "csv") == 4
    got = con.execute("SELECT item_id, ts, price, session_id, device FROM raw_events ORDER BY event_id").fetchall()
    noon = datetime(2024, 3, 1, 12, 34, 56)
    assert got == [
        ("i1", noon, 1.5, None, None),
        ("i2", noon, None, None, None),
        ("i,3", noon, 2.0, None, None),
        ("i4", datetime(2024, 3, 1, 13, 4, 56, 250_000), 3.0, None, None),
    ]


def test_canonical_parquet(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    # Integer ids, a TIMESTAMPTZ ts, no optional columns but price.
    con.execute("SET TimeZone = 'America/New_York'")  # must not change what UTC means
    con.execute(
        f"""COPY (SELECT 7 AS user_id, 100 + i AS item_id, 'view' AS event_type,
                   TIMESTAMPTZ '2024-03-01 12:00:00+00' + to_minutes(i) AS ts, 1.5::DECIMAL(6,2) AS price
                 FROM range(3) t(i)) TO '{folder / "part-0.parquet"}' (FORMAT parquet)"""
    )
    # Text ts (one unparsable), every optional column.
    con.execute(
        f"""COPY (SELECT * FROM (VALUES ('u1', 'i1', 'cart', '2024-03-02T00:00:00Z', 's', 'c', 'd', 'g', 2.0),
                                       ('u2', 'i2', 'view', 'nope', 's', 'c', 'd', 'g', 2.0))
                 v(user_id, item_id, event_type, ts, session_id, category, device, segment, price))
            TO '{folder / "part-1.parquet"}' (FORMAT parquet)"""
    )
    assert load_events(con, folder, "parquet") == 5
    rows = con.execute(
        "SELECT event_id, source, source_line, parse_error, user_id, item_id, ts, price, device FROM raw_events ORDER BY event_id"
    ).fetchall()
    assert rows[:4] == [
        (0, "part-0.parquet", None, None, "7", "100", datetime(2024, 3, 1, 12, 0), 1.5, None),
        (1, "part-0.parquet", None, None, "7", "101", datetime(2024, 3, 1, 12, 1), 1.5, None),
        (2, "part-0.parquet", None, None, "7", "102", datetime(2024, 3, 1, 12, 2), 1.5, None),
        (3, "part-1.parquet", None, None, "u1", "i1", datetime(2024, 3, 2), 2.0, "d"),
    ]
    assert rows[4][:4] == (4, "part-1.parquet", None, "malformed: unparsable ts 'nope'")
    assert "nope" in con.execute("SELECT raw_line FROM raw_events WHERE event_id = 4").fetchall()[0][0]

    con.execute(f"COPY (SELECT 'u' AS user_id, 'view' AS event_type, now() AS ts) TO '{tmp_path / 'bad.parquet'}'")
    with pytest.raises(SourceFormatError, match=r"bad\.parquet: expected Parquet columns .*; got 'no column item_id'"):
        load_events(con, tmp_path / "bad.parquet", "parquet")
    (tmp_path / "not.parquet").write_text("user_id,item_id\n")
    with pytest.raises(SourceFormatError, match=r"not\.parquet: expected a Parquet file"):
        load_events(con, tmp_path / "not.parquet", "parquet")


def test_parquet_files_of_one_schema_load_together_with_per_file_ids(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """Same-schema files go in one parallel statement; ids stay file offset + row number, in file order,
    and a file whose rows all fail to parse is still named even when good files follow it."""
    folder = tmp_path / "chunks"
    folder.mkdir()
    sizes = [3, 5, 2]
    for n, size in enumerate(sizes):
        con.execute(
            f"""COPY (SELECT 'u{n}' AS user_id, 'i' || i AS item_id, 'view' AS event_type,
                       TIMESTAMP '2024-03-01' + to_minutes(i) AS ts FROM range({size}) t(i))
                TO '{folder / f"events-{n}.parquet"}' (FORMAT parquet, ROW_GROUP_SIZE 2)"""
        )
    assert load_events(con, folder, "parquet") == sum(sizes)
    rows = con.execute("SELECT event_id, source, user_id, item_id FROM raw_events ORDER BY event_id").fetchall()
    expected = [(i, f"events-{n}.parquet", f"u{n}", f"i{i - sum(sizes[:n])}")
                for n, size in enumerate(sizes) for i in range(sum(sizes[:n]), sum(sizes[:n]) + size)]
    assert rows == expected

    # text timestamps: file a parses, file b (same schema) has no parsable row, file c parses
    for name, ts in (("a", "2024-03-01T00:00:00Z"), ("b", "soon"), ("c", "2024-03-02T00:00:00Z")):
        con.execute(
            f"""COPY (SELECT 'u' AS user_id, 'i' AS item_id, 'view' AS event_type, '{ts}' AS ts)
                TO '{tmp_path / f"t-{name}.parquet"}' (FORMAT parquet)"""
        )
    with pytest.raises(SourceFormatError, match=r"t-b\.parquet: expected canonical Parquet rows"):
        load_events(con, str(tmp_path / "t-*.parquet"), "parquet")
    assert con.execute("SELECT count(*) FROM raw_events").fetchall() == [(sum(sizes),)]  # previous table kept


def test_caller_transaction_is_respected(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    write_problem(path, PROBLEMS[2])
    con.execute("BEGIN TRANSACTION")
    assert load_events(con, path, "csv") == CLEAN + 2
    con.execute("ROLLBACK")  # the caller's transaction owns the outcome
    assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'raw_events'").fetchall() == [(0,)]


def test_timestamps_are_naive_utc_whatever_the_session_zone(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    con.execute("SET TimeZone = 'Asia/Tokyo'")
    path = tmp_path / "e.csv"
    path.write_bytes(b"\n".join([HEADER, event("u", "i", ts="2024-03-01T12:00:00+01:00"), event("u", "j", ts="2024-03-01 12:00:00")]))
    load_events(con, path, "csv")
    ts = [r[6] for r in _raw(con)]
    assert ts == [datetime(2024, 3, 1, 11, 0), datetime(2024, 3, 1, 12, 0)]
    assert all(t.tzinfo is None for t in ts)
