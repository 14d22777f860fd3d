"""An IO manager that keeps every tabular asset as a table of one DuckDB file.

Written by hand because Dagster's DuckDB IO managers load each table into memory as a
DataFrame; this one hands downstream assets a reference and lets SQL stages run inside DuckDB,
out of core, so the same code works on 100M+ events. Every tabular asset writes its table itself
(through WarehouseResource) and returns a `TableQuery`; the IO manager only records the table's
standard metadata (row count, column schema) on the materialization.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl
from dagster import ConfigurableIOManager, InputContext, OutputContext

from recsys_assets.assets.metadata import table_metadata
from recsys_assets.config import recsys_home, warehouse_path


@dataclass(frozen=True)
class TableRef:
    """A table of the warehouse, handed to downstream assets instead of its rows."""

    database: str
    table: str

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        con = duckdb.connect(self.database, read_only=read_only)
        try:
            yield con
        finally:
            con.close()

    def to_polars(self, columns: list[str] | None = None) -> pl.DataFrame:
        cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        with self.connect() as con:
            return con.sql(f'SELECT {cols} FROM "{self.table}"').pl()

    def count(self) -> int:
        with self.connect() as con:
            return int(con.sql(f'SELECT count(*) FROM "{self.table}"').fetchall()[0][0])


@dataclass(frozen=True)
class TableQuery:
    """An asset output whose table the asset has already written into the warehouse, under the
    asset's name; the IO manager records its name, row count and column schema."""


def _table_name(context: OutputContext | InputContext) -> str:
    return context.asset_key.path[-1]


class DuckDBTableIOManager(ConfigurableIOManager):
    """Stores each asset as table `<asset name>` of the DuckDB file `database`."""

    database: str = ""

    def _db(self) -> str:
        path = Path(self.database) if self.database else warehouse_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def handle_output(self, context: OutputContext, obj: object) -> None:
        table = _table_name(context)
        if not isinstance(obj, TableQuery):
            raise TypeError(
                f"asset {table!r} returned {type(obj).__name__}; expected a TableQuery "
                "(write the table through the warehouse resource, then return TableQuery())"
            )
        with duckdb.connect(self._db()) as con:
            metadata = table_metadata(con, f'"{table}"')
        context.add_output_metadata({"table": f"{Path(self._db()).name}:{table}", **metadata})

    def load_input(self, context: InputContext) -> TableRef:
        table = _table_name(context)
        db = self._db()
        with duckdb.connect(db, read_only=False) as con:
            exists = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
            ).fetchall()[0][0]
        if not exists:
            raise FileNotFoundError(f"table {table!r} is not in {db}: materialize asset {table!r} first")
        return TableRef(database=db, table=table)


class JsonArtifactIOManager(ConfigurableIOManager):
    """Stores a non-tabular asset's value (a JSON-able dict: paths of files it wrote, ids,
    metrics) as `$RECSYS_HOME/artifacts/<asset>.json`; the heavy files themselves (weights,
    ONNX models, reports) live where the asset wrote them."""

    directory: str = ""

    def _path(self, context: OutputContext | InputContext) -> Path:
        root = Path(self.directory) if self.directory else recsys_home() / "artifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root / f"{_table_name(context)}.json"

    def handle_output(self, context: OutputContext, obj: dict) -> None:
        if obj is None:
            return
        if not isinstance(obj, dict):
            raise TypeError(f"asset {_table_name(context)!r} must return a dict, got {type(obj).__name__}")
        path = self._path(context)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(path)  # atomic: a reader never sees half a file

    def load_input(self, context: InputContext) -> dict:
        path = self._path(context)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: materialize asset {_table_name(context)!r} first")
        return json.loads(path.read_text())
