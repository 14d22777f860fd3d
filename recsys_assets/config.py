"""Where the project writes: everything lives under one directory, ``RECSYS_HOME``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def recsys_home() -> Path:
    """The root of everything the project writes (default ``.recsys/`` in the repo)."""
    home = Path(os.environ.get("RECSYS_HOME", REPO_ROOT / ".recsys")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def warehouse_path() -> Path:
    """The DuckDB file holding one table per tabular asset."""
    return recsys_home() / "warehouse.duckdb"


def models_dir() -> Path:
    return _sub("models")


def reports_dir() -> Path:
    return _sub("reports")


def bundles_dir() -> Path:
    return _sub("bundles")


def _sub(name: str) -> Path:
    path = recsys_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
