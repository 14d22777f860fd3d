"""The code location: every asset, check, resource, job, sensor and schedule, composed in one place."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from recsys_assets import automation
from recsys_assets.assets import (
    cleaning,
    evaluation,
    export,
    features,
    ingest,
    monitoring,
    new_items,
    sequences,
    training,
)
from recsys_assets.io_manager import DuckDBTableIOManager, JsonArtifactIOManager
from recsys_assets.resources import PredictionTargetResource, WarehouseResource

STAGES = [ingest, cleaning, sequences, features, training, evaluation, export, new_items, monitoring]

retrain_job = define_asset_job(
    automation.RETRAIN_JOB,
    # drift_report is monitoring (drift_job makes it) and new_item_bundle grows a served bundle
    # between retrains (new_items_job): training reads neither.
    selection=AssetSelection.all() - AssetSelection.assets(automation.DRIFT_REPORT, automation.NEW_ITEM_BUNDLE),
    description="Raw events to a served model: ingest, clean, tokenize, train, evaluate, export, promote.",
)

defs = Definitions(
    assets=[a for stage in STAGES for a in stage.assets],
    asset_checks=[c for stage in STAGES for c in stage.asset_checks],
    jobs=[retrain_job, *automation.jobs, *(j for stage in STAGES for j in getattr(stage, "jobs", []))],
    schedules=[*automation.schedules, *(s for stage in STAGES for s in getattr(stage, "schedules", []))],
    sensors=[*automation.sensors, *(s for stage in STAGES for s in getattr(stage, "sensors", []))],
    resources={
        "warehouse": WarehouseResource(),
        "prediction_target": PredictionTargetResource(),
        "warehouse_io_manager": DuckDBTableIOManager(),
        "artifact_io_manager": JsonArtifactIOManager(),
    },
    # One process: DuckDB allows a single writer, and the stages are heavy enough to use all cores.
    executor=in_process_executor,
)
