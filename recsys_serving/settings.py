"""Serving configuration, read once from the environment (12-factor: the same image runs everywhere).

Field `x` is read from the variable `RECSYS_X` (pydantic-settings' `env_prefix`); the one variable
whose name does not follow that rule, RECSYS_BUNDLE, is the field's `validation_alias` (with
`populate_by_name`, RECSYS_BUNDLE_PATH is read too). Names are case-insensitive; an empty variable
counts as unset. recsys_serving/README.md lists the variables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from recsys_serving.bundle import PUBLIC_KEYS_ENV, public_key_paths
from recsys_serving.contract import (
    BUNDLES_DIR,
    CURRENT_BUNDLE,
    DEFAULT_RECSYS_HOME,
    REPO_ROOT,
    SERVED_ANSWERS_DIR,
    SERVED_EVENTS_DIR,
)

# What `from_env(environ)` reads instead of os.environ: a context variable, so a caller in another
# thread or task keeps reading its own.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("recsys_serving_settings_environ", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            (name if self.case_sensitive else name.lower()): value
            for name, value in self._environ.items()
            if value or not self.env_ignore_empty
        }


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


class ServingSettings(BaseSettings):
    """Every knob of the service; `from_env()` is what the BentoML service uses.

    Keyword arguments win over the environment, which wins over the defaults.
    """

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_",
        env_ignore_empty=True,  # `RECSYS_X=` means the default, as an unset variable does
        env_file=None,  # the environment only: no .env file changes what a deployed image does
        extra="forbid",  # a misspelt keyword fails instead of being ignored
        frozen=True,
        populate_by_name=True,  # `bundle_path=` works as a keyword although the variable is RECSYS_BUNDLE
    )

    home: Path = Field(default=DEFAULT_RECSYS_HOME, description="$RECSYS_HOME (recsys_serving.contract)")
    bundle_path: Path | None = Field(
        default=None,
        validation_alias="RECSYS_BUNDLE",
        description="bundle directory; None = <bento>/bundle when embedded, else $RECSYS_HOME/bundles/current",
    )
    feature_repo: Path = Field(default=REPO_ROOT / "feature_repo", description="Feast repository")
    cache_ttl_s: float = Field(default=30.0, gt=0, description="answers older than this are recomputed")
    cache_max_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="bound of the answer cache in bytes, over every user and request variant (device, "
        "segment, time of day); each entry counts its estimated size (answer, key and bookkeeping); "
        "0 = no cache",
    )
    health_probe_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="how often a background thread probes the online store (one cheap read, bounded by "
        "feature_timeout_ms) and the event log for /healthz and recsys_dependency_up; health requests "
        "only read the latest result, so no number of them adds load on the store",
    )
    bundle_public_key_file: str | None = Field(
        default=None,
        validation_alias=PUBLIC_KEYS_ENV,
        description="public key(s) that bundle signatures must verify with: comma-separated PEM files or "
        "directories (every *.pub inside); None = $RECSYS_HOME/secrets/bundle_signing_key.pub if it "
        "exists, else bundles are not signature-checked (a warning at start)",
    )
    model_timeout_ms: float = Field(default=250.0, gt=0, description="queueing + inference budget")
    feature_timeout_ms: float = Field(default=250.0, gt=0, description="feature store lookup budget")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="larger request bodies get 413")
    ort_intra_threads: int = Field(
        default=2, ge=1,
        description="ONNX Runtime threads per inference; the README (serving) shows why 2 is the default "
        "with 2 workers on 2 cores",
    )
    model_concurrency: int = Field(default=2, ge=1, description="inferences running at once")
    feature_concurrency: int = Field(default=2, ge=1, description="feature store reads running at once")
    use_gpu: bool = Field(default=True, description="use TensorRT/CUDA providers when onnxruntime has them")
    event_log_dir: Path | None = Field(default=None, description="None = $RECSYS_HOME/events/served")
    events_max_queue: int = Field(
        default=10_000, ge=1,
        description="events waiting for the writer (event_writer.py) per process; beyond it POST /events gets 503",
    )
    event_id_retention_days: float = Field(
        default=7.0, gt=0,
        description="how long a logged event id is remembered, so that a retry with the same id is not "
        "applied twice (the ingest stage keeps one line per id whatever the age)",
    )
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
    reload_interval_s: float = Field(
        default=2.0,
        ge=0,
        description="how often a service on the bundles/current pointer checks whether it was switched "
        "(promotion, rollback) and loads the new bundle in the background; 0 = never (restart to switch)",
    )
    answer_log: bool = Field(default=True, description="log every answer given (answer_log.py), for drift")
    answer_log_dir: Path | None = Field(default=None, description="None = $RECSYS_HOME/events/answers")
    answer_log_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="an answer log file is rotated at this size"
    )
    answer_log_keep: int = Field(
        default=8, ge=2, description="answer log files kept per process (the one written + rotated ones)"
    )
    answer_log_max_total_bytes: int = Field(
        default=2 * 1024**3, ge=1024,
        description="cap of the whole answer log directory: files of earlier processes (restarts) are "
        "deleted oldest first beyond it",
    )
    trace_requests: bool = Field(
        default=False,
        description="OpenTelemetry spans for /recommend and /events (BentoML's tracing config decides "
        "where they go); off, the tracing middleware skips them, since spans cost CPU on every request, "
        "sampled or not",
    )
    # The HTTP edge (access.py, service.ApiGuard): who may call, how much, how many at once.
    write_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="bearer tokens that may write (POST /events) and read, comma-separated; none (and none "
        "in api_tokens_file) = every write is refused",
    )
    read_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(), description="bearer tokens that may only read (needed for /recommend when read_access=token), comma-separated"
    )
    api_tokens_file: Path | None = Field(
        default=None,
        description="a file of tokens, one '<read|write> <token>' per line, '#' comments (e.g. a Kubernetes "
        "Secret mounted as a file); re-read within 5 s of a change; missing or malformed at start stops the service",
    )
    read_access: Literal["open", "token"] = Field(
        default="open", description="open: /recommend needs no token; token: it needs a read or write token"
    )
    rate_limit_per_s: float = Field(
        default=1000.0, ge=0,
        description="requests per second per client (its token, else its IP) on /recommend and /events, per "
        "worker process (token bucket); 0 = no limit",
    )
    rate_limit_burst: int = Field(default=2000, ge=1, description="requests a client may send at once above the rate")
    rate_limit_clients: int = Field(
        default=100_000, ge=1,
        description="clients whose rate-limit state each worker keeps (least recently seen dropped first: "
        "a dropped client starts with a full burst)",
    )
    recommend_max_concurrency: int = Field(
        default=200, ge=1, description="/recommend requests in progress per worker; more get 503 at once"
    )
    events_max_concurrency: int = Field(
        default=64, ge=1,
        description="POST /events requests in progress per worker; more get 503 at once, so that events "
        "cannot take the worker from /recommend",
    )

    @field_validator("write_tokens", "read_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's form; tokens are checked by access.py, which never echoes them
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        env = env_settings if environ is None else _MappingEnvSource(settings_cls, environ)
        return init_settings, env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServingSettings":
        """Settings from `environ` (default os.environ), keyword `overrides` taking precedence."""
        with _environment(environ):
            return cls(**overrides)

    def resolved_bundle_path(self) -> Path:
        """Explicit path, else a bundle embedded next to the package (a bento), else the promoted one."""
        if self.bundle_path is not None:
            return self.bundle_path.expanduser()
        embedded = REPO_ROOT / "bundle"
        if (embedded / "manifest.json").exists():
            return embedded
        return self.home.expanduser() / BUNDLES_DIR / CURRENT_BUNDLE

    def resolved_public_key_files(self) -> list[Path]:
        """The public key files bundles must verify with (empty: signatures are not checked);
        ValueError when the variable names a missing file or an empty directory."""
        return public_key_paths(self.bundle_public_key_file, self.home.expanduser())

    def resolved_event_log_dir(self) -> Path:
        return (self.event_log_dir or self.home.expanduser() / SERVED_EVENTS_DIR).expanduser()

    def resolved_answer_log_dir(self) -> Path:
        return (self.answer_log_dir or self.home.expanduser() / SERVED_ANSWERS_DIR).expanduser()
