"""Batch-1 latency of an exported model: PyTorch eager against ONNX Runtime (not a test).

For each history length: the median of interleaved runs of PyTorch eager (score_next, history
masked, torch.topk), ONNX Runtime with the top-K inside the graph, and ONNX Runtime returning the
scores with the top-K taken in numpy (graphs with a `scores` output only), at the same thread count.

    python benchmarks/onnx_latency.py --model-dir .recsys/models/beauty-final
    python benchmarks/onnx_latency.py --bundle .recsys/bundles/current --seq-len 10 50

The PyTorch side is the model saved by the training library (`--model-dir`; with `--bundle` it
defaults to the model directory the bundle's manifest records). The ONNX side is `--onnx`, the
bundle's model.onnx, or (neither given) a fresh export by the same `export_onnx` as the
`onnx_model` asset. Prints the figures as JSON (`--out` also writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from recsys_assets.bert4rec.data import SequenceData  # noqa: E402
from recsys_assets.bert4rec.model import BERT4Rec, load_model  # noqa: E402
from recsys_assets.export.onnx_export import DEFAULT_TOP_K, export_onnx  # noqa: E402
from recsys_assets.export.verification import cpu_session  # noqa: E402
from recsys_serving.bundle import read_manifest  # noqa: E402


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
        def timed(*fns) -> list[float]:
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


def _graph_contexts(onnx_path: Path) -> list[str]:
    """The context inputs the graph takes (its inputs besides tokens and exclude)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [i.name for i in graph.input if i.name not in ("tokens", "exclude")]


def _default_lengths(max_len: int, data: Path | None) -> list[int]:
    """The onnx_model asset's former choice with --data (the median validation history + [MASK],
    and max_len); else a short history and max_len."""
    if data is None:
        return sorted({min(10, max_len), max_len})
    tokens = SequenceData.from_sasrec_txt(data).tokens
    median_len = int(np.median([min(len(t) - 2, max_len - 1) for t in tokens])) + 1
    return sorted({max(2, median_len), max_len})


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="a BERT4Rec saved by the training library")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--onnx", type=Path, default=None, help="its ONNX export (default: export now)")
    source.add_argument("--bundle", type=Path, default=None, help="a model bundle directory (its model.onnx)")
    parser.add_argument("--item-table", choices=["fp32", "int8", "int4"], default="fp32",
                        help="the item table of a fresh export (neither --onnx nor --bundle)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=None,
                        help="history lengths incl. [MASK] (default: see --data)")
    parser.add_argument("--data", type=Path, default=None,
                        help="sasrec-format sequences: the default lengths become their median and max_len")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="threads of both runtimes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    onnx_path = args.onnx
    if args.bundle is not None:
        onnx_path = args.bundle / "model.onnx"
        recorded = read_manifest(args.bundle).export.get("model_dir")
        if args.model_dir is None and recorded:
            args.model_dir = Path(recorded)
    if args.model_dir is None:
        parser.error("--model-dir is required (with --bundle: unless its manifest records the model directory)")
    model, config = load_model(args.model_dir)
    if onnx_path is None:
        onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
        export_onnx(model, config, onnx_path, item_table=args.item_table)
    contexts = _graph_contexts(onnx_path)
    lengths = args.seq_len or _default_lengths(config.max_len, args.data)
    report = {
        "model_dir": str(args.model_dir),
        "onnx": str(onnx_path),
        "vocab_size": config.vocab_size,
        "contexts": contexts,
        "torch": torch.__version__,
        "ort": ort.__version__,
        "latency": [
            batch1_latency(model, onnx_path, contexts, n, repeats=args.repeats, threads=args.threads).model_dump()
            for n in lengths
        ],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
