"""The k-core of the cleaning stage equals a brute-force fixpoint on random power-law data, and
every row it removes is quarantined as below_k_core."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.sources import load_events


def brute_force_k_core(rows: list[tuple[str, str]], k_user: int, k_item: int) -> set[int]:
    """Indices of the rows in the k-core: drop rows of users/items below k until nothing changes."""
    alive = set(range(len(rows)))
    while True:
        users = Counter(rows[r][0] for r in alive)
        items = Counter(rows[r][1] for r in alive)
        keep = {r for r in alive if users[rows[r][0]] >= k_user and items[rows[r][1]] >= k_item}
        if keep == alive:
            return alive
        alive = keep


@pytest.mark.parametrize(("seed", "k_user", "k_item"), [(0, 5, 5), (1, 3, 7), (2, 6, 2)])
def test_k_core_matches_brute_force(tmp_path: Path, seed: int, k_user: int, k_item: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 400, 150
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1  # a long tail that peels over several rounds
    popularity /= popularity.sum()
    start = datetime(2024, 1, 1)
    rows: list[tuple[str, str]] = []
    lines = ["user_id,item_id,event_type,ts"]
    for u in range(n_users):
        for j in range(int(rng.integers(1, 12))):
            item = f"i{rng.choice(n_items, p=popularity)}"
            rows.append((f"u{u}", item))
            # purchases a minute apart: no duplicates, no repeated views, no bursts
            lines.append(f"u{u},{item},purchase,{(start + timedelta(minutes=j)).isoformat()}Z")
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    con = duckdb.connect()
    load_events(con, path, "csv")
    summary = clean_events(
        con, CleaningConfig(min_user_interactions=k_user, min_item_interactions=k_item, now=datetime(2030, 1, 1))
    )
    expected = brute_force_k_core(rows, k_user, k_item)
    assert summary.k_core_rounds >= 2  # the data really needs peeling in several rounds
    got = Counter(con.execute("SELECT user_id, item_id FROM cleaned_interactions").fetchall())
    assert got == Counter(rows[r] for r in expected)
    assert summary.by_reason["below_k_core"] == len(rows) - len(expected)
    assert summary.reconciles
    users = con.execute("SELECT min(n) FROM (SELECT count(*) n FROM cleaned_interactions GROUP BY user_id)").fetchall()
    assert not expected or users[0][0] >= k_user
