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


@pytest.mark.parametrize(("per_user", "per_minute"), [(40, 100), (20_000, 20)])
def test_bots_by_total_or_by_burst_whichever_limit_is_smaller(tmp_path: Path, per_user: int, per_minute: int) -> None:
    """A user over the total limit or over the per-minute limit is a bot, whichever limit is the
    smaller one (the burst counts are only taken for users over it)."""
    start = datetime(2024, 1, 1)
    lines = ["user_id,item_id,event_type,ts"]
    for n in range(50):  # 50 purchases a minute apart: over a total limit of 40
        lines.append(f"steady,i{n % 5},purchase,{(start + timedelta(minutes=n)).isoformat()}Z")
    for n in range(30):  # 30 purchases in one minute: over a burst limit of 20
        lines.append(f"burst,i{n % 5},purchase,{(start + timedelta(seconds=n)).isoformat()}Z")
    for u in range(3):  # ordinary users keep the items in the k-core
        for n in range(10):
            lines.append(f"u{u},i{n % 5},purchase,{(start + timedelta(hours=n)).isoformat()}Z")
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    con = duckdb.connect()
    load_events(con, path, "csv")
    summary = clean_events(con, CleaningConfig(
        bot_max_events_per_user=per_user, bot_max_events_per_minute=per_minute, now=datetime(2030, 1, 1),
        min_user_interactions=1, min_item_interactions=1,
    ))
    bots = dict(con.execute(
        "SELECT user_id, count(*) FROM quarantined_events WHERE reason = 'bot' GROUP BY user_id"
    ).fetchall())
    assert bots == ({"steady": 50} if per_user == 40 else {"burst": 30})
    assert summary.by_reason["bot"] == sum(bots.values()) and summary.reconciles
    detail = con.execute("SELECT any_value(detail) FROM quarantined_events WHERE reason = 'bot'").fetchall()[0][0]
    assert detail == ("user has 50 events, up to 1 in one minute" if per_user == 40 else "user has 30 events, up to 30 in one minute")
