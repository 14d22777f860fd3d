"""Resources: configured in definitions.py, never hard-coded in assets."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import duckdb
from dagster import ConfigurableResource
from pydantic import Field

from recsys_assets.config import recsys_home, warehouse_path
from recsys_serving.contract import TARGET_ENV, TARGET_EVENT_TYPES_ENV, PredictionTarget, target_from_env


class WarehouseResource(ConfigurableResource):
    """The DuckDB warehouse, opened with limits that keep large stages out of core."""

    database: str = Field("", description="DuckDB file; default $RECSYS_HOME/warehouse.duckdb.")
    memory_limit: str = Field("8GB", description="DuckDB spills to disk beyond this.")
    threads: int = Field(0, description="0 = DuckDB's default (all cores).")

    def path(self) -> Path:
        return Path(self.database) if self.database else warehouse_path()

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path))
        try:
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            spill = recsys_home() / "tmp" / "duckdb"
            spill.mkdir(parents=True, exist_ok=True)
            con.execute(f"SET temp_directory = '{spill}'")
            if self.threads:
                con.execute(f"SET threads = {self.threads}")
            yield con
        finally:
            con.close()


class PredictionTargetResource(ConfigurableResource):
    """What the models of a run predict (`recsys_serving.contract.PredictionTarget`). Training, the
    baselines and the evaluation all read this one setting; the model, the report and the bundle
    record it, and serving answers for the target its bundle was trained for."""

    target: str = Field("", description=f"next_item | next_purchase; empty: ${TARGET_ENV}, else next_item")
    event_types: str = Field(
        "", description=f"next_purchase: comma-separated target event types, e.g. cart,purchase; empty: "
        f"${TARGET_EVENT_TYPES_ENV}, else purchase"
    )

    def resolve(self) -> PredictionTarget:
        if not (self.target or self.event_types):
            return target_from_env()
        return PredictionTarget.parse(self.target or target_from_env().name, self.event_types)
