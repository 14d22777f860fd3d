"""Metadata a person reads in the Dagster UI: markdown tables, plots embedded as PNG, and the
standard table metadata (row count, column schema) the catalog shows for every table."""

from __future__ import annotations

import base64
import io
from typing import Any

import duckdb
import polars as pl
from dagster import MetadataValue, TableColumn, TableSchema

# cleaned_interactions records the repeated-view rule it applied under this key; the feature store
# applies the same rule to events that serving pushes.
REPEATED_VIEW_RULE_METADATA = "repeated_view_rule"

# drift_report records its verdict under this key; the drift sensor reads it to decide on a retrain.
DRIFT_VERDICT_METADATA = "verdict"
# Its values: recsys_serving.contract.DriftVerdict.


def figure_markdown(fig: Any, title: str = "") -> MetadataValue:
    """A matplotlib figure as a markdown image (base64 PNG), closed after rendering."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{data})")


def table_markdown(frame: pl.DataFrame, max_rows: int = 10) -> MetadataValue:
    """The first rows of a frame as a markdown table (lists shortened so the table stays readable)."""
    head = frame.head(max_rows)
    cols = head.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = []
        for value in row:
            text = str(value[:8]) + ("…" if len(value) > 8 else "") if isinstance(value, list) else str(value)
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return MetadataValue.md("\n".join(lines))


def table_metadata(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, MetadataValue]:
    """Dagster's standard table metadata of a DuckDB relation (a quoted table name, or e.g.
    `read_parquet('...')`): `dagster/row_count` and `dagster/column_schema` with DuckDB's types.

    Written under the documented keys (the namespace of `TableMetadataSet`, which dagster 1.13
    does not export publicly)."""
    columns = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()  # (name, type, null, ...)
    rows = con.execute(f"SELECT count(*) FROM {relation}").fetchall()[0][0]
    return {
        "dagster/row_count": MetadataValue.int(int(rows)),
        "dagster/column_schema": MetadataValue.table_schema(
            TableSchema(columns=[TableColumn(name=str(c[0]), type=str(c[1])) for c in columns])
        ),
    }
