"""Which FAISS index for the 2M-item ANN ranking (`item_table="ann"`), measured (not a test).

The item table and the queries are those of benchmarks/serve_latency.py's 2M catalogue: random
weights in the `--preset` network (seed `--seed`), queries head(hidden) of Beauty validation
sequences `--start` .. `--start + --queries` (serve_latency tunes on the same ones and measures
recall on the first 1,000, which this script never reads). For every index: build time, bytes,
and for every number of candidates rescored exactly in fp32: recall@10 against exact scoring of
every item (history not excluded) and single-threaded CPU ms per query (search + rescoring, as
serving runs one request). HNSW is built on a `--hnsw-items` subset only (its build time on 2
cores rules it out at 2M; the figure is extrapolated, recall is against that subset's own exact
top-10).

`--real-model DIR` (a save_model directory, e.g. `.recsys/models/beauty-final`) adds the same
sweep on that model's trained item table with its own validation queries.

    python benchmarks/ann_index_sweep.py --out .recsys/reports/ann_index_sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, load_model  # noqa: E402
from recsys_assets.bert4rec.presets import get_preset  # noqa: E402
from recsys_assets.export.ann_index import AnnOptions, exact_top, query_vectors, write_table  # noqa: E402
from recsys_assets.export.verification import validation_batches  # noqa: E402
from recsys_serving.ann import candidates_of, rescore, search_params  # noqa: E402
from recsys_serving.contract import FIRST_ITEM_TOKEN  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"
GRID = (1024, 2048, 4096, 8192, 16384, 32768)


def padded(rows: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.float32)
    out[:, : rows.shape[1]] = rows
    return out


def build(factory: str, dim: int, table: np.ndarray, items: np.ndarray, train_size: int, seed: int) -> tuple[Any, float]:
    faiss.omp_set_num_threads(2)
    started = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(seed).choice(items, min(train_size, len(items)), replace=False))
        index.train(padded(np.asarray(table[sample]), dim))
    for start in range(0, len(items), 1 << 18):
        index.add(padded(np.asarray(table[items[start : start + (1 << 18)]]), dim))
    return index, time.perf_counter() - started


def sweep(name: str, index: Any, table: np.ndarray, queries: np.ndarray, exact: np.ndarray, items: np.ndarray,
          grid: list[int], nprobe: int | None, timed: int) -> list[dict[str, Any]]:
    """recall@10 and single-thread ms/query per candidate count (index labels -> tokens via `items`)."""
    params = search_params(index, nprobe)
    dim = index.d

    def tokens_of(found: np.ndarray) -> np.ndarray:  # labels are positions in `items`
        labels = found - FIRST_ITEM_TOKEN
        return np.where(found >= FIRST_ITEM_TOKEN, items[np.clip(labels, 0, len(items) - 1)], -1)

    found = tokens_of(candidates_of(index, queries, dim, grid[-1], params))
    no_history = np.zeros((len(queries), 1), dtype=np.int64)
    rows = []
    for n in grid:
        _, top = rescore(table, queries, found[:, :n], no_history, 10)
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, exact)]))
        started = time.thread_time()
        for q in queries[:timed]:
            cand = tokens_of(candidates_of(index, q[None], dim, n, params))
            rescore(table, q[None], cand, no_history[:1], 100)
        ms = 1000 * (time.thread_time() - started) / min(timed, len(queries))
        rows.append({"index": name, "nprobe": nprobe, "candidates": n, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(label: str, model: BERT4Rec, data: SequenceData, args: argparse.Namespace, work: Path,
        configs: list[tuple[str, int, list[int | None]]]) -> dict[str, Any]:
    table = write_table(model, work / f"{label}_items.npy")
    vocab, width = table.shape
    hidden = width - 1
    batches = validation_batches(data, model.config.max_len, [], args.queries, batch_size=64, start=args.start)
    queries = np.ascontiguousarray(query_vectors(model, batches))
    started = time.perf_counter()
    exact = exact_top(table, queries)
    print(f"[{label}] {vocab - FIRST_ITEM_TOKEN:,} items, {len(queries)} queries, exact top-10 in "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    items = np.arange(FIRST_ITEM_TOKEN, vocab)
    grid = sorted({min(n, len(items)) for n in GRID})
    out: dict[str, Any] = {"items": len(items), "hidden": hidden, "queries": len(queries), "indexes": []}
    for factory, dims_per_code, probes in configs:
        dim = dims_per_code * -(-(hidden + 1) // dims_per_code)
        name = factory.format(m=dim // dims_per_code)
        index, seconds = build(name, dim, table, items, args.train_size, args.seed)
        entry = {"index": name, "dim": dim, "build_s": round(seconds, 1), "bytes": int(faiss.serialize_index(index).nbytes),
                 "rows": []}
        print(f"[{label}] {name}: built in {seconds:.1f}s, {entry['bytes']:,} bytes", flush=True)
        for nprobe in probes:
            entry["rows"] += sweep(name, index, table, queries, exact, items, grid, nprobe, args.timed)
        out["indexes"].append(entry)
        del index
    if args.hnsw_items and len(items) > args.hnsw_items:
        subset = np.sort(np.random.default_rng(args.seed).choice(items, args.hnsw_items, replace=False))
        dim = hidden + 1
        index, seconds = build(f"HNSW{args.hnsw_m},Flat", dim, table, subset, 0, args.seed)
        sub_exact = exact_top_subset(table, queries, subset)
        entry = {"index": f"HNSW{args.hnsw_m},Flat on {len(subset):,} items", "build_s": round(seconds, 1),
                 "extrapolated_build_s_at_all_items": round(seconds * len(items) / len(subset), 0), "rows": []}
        print(f"[{label}] HNSW on {len(subset):,} items built in {seconds:.1f}s", flush=True)
        for ef in (64, 256, 1024):
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
            faiss.omp_set_num_threads(1)
            started = time.thread_time()
            _, labels = index.search(padded(queries, dim), 10)
            ms = 1000 * (time.thread_time() - started) / len(queries)
            found = subset[labels]
            recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, sub_exact)]))
            entry["rows"].append({"efSearch": ef, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 2)})
            print(json.dumps(entry["rows"][-1]), flush=True)
        out["indexes"].append(entry)
    (work / f"{label}_items.npy").unlink()
    return out


def exact_top_subset(table: np.ndarray, queries: np.ndarray, subset: np.ndarray) -> np.ndarray:
    rows = np.asarray(table[subset])
    scores = np.concatenate([queries, np.ones((len(queries), 1), np.float32)], axis=1) @ rows.T
    return subset[np.argsort(-scores, axis=1)[:, :10]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beauty", type=Path, default=BEAUTY)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--preset", default="beauty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=1000, help="first validation sequence used as a query")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--timed", type=int, default=50, help="queries timed one by one per setting")
    parser.add_argument("--train-size", type=int, default=AnnOptions().train_size)
    parser.add_argument("--hnsw-items", type=int, default=200_000, help="0: skip HNSW")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--real-model", type=Path, default=None, help="save_model dir of a trained Beauty model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data = SequenceData.from_sasrec_txt(args.beauty)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    configs: list[tuple[str, int, list[int | None]]] = [
        ("PQ{m}x4fs", 4, [None]), ("PQ{m}x4fs", 3, [None]), ("PQ{m}x4fs", 2, [None]),
        ("IVF1024,PQ{m}x4fs", 3, [64, 256, 1024]), ("IVF1024,Flat", 257, [64, 256]),
    ]
    if args.real_model is not None:
        if (args.real_model / "config.json").is_file():
            model, _ = load_model(args.real_model)
            report["real"] = run("real", model.eval(), data, args, args.workdir, configs[:3] + [("IVF64,PQ{m}x4fs", 3, [4, 16, 64])])
        else:
            report["real"] = f"{args.real_model} has no model: skipped"
            print(report["real"], flush=True)
    shape = get_preset(args.preset).model
    config = BERT4RecConfig(**{**shape, "vocab_size": args.items + 2})  # as serve_latency's large model
    torch.manual_seed(args.seed)  # serve_latency's large model: the same seed, the same weights
    started = time.perf_counter()
    model = BERT4Rec(config).eval()
    print(f"random {args.items:,}-item model in {time.perf_counter() - started:.1f}s", flush=True)
    report["random"] = run("random", model, data, args, args.workdir, configs)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
