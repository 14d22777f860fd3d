"""BERT4Rec -> ONNX with the ranking inside the graph, and the parity check against PyTorch.

The graph (interface in recsys_serving.bundle):

    inputs   tokens [batch, seq] int64 (left-padded, last = [MASK]), the context inputs the model
             was trained with (tod, devices, segments, event_types; same shape), and
             exclude [batch, n_exclude] int64 (tokens never to return: the user's history)
    outputs  scores [batch, V] float32 (PAD/MASK = -inf, exactly BERT4Rec.score_next),
             top_scores [batch, K], top_tokens [batch, K] (history masked, best first)

Top-K runs inside the graph with a constant K (the largest k the API serves): ONNX Runtime's
TopK avoids copying the [batch, V] scores out (8 MB per request at 2M items) and the constant K
keeps the graph acceptable to TensorRT. Serving slices the first k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel
from torch import Tensor, nn

from recsys_assets.bert4rec.data import CONTEXT_FIELDS, EvalSet, SequenceData, eval_batches
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig

OPSET = 18
DEFAULT_TOP_K = 100
PROTOBUF_LIMIT = 2_000_000_000  # larger models keep their weights in an external data file
EXTERNAL_DATA_SUFFIX = ".data"


def context_table_size(config: BERT4RecConfig, name: str) -> int:
    return {"tod": config.n_tod, "devices": config.n_devices, "segments": config.n_segments,
            "event_types": config.n_event_types}[name]


def model_contexts(config: BERT4RecConfig, available: Sequence[str] = CONTEXT_FIELDS) -> list[str]:
    """Context inputs the graph gets: the model has a table for them (size > 1) and the data has
    them; the same rule as training and evaluation (train._usable_contexts, score_eval_set)."""
    return [c for c in CONTEXT_FIELDS if c in available and context_table_size(config, c) > 1]


class _ScoreNext(nn.Module):
    """Positional forward over the chosen context inputs (torch.export wants a flat signature)."""

    def __init__(self, model: BERT4Rec, contexts: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.contexts = list(contexts)

    def forward(self, tokens: Tensor, *context: Tensor) -> Tensor:
        return self.model.score_next(tokens, **dict(zip(self.contexts, context)))


class ExportReport(BaseModel):
    path: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    contexts: list[str]
    top_k: int
    vocab_size: int
    bytes: int
    external_data: str | None
    seconds: float


def add_ranking_head(proto: onnx.ModelProto, top_k: int) -> onnx.ModelProto:
    """scores -> ScatterElements(-inf at `exclude`) -> TopK(K); keeps `scores` as an output."""
    graph = proto.graph
    (scores_out,) = [o for o in graph.output if o.name == "scores"]
    batch_dim = scores_out.type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param or "batch"
    graph.input.append(helper.make_tensor_value_info("exclude", TensorProto.INT64, [batch, "n_exclude"]))
    graph.initializer.append(numpy_helper.from_array(np.array([top_k], dtype=np.int64), "ranking_top_k"))
    graph.node.extend(
        [
            helper.make_node("Shape", ["exclude"], ["ranking_exclude_shape"], name="ranking_shape"),
            helper.make_node(
                "ConstantOfShape",
                ["ranking_exclude_shape"],
                ["ranking_neg_inf"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float("-inf")]),
                name="ranking_fill",
            ),
            helper.make_node(
                "ScatterElements", ["scores", "exclude", "ranking_neg_inf"], ["ranking_masked"], axis=1,
                name="ranking_mask_history",
            ),
            helper.make_node(
                "TopK", ["ranking_masked", "ranking_top_k"], ["top_scores", "top_tokens"], axis=-1, largest=1,
                sorted=1, name="ranking_topk",
            ),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, [batch, top_k]),
            helper.make_tensor_value_info("top_tokens", TensorProto.INT64, [batch, top_k]),
        ]
    )
    return proto


def export_onnx(
    model: BERT4Rec,
    config: BERT4RecConfig,
    path: str | Path,
    contexts: Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> ExportReport:
    """Exports with dynamic batch and sequence length (<= max_len), adds the ranking head, checks."""
    started = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contexts = model_contexts(config) if contexts is None else list(contexts)
    unknown = [c for c in contexts if c not in CONTEXT_FIELDS]
    if unknown:
        raise ValueError(f"unknown context input(s) {unknown}; expected a subset of {CONTEXT_FIELDS}")
    top_k = min(top_k, config.vocab_size)
    model = model.eval()
    names = ["tokens", *contexts]
    example_len = min(8, config.max_len)
    example = (torch.full((2, example_len), 2, dtype=torch.long),) + tuple(
        torch.ones((2, example_len), dtype=torch.long) for _ in contexts
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=1, max=config.max_len)
    # keyed like forward(tokens, *context); torch.export refuses an empty `context` entry
    dynamic_shapes: dict[str, Any] = {"tokens": {0: batch, 1: seq}}
    if contexts:
        dynamic_shapes["context"] = tuple({0: batch, 1: seq} for _ in contexts)
    with torch.no_grad():
        program = torch.onnx.export(
            _ScoreNext(model, contexts),
            example,
            input_names=names,
            output_names=["scores"],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
    assert program is not None
    proto = program.model_proto
    add_ranking_head(proto, top_k)
    size = proto.ByteSize()
    external = None
    if size > PROTOBUF_LIMIT:
        external = path.name + EXTERNAL_DATA_SUFFIX
        onnx.save_model(proto, str(path), save_as_external_data=True, location=external, all_tensors_to_one_file=True)
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(proto, full_check=True)
    saved = onnx.load(str(path), load_external_data=False)
    return ExportReport(
        path=str(path),
        opset=OPSET,
        inputs=[i.name for i in saved.graph.input],
        outputs=[o.name for o in saved.graph.output],
        contexts=contexts,
        top_k=top_k,
        vocab_size=config.vocab_size,
        bytes=path.stat().st_size + ((path.parent / external).stat().st_size if external else 0),
        external_data=external,
        seconds=round(time.perf_counter() - started, 3),
    )


# --------------------------------------------------------------------------- parity


@dataclass
class ParityBatch:
    tokens: np.ndarray
    contexts: dict[str, np.ndarray]
    exclude: np.ndarray  # history tokens, 0-padded (0 = PAD, already -inf)


def validation_batches(
    data: SequenceData, max_len: int, contexts: Sequence[str], n_sequences: int, batch_size: int = 256
) -> Iterator[ParityBatch]:
    """The first `n_sequences` validation inputs (history tokens[:-2] -> tokens[-2]), batched as
    training evaluates them (eval_batches); the request context of the [MASK] is the target's."""
    split = data.split("train")
    valid = split.valid
    if valid is None or len(valid) == 0:
        raise ValueError("no validation sequences (users need >= 3 items)")
    n = min(n_sequences, len(valid))
    subset = EvalSet(
        inputs=valid.inputs[:n],
        contexts={k: v[:n] for k, v in valid.contexts.items() if k in contexts},
        targets=valid.targets[:n],
        histories=valid.histories[:n],
        users=valid.users[:n],
    )
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


class LatencyReport(BaseModel):
    """Batch-1 latency of one history length: PyTorch eager vs ONNX Runtime (graph top-K vs numpy)."""

    seq_len: int
    threads: int
    torch_eager_ms: float
    ort_topk_in_graph_ms: float
    ort_scores_then_numpy_topk_ms: float
    speedup_vs_torch: float
    topk_in_graph_faster: bool


def batch1_latency(
    model: BERT4Rec, onnx_path: str | Path, contexts: Sequence[str], seq_len: int, repeats: int = 50, threads: int = 1
) -> LatencyReport:
    """Median latencies at batch 1 (what serving runs); torch uses the same thread count."""
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    top_k = min(DEFAULT_TOP_K, vocab - 1)
    tokens = rng.integers(2, vocab, size=(1, seq_len), dtype=np.int64)
    tokens[0, -1] = 1
    ctx = {c: np.ones((1, seq_len), dtype=np.int64) for c in contexts}
    exclude = tokens[:, :-1].copy()
    session = cpu_session(onnx_path, threads)
    feeds = {k: v for k, v in {"tokens": tokens, **ctx, "exclude": exclude}.items()
             if k in {i.name for i in session.get_inputs()}}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def timed(fn) -> float:  # type: ignore[no-untyped-def]
            fn()
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return 1000 * float(np.median(samples))

        t_tokens, t_ctx = torch.from_numpy(tokens), {k: torch.from_numpy(v) for k, v in ctx.items()}

        def run_torch() -> None:
            with torch.no_grad():
                s = model.score_next(t_tokens, **t_ctx)
                s[0, t_tokens[0]] = float("-inf")
                torch.topk(s, top_k)

        def run_ort_outside() -> None:
            (s,) = session.run(["scores"], feeds)
            s[0, exclude[0]] = -np.inf
            part = np.argpartition(-s[0], top_k)[:top_k]
            part[np.argsort(-s[0, part])]

        eager = timed(run_torch)
        in_graph = timed(lambda: session.run(["top_scores", "top_tokens"], feeds))
        outside = timed(run_ort_outside)
    finally:
        torch.set_num_threads(previous)
    return LatencyReport(
        seq_len=seq_len,
        threads=threads,
        torch_eager_ms=round(eager, 4),
        ort_topk_in_graph_ms=round(in_graph, 4),
        ort_scores_then_numpy_topk_ms=round(outside, 4),
        speedup_vs_torch=round(eager / in_graph, 2),
        topk_in_graph_faster=in_graph < outside,
    )
