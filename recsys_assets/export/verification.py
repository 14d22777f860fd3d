"""Parity of an exported graph with PyTorch on real validation sequences.

`parity_check`: the exact (fp32 item table) graph, max |score difference| and identical top-10,
with and without the in-graph history masking. `quantized_ranking_check`: the two-stage quantized
head, recall@k against fp32 PyTorch and exactness of the scores it returns.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch
from pydantic import BaseModel

from recsys_assets.bert4rec.data import SequenceData, eval_batches
from recsys_assets.bert4rec.model import BERT4Rec


@dataclass
class ParityBatch:
    tokens: np.ndarray
    contexts: dict[str, np.ndarray]
    exclude: np.ndarray  # history tokens, 0-padded (0 = PAD, already -inf)


def validation_batches(
    data: SequenceData, max_len: int, contexts: Sequence[str], n_sequences: int, batch_size: int = 256,
    start: int = 0,
) -> Iterator[ParityBatch]:
    """`n_sequences` validation inputs from the `start`-th on (history tokens[:-2] -> tokens[-2]),
    batched as training evaluates them (eval_batches); the request context of the [MASK] is the target's."""
    split = data.split("train")
    valid = split.valid
    if valid is None or len(valid) == 0:
        raise ValueError("no validation sequences (users need >= 3 items)")
    if start >= len(valid):
        raise ValueError(f"start {start} is past the {len(valid)} validation sequences")
    subset = valid.subset(slice(start, min(start + n_sequences, len(valid))))
    for rows, tokens, ctx in eval_batches(subset, max_len, batch_size):
        hist = [np.unique(subset.histories[r]) for r in rows]
        width = max(len(h) for h in hist)
        exclude = np.zeros((len(rows), width), dtype=np.int64)
        for i, h in enumerate(hist):
            exclude[i, : len(h)] = h
        missing = [c for c in contexts if c not in ctx]
        if missing:
            raise ValueError(f"the data lacks context(s) {missing} that the graph takes")
        yield ParityBatch(tokens=tokens.numpy(), contexts={k: ctx[k].numpy() for k in contexts}, exclude=exclude)


class ParityReport(BaseModel):
    n_sequences: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    top10_identical: int
    top10_tie_swaps: int = 0  # rows whose order differs only between scores closer than tolerance
    topk_head_identical: int  # in-graph top-10 (history masked) == PyTorch top-10 with history masked
    topk_head_tie_swaps: int = 0
    infinite_mismatch: int
    passed: bool
    torch_ms_per_batch: float
    ort_ms_per_batch: float
    batch_size: int


def cpu_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Best k per row, best first, ties by lower token (as TopK); O(V) per row, for large catalogues."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _top10(scores: np.ndarray) -> np.ndarray:
    # stable on descending score: ties resolved by lower token first (as TopK does)
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def _compare_top(ref: np.ndarray, a: np.ndarray, b: np.ndarray, tolerance: float) -> tuple[int, int]:
    """(rows with identical lists, rows differing only by ties): at every rank both lists' items
    have PyTorch scores within `tolerance`, so the order between them is not a model difference."""
    same = (a == b).all(axis=1)
    ties = 0
    for row in np.flatnonzero(~same):
        if np.allclose(ref[row, a[row]], ref[row, b[row]], atol=tolerance, rtol=0):
            ties += 1
    return int(same.sum()), ties


def parity_check(
    model: BERT4Rec,
    onnx_path: str | Path,
    batches: Sequence[ParityBatch],
    tolerance: float = 1e-4,
) -> ParityReport:
    """fp32 PyTorch vs ONNX Runtime on real inputs: max |score diff| < tolerance and identical top-10."""
    model = model.eval()
    session = cpu_session(onnx_path)
    input_names = [i.name for i in session.get_inputs()]
    n = diff_count = identical = ties = head_identical = head_ties = inf_mismatch = 0
    diff_sum = 0.0
    max_diff = 0.0
    torch_s = ort_s = 0.0
    for batch in batches:
        feeds = {"tokens": batch.tokens, **batch.contexts, "exclude": batch.exclude}
        feeds = {k: v for k, v in feeds.items() if k in input_names}
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = model.score_next(
                torch.from_numpy(batch.tokens), **{k: torch.from_numpy(v) for k, v in batch.contexts.items()}
            ).numpy()
        t1 = time.perf_counter()
        scores, top_scores, top_tokens = session.run(["scores", "top_scores", "top_tokens"], feeds)
        t2 = time.perf_counter()
        torch_s += t1 - t0
        ort_s += t2 - t1
        finite = np.isfinite(ref)
        inf_mismatch += int((finite != np.isfinite(scores)).sum())
        diff = np.abs(ref[finite] - scores[finite])
        max_diff = max(max_diff, float(diff.max(initial=0.0)))
        diff_sum += float(diff.sum())
        diff_count += diff.size
        same, tie = _compare_top(ref, _top10(ref), _top10(scores), tolerance)
        identical += same
        ties += tie
        masked = ref.copy()
        np.put_along_axis(masked, batch.exclude, -np.inf, axis=1)
        same, tie = _compare_top(masked, _top10(masked), top_tokens[:, :10], tolerance)
        head_identical += same
        head_ties += tie
        n += len(batch.tokens)
    passed = (
        max_diff < tolerance and inf_mismatch == 0 and identical + ties == n and head_identical + head_ties == n
    )
    batches_n = max(1, len(batches))
    return ParityReport(
        n_sequences=n,
        max_abs_diff=max_diff,
        mean_abs_diff=diff_sum / max(1, diff_count),
        tolerance=tolerance,
        top10_identical=identical,
        top10_tie_swaps=ties,
        topk_head_identical=head_identical,
        topk_head_tie_swaps=head_ties,
        infinite_mismatch=inf_mismatch,
        passed=passed,
        torch_ms_per_batch=round(1000 * torch_s / batches_n, 3),
        ort_ms_per_batch=round(1000 * ort_s / batches_n, 3),
        batch_size=int(max(len(b.tokens) for b in batches)) if batches else 0,
    )


class QuantizedRankingReport(BaseModel):
    """A quantized item table's graph (two-stage head) against fp32 PyTorch, history masked in both."""

    n_sequences: int
    k: int
    recall_at_k: float  # mean share of PyTorch's top-k that the graph's top-k holds
    topk_identical: int  # rows whose top-k lists are identical (order included)
    max_score_diff: float  # returned scores vs PyTorch's score of the same item (exact rescoring)
    min_recall: float
    tolerance: float
    passed: bool


def quantized_ranking_check(
    model: BERT4Rec,
    onnx_path: str | Path,
    batches: Sequence[ParityBatch],
    k: int = 10,
    min_recall: float = 0.99,
    tolerance: float = 1e-4,
) -> QuantizedRankingReport:
    """recall@k of the graph's top-k against fp32 PyTorch's, and that the scores it returns are the
    fp32 scores of those items (the rescoring is exact; only the candidate set is approximate)."""
    session = cpu_session(onnx_path)
    input_names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        top_scores, top_tokens = session.run(["top_scores", "top_tokens"], {name: feeds[name] for name in input_names})
        return top_scores, top_tokens

    return _ranking_check(model, run, batches, k, min_recall, tolerance)


def bundle_ranking_check(
    model: BERT4Rec,
    bundle_dir: str | Path,
    batches: Sequence[ParityBatch],
    k: int = 10,
    min_recall: float = 0.99,
    tolerance: float = 1e-4,
    threads: int = 2,
) -> QuantizedRankingReport:
    """quantized_ranking_check through serving's ranker on a whole bundle: any ranking, the ANN
    stage of an item_table="ann" bundle (graph, index and table) included."""
    from recsys_serving.bundle import load_bundle
    from recsys_serving.model import OnnxRanker

    bundle = load_bundle(Path(bundle_dir))
    # cache_dir: TensorRT's engine cache, unused on the CPU
    ranker = OnnxRanker(bundle, intra_threads=threads, use_gpu=False, cache_dir=Path(tempfile.gettempdir()))

    def run(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return ranker.rank_batch({name: feeds[name] for name in ranker.input_names})

    return _ranking_check(model, run, batches, k, min_recall, tolerance)


def _ranking_check(
    model: BERT4Rec,
    run: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]],
    batches: Sequence[ParityBatch],
    k: int,
    min_recall: float,
    tolerance: float,
) -> QuantizedRankingReport:
    model = model.eval()
    n = identical = 0
    recall_sum = 0.0
    max_diff = 0.0
    for batch in batches:
        top_scores, top_tokens = run({"tokens": batch.tokens, **batch.contexts, "exclude": batch.exclude})
        with torch.no_grad():
            ref = model.score_next(
                torch.from_numpy(batch.tokens), **{c: torch.from_numpy(v) for c, v in batch.contexts.items()}
            ).numpy()
        np.put_along_axis(ref, batch.exclude, -np.inf, axis=1)
        want = _top_k(ref, k)
        got = top_tokens[:, :k]
        for row in range(len(ref)):
            recall_sum += len(set(want[row].tolist()) & set(got[row].tolist())) / k
        identical += int((want == got).all(axis=1).sum())
        returned = np.take_along_axis(ref, got, axis=1)
        finite = np.isfinite(returned)
        max_diff = max(max_diff, float(np.abs(returned[finite] - top_scores[:, :k][finite]).max(initial=0.0)))
        n += len(ref)
    recall = recall_sum / max(1, n)
    return QuantizedRankingReport(
        n_sequences=n,
        k=k,
        recall_at_k=round(recall, 6),
        topk_identical=identical,
        max_score_diff=max_diff,
        min_recall=min_recall,
        tolerance=tolerance,
        passed=n > 0 and recall >= min_recall and max_diff < tolerance,
    )
