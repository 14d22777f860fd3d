"""The CUDA path of the export, for machines where TensorRT itself cannot be installed (not a test).

PyTorch on CUDA (fp32, TF32, fp16, bf16) against ONNX Runtime on the CPU, on real Beauty validation
sequences (max |score diff| and identical top-10 lists), then batch-1 latency (eager and CUDA-graph
replay with top-k inside the graph) and batch-256 throughput. Also records whether `tensorrt` and
ONNX Runtime's CUDA provider are importable, so the output says which GPU paths were really run.

    python benchmarks/gpu_parity.py --model-dir .recsys/models/beauty-final --out gpu_parity.json

Without --onnx the model is exported first (the same `export_onnx` as the `onnx_model` asset).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import load_model  # noqa: E402
from recsys_assets.export.onnx_export import export_onnx, model_contexts  # noqa: E402
from recsys_assets.export.verification import cpu_session, validation_batches  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty" / "Beauty.txt"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model-dir", type=Path, required=True, help="a BERT4Rec saved by the training library")
parser.add_argument("--onnx", type=Path, default=None, help="its ONNX export (default: export now)")
parser.add_argument("--data", type=Path, default=BEAUTY, help="sasrec-format sequences for the parity inputs")
parser.add_argument("--sequences", type=int, default=2048)
parser.add_argument("--out", type=Path, default=None)
args = parser.parse_args()
if not torch.cuda.is_available():
    sys.exit("no CUDA device: this benchmark checks the GPU path")
model_dir, out_path = args.model_dir, args.out
if args.onnx is None:
    m, c = load_model(model_dir)
    args.onnx = Path(tempfile.mkdtemp()) / "model.onnx"
    export_onnx(m, c, args.onnx)
onnx_path = args.onnx
report: dict = {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0)}
try:
    import tensorrt  # noqa: F401

    report["tensorrt"] = tensorrt.__version__
except Exception as exc:  # noqa: BLE001
    report["tensorrt"] = f"not importable: {type(exc).__name__}: {exc}"
import onnxruntime as ort  # noqa: E402

report["ort"] = ort.__version__
report["ort_providers"] = ort.get_available_providers()

model, cfg = load_model(model_dir)
contexts = model_contexts(cfg)
data = SequenceData.from_sasrec_txt(args.data)
batches = list(validation_batches(data, cfg.max_len, contexts, n_sequences=args.sequences, batch_size=256))
session = cpu_session(onnx_path, threads=8)
names = {i.name for i in session.get_inputs()}
dev = torch.device("cuda")
gpu = model.to(dev).eval()


def ort_scores(b):
    feeds = {k: v for k, v in {"tokens": b.tokens, **b.contexts, "exclude": b.exclude}.items() if k in names}
    return session.run(["scores"], feeds)[0]


refs = [ort_scores(b) for b in batches]


def compare(mode: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    # "fp32": PyTorch's eval fast path for encoder layers (fused kernels; autocast turns it off);
    # "fp32_standard": the same layers through their ordinary ops, the path training takes
    torch.backends.mha.set_fastpath_enabled(mode != "fp32_standard")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
    max_diff, same, n = 0.0, 0, 0
    for b, ref in zip(batches, refs):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            s = gpu.score_next(torch.from_numpy(b.tokens).to(dev),
                               **{k: torch.from_numpy(v).to(dev) for k, v in b.contexts.items()}).float().cpu().numpy()
        fin = np.isfinite(ref)
        max_diff = max(max_diff, float(np.abs(s[fin] - ref[fin]).max()))
        a = np.argsort(-ref, axis=1, kind="stable")[:, :10]
        c = np.argsort(-s, axis=1, kind="stable")[:, :10]
        same += int((a == c).all(axis=1).sum())
        n += len(ref)
    return {"n_sequences": n, "max_abs_diff_vs_ort_cpu": max_diff, "top10_identical": same}


report["parity"] = {m: compare(m) for m in ("fp32", "fp32_standard", "tf32", "fp16", "bf16")}
torch.backends.mha.set_fastpath_enabled(True)
torch.backends.cuda.matmul.allow_tf32 = False


def median_ms(fn, repeats=200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return 1000 * float(np.median(xs))


lat = {}
rng = np.random.default_rng(0)
for L in (10, cfg.max_len):
    tok = rng.integers(2, cfg.vocab_size, size=(1, L), dtype=np.int64)
    tok[0, -1] = 1
    ctx = {c: np.ones((1, L), dtype=np.int64) for c in contexts}
    t = torch.from_numpy(tok).to(dev)
    tc = {k: torch.from_numpy(v).to(dev) for k, v in ctx.items()}
    row = {}
    for mode, dtype in (("fp32", None), ("fp16", torch.float16)):
        def eager():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                s = gpu.score_next(t, **tc)
                s[0, t[0]] = float("-inf")
                v, i = torch.topk(s, 10)
            i.cpu()
        row[f"cuda_eager_{mode}_ms"] = median_ms(eager)
        # CUDA graph: one replay per request, top-k inside the captured graph
        static = t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            for _ in range(3):
                gpu.score_next(static, **tc)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            s = gpu.score_next(static, **tc)
            out_v, out_i = torch.topk(s, 10)

        def replay():
            static.copy_(t)
            graph.replay()
            out_i.cpu()
        row[f"cuda_graph_{mode}_ms"] = median_ms(replay)
    feeds = {k: v for k, v in {"tokens": tok, **ctx, "exclude": tok[:, :-1]}.items() if k in names}
    for threads in (2, 8):
        sess = cpu_session(onnx_path, threads=threads)
        row[f"ort_cpu_{threads}t_topk_ms"] = median_ms(lambda: sess.run(["top_tokens"], feeds))
    lat[f"len{L}"] = row
report["batch1_latency"] = lat
b = batches[0]
tok = torch.from_numpy(b.tokens).to(dev)
for mode, dtype in (("fp32", None), ("fp16", torch.float16)):
    def batch_run():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            torch.topk(gpu.score_next(tok), 10)[1].cpu()
    ms = median_ms(batch_run, 50)
    report[f"batch{len(b.tokens)}_{mode}_ms"] = ms
    report[f"batch{len(b.tokens)}_{mode}_seq_per_s"] = len(b.tokens) / ms * 1000
print(json.dumps(report, indent=1))
if out_path is not None:
    out_path.write_text(json.dumps(report, indent=1))
