"""Where the project writes: everything lives under one directory, ``RECSYS_HOME``."""

from __future__ import annotations

from pathlib import Path

from recsys_serving.contract import BUNDLES_DIR, REPO_ROOT, recsys_home_path

__all__ = ["REPO_ROOT", "bundles_dir", "models_dir", "recsys_home", "reports_dir", "warehouse_path"]


def recsys_home() -> Path:
    """The root of everything the project writes (default ``.recsys/`` in the repo), created."""
    home = recsys_home_path()
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
    return _sub(BUNDLES_DIR)


def _sub(name: str) -> Path:
    path = recsys_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
