"""ONNX Runtime inference for a bundle's BERT4Rec graph (TensorRT/CUDA providers where present),
followed by the approximate nearest-neighbour stage (recsys_serving.ann) where the manifest has one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnxruntime as ort

from recsys_serving.bundle import (
    ANN_QUERY_OUTPUT,
    MODEL_CONTEXT_INPUTS,
    MODEL_REQUIRED_INPUTS,
    BundleRefused,
    LoadedBundle,
    Vocabulary,
)
from recsys_serving.contract import (
    EVENT_TYPE_TOKENS,
    FIRST_ITEM_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    UNKNOWN_CONTEXT_TOKEN,
    history_length,
    valid_time_of_day_token,
)

if TYPE_CHECKING:  # faiss is imported only where a bundle has an ANN ranking
    from recsys_serving.ann import AnnHead

logger = logging.getLogger(__name__)

WARM_UP_RUNS = 3


@dataclass(frozen=True)
class History:
    """A user's recent events, oldest first; context lists are optional and per position."""

    item_ids: Sequence[str]
    event_types: Sequence[str] | None = None
    tod: Sequence[int] | None = None
    devices: Sequence[str] | None = None


@dataclass(frozen=True)
class MaskContext:
    """Context tokens' values at the [MASK] position, resolved from a request (schemas.RequestContext)
    and the user's stored features: the request time's time-of-day token, device and segment."""

    tod: int = 0
    device: str | None = None
    segment: str | None = None


@dataclass
class Encoded:
    feeds: dict[str, np.ndarray]
    seen_tokens: np.ndarray  # every known history token (exclusion)
    n_known: int


def encode(
    history: History,
    request: MaskContext,
    vocabulary: Vocabulary,
    max_len: int,
    input_names: Sequence[str],
    exclude_history: bool = True,
) -> Encoded | None:
    """Latest max_len-1 known items + [MASK], batch of one; None when no item is in the vocabulary.
    `exclude_history`: the graph leaves the known history items out of the answer (else only PAD:
    PredictionTarget.removes_history)."""
    lookup = vocabulary.item_to_token
    n = len(history.item_ids)
    keep = [i for i, item in enumerate(history.item_ids) if item in lookup]
    if not keep:
        return None
    seen = np.unique(np.fromiter((lookup[history.item_ids[i]] for i in keep), dtype=np.int64, count=len(keep)))
    window = keep[-history_length(max_len) :]
    width = len(window) + 1

    def per_position(values: Sequence[object] | None, convert: object, last: int) -> np.ndarray:
        out = np.zeros((1, width), dtype=np.int64)
        if values is not None and len(values) == n:
            out[0, :-1] = [convert(values[i]) for i in window]  # type: ignore[operator]
        out[0, -1] = last
        return out

    segment_token = vocabulary.segments.get(request.segment or "", 0)
    feeds: dict[str, np.ndarray] = {
        "tokens": np.array([[lookup[history.item_ids[i]] for i in window] + [MASK_TOKEN]], dtype=np.int64),
        "exclude": seen.reshape(1, -1) if exclude_history else np.full((1, 1), PAD_TOKEN, dtype=np.int64),
    }
    if "tod" in input_names:
        feeds["tod"] = per_position(history.tod, lambda v: valid_time_of_day_token(int(v)), request.tod)
    if "devices" in input_names:
        feeds["devices"] = per_position(
            history.devices, lambda v: vocabulary.devices.get(v or "", 0), vocabulary.devices.get(request.device or "", 0)
        )
    if "segments" in input_names:
        # The store keeps only the latest segment; it stands for every position.
        feeds["segments"] = np.full((1, width), segment_token, dtype=np.int64)
    if "event_types" in input_names:
        # The event type of the [MASK] position is the unknown outcome: 0, as in training.
        feeds["event_types"] = per_position(history.event_types, lambda v: EVENT_TYPE_TOKENS.get(v, UNKNOWN_CONTEXT_TOKEN), UNKNOWN_CONTEXT_TOKEN)
    return Encoded(feeds=feeds, seen_tokens=seen, n_known=len(keep))


def _providers(use_gpu: bool, cache_dir: Path) -> list[object]:
    available = set(ort.get_available_providers())
    providers: list[object] = []
    if use_gpu and "TensorrtExecutionProvider" in available:
        cache_dir.mkdir(parents=True, exist_ok=True)
        providers.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache_dir),
                },
            )
        )
    if use_gpu and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


class OnnxRanker:
    """One ONNX Runtime session and, for bundles with an ANN ranking (ModelSpec.ranking), its
    index and table; `rank` is thread-safe (ORT sessions allow concurrent `run`, FAISS searches and
    the mapped table are read-only)."""

    def __init__(self, bundle: LoadedBundle, intra_threads: int, use_gpu: bool, cache_dir: Path) -> None:
        spec = bundle.manifest.model
        self.vocabulary = bundle.vocabulary
        self.path = bundle.path
        self.max_len = spec.max_len
        self.top_k = spec.top_k
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the (few) cores from the event loop between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(bundle.path / "model.onnx"), options, providers=_providers(use_gpu, cache_dir / bundle.version)
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleRefused(bundle.path, "ONNX Runtime cannot load model.onnx", detail=str(exc)) from exc
        self.providers = self.session.get_providers()
        self.graph_inputs = [i.name for i in self.session.get_inputs()]
        output_names = [o.name for o in self.session.get_outputs()]
        self.ann: AnnHead | None = None
        if spec.ranking is not None:
            # the graph outputs the query; `exclude` is the ANN stage's input, not the graph's
            from recsys_serving.ann import AnnHead

            if "exclude" in self.graph_inputs or output_names != [ANN_QUERY_OUTPUT]:
                raise BundleRefused(bundle.path, f"graph inputs {self.graph_inputs} / outputs {output_names} "
                                                 "are not an ANN bundle's query graph")
            self.ann = AnnHead(bundle.path, spec.ranking, spec.vocab_size, spec.top_k)
            self.input_names = [*self.graph_inputs, "exclude"]
        else:
            self.input_names = list(self.graph_inputs)
        missing = [n for n in MODEL_REQUIRED_INPUTS if n not in self.input_names]
        unknown = [n for n in self.input_names if n not in (*MODEL_REQUIRED_INPUTS, *MODEL_CONTEXT_INPUTS)]
        if missing or unknown or (self.ann is None and not {"top_scores", "top_tokens"} <= set(output_names)):
            raise BundleRefused(
                bundle.path, f"graph inputs {self.input_names} / outputs {output_names} are not understood"
            )
        if self.input_names != list(spec.inputs):
            raise BundleRefused(bundle.path, f"graph inputs {self.input_names} differ from the manifest {spec.inputs}")
        self.inference_ms = 0.0  # fastest warm-up inference, set by warm_up()
        self.warm_up()

    def warm_up(self) -> None:
        """Real inferences at load: a broken graph is refused before traffic arrives, and the fastest
        run's time (`inference_ms`) tells the service whether inference may block its event loop."""
        probe = History(item_ids=[self.vocabulary.item_id(FIRST_ITEM_TOKEN)])
        encoded = encode(probe, MaskContext(), self.vocabulary, self.max_len, self.input_names)
        assert encoded is not None
        timings = []
        try:
            for _ in range(WARM_UP_RUNS):
                started = time.perf_counter()
                scores, tokens = self.rank(encoded.feeds)
                timings.append(time.perf_counter() - started)
        except Exception as exc:
            raise BundleRefused(self.path, "warm-up inference failed", detail=f"{type(exc).__name__}: {exc}") from exc
        self.inference_ms = 1000 * min(timings)
        if tokens.shape != (self.top_k,) or not np.isfinite(scores[:1]).all():
            raise BundleRefused(self.path, f"warm-up returned shape {tokens.shape}, expected ({self.top_k},)")

    def rank(self, feeds: dict[str, np.ndarray], run_options: ort.RunOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (scores, tokens) of the top-K for a batch of one, best first."""
        scores, tokens = self.rank_batch(feeds, run_options)
        return scores[0], tokens[0]

    def rank_batch(
        self, feeds: dict[str, np.ndarray], run_options: ort.RunOptions | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feeds of `input_names` [B, ...] -> (top_scores, top_tokens) [B, top_k], best first."""
        if self.ann is None:
            scores, tokens = self.session.run(["top_scores", "top_tokens"], feeds, run_options)
            return scores, tokens
        graph_feeds = {name: feeds[name] for name in self.graph_inputs}
        (queries,) = self.session.run([ANN_QUERY_OUTPUT], graph_feeds, run_options)
        if run_options is not None and run_options.terminate:  # abandoned by the model timeout
            raise RuntimeError("the ranking was abandoned (RunOptions.terminate)")
        return self.ann.rank(queries, feeds["exclude"])

    def decode(self, scores: np.ndarray, tokens: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Top-K tokens -> (item id, score); masked entries (-inf: history, specials) are dropped."""
        keep = np.isfinite(scores) & (tokens >= FIRST_ITEM_TOKEN)
        items = self.vocabulary.items
        return [
            (items[t - FIRST_ITEM_TOKEN], s)
            for t, s in zip(tokens[keep][:k].tolist(), scores[keep][:k].tolist())
        ]
