"""Tokenizing in hash partitions of users (how large tables stay within DuckDB's memory) gives the
same sequences as one pass."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb

from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.sequences import build_context_vocabulary, build_item_vocabulary, tokenize_sequences
from recsys_assets.data.sources import load_events
from recsys_assets.data.synthetic import SyntheticConfig, generate_events


def test_partitioned_tokenization_equals_one_pass(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_users=400, n_items=150, n_categories=10, events_per_user_mean=15, seed=5,
                          output_format="parquet", malformed_rate=0.0)
    generate_events(tmp_path / "events", cfg)
    con = duckdb.connect()
    load_events(con, tmp_path / "events", "parquet")
    clean_events(con, CleaningConfig(now=datetime(2030, 1, 1)))
    build_item_vocabulary(con)
    build_context_vocabulary(con)
    rows = con.execute("SELECT count(*) FROM cleaned_interactions").fetchall()[0][0]
    assert rows > 1000

    one = tokenize_sequences(con, sequences_table="one_pass")
    many = tokenize_sequences(con, sequences_table="partitioned", partition_rows=rows // 7)
    assert one.model_dump(exclude={"seconds"}) == many.model_dump(exclude={"seconds"})
    columns = "user_id, tokens, event_types, tod, devices, segments, ts, train_tokens, valid_item, test_item"
    a = con.execute(f"SELECT {columns} FROM one_pass ORDER BY user_id").fetchall()
    b = con.execute(f"SELECT {columns} FROM partitioned ORDER BY user_id").fetchall()
    assert a == b and len(a) == one.users
    assert con.execute("SELECT user_id FROM one_pass").fetchall() == sorted(r[:1] for r in a)  # one pass: sorted
