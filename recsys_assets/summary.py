"""Print where the results of a run are (`make run` ends with this)."""

from __future__ import annotations

import json
import os

import duckdb

from recsys_assets.config import recsys_home, warehouse_path
from recsys_serving.contract import BUNDLES_DIR, CURRENT_BUNDLE


def main() -> None:
    home = recsys_home()
    print(f"\nResults under RECSYS_HOME = {home}")
    db = warehouse_path()
    if db.exists():
        con = duckdb.connect(str(db), read_only=True)
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        print(f"  warehouse  {db}")
        for table in tables:
            rows = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
            print(f"    {table:<28} {rows:>12,} rows")
        con.close()
    report = home / "reports" / "evaluation" / "latest"
    if (report / "metrics.json").exists():
        metrics = json.loads((report / "metrics.json").read_text())
        print(f"  evaluation {report / 'report.html'} (target {metrics.get('config', {}).get('target_label', 'next_item')})")
        for model, protocols in metrics.get("models", {}).items():
            full = protocols.get("full", {})
            print(f"    {model:<12} full HR@10 {full.get('HR@10', float('nan')):.4f}  NDCG@10 {full.get('NDCG@10', float('nan')):.4f}")
    for name in ("models", "bundles", "features", "events"):
        path = home / name
        if path.exists():
            print(f"  {name:<10} {path}")
    current = home / BUNDLES_DIR / CURRENT_BUNDLE
    if current.exists():
        print(f"  served bundle -> {current.resolve()}")
    print(f"  dagster    {os.environ.get('DAGSTER_HOME', home / 'dagster')} (make ui, then http://127.0.0.1:3000)")


if __name__ == "__main__":
    main()
