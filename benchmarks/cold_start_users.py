"""What a new user (no events yet) gets from the popularity fallback (not a test).

HR@K and NDCG@K of answering each user's last event (the test item) from the popularity lists
alone, with no history: (a) the global list, (b) the list chosen by context from that event's device,
segment and time of day (the request context a new user arrives with), and, to order the lists of
equal specificity, each combination of dimensions on its own (its lists, topped up like the
fallback). The lists are the bundle's: `popularity_document` (the writer, with model_bundle's
defaults) over every event before each user's last one, never over a test event; the answers are
`Popularity.ranked`, what serving's fallback returns. `--folds K` (K > 1) splits the users in K
folds and answers a fold's users from the other folds' events only, as for a real new user, whose
own earlier events are in no list (K = 1: the lists include each user's earlier events).

Data: the built-in generator (`DEFAULT_CONFIG`, `make run`'s data, or `--users`), loaded and cleaned
by the project's stage functions, or `--source DIR` of canonical event files.

    python benchmarks/cold_start_users.py
    python benchmarks/cold_start_users.py --folds 5 --out .recsys/reports/cold_start_users.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
from pydantic import BaseModel, Field

from recsys_assets.data import sources
from recsys_assets.data.cleaning import CleaningConfig, clean_events
from recsys_assets.data.synthetic import DEFAULT_CONFIG, generate_events
from recsys_assets.evaluation.metrics import bootstrap_ci
from recsys_assets.export.bundle import PRIOR_EVENTS, popularity_document
from recsys_serving.bundle import CONTEXT_DIMENSIONS, POPULARITY_CHOICE_ORDER, ContextDimension, Popularity
from recsys_serving.contract import time_of_day_token_of

GLOBAL = "global"
CONTEXT = "context"
SPECIFICITY = {0: "global", 1: "one dimension", 2: "two dimensions", 3: "all three"}


def combination_name(dimensions: tuple[ContextDimension, ...]) -> str:
    return "+".join(dimensions)


class Figures(BaseModel):
    hr: float = Field(description="HR@k: share of users whose test item is in the k answered")
    ndcg: float = Field(description="NDCG@k (one relevant item: 1 / log2(rank + 1))")
    hr_ci: tuple[float, float]
    ndcg_ci: tuple[float, float]


class ColdStartReport(BaseModel):
    users: int
    k: int
    folds: int
    lists: dict[str, int] = Field(description="context lists per combination of dimensions (fold 0)")
    figures: dict[str, Figures] = Field(
        description="global; context (the fallback's choice); each combination of dimensions on its own"
    )
    context_minus_global_hr_ci: tuple[float, float] = Field(description="paired 95% bootstrap CI of the HR@k gain")
    answered_by: dict[str, float] = Field(description="share of users the context choice answered from each kind of list")


def measure(
    con: duckdb.DuckDBPyConnection,
    table: str = "cleaned_interactions",
    k: int = 10,
    folds: int = 1,
    window_days: int | None = 30,
    top_group: int = 300,
    min_group_events: int = 100,
    max_groups: int = 200,
    prior_events: float = PRIOR_EVENTS,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> ColdStartReport:
    """The figures above over `table` (cleaned_interactions' columns: event_id, user_id, item_id,
    event_type, ts, device, segment)."""
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _cold_start AS
            SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, event_id DESC) = 1 AS is_test,
                   hash(user_id) % {int(folds)} AS fold
            FROM "{table}" """
    )
    variants: dict[str, tuple[ContextDimension, ...]] = {GLOBAL: (), CONTEXT: CONTEXT_DIMENSIONS}
    # each combination on its own (all three is `context` itself)
    variants.update({combination_name(dims): dims for dims in POPULARITY_CHOICE_ORDER if dims != CONTEXT_DIMENSIONS})
    ranks: dict[str, list[int]] = {name: [] for name in variants}
    answered_by: dict[str, int] = {name: 0 for name in SPECIFICITY.values()}
    lists: dict[str, int] = {}
    for fold in range(folds):
        fit, test = ("NOT is_test", "is_test") if folds == 1 else (f"NOT is_test AND fold <> {fold}", f"is_test AND fold = {fold}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW _cold_start_fit AS SELECT * EXCLUDE (is_test, fold) FROM _cold_start WHERE {fit}")
        popularity = Popularity.model_validate(
            popularity_document(con, "_cold_start_fit", window_days=window_days, top_group=top_group,
                                min_group_events=min_group_events, max_groups=max_groups,
                                prior_events=prior_events)
        )
        if fold == 0:
            for group in popularity.groups:
                name = combination_name(tuple(d for d in CONTEXT_DIMENSIONS if d in group.context))
                lists[name] = lists.get(name, 0) + 1
        tests = con.execute(
            f"SELECT item_id, device, segment, ts FROM _cold_start WHERE {test} ORDER BY user_id"
        ).fetchall()
        for item, device, segment, ts in tests:
            request = {"device": device, "segment": segment, "time_of_day": time_of_day_token_of(ts)}
            for name, dims in variants.items():
                context = {d: request[d] if d in dims else None for d in CONTEXT_DIMENSIONS}
                answer = [i for i, _ in popularity.ranked(context["device"], context["segment"], context["time_of_day"], k)]
                ranks[name].append(answer.index(str(item)) + 1 if str(item) in answer else 0)
            _, chosen = popularity.choose(request["device"], request["segment"], request["time_of_day"])
            answered_by[SPECIFICITY[0 if chosen == GLOBAL else chosen.count("=")]] += 1
    users = len(ranks[GLOBAL])
    if users == 0:
        raise ValueError(f"{table} has no users")
    per_user: dict[tuple[str, str], np.ndarray] = {}
    for name, r in ranks.items():
        arr = np.asarray(r, dtype=np.float64)
        per_user[(name, "hr")] = (arr > 0).astype(np.float64)
        ndcg = np.zeros_like(arr)
        ndcg[arr > 0] = 1.0 / np.log2(arr[arr > 0] + 1.0)
        per_user[(name, "ndcg")] = ndcg
    gain = per_user[(CONTEXT, "hr")] - per_user[(GLOBAL, "hr")]
    intervals = bootstrap_ci({**per_user, ("gain", "hr"): gain}, n_bootstrap, seed)
    return ColdStartReport(
        users=users,
        k=k,
        folds=folds,
        lists=lists,
        figures={
            name: Figures(
                hr=float(per_user[(name, "hr")].mean()),
                ndcg=float(per_user[(name, "ndcg")].mean()),
                hr_ci=intervals[(name, "hr")],
                ndcg_ci=intervals[(name, "ndcg")],
            )
            for name in variants
        },
        context_minus_global_hr_ci=intervals[("gain", "hr")],
        answered_by={name: n / users for name, n in answered_by.items()},
    )


def markdown(report: ColdStartReport) -> str:
    k = report.k
    lines = [f"| lists | HR@{k} (95% CI) | NDCG@{k} (95% CI) |", "|---|---|---|"]
    for name, f in report.figures.items():
        lines.append(
            f"| {name} | {f.hr:.4f} ({f.hr_ci[0]:.4f}-{f.hr_ci[1]:.4f}) | {f.ndcg:.4f} ({f.ndcg_ci[0]:.4f}-{f.ndcg_ci[1]:.4f}) |"
        )
    lo, hi = report.context_minus_global_hr_ci
    answered = ", ".join(f"{name} {share:.1%}" for name, share in report.answered_by.items())
    return "\n".join(lines + [
        "",
        f"{report.users} users, folds {report.folds}; context - global HR@{k}: 95% CI [{lo:+.4f}, {hi:+.4f}]",
        f"context answered from: {answered}",
        "lists: " + ", ".join(f"{name} {n}" for name, n in report.lists.items()),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="canonical event files instead of the generator")
    parser.add_argument("--format", default="csv", choices=["csv", "parquet"], help="of --source")
    parser.add_argument("--users", type=int, default=DEFAULT_CONFIG.n_users, help="generated users (bots included)")
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG.seed, help="generator seed")
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--window-days", type=int, default=30, help="0: all events (model_bundle's default: 30)")
    parser.add_argument("--min-group-events", type=int, default=100)
    parser.add_argument("--max-groups", type=int, default=200)
    parser.add_argument("--prior-events", type=float, default=PRIOR_EVENTS, help="shrinkage towards global")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect()
        if args.source is not None:
            sources.load_events(con, args.source, args.format, table="raw_events")
        else:
            cfg = DEFAULT_CONFIG.model_copy(update={"n_users": args.users, "seed": args.seed})
            generate_events(Path(tmp) / "events", cfg)
            sources.load_events(con, Path(tmp) / "events", cfg.output_format, table="raw_events")
        clean_events(con, CleaningConfig())
        report = measure(con, k=args.k, folds=args.folds, window_days=args.window_days or None,
                         min_group_events=args.min_group_events, max_groups=args.max_groups,
                         prior_events=args.prior_events)
    print(markdown(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.model_dump(), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
