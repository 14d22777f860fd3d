"""Metadata a person reads in the Dagster UI: markdown tables and plots embedded as PNG."""

from __future__ import annotations

import base64
import io
from typing import Any

import polars as pl
from dagster import MetadataValue


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
