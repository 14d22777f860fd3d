"""BERT4Rec -> ONNX with the ranking inside the graph.

The graph (interface in recsys_serving.bundle):

    inputs   tokens [batch, seq] int64 (left-padded, last = [MASK]), the context inputs the model
             was trained with (tod, devices, segments, event_types; same shape), and
             exclude [batch, n_exclude] int64 (tokens never to return: the user's history)
    outputs  scores [batch, V] float32 (PAD/MASK = -inf, exactly BERT4Rec.score_next),
             top_scores [batch, K], top_tokens [batch, K] (history masked, best first)

Top-K runs inside the graph with a constant K (the largest k the API serves): ONNX Runtime's
TopK avoids copying the [batch, V] scores out per request and the constant K keeps the graph
acceptable to TensorRT. Serving slices the first k. The ranking heads are in ranking_heads, the
parity checks against PyTorch in verification.

Large catalogues (`item_table="int8"` or `"int4"`): scoring every item reads the whole fp32 item
table per request, which bounds latency by memory bandwidth. The quantized variant scores with a
per-item scaled int8 / int4 copy of the table, keeps the best `rescore_candidates` (history
masked), rescores those exactly against the fp32 table and returns their top-K
(ranking_heads.add_quantized_ranking_head). That graph has no `scores` output and runs on ONNX
Runtime's CPU provider (a com.microsoft operator).

Approximate nearest neighbours (`item_table="ann"`, options in ann_index.AnnOptions): the graph
stops at the query (tokens + context -> query [batch, H], no `exclude` input); a FAISS index over
the items' [vector, bias] rows proposes candidates and serving rescores them exactly in fp32 with
the history left out (recsys_serving.ann). The index and the fp32 table are files beside the
graph (ExportReport.ann), and the manifest's ModelSpec.ranking tells serving to run them; the
report's inputs / outputs are the served interface (with `exclude`, top_scores / top_tokens).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from recsys_assets.bert4rec.data import CONTEXT_FIELDS
from recsys_assets.bert4rec.model import BERT4Rec, BERT4RecConfig, token_tables
from recsys_assets.export.ann_index import AnnOptions, AnnReport, build_ann_files
from recsys_assets.export.ranking_heads import add_quantized_ranking_head, ranking_head

OPSET = 18
DEFAULT_TOP_K = 100
ItemTable = Literal["fp32", "int8", "int4", "ann"]
ITEM_TABLE_BITS: dict[str, int] = {"int8": 8, "int4": 4}
DEFAULT_RESCORE_CANDIDATES = 1024
PROTOBUF_LIMIT = 2_000_000_000  # larger models keep their weights in an external data file
EXTERNAL_DATA_SUFFIX = ".data"
ITEM_TABLE = "item_emb.weight"
LARGE_TABLE_BYTES = 1 << 30  # vocabulary tables above this are exported via a stand-in (export_onnx)
STAND_IN_VOCAB = 1024
EXTERNAL_ALIGNMENT = 1 << 16  # offsets a runtime may memory-map (ONNX's external-data guidance; 64 KiB on Windows)


def context_table_size(config: BERT4RecConfig, name: str) -> int:
    return {"tod": config.n_tod, "devices": config.n_devices, "segments": config.n_segments,
            "event_types": config.n_event_types}[name]


def model_contexts(config: BERT4RecConfig, available: Sequence[str] = CONTEXT_FIELDS) -> list[str]:
    """Context inputs the graph gets: the model has a table for them (size > 1) and the data has
    them; the same rule as training and evaluation (train._usable_contexts, score_eval_set)."""
    return [c for c in CONTEXT_FIELDS if c in available and context_table_size(config, c) > 1]


class _Positional(nn.Module):
    """A positional forward over the chosen context inputs (torch.export wants a flat signature)."""

    def __init__(self, model: BERT4Rec, contexts: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.contexts = list(contexts)

    def _context(self, context: Sequence[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.contexts, context))


class _ScoreNext(_Positional):
    """(tokens, *context, exclude) -> scores, top_scores, top_tokens: BERT4Rec.score_next and the
    exact ranking head, both traced, so the exporter emits the masking and TopK nodes."""

    def __init__(self, model: BERT4Rec, contexts: Sequence[str], top_k: int) -> None:
        super().__init__(model, contexts)
        self.top_k = top_k

    def forward(self, tokens: Tensor, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        *context, exclude = inputs
        scores = self.model.score_next(tokens, **self._context(context))
        top_scores, top_tokens = ranking_head(scores, exclude, self.top_k)
        return scores, top_scores, top_tokens


class _QueryNext(_Positional):
    """The [MASK] position's query vector head(hidden) [B, H]: what score_next multiplies with the
    item table. The quantized ranking head does that product in ONNX (see add_quantized_ranking_head),
    the ANN ranking in serving (recsys_serving.ann)."""

    def forward(self, tokens: Tensor, *context: Tensor) -> Tensor:
        hidden = self.model.forward(tokens, **self._context(context), last_only=True)
        return self.model.head(hidden[:, -1])


def _with_vocabulary(model: BERT4Rec, config: BERT4RecConfig, vocab: int) -> BERT4Rec:
    """A copy of `model` whose vocabulary tables keep only their first `vocab` rows (same graph)."""
    small = BERT4Rec(config.model_copy(update={"vocab_size": min(vocab, config.vocab_size)})).eval()
    tables = token_tables(model)
    state = {name: (t[:vocab] if name in tables else t) for name, t in model.state_dict().items()}
    small.load_state_dict(state)
    return small


def attach_external_initializers(model: ir.Model, data_path: Path, arrays: dict[str, np.ndarray],
                                 min_bytes: int = 1 << 20) -> None:
    """Moves initializers to one external data file, each at an aligned offset (mappable): the ones
    named in `arrays` get those values (written straight from them, never through a protobuf), and
    every other initializer of at least `min_bytes` keeps its own. (ONNX Runtime's CPU provider may
    still read them into each session's memory: alignment makes mapping possible, not certain.)"""
    moved: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for name, value in model.graph.initializers.items():
        if name in arrays:
            values = np.ascontiguousarray(arrays[name])
            if values.dtype != np.float32:
                raise ValueError(f"{name}: expected float32 values, got {values.dtype}")
            value.const_value = ir.Tensor(values, name=name)
            value.shape = ir.Shape(values.shape)
            moved.append((value, value.const_value))
        elif value.const_value is not None and value.const_value.nbytes >= min_bytes:
            moved.append((value, value.const_value))
    external = ir.external_data.convert_tensors_to_external(
        [tensor for _, tensor in moved],
        base_dir=data_path.parent,
        relative_path=data_path.name,
        alignment=EXTERNAL_ALIGNMENT,
        align_threshold=0,  # every moved tensor, small ones included
    )
    for (value, _), tensor in zip(moved, external):
        value.const_value = tensor


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


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
    item_table: ItemTable = "fp32"  # first scoring pass: fp32 (the only pass), int8/int4 scan, ann index
    rescore_candidates: int | None = None  # two-stage variants: candidates rescored in fp32
    ann: AnnReport | None = None  # item_table="ann": the index and table files beside the graph


def export_onnx(
    model: BERT4Rec,
    config: BERT4RecConfig,
    path: str | Path,
    contexts: Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    item_table: ItemTable = "fp32",
    rescore_candidates: int = DEFAULT_RESCORE_CANDIDATES,
    ann: AnnOptions | None = None,
    ann_tuning_queries: np.ndarray | None = None,
) -> ExportReport:
    """Exports with dynamic batch and sequence length (<= max_len) and the ranking head, checks.
    `item_table` "int8"/"int4": the two-stage quantized head for large catalogues; "ann": the query
    graph plus the ANN files (module docstring), built with `ann` (default AnnOptions()) and tuned
    on `ann_tuning_queries` (validation-like queries [n, H], ann_index.query_vectors) if given."""
    started = time.perf_counter()
    if item_table != "fp32" and item_table != "ann" and item_table not in ITEM_TABLE_BITS:
        raise ValueError(f"item_table must be one of fp32, {', '.join(ITEM_TABLE_BITS)}, ann; got {item_table!r}")
    if rescore_candidates < 1:
        raise ValueError(f"rescore_candidates must be >= 1, got {rescore_candidates}")
    if item_table != "ann" and (ann is not None or ann_tuning_queries is not None):
        raise ValueError("ann options and tuning queries are for item_table='ann'")
    # both two-stage variants export the graph up to the query; the int8/int4 head is then added to it
    query_graph = item_table != "fp32"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contexts = model_contexts(config) if contexts is None else list(contexts)
    unknown = [c for c in contexts if c not in CONTEXT_FIELDS]
    if unknown:
        raise ValueError(f"unknown context input(s) {unknown}; expected a subset of {CONTEXT_FIELDS}")
    top_k = min(top_k, config.vocab_size)
    if item_table in ITEM_TABLE_BITS and min(rescore_candidates, config.vocab_size) < top_k:
        raise ValueError(f"rescore_candidates ({rescore_candidates}) must be >= top_k ({top_k})")
    model = model.eval()
    example_len = min(8, config.max_len)
    example: tuple[Tensor, ...] = (torch.full((2, example_len), 2, dtype=torch.long),) + tuple(
        torch.ones((2, example_len), dtype=torch.long) for _ in contexts
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=1, max=config.max_len)
    # keyed like forward(tokens, *context) / forward(tokens, *inputs); torch.export refuses an
    # empty starred entry
    dynamic_shapes: dict[str, Any] = {"tokens": {0: batch, 1: seq}}
    per_position = tuple({0: batch, 1: seq} for _ in contexts)
    if query_graph:
        names, outputs = ["tokens", *contexts], ["query"]
        if contexts:
            dynamic_shapes["context"] = per_position
    else:
        names, outputs = ["tokens", *contexts, "exclude"], ["scores", "top_scores", "top_tokens"]
        # a width unlike the other example sizes, so the exporter cannot tie n_exclude to them
        example += (torch.zeros((2, example_len + 3), dtype=torch.long),)
        dynamic_shapes["inputs"] = per_position + ({0: batch, 1: torch.export.Dim("n_exclude", min=1)},)
    vocab_tables = token_tables(model)
    table_bytes = sum(t.numel() * t.element_size() for t in vocab_tables.values())
    # A query graph only gathers rows of the vocabulary tables, so for a large catalogue the
    # encoder is exported at a stand-in vocabulary and the real tables are attached afterwards as
    # external data: the exporter never holds (and copies) gigabytes of tables in a protobuf.
    stand_in = query_graph and table_bytes > LARGE_TABLE_BYTES
    traced = _with_vocabulary(model, config, STAND_IN_VOCAB) if stand_in else model
    wrapper = (_QueryNext(traced, contexts) if query_graph else _ScoreNext(traced, contexts, top_k)).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            example,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
    assert program is not None
    graph_model = program.model
    if query_graph:
        with torch.no_grad():
            table = model.item_emb.weight.detach().cpu().numpy()
            bias = (model.out_bias + model.get_buffer("special_mask")).detach().cpu().numpy()
            # the head rebuilds BERT4Rec.logits from these tensors: refuse a model whose logits differ
            probe = torch.randn(4, config.hidden, generator=torch.Generator().manual_seed(0))
            expected = model.logits(probe).numpy()
            rebuilt = (model.head(probe) @ model.item_emb.weight.t()).numpy() + bias
        if not np.allclose(expected, rebuilt, atol=1e-4, rtol=0):
            raise ValueError(f"the {item_table} ranking needs logits = head(h) @ item_emb.T + out_bias "
                             "(+ the special tokens' -inf); this model computes them otherwise")
        if item_table in ITEM_TABLE_BITS:
            add_quantized_ranking_head(graph_model, table, bias, top_k, ITEM_TABLE_BITS[item_table],
                                       rescore_candidates, table_initializer=f"model.{ITEM_TABLE}" if stand_in else None)
        del table, bias
    ann_report = None
    if item_table == "ann":
        # enough candidates for a full top-K after the longest history is left out
        ann_report = build_ann_files(model, path.parent, ann or AnnOptions(), top_k, top_k + config.max_len - 1,
                                     ann_tuning_queries)
    external = None
    if stand_in:
        external = path.name + EXTERNAL_DATA_SUFFIX
        in_graph = set(graph_model.graph.initializers)
        arrays = {f"model.{n}": t.detach().cpu().numpy() for n, t in vocab_tables.items() if f"model.{n}" in in_graph}
        if f"model.{ITEM_TABLE}" not in arrays:
            raise ValueError(f"the exported graph has no initializer model.{ITEM_TABLE} to attach the real table to")
        attach_external_initializers(graph_model, path.parent / external, arrays)
        for node in graph_model.graph:  # intermediate shapes were inferred at the stand-in vocabulary
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape = None
        ir.save(graph_model, path)
    elif _initializer_bytes(graph_model) > PROTOBUF_LIMIT:
        external = path.name + EXTERNAL_DATA_SUFFIX
        ir.save(graph_model, path, external_data=external)
    else:
        ir.save(graph_model, path)
    onnx.checker.check_model(str(path), full_check=True)
    inputs = [str(v.name) for v in graph_model.graph.inputs]  # the exporter names every input
    outputs = [str(v.name) for v in graph_model.graph.outputs]
    if ann_report is not None:  # the served interface: the ANN stage takes exclude, returns the top-K
        inputs, outputs = [*inputs, "exclude"], ["top_scores", "top_tokens"]
    size = path.stat().st_size + ((path.parent / external).stat().st_size if external else 0)
    return ExportReport(
        path=str(path),
        opset=OPSET,
        inputs=inputs,
        outputs=outputs,
        contexts=contexts,
        top_k=top_k,
        vocab_size=config.vocab_size,
        bytes=size + (ann_report.index_bytes + ann_report.table_bytes if ann_report else 0),
        external_data=external,
        seconds=round(time.perf_counter() - started, 3),
        item_table=item_table,
        rescore_candidates=(ann_report.candidates if ann_report else min(rescore_candidates, config.vocab_size))
        if query_graph else None,
        ann=ann_report,
    )
