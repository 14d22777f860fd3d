"""TensorRT engine (fp16) from the exported ONNX graph, with a parity check against ONNX Runtime.

GPU only: `tensorrt_available()` says why not when there is no CUDA device or no `tensorrt`
package, and the asset records that reason instead of pretending to have built anything.
Device buffers for the parity run are torch CUDA tensors (the asset side may use torch; serving
never does).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from recsys_assets.export.verification import ParityBatch, cpu_session


class TensorRTUnavailable(RuntimeError):
    pass


class ProfileShape(BaseModel):
    """One optimization profile: (min, opt, max) of batch, sequence length and history to exclude."""

    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    exclude: tuple[int, int, int]


class EngineReport(BaseModel):
    path: str
    fp16: bool
    profiles: list[ProfileShape]
    tensorrt_version: str
    device: str
    bytes: int
    build_seconds: float


class TensorRTParity(BaseModel):
    n_sequences: int
    max_abs_diff: float
    mean_abs_diff: float
    top10_overlap: float = Field(description="mean |TRT top-10 ∩ ORT top-10| / 10 (history masked)")
    top1_agreement: float
    min_top10_overlap: float
    passed: bool
    trt_ms_per_batch: float


# The fp16 build sets BuilderFlag.FP16 on a weakly typed network, which TensorRT 11 removed (its
# networks are strongly typed); pyproject's [gpu] extra and requirements-gpu.lock pin major 10.
SUPPORTED_TENSORRT_MAJOR = 10


def tensorrt_available() -> tuple[bool, str]:
    """(True, device name) or (False, the reason in one sentence)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed (it needs a CUDA machine: requirements-gpu.lock)"
    import tensorrt as trt

    if trt.__version__.split(".")[0] != str(SUPPORTED_TENSORRT_MAJOR):
        return False, (
            f"TensorRT {trt.__version__} is installed; the engine build needs TensorRT {SUPPORTED_TENSORRT_MAJOR}.x "
            "(BuilderFlag.FP16 was removed in 11): install requirements-gpu.lock's tensorrt pins"
        )
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def default_profiles(max_len: int, max_exclude: int = 512) -> list[ProfileShape]:
    """Online (batch 1, short histories) and offline (large batches, full length) profiles."""
    opt_len = min(16, max_len)
    return [
        ProfileShape(name="online", batch=(1, 1, 8), seq=(1, opt_len, max_len), exclude=(1, opt_len, max_exclude)),
        ProfileShape(name="batch", batch=(1, 64, 256), seq=(1, max_len, max_len), exclude=(1, 64, max_exclude)),
    ]


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    profiles: Sequence[ProfileShape],
    fp16: bool = True,
    workspace_bytes: int = 2 << 30,
) -> EngineReport:
    """Parse the ONNX graph, add the optimization profiles, build and serialize the engine."""
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for shape in profiles:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            second = shape.exclude if name == "exclude" else shape.seq
            profile.set_shape(name, *[(b, s) for b, s in zip(shape.batch, second)])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(bytes(serialized))
    import torch

    return EngineReport(
        path=str(plan_path),
        fp16=fp16,
        profiles=list(profiles),
        tensorrt_version=trt.__version__,
        device=torch.cuda.get_device_name(0),
        bytes=plan_path.stat().st_size,
        build_seconds=round(time.perf_counter() - started, 3),
    )


class _Engine:
    """Runs a serialized engine on CUDA with torch tensors as device buffers."""

    def __init__(self, plan_path: str | Path, profile_index: int) -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.context.set_optimization_profile_async(profile_index, self.stream.cuda_stream)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _dtype(self, name: str) -> Any:
        trt, torch = self.trt, self.torch
        return {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
        }[self.engine.get_tensor_dtype(name)]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep = []
        for name in self.inputs:
            tensor = torch.from_numpy(feeds[name]).to("cuda", dtype=self._dtype(name)).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in outputs.items()}


def parity_check_tensorrt(
    plan_path: str | Path,
    onnx_path: str | Path,
    batches: Sequence[ParityBatch],
    profile_index: int,
    max_exclude: int,
    min_top10_overlap: float = 0.9,
) -> TensorRTParity:
    """fp16 TensorRT vs fp32 ONNX Runtime on the same real inputs. fp16 moves scores by ~1e-3, so the
    criterion is ranking agreement: mean top-10 overlap >= `min_top10_overlap` (scores reported)."""
    engine = _Engine(plan_path, profile_index)
    session = cpu_session(onnx_path)
    n = 0
    diffs: list[float] = []
    max_diff = 0.0
    overlap_sum = top1 = 0.0
    seconds = 0.0
    for batch in batches:
        feeds = {"tokens": batch.tokens, **batch.contexts, "exclude": batch.exclude[:, :max_exclude]}
        feeds = {k: v for k, v in feeds.items() if k in engine.inputs}
        ref_scores, ref_top = session.run(["scores", "top_tokens"], feeds)
        t0 = time.perf_counter()
        out = engine.run(feeds)
        seconds += time.perf_counter() - t0
        finite = np.isfinite(ref_scores) & np.isfinite(out["scores"])
        d = np.abs(ref_scores[finite] - out["scores"][finite])
        max_diff = max(max_diff, float(d.max(initial=0.0)))
        diffs.append(float(d.mean()) if d.size else 0.0)
        for a, b in zip(ref_top[:, :10], out["top_tokens"][:, :10]):
            overlap_sum += len(set(a.tolist()) & set(b.tolist())) / 10
            top1 += float(a[0] == b[0])
        n += len(batch.tokens)
    overlap = overlap_sum / max(1, n)
    return TensorRTParity(
        n_sequences=n,
        max_abs_diff=max_diff,
        mean_abs_diff=float(np.mean(diffs)) if diffs else 0.0,
        top10_overlap=overlap,
        top1_agreement=top1 / max(1, n),
        min_top10_overlap=min_top10_overlap,
        passed=overlap >= min_top10_overlap,
        trt_ms_per_batch=round(1000 * seconds / max(1, len(batches)), 3),
    )
