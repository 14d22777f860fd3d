"""Where the project writes: everything lives under one directory, ``RECSYS_HOME``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from recsys_serving.contract import BUNDLES_DIR, REPO_ROOT, recsys_home_path

__all__ = ["REPO_ROOT", "bundles_dir", "models_dir", "recsys_home", "report_url", "reports_dir", "warehouse_path"]

REPORTS_URL_ENV = "RECSYS_REPORTS_URL"
# where `make ui` serves $RECSYS_HOME/reports (a browser will not follow file:// links from the UI)
DEFAULT_REPORTS_URL = "http://127.0.0.1:3001/"


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


def report_url(path: Path) -> str:
    """The http address of a file under reports_dir(), at $RECSYS_REPORTS_URL (default: `make ui`'s)."""
    base = os.environ.get(REPORTS_URL_ENV) or DEFAULT_REPORTS_URL
    relative = Path(path).resolve().relative_to(reports_dir().resolve())
    return base.rstrip("/") + "/" + quote(relative.as_posix())


def _sub(name: str) -> Path:
    path = recsys_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
