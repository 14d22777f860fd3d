"""Writes requirements-gpu.lock and deploy/serving/requirements-cuda.txt (needs PyPI).

requirements-gpu.lock is requirements.lock for a CUDA machine: every pin kept, `onnxruntime`
replaced by `onnxruntime-gpu` (the two share the `onnxruntime` module; installed side by side, the
CUDA and TensorRT providers disappear), torch as PyPI's CUDA build, the CUDA libraries pip resolves
for them, and TensorRT 10 (whose `tensorrt-cu13-libs` is fetched from NVIDIA's index). pip's own
resolver does the resolution (`pip install --dry-run --report`), against PyPI only: this machine's
pip configuration (local indexes, constraints) is ignored. deploy/serving/requirements-cuda.txt is
the part the serving image's CUDA variant installs in place of onnxruntime.

    .venv/bin/python deploy/gpu_lock.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
GPU_LOCK = REPO / "requirements-gpu.lock"
SERVING_CUDA = REPO / "deploy" / "serving" / "requirements-cuda.txt"
CPU_ONLY = "onnxruntime"
ONNXRUNTIME_GPU = "onnxruntime-gpu[cuda,cudnn]==1.31.1"  # its newest release; a CUDA 13 build, like torch 2.13
# Major 10: recsys_assets/export/tensorrt_engine.py builds fp16 engines with BuilderFlag.FP16.
TENSORRT = ["tensorrt-cu13==10.16.1.11", "tensorrt-cu13-bindings==10.16.1.11", "tensorrt-cu13-libs==10.16.1.11"]
NVIDIA_INDEX = "https://pypi.nvidia.com"
LOCAL_VERSION_OK = {"torch"}  # the CPU venv's torch is 2.13.0+cpu, the lock says 2.13.0


def resolve(requirements: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        req_file.write_text("\n".join(requirements) + "\n")
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), "-r", str(req_file)],
            check=True, env=env,
        )
        return json.loads(report.read_text())["install"]


def main() -> int:
    lock = [line.strip() for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    kept = [line for line in lock if canonicalize_name(Requirement(line).name) != CPU_ONLY]
    installed = resolve([*kept, ONNXRUNTIME_GPU])
    meta = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in installed}
    for line in kept:
        req = Requirement(line)
        name, pinned = canonicalize_name(req.name), next(iter(req.specifier)).version
        got = meta[name]["version"]
        if got != pinned and not (name in LOCAL_VERSION_OK and got.split("+")[0] == pinned):
            raise SystemExit(f"pip resolved {name} {got} for the GPU lock, requirements.lock pins {pinned}")
    lock_names = {canonicalize_name(Requirement(line).name) for line in kept}
    added = sorted(n for n in meta if n not in lock_names)
    pins = {canonicalize_name(Requirement(line).name): line for line in kept}
    pins.update({n: f"{meta[n]['name']}=={meta[n]['version']}" for n in added})
    pins.update({canonicalize_name(Requirement(t).name): t for t in TENSORRT})
    header = (
        "# requirements.lock for CUDA machines, written by deploy/gpu_lock.py (pip's resolver, PyPI):\n"
        "# the same pins, onnxruntime-gpu instead of onnxruntime, PyPI's CUDA build of torch, the CUDA\n"
        "# libraries, TensorRT 10. Install (tensorrt-cu13-libs comes from NVIDIA's index):\n"
        f"#   pip install --extra-index-url {NVIDIA_INDEX} -r requirements-gpu.lock && pip install --no-deps -e .\n"
    )
    GPU_LOCK.write_text(header + "".join(f"{pins[n]}\n" for n in sorted(pins)))

    # onnxruntime-gpu and what it needs beyond the serving image's CPU requirements, plus TensorRT's
    # libraries for its TensorRT provider.
    todo, need = [Requirement(ONNXRUNTIME_GPU)], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in need or name not in meta:
            continue
        need.add(name)
        for spec in meta[name].get("requires_dist") or []:
            dep = Requirement(spec)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(e) for e in envs):
                todo.append(dep)
    serving_cpu = (REPO / "deploy" / "serving" / "requirements.txt").read_text()
    lines = [pins[n] for n in sorted(need) if f"\n{pins[n]}\n" not in f"\n{serving_cpu}"]
    lines += TENSORRT
    SERVING_CUDA.write_text(
        "# The serving image's CUDA variant (deploy/serving/Dockerfile.template): installed with --no-deps\n"
        "# in place of onnxruntime; pins of requirements-gpu.lock, written by deploy/gpu_lock.py.\n"
        + "".join(f"{line}\n" for line in lines)
    )
    print(f"wrote {GPU_LOCK.name} ({len(pins)} packages) and {SERVING_CUDA.relative_to(REPO)} ({len(lines)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
