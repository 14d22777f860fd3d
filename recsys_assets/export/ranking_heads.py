"""The ranking inside the exported graph: history masking and top-K, exact or two-stage quantized.

Exact head (`ranking_head`): torch ops inside the exported wrapper, so torch.onnx emits the
ScatterElements(-inf at `exclude`) -> TopK(K) nodes itself; ties keep ONNX TopK's order (lower
token first), the same kernel whichever side built the graph.

Quantized head (`add_quantized_ranking_head`): query [B, H] -> per-item scaled int8 / int4 scores
of every item (ONNX Runtime's MatMulNBits, a com.microsoft operator) -> -inf at `exclude` ->
TopK(candidates) -> exact fp32 rescoring of the candidates -> TopK(K). Returned scores are fp32
scores; only the candidate set is approximate (verification.quantized_ranking_check measures it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

MS_DOMAIN = "com.microsoft"


def ranking_head(scores: Tensor, exclude: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """scores [B, V], exclude [B, n] (tokens never to return) -> (top_scores, top_tokens) [B, K],
    best first. Duplicate or PAD entries in `exclude` are harmless: every write is the same -inf."""
    masked = torch.scatter(scores, 1, exclude, float("-inf"))
    top_scores, top_tokens = torch.topk(masked, top_k, dim=1, largest=True, sorted=True)
    return top_scores, top_tokens


def _block_size(hidden: int) -> int:
    """MatMulNBits blocks: a power of two >= 16, at most 256; one block per item when hidden <= 256
    (the per-item scale), several otherwise (finer still)."""
    size = 16
    while size < min(hidden, 256):
        size *= 2
    return size


def quantize_item_table(item_table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[V, H] fp32 -> (packed [V, blocks, block_size * bits / 8] uint8, scales [V, blocks], block_size),
    symmetric, in MatMulNBits' layout."""
    # ONNX Runtime's own packing routine (the one its matmul_nbits_quantizer calls): the layout is
    # the kernel's by construction. It has no public binding, and neither onnx_ir nor torch packs
    # for MatMulNBits, so this private import stays.
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


def _find_table(graph: ir.Graph, item_table: np.ndarray) -> ir.Value | None:
    """The graph's initializer holding exactly `item_table` (the encoder's input embedding)."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is not None and tuple(tensor.shape.numpy()) == item_table.shape
                and np.array_equal(tensor.numpy(), item_table)):
            return value
    return None


def add_quantized_ranking_head(
    model: ir.Model,
    item_table: np.ndarray,
    item_bias: np.ndarray,
    top_k: int,
    bits: int,
    candidates: int,
    table_initializer: str | None = None,
) -> ir.Model:
    """Replaces the graph's `query` output by the two-stage head (module docstring); adds the
    `exclude` input and the `top_scores` / `top_tokens` outputs. `item_bias` holds out_bias + the
    special tokens' -inf. The fp32 table is the graph's own input embedding initializer
    (`table_initializer`, or one found holding the same values): no second copy; else it is added."""
    # A graph edit (onnx_ir), not torch ops in the wrapper: MatMulNBits is ONNX Runtime's
    # contrib operator with a prepacked table, which torch.onnx cannot emit from a torch op.
    graph = model.graph
    (query,) = [o for o in graph.outputs if o.name == "query"]
    batch = query.shape[0] if query.shape is not None else "batch"
    n_items, hidden = item_table.shape
    candidates = min(candidates, n_items)
    if top_k > candidates:
        raise ValueError(f"rescore_candidates ({candidates}) must be >= top_k ({top_k})")
    table = graph.initializers[table_initializer] if table_initializer else _find_table(graph, item_table)
    tape = ir.tape.Tape(graph)
    if table is None:
        table = tape.initializer(ir.tensor(item_table.astype(np.float32), name="ranking_item_table"))
    packed, scales, block = quantize_item_table(item_table, bits)

    def const(name: str, values: np.ndarray) -> ir.Value:
        return tape.initializer(ir.tensor(values, name=name))

    table_q = const("ranking_item_table_q", packed)
    item_scales = const("ranking_item_scales", scales)
    bias = const("ranking_item_bias", item_bias.astype(np.float32))
    n_candidates = const("ranking_candidates", np.array([candidates], dtype=np.int64))
    k = const("ranking_top_k", np.array([top_k], dtype=np.int64))
    axis2 = const("ranking_axis2", np.array([2], dtype=np.int64))
    exclude = ir.val("exclude", ir.DataType.INT64, ir.Shape([batch, "n_exclude"]))
    graph.inputs.append(exclude)

    def op(op_type: str, inputs: list[ir.Value | None], output: str, name: str, **attributes: Any) -> ir.Value:
        return tape.op(op_type, inputs, attributes or None, name=name,
                       output=ir.val(output), domain=MS_DOMAIN if op_type == "MatMulNBits" else "")

    def op2(op_type: str, inputs: list[ir.Value], outputs: tuple[str, str], name: str,
            **attributes: Any) -> tuple[ir.Value, ir.Value]:
        first, second = tape.op_multi_out(op_type, inputs, attributes,
                                          outputs=[ir.val(n) for n in outputs], name=name)
        return first, second

    # accuracy_level 4: int8 arithmetic (VNNI/AMX where the CPU has them); fp32 arithmetic would
    # forfeit most of what the narrow table saves
    approx = op("MatMulNBits", [query, table_q, item_scales, None, None, bias], "ranking_approx",
                "ranking_quantized_scores", K=hidden, N=n_items, bits=bits, block_size=block, accuracy_level=4)
    neg_inf = op("ConstantOfShape", [op("Shape", [exclude], "ranking_exclude_shape", "ranking_shape")],
                 "ranking_neg_inf", "ranking_fill", value=ir.tensor(np.array([-np.inf], dtype=np.float32)))
    masked = op("ScatterElements", [approx, exclude, neg_inf], "ranking_approx_masked", "ranking_mask_history",
                axis=1)
    approx_top, cand = op2("TopK", [masked, n_candidates], ("ranking_approx_top", "ranking_cand"),
                           "ranking_candidates_topk", axis=-1, largest=1, sorted=1)
    rows = op("Gather", [table, cand], "ranking_cand_rows", "ranking_rows", axis=0)
    query3 = op("Unsqueeze", [query, axis2], "ranking_query3", "ranking_query_column")
    dot = op("Squeeze", [op("MatMul", [rows, query3], "ranking_dot3", "ranking_rescore"), axis2], "ranking_dot",
             "ranking_squeeze")
    exact_raw = op("Add", [dot, op("Gather", [bias, cand], "ranking_cand_bias", "ranking_bias", axis=0)],
                   "ranking_exact_raw", "ranking_add_bias")
    # a masked (-inf) candidate only appears when fewer items than candidates remain: keep it masked
    is_masked = op("IsInf", [approx_top], "ranking_masked_cand", "ranking_is_masked")
    exact = op("Where", [is_masked, approx_top, exact_raw], "ranking_exact", "ranking_keep_mask")
    top_scores, pos = op2("TopK", [exact, k], ("top_scores", "ranking_pos"), "ranking_topk",
                          axis=-1, largest=1, sorted=1)
    top_tokens = op("GatherElements", [cand, pos], "top_tokens", "ranking_tokens", axis=1)
    top_scores.type, top_scores.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, top_k])
    top_tokens.type, top_tokens.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([batch, top_k])
    graph.outputs.remove(query)
    graph.outputs.extend([top_scores, top_tokens])
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return model
