"""Event-source readers: every supported source format -> the ``raw_events`` table, inside DuckDB.
`load_events` (in `core`) is the entry point; each format lives in its own module and registers there."""

from __future__ import annotations

# Imported for their registration in core.LOADERS, and for the names they export below.
from recsys_assets.data.sources import amazon, generic_csv, otto, parquet, sasrec  # noqa: F401
from recsys_assets.data.sources.core import (
    FORMATS,
    LOADERS,
    OPTIONAL_CANONICAL,
    REQUIRED_CANONICAL,
    SourceFormatError,
    load_events,
)
from recsys_assets.data.sources.diginetica import CATEGORIES as DIGINETICA_CATEGORIES
from recsys_assets.data.sources.diginetica import PURCHASES as DIGINETICA_PURCHASES
from recsys_assets.data.sources.diginetica import VIEWS as DIGINETICA_VIEWS
from recsys_assets.data.sources.rees46 import HEADER as REES46_HEADER
from recsys_assets.data.sources.retailrocket import HEADER as RETAILROCKET_HEADER
from recsys_assets.data.sources.sasrec import EPOCH as SASREC_EPOCH

__all__ = [
    "DIGINETICA_CATEGORIES",
    "DIGINETICA_PURCHASES",
    "DIGINETICA_VIEWS",
    "FORMATS",
    "LOADERS",
    "OPTIONAL_CANONICAL",
    "REES46_HEADER",
    "REQUIRED_CANONICAL",
    "RETAILROCKET_HEADER",
    "SASREC_EPOCH",
    "SourceFormatError",
    "load_events",
]

if set(LOADERS) != set(FORMATS):  # a format module not imported above
    raise ImportError(f"source formats without a loader: {sorted(set(FORMATS) - set(LOADERS))}")
