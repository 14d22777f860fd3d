"""Materializing the data stages through Dagster's API: counts reconcile, checks pass, tables follow the contract."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from dagster import materialize

from recsys_assets.assets import cleaning, ingest, sequences
from recsys_serving.contract import FIRST_ITEM_TOKEN
from recsys_assets.data.schema import RAW_EVENTS_COLUMNS
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


def test_cleaned_interactions_without_the_quarantine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The subset `*evaluation_report` takes: cleaned_interactions without quarantined_events. The pass
    still reconciles, the unselected quarantine is neither stored nor left behind, and each table's
    materialization carries the standard row count and column schema."""
    from dagster import AssetSelection

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_EVENTS_PATH", raising=False)
    monkeypatch.delenv("RECSYS_EVENTS_FORMAT", raising=False)
    db = str(tmp_path / "warehouse.duckdb")
    result = materialize(
        [*ingest.assets, *cleaning.assets, *ingest.asset_checks, *cleaning.asset_checks],
        selection=AssetSelection.assets("raw_events", "cleaned_interactions"),
        resources={
            "warehouse": WarehouseResource(database=db, memory_limit="2GB"),
            "warehouse_io_manager": DuckDBTableIOManager(database=db),
        },
        run_config={"ops": {"raw_events": {"config": {"synthetic_users": 300, "synthetic_items": 120}}}},
    )
    assert result.success
    stored = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert stored == {"raw_events", "cleaned_interactions"}
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"raw_events_ids_unique": True, "counts_reconcile": True, "no_null_ids": True, "no_duplicate_events": True}
    reconcile = next(c for c in result.get_asset_check_evaluations() if c.check_name == "counts_reconcile")
    raw, cleaned, quarantined = (reconcile.metadata[k].value for k in ("raw", "cleaned", "quarantined"))
    assert raw == cleaned + quarantined and quarantined > 0
    with duckdb.connect(db, read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert tables == {"raw_events", "cleaned_interactions"}
        for node, table in (("raw_events", "raw_events"), ("clean_raw_events", "cleaned_interactions")):
            meta = result.asset_materializations_for_node(node)[0].metadata
            columns = con.execute(f"DESCRIBE {table}").fetchall()
            assert meta["dagster/row_count"].value == con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            assert [(c.name, c.type) for c in meta["dagster/column_schema"].schema.columns] == [
                (c[0], c[1]) for c in columns
            ]
