"""Serving's access to the Feast feature store: a user's latest event sequence, read and updated online.

Depends only on Feast (and redis-py through Feast when the Redis online store is selected); never on
torch or recsys_assets. The names used here (feature view, push source, fields) are defined in
feature_repo/user_sequences.py.

- `get_user_sequence(user_id)` reads the online store: a `UserSequence`, or None for a user the store
  does not know (cold start). Any failure of the store itself raises `FeatureStoreUnavailable`, which
  serving turns into a fallback with a reason instead of an error response.
- `push_events(events)` appends events to their users' latest sequences (truncated to `max_len`)
  with one online read and one online write per batch, so the next read sees them without a batch
  job (`push_event` for one). Online only: the offline truth is rebuilt from cleaned_interactions by
  the retrain job, and Feast's file offline store would rewrite the whole Parquet source on every event.

Store selection: `online_store="sqlite"` (feature_store.yaml, default) or `"redis"`
(feature_store.redis.yaml), or the environment variable RECSYS_FEAST_ONLINE_STORE.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import re
import sqlite3
import sys
import threading
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from recsys_serving.contract import (
    DEFAULT_MAX_LEN,
    ENTITY_KEY,
    FEATURE_FIELDS,
    FEATURE_VIEW,
    MAX_LEN_TAG,
    RECSYS_HOME_ENV,
    REPEATED_VIEW_WINDOW_TAG,
    SEQUENCE_FIELDS,
    EventType,
    recsys_home_path,
    RepeatedViewRule,
    time_of_day_token_of,
)

log = logging.getLogger(__name__)

OnlineStoreKind = Literal["sqlite", "redis"]
ONLINE_STORE_ENV = "RECSYS_FEAST_ONLINE_STORE"
STORE_YAML: dict[str, str] = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
# Defaults for the ${VARS} of the yaml files when the environment does not set them.
ENV_DEFAULTS: dict[str, str] = {"RECSYS_REDIS_CONNECTION": "localhost:6379"}

FEATURE_REFS: list[str] = [f"{FEATURE_VIEW}:{name}" for name in FEATURE_FIELDS]

_STRIPES = 64  # per-user locks for push_event's read-modify-write, striped to bound memory


class FeatureStoreUnavailable(RuntimeError):
    """The online store (or its registry) cannot be read or written; serving falls back."""


class FeatureRecordInvalid(FeatureStoreUnavailable):
    """A stored record is unusable (e.g. per-position lists of different lengths)."""


@dataclass
class UserSequence:
    """The latest events of one user, oldest first; per-position lists have equal length."""

    user_id: str
    item_ids: list[str]
    event_types: list[str]
    tod: list[int]
    devices: list[str]
    last_event_ts: datetime | None
    segment: str | None
    # Exact version of the record (epoch microseconds); kept so updates stay strictly ordered.
    last_event_ts_us: int | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.item_ids)


class PushedEvent(BaseModel):
    """One new event, validated before it touches the store."""

    model_config = ConfigDict(frozen=True)

    user_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    event_type: EventType
    ts: datetime
    device: str | None = None

    @field_validator("ts")
    @classmethod
    def _utc(cls, ts: datetime) -> datetime:
        # Naive timestamps are UTC, as everywhere in the project (cleaned_interactions.ts).
        return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def to_epoch_us(ts: datetime) -> int:
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts
    delta = ts - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(us))


# ----------------------------------------------------------------------------------------------
# Loading the store


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def resolve_online_store(online_store: str | None = None) -> OnlineStoreKind:
    kind = (online_store or os.environ.get(ONLINE_STORE_ENV) or "sqlite").strip().lower()
    if kind not in STORE_YAML:
        raise ValueError(
            f"unknown online store {kind!r} (argument or ${ONLINE_STORE_ENV}); expected one of {sorted(STORE_YAML)}"
        )
    return kind  # type: ignore[return-value]


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError("torch is not loaded for Feast by recsys_serving", name=fullname)
        return None


def _import_feast() -> None:
    """Imports Feast without letting it load torch.

    feast 0.67 imports torch at import time when it is installed (feast.torch_wrapper, only for its
    optional tensor output, unused here): seconds of start-up and hundreds of MB in a serving process
    that must not depend on torch. Where torch is already loaded (the Dagster process) nothing changes;
    otherwise Feast records torch as unavailable and later `import torch` elsewhere works as usual.
    """
    if "feast.torch_wrapper" in sys.modules or "torch" in sys.modules:
        return
    blocker = _NoTorch()
    sys.meta_path.insert(0, blocker)
    try:
        import feast.torch_wrapper  # noqa: F401
    finally:
        sys.meta_path.remove(blocker)


def load_repo_config(repo_path: str | Path, online_store: str | None = None) -> Any:
    """The RepoConfig of feature_repo/ for the selected online store, with ${VARS} substituted.

    Written by hand rather than Feast's loader because Feast's os.path.expandvars silently leaves an
    unset variable in place (a path literally named '${RECSYS_HOME}'); here RECSYS_HOME defaults like
    recsys_assets.config, and any other unset variable is an error that names it.
    """
    _import_feast()
    from feast.repo_config import RepoConfig

    repo = Path(repo_path).resolve()
    yaml_path = repo / STORE_YAML[resolve_online_store(online_store)]
    if not yaml_path.is_file():
        raise FileNotFoundError(f"Feast configuration {yaml_path} is missing")
    env = {**ENV_DEFAULTS, **os.environ, RECSYS_HOME_ENV: str(recsys_home_path())}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ValueError(f"{yaml_path.name} uses ${{{name}}} but the environment does not set it")
        return env[name]

    raw = yaml.safe_load(_VAR.sub(substitute, yaml_path.read_text()))
    config = RepoConfig(**raw)
    config.repo_path = repo
    return config


def load_feature_store(repo_path: str | Path, online_store: str | None = None) -> Any:
    """A feast.FeatureStore over feature_repo/ (nothing is read until first use)."""
    _import_feast()
    from feast import FeatureStore

    config = load_repo_config(repo_path, online_store)
    return FeatureStore(repo_path=str(Path(repo_path).resolve()), config=config)


def _store_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the store is not there', as opposed to bugs in the caller."""
    _import_feast()
    from feast.errors import FeastObjectNotFoundException, FeastProviderLoginError

    errors: list[type[BaseException]] = [
        sqlite3.Error,
        OSError,  # includes ConnectionError, FileNotFoundError (registry), TimeoutError
        FeastObjectNotFoundException,  # feature view / push source not applied
        FeastProviderLoginError,
    ]
    try:
        from redis.exceptions import RedisError

        errors.append(RedisError)
    except ImportError:  # redis-py is only needed with the Redis online store
        pass
    return tuple(errors)


# ----------------------------------------------------------------------------------------------
# The client


class FeatureStoreClient:
    """Reads and updates users' latest sequences in the Feast online store.

    Thread-safe within one process: push_event serializes per user (striped locks), and all access to
    a SQLite online store is serialized because Feast shares one sqlite3 connection across threads.
    Across processes two simultaneous events of the same user can race (last writer wins); the next
    materialization repairs the record from cleaned_interactions.
    """

    def __init__(
        self,
        repo_path: str | Path,
        *,
        online_store: str | None = None,
        max_len: int | None = None,
        repeated_view_rule: RepeatedViewRule | None = None,
        store: Any | None = None,
    ) -> None:
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.repo_path = Path(repo_path).resolve()
        self.online_store: OnlineStoreKind = resolve_online_store(online_store)
        self._store = store if store is not None else load_feature_store(self.repo_path, self.online_store)
        self._max_len = max_len
        self._repeated_view_rule = repeated_view_rule
        self._errors = _store_errors()
        self._store_lock: threading.RLock | None = (
            threading.RLock() if self._store.config.online_store.type == "sqlite" else None
        )
        self._user_locks = [threading.Lock() for _ in range(_STRIPES)]
        self._written_view: tuple[Any, dict[str, Any]] | None = None
        if self._store.config.online_store.type == "redis":
            _fail_fast_redis(self._store)

    @property
    def store(self) -> Any:
        return self._store

    def for_writes(self) -> "FeatureStoreClient":
        """A client for a writer thread: its own online-store connection, so writes never wait on or
        hold up this client's reads, over the same registry object (Feast's request-resolution cache is
        global and keyed by the registry: two registries would evict each other on every call; internal
        API of feast 0.67). A SQLite online store is switched to WAL, in which readers do not wait for a
        writer's commit, and the writer's commits are not fsync-ed (the event log is)."""
        store = load_feature_store(self.repo_path, self.online_store)
        store._registry = self._store.registry
        if self._store.config.online_store.type == "sqlite":
            with self._guard("switch the online store to WAL"):
                with contextlib.closing(sqlite3.connect(self._sqlite_path(), timeout=30)) as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
                # No fsync per commit on this connection (the event log is the durable copy, and the
                # next materialization rebuilds what a power cut took; WAL keeps the file consistent).
                online = store._get_provider().online_store
                online._get_conn(store.config).execute("PRAGMA synchronous=NORMAL")
        return FeatureStoreClient(
            self.repo_path,
            online_store=self.online_store,
            max_len=self._max_len,
            repeated_view_rule=self._repeated_view_rule,
            store=store,
        )

    def _sqlite_path(self) -> Path:
        path = Path(self._store.config.online_store.path)
        return path if path.is_absolute() else self.repo_path / path

    @property
    def max_len(self) -> int:
        """Explicit argument, else the `max_len` tag the feature view was applied with, else the default."""
        if self._max_len is None:
            self._max_len = int(self._view_tags().get(MAX_LEN_TAG, DEFAULT_MAX_LEN))
        return self._max_len

    @property
    def repeated_view_rule(self) -> RepeatedViewRule:
        """Explicit argument, else the cleaning rule the feature view was applied with."""
        if self._repeated_view_rule is None:
            self._repeated_view_rule = RepeatedViewRule.from_tag(self._view_tags().get(REPEATED_VIEW_WINDOW_TAG))
        return self._repeated_view_rule

    def _view_tags(self) -> dict[str, str]:
        with self._guard("read the feature view"):
            return dict(self._store.get_feature_view(FEATURE_VIEW).tags)

    # -- reads ---------------------------------------------------------------------------------

    def get_user_sequence(self, user_id: str) -> UserSequence | None:
        """The user's latest sequence, or None when the store does not know the user (cold start)."""
        return self.get_user_sequences([user_id])[0]

    def get_user_sequences(self, user_ids: Sequence[str]) -> list[UserSequence | None]:
        """Batched read, in the order of `user_ids` (one online-store round trip)."""
        ids = [_check_user_id(u) for u in user_ids]
        if not ids:
            return []
        with self._guard("read online features"):
            columns = self._store.get_online_features(
                features=FEATURE_REFS, entity_rows=[{ENTITY_KEY: u} for u in ids]
            ).to_dict()
        return [_to_sequence(u, {name: columns[name][i] for name in FEATURE_FIELDS}) for i, u in enumerate(ids)]

    def check(self) -> None:
        """Raises FeatureStoreUnavailable unless registry and online store answer (readiness probe)."""
        self.get_user_sequences(["__recsys_readiness_probe__"])

    # -- writes --------------------------------------------------------------------------------

    def push_event(
        self,
        user_id: str,
        item_id: str,
        event_type: str,
        ts: datetime | str | int | float,
        device: str | None = None,
    ) -> UserSequence:
        """Append one event to the user's latest sequence and write it online; returns the new sequence."""
        try:
            event = PushedEvent.model_validate(
                {"user_id": user_id, "item_id": item_id, "event_type": event_type, "ts": ts, "device": device}
            )
        except ValidationError as exc:
            raise ValueError(f"invalid event for push_event: {exc}") from exc
        return self.push_events([event])[0]

    def push_events(
        self, events: Sequence[PushedEvent], current: Mapping[str, UserSequence | None] | None = None
    ) -> list[UserSequence]:
        """Append events (in the given order) to their users' sequences: one online read (skipped for the
        users in `current`, sequences the caller has just read) and one online write for the whole batch.
        Returns, per event, the user's sequence after it.

        The record's version (`last_event_ts_us`, also the Feast event timestamp) strictly increases: an
        event at or before the stored one is stamped one microsecond after it, because Redis drops a write
        whose timestamp is not newer than the stored one. A view of the item viewed just before
        (`repeated_view_rule`, the cleaning stage's rule) leaves the sequence as it is, as cleaning
        quarantines such views (`repeated_view`) from the training data.
        """
        if not events:
            return []
        max_len = self.max_len
        users = list(dict.fromkeys(e.user_id for e in events))
        stripes = sorted({self._stripe(u) for u in users})  # a fixed order: no deadlock between callers
        with contextlib.ExitStack() as held:
            for stripe in stripes:
                held.enter_context(self._user_locks[stripe])
            known = dict(current or {})
            missing = [u for u in users if u not in known]
            known.update(zip(missing, self.get_user_sequences(missing)))
            results: list[UserSequence] = []
            changed: dict[str, UserSequence] = {}
            for event in events:
                sequence = known[event.user_id]
                if sequence is None or not self._is_repeated_view(sequence, event):
                    sequence = changed[event.user_id] = known[event.user_id] = _append(sequence, event, max_len)
                results.append(sequence)
            if changed:
                self._write(list(changed.values()))
        return results

    def _write(self, sequences: Sequence[UserSequence]) -> None:
        """One online write of whole records, through the online store's own `online_write_batch`.

        Not `FeatureStore.push`: its DataFrame -> Arrow -> proto conversion costs milliseconds of CPU
        (holding the GIL) per call; the protos are built here directly (internal API of feast 0.67, the
        interface every online store implements).
        """
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto
        from feast.type_map import python_values_to_proto_values

        with self._guard("write to the online store"):
            if self._written_view is None:  # fixed for the life of the process, as max_len is
                view = self._store.get_feature_view(FEATURE_VIEW, allow_registry_cache=True)
                self._written_view = (view, {f.name: f.dtype.to_value_type() for f in view.features})
            view, types = self._written_view
            created = datetime.now(timezone.utc)
            rows = []
            for s in sequences:
                values = {
                    "item_ids": s.item_ids, "event_types": s.event_types, "tod": s.tod, "devices": s.devices,
                    "last_event_ts_us": s.last_event_ts_us, "segment": s.segment,
                }
                protos = {
                    name: python_values_to_proto_values([value], types[name])[0] for name, value in values.items()
                }
                key = EntityKeyProto(join_keys=[ENTITY_KEY], entity_values=[ValueProto(string_val=s.user_id)])
                rows.append((key, protos, from_epoch_us(s.last_event_ts_us or 0), created))
            self._store._get_provider().online_write_batch(self._store.config, view, rows, progress=None)

    # -- internals -----------------------------------------------------------------------------

    def _is_repeated_view(self, current: UserSequence, event: PushedEvent) -> bool:
        return self.repeated_view_rule.is_repeated(
            current.item_ids[-1], current.event_types[-1], current.last_event_ts,
            event.item_id, event.event_type, event.ts,
        )

    @staticmethod
    def _stripe(user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % _STRIPES

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Serializes SQLite access and turns store failures into FeatureStoreUnavailable."""
        with self._store_lock or contextlib.nullcontext():
            try:
                yield
            except FeatureStoreUnavailable:
                raise
            except self._errors as exc:
                from feast.errors import FeastObjectNotFoundException

                hint = (
                    " (not applied yet? materialize the feast_online_store asset)"
                    if isinstance(exc, (FileNotFoundError, FeastObjectNotFoundException))
                    else ""
                )
                raise FeatureStoreUnavailable(
                    f"Feast {self.online_store} online store at {self._describe()} could not {action}: "
                    f"{type(exc).__name__}: {exc}{hint}"
                ) from exc

    def _describe(self) -> str:
        online = self._store.config.online_store
        return str(getattr(online, "path", None) or getattr(online, "connection_string", "?"))


def _fail_fast_redis(store: Any) -> None:
    """One immediate retry instead of redis-py's default three with exponential backoff.

    With the default, a read against a Redis that is down sits out every backoff before failing, which
    ties up a serving thread long after the request fell back. Feast's connection string cannot carry a
    Retry object, so the policy is set on the client Feast creates (internal API of feast 0.67).
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    online = store._get_provider().online_store
    get_client = getattr(online, "_get_client", None)
    if get_client is None:
        log.warning("feast %s: cannot reach the Redis client to shorten its retries", type(online).__name__)
        return
    get_client(store.config.online_store).set_retry(Retry(NoBackoff(), retries=1))


def _check_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    return user_id


def _to_sequence(user_id: str, row: dict[str, Any]) -> UserSequence | None:
    items = row["item_ids"]
    if not items:
        return None  # unknown to the store: cold start
    lists = {name: list(row[name] or []) for name in SEQUENCE_FIELDS}
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) != 1:
        raise FeatureRecordInvalid(f"online record of user {user_id!r} has lists of different lengths: {lengths}")
    us = row["last_event_ts_us"]
    return UserSequence(
        user_id=user_id,
        item_ids=[str(i) for i in lists["item_ids"]],
        event_types=[str(e) for e in lists["event_types"]],
        tod=[int(t) for t in lists["tod"]],
        devices=[str(d) for d in lists["devices"]],
        last_event_ts=from_epoch_us(us) if us is not None else None,
        segment=row["segment"],
        last_event_ts_us=int(us) if us is not None else None,
    )


def _append(current: UserSequence | None, event: PushedEvent, max_len: int) -> UserSequence:
    base = current or UserSequence(event.user_id, [], [], [], [], None, None)
    us = to_epoch_us(event.ts)
    if base.last_event_ts_us is not None and us <= base.last_event_ts_us:
        us = base.last_event_ts_us + 1

    def keep(values: list[Any], new: Any) -> list[Any]:
        return [*values, new][-max_len:]

    return UserSequence(
        user_id=event.user_id,
        item_ids=keep(base.item_ids, event.item_id),
        event_types=keep(base.event_types, event.event_type),
        tod=keep(base.tod, time_of_day_token_of(event.ts)),
        devices=keep(base.devices, event.device or ""),
        last_event_ts=from_epoch_us(us),
        segment=base.segment,
        last_event_ts_us=us,
    )
