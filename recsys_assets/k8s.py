"""Training on its own GPU pod: Dagster Pipes (`dagster_k8s.PipesK8sClient`) runs the training CLI
under `torchrun` there, while the rest of the run stays in the run's own pod.

Pipes rather than the `k8s_job_executor`: the executor would put every step in a pod of its own, and
every step but training reads or writes the one DuckDB warehouse, which allows a single writer;
with Pipes only the step that needs a GPU leaves the process, with exactly the command a person
types (`torchrun ... -m recsys_assets.bert4rec.cli`), and the default stays local
(`RECSYS_TRAINING_LAUNCHER` unset = `local`: `make run` never needs a cluster).

The pod reads the warehouse and writes the model under `RECSYS_HOME` on the shared volume
(deploy/k8s/storage.yaml), so the asset reads the result from the same directory as after a local
run; checkpoints land there too, so a retried step resumes.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys_assets.bert4rec.model import EXTRA_FILE, BERT4RecConfig
from recsys_assets.bert4rec.train import LOG_FILE, TrainConfig, TrainResult

TRAINING_CLI_MODULE = "recsys_assets.bert4rec.cli"
GPU_RESOURCE = "nvidia.com/gpu"


class TrainingLauncherSettings(BaseSettings):
    """Where `bert4rec_model` trains; variables `RECSYS_TRAINING_<FIELD>` (README, "Deploying to Kubernetes")."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_TRAINING_", env_ignore_empty=True, extra="forbid", frozen=True)

    launcher: Literal["local", "k8s"] = Field(
        default="local", description="local: in the Dagster run's process; k8s: on a pod of its own through Dagster Pipes"
    )
    image: str | None = Field(default=None, description="the training pod's image (the CUDA variant of the Dagster image)")
    namespace: str | None = Field(default=None, description="the pod's namespace; None = the run pod's own")
    gpus: int = Field(default=1, ge=0, description="GPUs of the pod, and torchrun's --nproc-per-node (0 = one CPU process)")
    cpu: str = Field(default="8", description="CPU request of the pod")
    memory: str = Field(default="32Gi", description="memory request and limit of the pod")
    shm_size: str = Field(default="8Gi", description="size of the pod's /dev/shm (NCCL and torch share memory there)")
    home: str = Field(default="/var/lib/recsys", description="RECSYS_HOME inside the pod, where the shared volume is mounted")
    data_claim: str = Field(default="recsys-data", description="the PersistentVolumeClaim holding RECSYS_HOME")
    service_account: str = Field(default="recsys-training", description="the pod's service account")
    node_selector: dict[str, str] = Field(default_factory=dict, description="JSON object, e.g. {\"nvidia.com/gpu.present\": \"true\"}")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        description="JSON list of the pod's tolerations (default: GPU nodes' usual taint)",
    )
    run_as_user: int = Field(default=10001, ge=1, description="uid (and gid) of the pod, the same as every recsys pod's")
    wait_timeout_s: float = Field(default=24 * 3600.0, gt=0, description="how long the asset waits for the pod")


@dataclass(frozen=True)
class TrainingPodRequest:
    """What `PipesK8sClient.run` needs, besides the context: the first container runs `command`."""

    image: str
    command: list[str]
    env: dict[str, str]
    namespace: str | None
    base_pod_meta: dict[str, Any]
    base_pod_spec: dict[str, Any] = field(repr=False)
    out_dir: str


def _set_args(scope: str, values: dict[str, Any]) -> list[str]:
    # the CLI's --set parses each value as JSON (recsys_assets.bert4rec.cli.parse_overrides)
    args: list[str] = []
    for key, value in values.items():
        args += ["--set", f"{scope}.{key}={json.dumps(value)}"]
    return args


def torchrun_command(
    settings: TrainingLauncherSettings,
    *,
    preset: str,
    out_dir: str,
    model_config: BERT4RecConfig,
    train_overrides: dict[str, Any],
) -> list[str]:
    """`torchrun` on one node around the training CLI. Every field of the model config the asset built
    is passed, so the pod trains the same network whatever the CLI would infer from the data."""
    procs = max(1, settings.gpus)
    train = {**train_overrides, "device": "cuda" if settings.gpus > 0 else "cpu"}
    return [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={procs}",
        "-m",
        TRAINING_CLI_MODULE,
        "--data",
        f"{settings.home}/warehouse.duckdb",
        "--preset",
        preset,
        "--out",
        out_dir,
        *_set_args("model", model_config.model_dump(mode="json")),
        *_set_args("train", train),
    ]


def training_pod_request(
    settings: TrainingLauncherSettings,
    *,
    run_id: str,
    preset: str,
    model_config: BERT4RecConfig,
    train_overrides: dict[str, Any],
) -> TrainingPodRequest:
    """The pod for one training: image, torchrun command, GPUs, the shared volume, a read-only root."""
    if not settings.image:
        raise ValueError("RECSYS_TRAINING_LAUNCHER=k8s needs RECSYS_TRAINING_IMAGE (the training pod's image)")
    out_dir = f"{settings.home}/models/{run_id}"
    command = torchrun_command(
        settings, preset=preset, out_dir=out_dir, model_config=model_config, train_overrides=train_overrides
    )
    resources: dict[str, Any] = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if settings.gpus > 0:
        resources["requests"][GPU_RESOURCE] = str(settings.gpus)
        resources["limits"][GPU_RESOURCE] = str(settings.gpus)
    container = {
        "name": "trainer",
        "image_pull_policy": "Always",
        "resources": resources,
        "security_context": {
            "allow_privilege_escalation": False,
            "read_only_root_filesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volume_mounts": [
            {"name": "data", "mount_path": settings.home},
            {"name": "tmp", "mount_path": "/tmp"},
            {"name": "dshm", "mount_path": "/dev/shm"},
        ],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "restart_policy": "Never",  # a failed training fails the step; Dagster's retry resumes from the checkpoint
        "service_account_name": settings.service_account,
        "automount_service_account_token": False,
        "security_context": {
            "run_as_non_root": True,
            "run_as_user": settings.run_as_user,
            "run_as_group": settings.run_as_user,
            "fs_group": settings.run_as_user,
            "seccomp_profile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "data", "persistent_volume_claim": {"claim_name": settings.data_claim}},
            {"name": "tmp", "empty_dir": {}},
            {"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": settings.shm_size}},
        ],
        "tolerations": settings.tolerations,
    }
    if settings.node_selector:
        spec["node_selector"] = settings.node_selector
    env = {
        "RECSYS_HOME": settings.home,
        "PYTHONUNBUFFERED": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    meta = {"labels": {"app.kubernetes.io/name": "recsys-training", "app.kubernetes.io/part-of": "recsys"}}
    return TrainingPodRequest(
        image=settings.image, command=command, env=env, namespace=settings.namespace,
        base_pod_meta=meta, base_pod_spec=spec, out_dir=out_dir,
    )


def result_from_directory(out_dir: str | Path) -> TrainResult:
    """What `train()` returns, read back from the files it wrote (a pod's run, on the shared volume)."""
    out = Path(out_dir)
    extra_path, log_path = out / EXTRA_FILE, out / LOG_FILE
    for path in (extra_path, log_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the training pod did not finish writing {out}")
    from recsys_assets.bert4rec.model import load_model

    _, config = load_model(out)
    extra = json.loads(extra_path.read_text())
    return TrainResult(
        path=str(out),
        config=config,
        train_config=TrainConfig.model_validate(extra["train_config"]),
        best_valid=extra.get("best_valid"),
        best_epoch=extra.get("best_epoch"),
        epochs=int(extra["epochs"]),
        seconds_per_epoch=float(extra["seconds_per_epoch"]),
        log=json.loads(log_path.read_text()),
    )


def train_on_kubernetes(
    context: Any, settings: TrainingLauncherSettings, request: TrainingPodRequest, local_out: Path
) -> TrainResult:
    """Runs the pod through Dagster Pipes (its logs stream into the step's), then reads the model from
    `local_out`, the pod's `out_dir` as this process mounts the shared volume."""
    from dagster_k8s import PipesK8sClient

    context.log.info(f"training on a Kubernetes pod ({request.image}): {shlex.join(request.command)}")
    PipesK8sClient().run(
        context=context,
        image=request.image,
        command=request.command,
        namespace=request.namespace,
        env=request.env,
        base_pod_meta=request.base_pod_meta,
        base_pod_spec=request.base_pod_spec,
        pod_wait_timeout=settings.wait_timeout_s,
    )
    return result_from_directory(local_out)
