"""The shared contract: each rule behaves the same in Python (serving) and in SQL (the pipeline)."""

from __future__ import annotations

import ast
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from recsys_serving import contract
from recsys_serving.contract import (
    TIME_OF_DAY_BUCKETS,
    RepeatedViewRule,
    sequence_length_mismatch,
    time_of_day_sql,
    time_of_day_token,
    time_of_day_token_of,
)

REPO = Path(__file__).resolve().parents[1]


def test_contract_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(contract.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", "os", "dataclasses", "datetime", "pathlib", "typing"}


def test_time_of_day_tokens_cover_the_day_and_sql_agrees() -> None:
    hours = list(range(24))
    assert {time_of_day_token(h) for h in hours} == set(range(1, TIME_OF_DAY_BUCKETS + 1))
    with duckdb.connect() as con:
        sql = con.execute(
            f"SELECT {time_of_day_sql('ts')} FROM (SELECT TIMESTAMP '2024-01-01' + INTERVAL (h) HOUR AS ts "
            "FROM range(24) r(h)) ORDER BY ts"
        ).fetchall()
    assert [row[0] for row in sql] == [time_of_day_token(h) for h in hours]
    # Aware timestamps are converted to UTC first: 23:30 at UTC+2 is 21:30 UTC.
    aware = datetime(2024, 1, 1, 23, 30, tzinfo=timezone(timedelta(hours=2)))
    assert time_of_day_token_of(aware) == time_of_day_token(21)


@pytest.mark.parametrize("window", [0.0, 60.0, 1800.0, None])
def test_repeated_view_rule_is_the_same_in_python_and_sql(window: float | None) -> None:
    rule = RepeatedViewRule(window)
    rng = random.Random(7)
    start = datetime(2024, 1, 1)
    rows = []
    for i in range(400):
        prev = (rng.choice(["a", "b"]), rng.choice(["view", "cart"]), start + timedelta(seconds=rng.randint(0, 4000)))
        cur = (rng.choice(["a", "b"]), rng.choice(["view", "purchase"]), prev[2] + timedelta(seconds=rng.choice([0, 30, 60, 61, 1800, 1801, 3600])))
        rows.append((i, *prev, *cur))
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE t (i INT, prev_item VARCHAR, prev_type VARCHAR, prev_ts TIMESTAMP,"
            " item_id VARCHAR, event_type VARCHAR, ts TIMESTAMP)"
        )
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        in_sql = {i for (i,) in con.execute(f"SELECT i FROM t WHERE {rule.sql()}").fetchall()}
    in_python = {r[0] for r in rows if rule.is_repeated(*r[1:])}
    assert in_sql == in_python
    assert (len(in_python) == 0) == (window is None)


def test_repeated_view_rule_round_trips_through_its_tag() -> None:
    for rule in (RepeatedViewRule(), RepeatedViewRule(None), RepeatedViewRule(90)):
        assert RepeatedViewRule.from_tag(rule.tag()) == rule
    assert RepeatedViewRule.from_tag(None) == RepeatedViewRule()
    with pytest.raises(ValueError, match="repeated_view_window_s"):
        RepeatedViewRule(-1)


def test_cleaning_config_carries_the_rule_serving_applies() -> None:
    from recsys_assets.data.cleaning import CleaningConfig

    assert CleaningConfig().repeated_view_rule == RepeatedViewRule()
    assert CleaningConfig(repeated_view_window_s=60).repeated_view_rule == RepeatedViewRule(60)
    assert CleaningConfig(dedupe_repeated_views=False).repeated_view_rule == RepeatedViewRule(None)


def test_sequence_length_rule() -> None:
    assert sequence_length_mismatch(model_max_len=50, stored_events=49) is None
    assert sequence_length_mismatch(model_max_len=20, stored_events=50) is None
    message = sequence_length_mismatch(model_max_len=200, stored_events=50)
    assert message and "keeps the latest 50 events" in message and "reads 199" in message


def test_model_bundle_refuses_a_model_longer_than_the_feature_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import build_asset_context

    from recsys_assets.assets.export import ModelBundleConfig, model_bundle
    from recsys_assets.bert4rec.model import BERT4RecConfig
    from recsys_assets.io_manager import TableRef

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    config = BERT4RecConfig(vocab_size=40, hidden=16, layers=1, heads=2, max_len=200)
    table = TableRef(database=str(tmp_path / "warehouse.duckdb"), table="unused")
    with pytest.raises(ValueError, match="feature view 'user_sequence'.*keeps the latest 50 events.*reads 199"):
        model_bundle(
            build_asset_context(),
            config=ModelBundleConfig(),
            onnx_model={"config": config.model_dump()},
            tensorrt_engine={},
            evaluation_report={},
            item_vocabulary=table,
            context_vocabulary=table,
            cleaned_interactions=table,
            feast_online_store={"max_len": 50},
        )
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())
