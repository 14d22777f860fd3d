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

Large catalogues (`item_table="int8"` or `"int4"`): scoring every item reads the whole fp32 item
table per request (512 MB at 2M items x 64), which bounds latency by memory bandwidth. The
quantized variant scores with a per-item scaled int8 / int4 copy of the table (ONNX Runtime's
MatMulNBits, int8 arithmetic), keeps the best `rescore_candidates` (history masked), rescores those
exactly against the fp32 table and returns their top-K: returned scores are fp32 scores, only the
candidate set is approximate (`quantized_ranking_check` measures recall@10 against PyTorch). That
graph has no `scores` output and runs on ONNX Runtime's CPU provider (a com.microsoft operator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

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
ItemTable = Literal["fp32", "int8", "int4"]
ITEM_TABLE_BITS: dict[str, int] = {"int8": 8, "int4": 4}
DEFAULT_RESCORE_CANDIDATES = 1024
MS_DOMAIN = "com.microsoft"
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


class _QueryNext(_ScoreNext):
    """The [MASK] position's query vector head(hidden) [B, H]: what score_next multiplies with the
    item table. The quantized ranking head does that product in ONNX (see add_quantized_ranking_head)."""

    def forward(self, tokens: Tensor, *context: Tensor) -> Tensor:
        hidden = self.model.forward(tokens, **dict(zip(self.contexts, context)), last_only=True)
        return self.model.head(hidden[:, -1])


ITEM_TABLE = "item_emb.weight"
LARGE_TABLE_BYTES = 1 << 30  # vocabulary tables above this are exported via a stand-in (export_onnx)
STAND_IN_VOCAB = 1024
EXTERNAL_ALIGNMENT = 1 << 16  # offsets a runtime may memory-map (ONNX's external-data guidance; 64 KiB on Windows)


def _vocabulary_tables(model: BERT4Rec) -> dict[str, Tensor]:
    """Parameters with one row per token (item tables and the output bias), by state-dict name."""
    vocab = model.config.vocab_size
    return {name: t for name, t in model.state_dict().items() if t.ndim >= 1 and t.shape[0] == vocab}


def _with_vocabulary(model: BERT4Rec, config: BERT4RecConfig, vocab: int) -> BERT4Rec:
    """A copy of `model` whose vocabulary tables keep only their first `vocab` rows (same graph)."""
    small = BERT4Rec(config.model_copy(update={"vocab_size": min(vocab, config.vocab_size)})).eval()
    tables = _vocabulary_tables(model)
    state = {name: (t[:vocab] if name in tables else t) for name, t in model.state_dict().items()}
    small.load_state_dict(state)
    return small


def write_external_initializers(proto: onnx.ModelProto, data_path: Path, arrays: dict[str, np.ndarray],
                                min_bytes: int = 1 << 20) -> None:
    """Moves initializers to one external data file, each at an aligned offset (mappable): the ones
    named in `arrays` get those values (written straight from them, never through a protobuf), and
    every other initializer of at least `min_bytes` keeps its own. (ONNX Runtime 1.32's CPU provider
    still reads them into each session's memory: measured, 1x the file per session.)"""
    with open(data_path, "wb") as out:
        for init in proto.graph.initializer:
            if init.name in arrays:
                values = np.ascontiguousarray(arrays[init.name])
                if values.dtype != np.float32:
                    raise ValueError(f"{init.name}: expected float32 values, got {values.dtype}")
            elif init.HasField("raw_data") and len(init.raw_data) >= min_bytes:
                values = numpy_helper.to_array(init)
            else:
                continue
            offset = -(-out.tell() // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
            out.seek(offset)
            out.write(memoryview(values).cast("B"))
            dims = list(values.shape)
            init.ClearField("raw_data")
            init.ClearField("float_data")
            del init.dims[:]
            init.dims.extend(dims)
            del init.external_data[:]
            for key, value in (("location", data_path.name), ("offset", offset), ("length", values.nbytes)):
                entry = init.external_data.add()
                entry.key, entry.value = key, str(value)
            init.data_location = TensorProto.EXTERNAL


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
    item_table: ItemTable = "fp32"  # precision of the first scoring pass (fp32: the only pass)
    rescore_candidates: int | None = None  # quantized variants: candidates rescored in fp32


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


def _block_size(hidden: int) -> int:
    """MatMulNBits blocks: a power of two >= 16, at most 256; one block per item when hidden <= 256
    (the per-item scale), several otherwise (finer still)."""
    size = 16
    while size < min(hidden, 256):
        size *= 2
    return size


def quantize_item_table(item_table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[V, H] fp32 -> (packed [V, blocks, block_size * bits / 8] uint8, scales [V, blocks], block_size),
    symmetric, in MatMulNBits' layout. ONNX Runtime's own packing routine (the one its
    matmul_nbits_quantizer calls), so the layout is the kernel's by construction."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n_items, hidden = item_table.shape
    block = _block_size(hidden)
    blocks = -(-hidden // block)
    packed = np.zeros((n_items, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n_items, blocks), dtype=np.float32)
    zero_points = np.zeros((n_items, -(-blocks * bits // 8)), dtype=np.uint8)  # unused: symmetric
    weight = np.ascontiguousarray(item_table.T, dtype=np.float32)  # MatMulNBits multiplies by B [K=H, N=V]
    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    quantize(packed, weight, scales, zero_points, block, n_items, hidden, True)
    return packed, scales, block


def add_quantized_ranking_head(
    proto: onnx.ModelProto,
    item_table: np.ndarray,
    item_bias: np.ndarray,
    top_k: int,
    bits: int,
    candidates: int,
    table_initializer: str | None = None,
) -> onnx.ModelProto:
    """query [B, H] -> quantized scores of every item (+bias) -> -inf at `exclude` -> TopK(candidates)
    -> exact fp32 rescoring of the candidates -> TopK(K). `item_bias` holds out_bias + the special
    tokens' -inf. The fp32 table is the graph's own input embedding initializer (`table_initializer`,
    or one found holding the same values): no second copy; else it is added."""
    graph = proto.graph
    (query_out,) = [o for o in graph.output if o.name == "query"]
    batch_dim = query_out.type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param or "batch"
    n_items, hidden = item_table.shape
    candidates = min(candidates, n_items)
    if top_k > candidates:
        raise ValueError(f"rescore_candidates ({candidates}) must be >= top_k ({top_k})")
    table_name = table_initializer or next(
        (
            init.name
            for init in graph.initializer
            if list(init.dims) == [n_items, hidden] and np.array_equal(numpy_helper.to_array(init), item_table)
        ),
        None,
    )
    if table_name is None:
        table_name = "ranking_item_table"
        graph.initializer.append(numpy_helper.from_array(item_table.astype(np.float32), table_name))
    packed, scales, block = quantize_item_table(item_table, bits)
    graph.initializer.extend(
        [
            numpy_helper.from_array(packed, "ranking_item_table_q"),
            numpy_helper.from_array(scales, "ranking_item_scales"),
            numpy_helper.from_array(item_bias.astype(np.float32), "ranking_item_bias"),
            numpy_helper.from_array(np.array([candidates], dtype=np.int64), "ranking_candidates"),
            numpy_helper.from_array(np.array([top_k], dtype=np.int64), "ranking_top_k"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "ranking_axis2"),
        ]
    )
    graph.input.append(helper.make_tensor_value_info("exclude", TensorProto.INT64, [batch, "n_exclude"]))
    node = helper.make_node
    graph.node.extend(
        [
            # accuracy_level 4: int8 arithmetic (VNNI/AMX where the CPU has them); the fp32 path is 20x slower
            node("MatMulNBits", ["query", "ranking_item_table_q", "ranking_item_scales", "", "", "ranking_item_bias"],
                 ["ranking_approx"], domain=MS_DOMAIN, K=hidden, N=n_items, bits=bits, block_size=block,
                 accuracy_level=4, name="ranking_quantized_scores"),
            node("Shape", ["exclude"], ["ranking_exclude_shape"], name="ranking_shape"),
            node("ConstantOfShape", ["ranking_exclude_shape"], ["ranking_neg_inf"],
                 value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float("-inf")]), name="ranking_fill"),
            node("ScatterElements", ["ranking_approx", "exclude", "ranking_neg_inf"], ["ranking_approx_masked"],
                 axis=1, name="ranking_mask_history"),
            node("TopK", ["ranking_approx_masked", "ranking_candidates"], ["ranking_approx_top", "ranking_cand"],
                 axis=-1, largest=1, sorted=1, name="ranking_candidates_topk"),
            node("Gather", [table_name, "ranking_cand"], ["ranking_cand_rows"], axis=0, name="ranking_rows"),
            node("Unsqueeze", ["query", "ranking_axis2"], ["ranking_query3"], name="ranking_query_column"),
            node("MatMul", ["ranking_cand_rows", "ranking_query3"], ["ranking_dot3"], name="ranking_rescore"),
            node("Squeeze", ["ranking_dot3", "ranking_axis2"], ["ranking_dot"], name="ranking_squeeze"),
            node("Gather", ["ranking_item_bias", "ranking_cand"], ["ranking_cand_bias"], axis=0, name="ranking_bias"),
            node("Add", ["ranking_dot", "ranking_cand_bias"], ["ranking_exact_raw"], name="ranking_add_bias"),
            # a masked (-inf) candidate only appears when fewer items than candidates remain: keep it masked
            node("IsInf", ["ranking_approx_top"], ["ranking_masked_cand"], name="ranking_is_masked"),
            node("Where", ["ranking_masked_cand", "ranking_approx_top", "ranking_exact_raw"], ["ranking_exact"],
                 name="ranking_keep_mask"),
            node("TopK", ["ranking_exact", "ranking_top_k"], ["top_scores", "ranking_pos"], axis=-1, largest=1,
                 sorted=1, name="ranking_topk"),
            node("GatherElements", ["ranking_cand", "ranking_pos"], ["top_tokens"], axis=1, name="ranking_tokens"),
        ]
    )
    graph.output.remove(query_out)
    graph.output.extend(
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, [batch, top_k]),
            helper.make_tensor_value_info("top_tokens", TensorProto.INT64, [batch, top_k]),
        ]
    )
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return proto


def export_onnx(
    model: BERT4Rec,
    config: BERT4RecConfig,
    path: str | Path,
    contexts: Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    item_table: ItemTable = "fp32",
    rescore_candidates: int = DEFAULT_RESCORE_CANDIDATES,
) -> ExportReport:
    """Exports with dynamic batch and sequence length (<= max_len), adds the ranking head, checks.
    `item_table` "int8"/"int4": the two-stage quantized head for large catalogues (module docstring)."""
    started = time.perf_counter()
    if item_table != "fp32" and item_table not in ITEM_TABLE_BITS:
        raise ValueError(f"item_table must be one of fp32, {', '.join(ITEM_TABLE_BITS)}; got {item_table!r}")
    if rescore_candidates < 1:
        raise ValueError(f"rescore_candidates must be >= 1, got {rescore_candidates}")
    quantized = item_table != "fp32"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contexts = model_contexts(config) if contexts is None else list(contexts)
    unknown = [c for c in contexts if c not in CONTEXT_FIELDS]
    if unknown:
        raise ValueError(f"unknown context input(s) {unknown}; expected a subset of {CONTEXT_FIELDS}")
    top_k = min(top_k, config.vocab_size)
    if quantized and min(rescore_candidates, config.vocab_size) < top_k:
        raise ValueError(f"rescore_candidates ({rescore_candidates}) must be >= top_k ({top_k})")
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
    vocab_tables = _vocabulary_tables(model)
    table_bytes = sum(t.numel() * t.element_size() for t in vocab_tables.values())
    # A quantized graph only gathers rows of the vocabulary tables, so for a large catalogue the
    # encoder is exported at a stand-in vocabulary and the real tables are attached afterwards as
    # external data: the exporter never holds (and copies) gigabytes of tables in a protobuf.
    stand_in = quantized and table_bytes > LARGE_TABLE_BYTES
    traced = _with_vocabulary(model, config, STAND_IN_VOCAB) if stand_in else model
    wrapper = (_QueryNext if quantized else _ScoreNext)(traced, contexts).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            example,
            input_names=names,
            output_names=["query" if quantized else "scores"],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
    assert program is not None
    proto = program.model_proto
    if quantized:
        with torch.no_grad():
            table = model.item_emb.weight.detach().cpu().numpy()
            bias = (model.out_bias + model.get_buffer("special_mask")).detach().cpu().numpy()
            # the head rebuilds BERT4Rec.logits from these tensors: refuse a model whose logits differ
            probe = torch.randn(4, config.hidden, generator=torch.Generator().manual_seed(0))
            expected = model.logits(probe).numpy()
            rebuilt = (model.head(probe) @ model.item_emb.weight.t()).numpy() + bias
        if not np.allclose(expected, rebuilt, atol=1e-4, rtol=0):
            raise ValueError("the quantized ranking head needs logits = head(h) @ item_emb.T + out_bias "
                             "(+ the special tokens' -inf); this model computes them otherwise")
        add_quantized_ranking_head(proto, table, bias, top_k, ITEM_TABLE_BITS[item_table], rescore_candidates,
                                   table_initializer=f"model.{ITEM_TABLE}" if stand_in else None)
    else:
        add_ranking_head(proto, top_k)
    external = None
    if stand_in:
        external = path.name + EXTERNAL_DATA_SUFFIX
        in_graph = {i.name for i in proto.graph.initializer}
        arrays = {f"model.{n}": t.detach().cpu().numpy() for n, t in vocab_tables.items() if f"model.{n}" in in_graph}
        if f"model.{ITEM_TABLE}" not in arrays:
            raise ValueError(f"the exported graph has no initializer model.{ITEM_TABLE} to attach the real table to")
        write_external_initializers(proto, path.parent / external, arrays)
        del proto.graph.value_info[:]  # intermediate shapes were inferred at the stand-in vocabulary
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path), full_check=True)
    elif proto.ByteSize() > PROTOBUF_LIMIT:
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
        item_table=item_table,
        rescore_candidates=min(rescore_candidates, config.vocab_size) if quantized else None,
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
    model = model.eval()
    session = cpu_session(onnx_path)
    input_names = [i.name for i in session.get_inputs()]
    n = identical = 0
    recall_sum = 0.0
    max_diff = 0.0
    for batch in batches:
        feeds = {"tokens": batch.tokens, **batch.contexts, "exclude": batch.exclude}
        top_scores, top_tokens = session.run(
            ["top_scores", "top_tokens"], {name: feeds[name] for name in input_names}
        )
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


class LatencyReport(BaseModel):
    """Batch-1 latency of one history length: PyTorch eager vs ONNX Runtime (graph top-K vs numpy)."""

    seq_len: int
    threads: int
    torch_eager_ms: float
    ort_topk_in_graph_ms: float
    ort_scores_then_numpy_topk_ms: float | None  # None: the graph has no `scores` output (quantized)
    speedup_vs_torch: float
    topk_in_graph_faster: bool | None


def batch1_latency(
    model: BERT4Rec, onnx_path: str | Path, contexts: Sequence[str], seq_len: int, repeats: int = 50, threads: int = 1
) -> LatencyReport:
    """Median latencies at batch 1 (what serving runs); torch uses the same thread count. The runs
    alternate (torch, ORT, ORT without in-graph top-K, torch, ...) so that load from elsewhere on
    a shared machine falls on all of them alike instead of on whichever ran during a busy spell."""
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
    has_scores = "scores" in {o.name for o in session.get_outputs()}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def timed(*fns) -> list[float]:  # type: ignore[no-untyped-def]
            for fn in fns:
                fn()
            samples: list[list[float]] = [[] for _ in fns]
            for _ in range(repeats):
                for fn, out in zip(fns, samples):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
            return [1000 * float(np.median(s)) for s in samples]

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

        run_in_graph = lambda: session.run(["top_scores", "top_tokens"], feeds)  # noqa: E731
        if has_scores:
            eager, in_graph, outside = timed(run_torch, run_in_graph, run_ort_outside)
        else:
            (eager, in_graph), outside = timed(run_torch, run_in_graph), None
    finally:
        torch.set_num_threads(previous)
    return LatencyReport(
        seq_len=seq_len,
        threads=threads,
        torch_eager_ms=round(eager, 4),
        ort_topk_in_graph_ms=round(in_graph, 4),
        ort_scores_then_numpy_topk_ms=round(outside, 4) if outside is not None else None,
        speedup_vs_torch=round(eager / in_graph, 2),
        topk_in_graph_faster=in_graph < outside if outside is not None else None,
    )
