"""The approximate nearest-neighbour files of an `item_table="ann"` export (onnx_export.export_onnx).

BERT4Rec scores item t as q . e_t + b_t, so with rows [e_t, b_t] and queries [q, 1] the score is
one inner product: `ann_items.npy` holds those rows for every token (fp32, the exact rescoring
table) and `ann_index.faiss` a FAISS inner-product index over the item tokens' rows, zero-padded
to a multiple of the code width. Serving (recsys_serving.ann) asks the index for `candidates`
neighbours and rescores them exactly.

The index: FAISS's 4-bit product quantizer with fast-scan ("PQ{M}x4fs": one 4-bit code per
`dims_per_code` dimensions, scanned with SIMD lookups), optionally under an IVF coarse quantizer
("IVF{nlist},PQ{M}x4fs", `nprobe` cells searched). Why this family and these widths:
benchmarks/ann_index_sweep.py measures it against IVF-Flat, HNSW and other code widths.

Tuning (`tune`): given validation-like query vectors, the number of candidates (and nprobe for an
IVF index) is the one that reaches `target_recall` (recall@10 of the rescored answer against exact
fp32 scoring of every item) at the least CPU time per query, measured single-threaded as serving
runs it; the table of every tried setting goes into the export report.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from recsys_assets.bert4rec.model import BERT4Rec
from recsys_serving.ann import candidates_of, rescore, search_params
from recsys_serving.bundle import ANN_INDEX_FILE, ANN_TABLE_FILE, AnnRanking
from recsys_serving.contract import FIRST_ITEM_TOKEN

DEFAULT_CANDIDATES = 8192  # without tuning queries
CANDIDATE_GRID = (64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
TIMED_QUERIES = 50  # single-query searches timed per tuning setting
_CHUNK = 1 << 18  # table rows per write / add step (bounded temporary memory)
_EXACT_CHUNK = 1 << 16  # table rows per exact-scoring step
RECALL_K = 10


class AnnOptions(BaseModel):
    """How an `item_table="ann"` export builds and sets up its index."""

    model_config = ConfigDict(extra="forbid")

    dims_per_code: int = Field(3, ge=1, le=32, description="vector dimensions per 4-bit PQ code (fewer: finer codes, longer scan)")
    nlist: int = Field(0, ge=0, description="IVF cells; 0: none, every item's code is scanned")
    nprobe: int | None = Field(None, ge=1, description="IVF cells searched; None: tuned (all cells without tuning queries)")
    candidates: int | None = Field(None, ge=1, description=f"rescored exactly; None: tuned ({DEFAULT_CANDIDATES} without tuning queries)")
    target_recall: float = Field(0.995, gt=0.0, le=1.0, description="recall@10 the tuning must reach on its queries")
    train_size: int = Field(65536, ge=1, description="item rows sampled to train the quantizers")
    seed: int = 0

    def index_dim(self, hidden: int) -> int:
        return self.dims_per_code * math.ceil((hidden + 1) / self.dims_per_code)

    def factory(self, hidden: int) -> str:
        pq = f"PQ{self.index_dim(hidden) // self.dims_per_code}x4fs"
        return f"IVF{self.nlist},{pq}" if self.nlist else pq


class AnnTuningRow(BaseModel):
    nprobe: int | None
    candidates: int
    recall_at_10: float
    ms_per_query: float | None = None  # timed only where the recall reaches the target


class AnnReport(BaseModel):
    factory: str
    index_dim: int
    n_items: int
    candidates: int
    nprobe: int | None
    index_file: str = ANN_INDEX_FILE
    table_file: str = ANN_TABLE_FILE
    index_bytes: int
    table_bytes: int
    table_seconds: float
    train_seconds: float
    add_seconds: float
    tune_seconds: float = 0.0
    tuning_queries: int = 0
    target_recall: float
    met_target: bool | None = None  # None: not tuned
    tuning: list[AnnTuningRow] = []

    def ranking(self) -> AnnRanking:
        return AnnRanking(index_file=self.index_file, table_file=self.table_file, factory=self.factory,
                          index_dim=self.index_dim, candidates=self.candidates, nprobe=self.nprobe)


def write_table(model: BERT4Rec, path: Path) -> np.ndarray:
    """[vocab, hidden + 1] rows [item_emb, out_bias] -> `path` (.npy, written in chunks: no second
    in-memory copy of a large table); returns it memory-mapped read-only."""
    weight, bias = model.item_emb.weight.detach(), model.out_bias.detach()
    vocab, hidden = weight.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(vocab, hidden + 1))
    for start in range(0, vocab, _CHUNK):
        stop = min(start + _CHUNK, vocab)
        out[start:stop, :hidden] = weight[start:stop].cpu().numpy()
        out[start:stop, hidden] = bias[start:stop].cpu().numpy()
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _padded(rows: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.float32)
    out[:, : rows.shape[1]] = rows
    return out


def exact_top(table: np.ndarray, queries: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """Item tokens [N, k] of the best exact fp32 scores [q, 1] . row over every item (PAD/MASK never)."""
    rows_q = np.concatenate([queries, np.ones((len(queries), 1), dtype=np.float32)], axis=1)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_t = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(FIRST_ITEM_TOKEN, len(table), _EXACT_CHUNK):
        stop = min(start + _EXACT_CHUNK, len(table))
        scores = rows_q @ np.asarray(table[start:stop]).T  # [N, chunk]
        tokens = np.broadcast_to(np.arange(start, stop), scores.shape)
        all_s, all_t = np.concatenate([best_s, scores], axis=1), np.concatenate([best_t, tokens], axis=1)
        keep = np.argpartition(-all_s, min(k, all_s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_t = np.take_along_axis(all_s, keep, axis=1), np.take_along_axis(all_t, keep, axis=1)
    order = np.lexsort((best_t, -best_s), axis=1)
    return np.take_along_axis(best_t, order, axis=1)


def query_vectors(model: BERT4Rec, batches: Iterable[Any]) -> np.ndarray:
    """The [MASK] queries head(hidden) [N, H] of batches with `tokens` and `contexts` (e.g.
    verification.validation_batches): what the graph of an ANN export outputs."""
    out = []
    with torch.no_grad():
        for batch in batches:
            context = {name: torch.from_numpy(v) for name, v in batch.contexts.items()}
            hidden = model.eval().forward(torch.from_numpy(batch.tokens), **context, last_only=True)
            out.append(model.head(hidden[:, -1]).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.hidden), np.float32)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact)]))


def tune(index: Any, table: np.ndarray, queries: np.ndarray, options: AnnOptions, top_k: int,
         min_candidates: int) -> tuple[int, int | None, bool, list[AnnTuningRow]]:
    """-> (candidates, nprobe, target met, rows): the cheapest setting whose recall@10 reaches
    options.target_recall on `queries` (else the one of highest recall); candidates >= min_candidates."""
    n_items, index_dim = index.ntotal, index.d
    exact = exact_top(table, queries)
    no_history = np.zeros((len(queries), 1), dtype=np.int64)
    floor = min(min_candidates, n_items)
    if options.candidates is not None:
        grid = [min(max(options.candidates, floor), n_items)]
    else:
        grid = sorted({min(c, n_items) for c in CANDIDATE_GRID if c >= floor} | {floor})
    ivf = faiss.try_extract_index_ivf(index)
    if options.nprobe is not None or ivf is None:
        probes: list[int | None] = [options.nprobe]
    else:
        probes = [*sorted({min(ivf.nlist, 1 << i) for i in range(int(math.log2(ivf.nlist)) + 2)})]
    rows: list[AnnTuningRow] = []
    for nprobe in probes:
        params = search_params(index, nprobe)
        found = candidates_of(index, queries, index_dim, grid[-1], params)  # best approximate first
        for n in grid:
            _, tokens = rescore(table, queries, found[:, :n], no_history, RECALL_K)
            rows.append(AnnTuningRow(nprobe=nprobe, candidates=n, recall_at_10=round(_recall(tokens, exact), 5)))
    timed = []
    for nprobe in probes:  # per nprobe, the fewest candidates that reach the target
        row = next((r for r in rows if r.nprobe == nprobe and r.recall_at_10 >= options.target_recall), None)
        if row is None:
            continue
        params = search_params(index, nprobe)
        started = time.thread_time()  # this thread's CPU: the stage is single-threaded, as in serving
        for q in queries[:TIMED_QUERIES]:
            found = candidates_of(index, q[None], index_dim, row.candidates, params)
            rescore(table, q[None], found, no_history[:1], top_k)
        row.ms_per_query = round(1000 * (time.thread_time() - started) / min(TIMED_QUERIES, len(queries)), 3)
        timed.append(row)
    if timed:
        best = min(timed, key=lambda r: (r.ms_per_query, r.candidates))
        return best.candidates, best.nprobe, True, rows
    best = max(rows, key=lambda r: (r.recall_at_10, -r.candidates))
    return best.candidates, best.nprobe, False, rows


def build_ann_files(
    model: BERT4Rec,
    out_dir: Path,
    options: AnnOptions,
    top_k: int,
    min_candidates: int,
    tuning_queries: np.ndarray | None = None,
) -> AnnReport:
    """Writes ann_items.npy and ann_index.faiss into `out_dir` (module docstring). At least
    `min_candidates` are rescored (top_k + the longest history: a full top-K after the history is
    left out)."""
    vocab, hidden = model.item_emb.weight.shape
    n_items = vocab - FIRST_ITEM_TOKEN
    if n_items < 16:
        raise ValueError(f"an ANN index needs at least 16 items (one per 4-bit code), the model has {n_items}")
    if options.nlist and options.nprobe is not None and options.nprobe > options.nlist:
        raise ValueError(f"nprobe {options.nprobe} exceeds nlist {options.nlist}")
    if not options.nlist and options.nprobe is not None:
        raise ValueError("nprobe needs an IVF index (nlist > 0)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = write_table(model, out_dir / ANN_TABLE_FILE)
    written = time.perf_counter()
    index_dim = options.index_dim(hidden)
    index = faiss.index_factory(index_dim, options.factory(hidden), faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(options.seed)
    sample = np.sort(rng.choice(n_items, min(options.train_size, n_items), replace=False)) + FIRST_ITEM_TOKEN
    index.train(_padded(np.asarray(table[sample]), index_dim))
    trained = time.perf_counter()
    for start in range(FIRST_ITEM_TOKEN, vocab, _CHUNK):  # in token order: label = token - FIRST_ITEM_TOKEN
        index.add(_padded(np.asarray(table[start : min(start + _CHUNK, vocab)]), index_dim))
    added = time.perf_counter()
    ivf = faiss.try_extract_index_ivf(index)
    candidates = min(max(options.candidates or DEFAULT_CANDIDATES, min_candidates), n_items)
    nprobe = options.nprobe if options.nprobe is not None else (ivf.nlist if ivf is not None else None)
    met: bool | None = None
    rows: list[AnnTuningRow] = []
    n_tuning = 0 if tuning_queries is None else len(tuning_queries)
    if n_tuning:
        assert tuning_queries is not None
        queries = np.ascontiguousarray(tuning_queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != hidden:
            raise ValueError(f"tuning queries of shape {queries.shape}, expected [n, {hidden}]")
        candidates, nprobe, met, rows = tune(index, table, queries, options, top_k, min_candidates)
    tuned = time.perf_counter()
    faiss.write_index(index, str(out_dir / ANN_INDEX_FILE))
    return AnnReport(
        factory=options.factory(hidden),
        index_dim=index_dim,
        n_items=n_items,
        candidates=candidates,
        nprobe=nprobe,
        index_bytes=(out_dir / ANN_INDEX_FILE).stat().st_size,
        table_bytes=(out_dir / ANN_TABLE_FILE).stat().st_size,
        table_seconds=round(written - started, 2),
        train_seconds=round(trained - written, 2),
        add_seconds=round(added - trained, 2),
        tune_seconds=round(tuned - added, 2),
        tuning_queries=n_tuning,
        target_recall=options.target_recall,
        met_target=met,
        tuning=rows,
    )
