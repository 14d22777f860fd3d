"""Resources: configured in definitions.py, never hard-coded in assets."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import duckdb
from dagster import ConfigurableResource
from pydantic import Field

from recsys_assets.config import recsys_home, warehouse_path


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
