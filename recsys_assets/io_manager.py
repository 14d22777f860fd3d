"""An IO manager that keeps every tabular asset as a table of one DuckDB file.

Written by hand because Dagster's DuckDB IO managers load each table into memory as a
DataFrame; this one hands downstream assets a reference and lets SQL stages run inside DuckDB,
out of core, so the same code works on 100M+ events.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl
import pyarrow as pa
from dagster import ConfigurableIOManager, InputContext, OutputContext

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
    """An asset output that is already a table (or SQL) inside the warehouse.

    `sql` is run as `CREATE OR REPLACE TABLE <asset> AS <sql>`; if `sql` is None the producer
    has written the table itself (e.g. a streaming writer) and only the name is recorded.
    """

    sql: str | None = None


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
        if obj is None:
            return
        table = _table_name(context)
        with duckdb.connect(self._db()) as con:
            if isinstance(obj, TableQuery):
                if obj.sql is not None:
                    con.execute(f'CREATE OR REPLACE TABLE "{table}" AS {obj.sql}')
            elif isinstance(obj, (pl.DataFrame, pl.LazyFrame, pa.Table)):
                frame = obj.collect() if isinstance(obj, pl.LazyFrame) else obj
                arrow = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
                con.register("_incoming", arrow)
                con.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _incoming')
                con.unregister("_incoming")
            else:
                raise TypeError(
                    f"asset {table!r} returned {type(obj).__name__}; expected a polars "
                    "DataFrame/LazyFrame, a pyarrow Table or a TableQuery"
                )
            rows = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
        context.add_output_metadata({"table": f"{Path(self._db()).name}:{table}", "rows": int(rows)})

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
