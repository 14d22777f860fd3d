"""Materializing the data stages through Dagster's API: counts reconcile, checks pass, tables follow the contract."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from dagster import materialize

from recsys_assets.assets import cleaning, ingest, sequences
from recsys_assets.data.schema import FIRST_ITEM_TOKEN, RAW_EVENTS_COLUMNS
from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager
from recsys_assets.resources import WarehouseResource

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _materialize(tmp_path: Path, raw_config: dict):
    db = str(tmp_path / "warehouse.duckdb")
    result = materialize(
        [*ingest.assets, *cleaning.assets, *sequences.assets, *ingest.asset_checks,
         *cleaning.asset_checks, *sequences.asset_checks],
        resources={
            "warehouse": WarehouseResource(database=db, memory_limit="2GB"),
            "warehouse_io_manager": DuckDBTableIOManager(database=db),
            "artifact_io_manager": JsonArtifactIOManager(directory=str(tmp_path / "artifacts")),
        },
        run_config={"ops": {"raw_events": {"config": raw_config}}},
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks if not c.passed]
    return duckdb.connect(db, read_only=True)


def test_synthetic_default_source_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_EVENTS_PATH", raising=False)
    monkeypatch.delenv("RECSYS_EVENTS_FORMAT", raising=False)
    con = _materialize(tmp_path, {"synthetic_users": 800, "synthetic_items": 300})
    raw, cleaned, quarantined = con.execute(
        "SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM cleaned_interactions),"
        " (SELECT count(*) FROM quarantined_events)"
    ).fetchall()[0]
    assert raw == cleaned + quarantined and cleaned > 0.5 * raw
    assert [r[0] for r in con.execute("DESCRIBE raw_events").fetchall()] == list(RAW_EVENTS_COLUMNS)
    reasons = dict(con.execute("SELECT reason, count(*) FROM quarantined_events GROUP BY 1").fetchall())
    # The generator plants every kind of noise; each must be caught under its own reason.
    for reason in ("malformed", "null_id", "unknown_event_type", "future_timestamp", "duplicate", "bot"):
        assert reasons.get(reason, 0) > 0, reasons
    # Leave-one-out: the test item is the last token and never part of the training tokens' tail.
    rows = con.execute("SELECT tokens, train_tokens, valid_item, test_item FROM tokenized_sequences").fetchall()
    assert rows
    for tokens, train, valid, test in rows:
        assert min(tokens) >= FIRST_ITEM_TOKEN
        if test is not None:
            assert tokens[-1] == test and tokens[-2] == valid and train == tokens[:-2]


@pytest.mark.skipif(not (SHARED / "rees46").exists(), reason="shared datasets not present")
def test_real_rees46_through_the_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    path = SHARED / "rees46" / "2019-Oct_head.csv.gz"
    con = _materialize(tmp_path, {"events_format": "rees46", "events_path": str(path)})
    raw = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    assert raw == 17_434
    users = con.execute("SELECT count(*) FROM tokenized_sequences").fetchall()[0][0]
    assert users > 0
