"""The approximate nearest-neighbour ranking stage of bundles exported with item_table="ann".

BERT4Rec scores item t as q . e_t + b_t (q: the [MASK] query, e_t: the item's row of the tied
item table, b_t: its output bias). With rows [e_t, b_t] and queries [q, 1] that is one inner
product, so a FAISS inner-product index over the item tokens proposes candidates, and
`rescore` scores them exactly in fp32 against the bundle's table of the same rows, leaving out
the request's history and PAD/MASK (the index never holds those), best first, ties by lower token
(as ONNX TopK). Only the candidate set is approximate.

Memory: the table is memory-mapped read-only, and the index is read with FAISS's mmap flags, so
the workers of one server share their pages through the page cache; index types whose codes
FAISS keeps in its own aligned buffers (the fast-scan PQ) still copy those codes into each worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys_serving.bundle import AnnRanking, BundleRefused
from recsys_serving.contract import FIRST_ITEM_TOKEN, PAD_TOKEN

# IO_FLAG_MMAP_IFC maps flat codes, IO_FLAG_MMAP the inverted lists; read-only, as the bundle is
MMAP_FLAGS = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def index_rows(queries: np.ndarray, index_dim: int) -> np.ndarray:
    """Queries [B, H] -> [B, index_dim]: [q, 1, 0...], the bias column's weight 1, then the zero padding."""
    out = np.zeros((len(queries), index_dim), dtype=np.float32)
    hidden = queries.shape[1]
    out[:, :hidden] = queries
    out[:, hidden] = 1.0
    return out


def search_params(index: Any, nprobe: int | None) -> Any:
    """Per-call search parameters: thread-safe, unlike setting nprobe on the shared index."""
    if nprobe is None:
        return None
    if faiss.try_extract_index_ivf(index) is None:
        raise ValueError(f"nprobe {nprobe} given for an index without IVF cells ({type(index).__name__})")
    return faiss.SearchParametersIVF(nprobe=nprobe)


@contextmanager
def _one_thread() -> Iterator[None]:
    """FAISS's OpenMP at one thread in this thread (OpenMP's setting is per thread), restored after:
    a request is one query, and an OpenMP team's wake-up and spinning only take the core from the
    other worker and the graph's threads."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def candidates_of(index: Any, queries: np.ndarray, index_dim: int, n: int, params: Any = None) -> np.ndarray:
    """Item tokens [B, n] the index proposes for queries [B, H], best approximate first; -1 where
    it has fewer. Index labels are token - FIRST_ITEM_TOKEN (the items were added in token order)."""
    with _one_thread():
        _, labels = index.search(index_rows(queries, index_dim), n, params=params)
    return np.where(labels >= 0, labels + FIRST_ITEM_TOKEN, -1)


def rescore(
    table: np.ndarray, queries: np.ndarray, candidates: np.ndarray, exclude: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact fp32 scores of the candidate tokens [B, n] against `table` ([vocab, H + 1] rows
    [item, bias]) -> (top_scores, top_tokens) [B, top_k], best first; history (`exclude`) and
    non-items are never returned; rows with fewer candidates end in -inf / PAD."""
    batch, n = candidates.shape
    width = table.shape[1]
    valid = candidates >= FIRST_ITEM_TOKEN
    for row in range(batch):
        valid[row] &= ~np.isin(candidates[row], exclude[row])
    ids = np.ascontiguousarray(np.where(valid, candidates, PAD_TOKEN), dtype=np.int64)
    rows = np.ascontiguousarray(index_rows(queries, width))
    scores = np.empty((batch, n), dtype=np.float32)
    # reads only the candidates' rows of the mapped table (numpy fancy indexing would copy them
    # first, and numpy's BLAS would start its threads for the product)
    with _one_thread():
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores), faiss.swig_ptr(rows), faiss.swig_ptr(table), faiss.swig_ptr(ids), width, batch, n
        )
    scores[~valid] = -np.inf
    k = min(top_k, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (batch, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    part_tokens = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((part_tokens, -part_scores), axis=1)
    top_scores = np.full((batch, top_k), -np.inf, dtype=np.float32)
    top_tokens = np.full((batch, top_k), PAD_TOKEN, dtype=np.int64)
    top_scores[:, :k] = np.take_along_axis(part_scores, order, axis=1)
    top_tokens[:, :k] = np.take_along_axis(part_tokens, order, axis=1)
    top_tokens[~np.isfinite(top_scores)] = PAD_TOKEN
    return top_scores, top_tokens


class AnnHead:
    """A bundle's index and fp32 table, memory-mapped; `rank` turns the graph's queries into the top-K."""

    def __init__(self, path: Path, spec: AnnRanking, vocab_size: int, top_k: int) -> None:
        self.spec = spec
        self.top_k = top_k
        try:
            self.table: np.ndarray = np.load(path / spec.table_file, mmap_mode="r")
            self.index: Any = faiss.read_index(str(path / spec.index_file), MMAP_FLAGS)
        except (OSError, ValueError, RuntimeError) as exc:  # FAISS raises RuntimeError on a bad file
            raise BundleRefused(path, "the ANN index or table cannot be read", detail=str(exc)) from exc
        problems = []
        if self.table.dtype != np.float32 or self.table.ndim != 2 or not self.table.flags.c_contiguous:
            problems.append(f"table {self.table.dtype} {self.table.shape} is not a C-ordered float32 matrix")
        elif self.table.shape[0] != vocab_size or self.table.shape[1] > spec.index_dim:
            problems.append(f"table shape {self.table.shape} does not fit {vocab_size} tokens and index_dim {spec.index_dim}")
        if self.index.d != spec.index_dim or self.index.ntotal != vocab_size - FIRST_ITEM_TOKEN:
            problems.append(f"index of {self.index.ntotal} vectors of width {self.index.d}, expected "
                            f"{vocab_size - FIRST_ITEM_TOKEN} of width {spec.index_dim}")
        if problems:
            raise BundleRefused(path, "the ANN index does not match the model", detail="; ".join(problems))
        try:
            self.params = search_params(self.index, spec.nprobe)
        except ValueError as exc:
            raise BundleRefused(path, "the ANN ranking's nprobe does not fit its index", detail=str(exc)) from exc
        self.hidden = self.table.shape[1] - 1
        self._map_table()

    def _map_table(self) -> None:
        """Reads one value of every page of the table once: its pages enter this process's page
        tables now (they are the page cache's, shared by every worker) instead of as page faults
        of the first requests whose candidates fall on them."""
        rows_per_page = max(1, 4096 // (self.table.shape[1] * self.table.itemsize))
        float(np.asarray(self.table[::rows_per_page, 0]).sum())

    def rank(self, queries: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """queries [B, hidden], exclude [B, n] -> (top_scores, top_tokens) [B, top_k], best first."""
        if queries.ndim != 2 or queries.shape[1] != self.hidden:
            raise ValueError(f"queries of shape {queries.shape}, expected [batch, {self.hidden}]")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = candidates_of(self.index, queries, self.spec.index_dim, self.spec.candidates, self.params)
        return rescore(self.table, queries, found, exclude, self.top_k)
