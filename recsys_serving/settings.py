"""Serving configuration, read once from the environment (12-factor: the same image runs everywhere)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent

# Environment variable -> field. Kept explicit (not pydantic-settings, which is not a dependency).
ENV_FIELDS: dict[str, str] = {
    "RECSYS_HOME": "home",
    "RECSYS_BUNDLE": "bundle_path",
    "RECSYS_FEATURE_REPO": "feature_repo",
    "RECSYS_CACHE_TTL_S": "cache_ttl_s",
    "RECSYS_CACHE_SIZE": "cache_size",
    "RECSYS_MODEL_TIMEOUT_MS": "model_timeout_ms",
    "RECSYS_FEATURE_TIMEOUT_MS": "feature_timeout_ms",
    "RECSYS_MAX_BODY_BYTES": "max_body_bytes",
    "RECSYS_ORT_INTRA_THREADS": "ort_intra_threads",
    "RECSYS_MODEL_CONCURRENCY": "model_concurrency",
    "RECSYS_FEATURE_CONCURRENCY": "feature_concurrency",
    "RECSYS_USE_GPU": "use_gpu",
    "RECSYS_EVENT_LOG_DIR": "event_log_dir",
    "RECSYS_WORKERS": "workers",
    "RECSYS_EXECUTION": "execution",
    "RECSYS_TRACE_REQUESTS": "trace_requests",
}


class ServingSettings(BaseModel):
    """Every knob of the service; `from_env()` is what the BentoML service uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default=_PACKAGE_PARENT / ".recsys", description="$RECSYS_HOME")
    bundle_path: Path | None = Field(
        default=None,
        description="bundle directory; None = <bento>/bundle when embedded, else $RECSYS_HOME/bundles/current",
    )
    feature_repo: Path = Field(default=_PACKAGE_PARENT / "feature_repo", description="Feast repository")
    cache_ttl_s: float = Field(default=30.0, gt=0, description="answers older than this are recomputed")
    cache_size: int = Field(default=100_000, ge=1, description="users whose answers are cached")
    model_timeout_ms: float = Field(default=250.0, gt=0, description="queueing + inference budget")
    feature_timeout_ms: float = Field(default=250.0, gt=0, description="feature store lookup budget")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="larger request bodies get 413")
    ort_intra_threads: int = Field(
        default=2, ge=1,
        description="ONNX Runtime threads per inference; 2 met every latency goal on 2 cores with 2 workers, "
        "1 did not (README, serving)",
    )
    model_concurrency: int = Field(default=2, ge=1, description="inferences running at once")
    feature_concurrency: int = Field(default=2, ge=1, description="feature store reads running at once")
    use_gpu: bool = Field(default=True, description="use TensorRT/CUDA providers when onnxruntime has them")
    event_log_dir: Path | None = Field(default=None, description="None = $RECSYS_HOME/events/served")
    workers: int = Field(default=1, ge=1, le=64, description="server processes (each with its cache and session)")
    execution: Literal["auto", "thread", "inline"] = Field(
        default="auto",
        description="where feature reads and inference run. thread: worker threads, each stage under its "
        "budget (a late answer becomes a fallback); inline: on the event loop, no thread hand-offs (least "
        "CPU and latency per request; a stage cannot be interrupted, so the model budget is checked before "
        "inference starts; run one worker per core); auto: inline with a local (SQLite) online store and "
        "an inference under 5 ms at load, else thread (a slow Redis read or a long inference must not "
        "stall the event loop)",
    )
    trace_requests: bool = Field(
        default=False,
        description="OpenTelemetry spans for /recommend and /events (BentoML's tracing config decides "
        "where they go); off, the tracing middleware skips them: ~0.6 ms of CPU per request, sampled or not",
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "ServingSettings":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {field: env[var] for var, field in ENV_FIELDS.items() if env.get(var)}
        values.update(overrides)
        return cls.model_validate(values)

    def resolved_bundle_path(self) -> Path:
        """Explicit path, else a bundle embedded next to the package (a bento), else the promoted one."""
        if self.bundle_path is not None:
            return self.bundle_path.expanduser()
        embedded = _PACKAGE_PARENT / "bundle"
        if (embedded / "manifest.json").exists():
            return embedded
        return self.home.expanduser() / "bundles" / "current"

    def resolved_event_log_dir(self) -> Path:
        return (self.event_log_dir or self.home.expanduser() / "events" / "served").expanduser()
