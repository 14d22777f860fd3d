"""The images install what was tested, and the GPU environment replaces onnxruntime.

No Docker engine here, so no image is built: the checks are on what the builds consume. The
serving image's Dockerfile is the one BentoML itself generates from bentofile.yaml (a real
`bentoml build`), the Dagster image's Dockerfile is read, and both go through checkov where
`make tools` installed it. requirements-gpu.lock was resolved by pip (deploy/gpu_lock.py); here it
is checked against requirements.lock pin by pin.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from recsys_assets.assets.export import stage_build_context
from recsys_assets.export.tensorrt_engine import SUPPORTED_TENSORRT_MAJOR

REPO = Path(__file__).resolve().parents[1]
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
DAGSTER_DOCKERFILE = REPO / "deploy" / "docker" / "Dagster.Dockerfile"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[canonicalize_name(Requirement(line).name)] = line
    return pins


def test_serving_requirements_are_the_locks_pins() -> None:
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "serving" / "requirements.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    serving, lock = _pins(REPO / "deploy" / "serving" / "requirements.txt"), _pins(REPO / "requirements.lock")
    assert all(lock[name] == line for name, line in serving.items())
    assert {"bentoml", "onnxruntime", "feast", "redis", "cryptography"} <= serving.keys()
    assert not {"torch", "dagster", "recsys"} & serving.keys(), "serving never needs torch or Dagster"


def test_gpu_lock_replaces_onnxruntime_and_keeps_every_other_pin() -> None:
    lock, gpu = _pins(REPO / "requirements.lock"), _pins(REPO / "requirements-gpu.lock")
    assert "onnxruntime" in lock and "onnxruntime" not in gpu
    assert re.fullmatch(r"onnxruntime-gpu==[\d.]+", gpu["onnxruntime-gpu"])
    for name, line in lock.items():
        if name != "onnxruntime":
            assert gpu.get(name) == line, f"requirements-gpu.lock changes {line}"
    for name in ("tensorrt-cu13", "tensorrt-cu13-bindings", "tensorrt-cu13-libs"):
        version = Requirement(gpu[name]).specifier
        (spec,) = version
        assert spec.operator == "==" and spec.version.split(".")[0] == str(SUPPORTED_TENSORRT_MAJOR)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert not any(canonicalize_name(Requirement(e).name).startswith("onnxruntime") for e in extras), (
        "the [gpu] extra cannot remove onnxruntime, so it must not add onnxruntime-gpu beside it"
    )
    (tensorrt,) = [Requirement(e) for e in extras if Requirement(e).name == "tensorrt-cu13"]
    pinned = next(iter(Requirement(gpu["tensorrt-cu13"]).specifier)).version
    assert tensorrt.specifier.contains(pinned) and not tensorrt.specifier.contains(f"{SUPPORTED_TENSORRT_MAJOR + 1}.0.0")
    cuda = _pins(REPO / "deploy" / "serving" / "requirements-cuda.txt")
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert all(gpu[name] == line for name, line in cuda.items())


def test_dagster_dockerfile_installs_the_locks_as_non_root() -> None:
    text = DAGSTER_DOCKERFILE.read_text()
    assert "ARG VARIANT=cpu" in text and "FROM deps-${VARIANT} AS final" in text
    assert re.search(r"FROM base AS deps-cpu\n(RUN .*\n(    .*\n)*)", text).group(1).count("-r requirements.lock") == 1
    assert "pip install -r requirements-gpu.lock" in text.split("FROM base AS deps-cuda", 1)[1].split("FROM", 1)[0]
    assert "pip install --no-deps ." in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    assert f'"--module-name", "{pyproject["module_name"]}"' in text
    values = yaml.safe_load((REPO / "deploy" / "helm" / "dagster-values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert f'"-p", "{deployment["port"]}"' in text
    uids = {v["podSecurityContext"]["runAsUser"] for v in [deployment]}
    assert uids == {int(user[-1].split(":")[0])}


@pytest.fixture(scope="module")
def bento_dockerfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bentoml build` as the `bento` asset runs it: from its staged build context (a stand-in
    bundle directory: building does not read it), into a scratch BENTOML_HOME."""
    home, scratch = tmp_path_factory.mktemp("bentoml_home"), tmp_path_factory.mktemp("bento_build")
    bundle = scratch / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    staging = stage_build_context(bundle, scratch / "staging")
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(staging), "-f", str(staging / "bentofile.yaml"), "-o", "tag"],
        capture_output=True, text=True, timeout=300, cwd=staging, env={**os.environ, "BENTOML_HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (bento,) = [p for p in (home / "bentos" / "recsys_recommender").iterdir() if p.name != "latest"]
    return bento


def test_bento_image_installs_the_pins_as_uid_10001_with_a_cuda_variant(bento_dockerfile: Path) -> None:
    dockerfile = (bento_dockerfile / "env" / "docker" / "Dockerfile").read_text()
    assert "ARG BENTO_USER_UID=10001" in dockerfile and "ARG BENTO_USER_GID=10001" in dockerfile
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] == "bentoml"
    assert "ARG RECSYS_VARIANT=cpu" in dockerfile
    assert "uv pip uninstall onnxruntime" in dockerfile and "requirements-cuda.txt" in dockerfile
    assert (bento_dockerfile / "src" / "deploy" / "serving" / "requirements-cuda.txt").exists()
    installed = _pins(bento_dockerfile / "env" / "python" / "requirements.txt")
    assert installed == _pins(REPO / "deploy" / "serving" / "requirements.txt")
    manifest = (REPO / "deploy" / "k8s" / "serving.yaml").read_text()
    assert "runAsUser: 10001" in manifest


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is installed by `make tools` (its own virtualenv, .venv-tools)")
def test_checkov_passes_both_dockerfiles(bento_dockerfile: Path) -> None:
    """The Dagster image's and the serving image's as BentoML generates it; a skip needs its reason."""
    files = [DAGSTER_DOCKERFILE, bento_dockerfile / "env" / "docker" / "Dockerfile"]
    done = subprocess.run(
        [str(CHECKOV), "--compact", "--skip-download", "--output", "json", "--framework", "dockerfile",
         *[arg for f in files for arg in ("-f", str(f))]],
        capture_output=True, text=True, timeout=300,
    )
    report = json.loads(done.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["file_path"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert {Path(c["file_path"]).name for c in results["passed_checks"]} == {f.name for f in files}
    for check in results["skipped_checks"]:
        assert len((check["check_result"].get("suppress_comment") or "").strip()) >= 20, check["check_id"]
