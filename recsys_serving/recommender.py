"""The serving logic, independent of the HTTP framework: bundle, model, feature store, cache, fallback.

Every path that cannot use the model answers from the popularity fallback with a reason; only a
failure to log an event durably is an error (the client must retry, nothing is silently lost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Literal, Mapping

import anyio
import anyio.to_thread
import onnxruntime as ort
from recsys_serving.answer_cache import UNKNOWN_VALUE, Answer, AnswerCache
from recsys_serving.answer_log import AnswerLog
from recsys_serving.bundle import (
    PUBLIC_KEYS_ENV,
    BundleRefused,
    ContextDimension,
    LoadedBundle,
    Popularity,
    PublicKey,
    Vocabulary,
    load_bundle,
    load_public_keys,
    salvage_popularity,
)
from recsys_serving.event_log import EventLog, canonical_record
from recsys_serving.event_writer import EventReceipt, EventWriter, PendingEvent
from recsys_serving.feature_client import (
    FeatureStoreClient,
    FeatureStoreUnavailable,
    PushedEvent,
    UserSequence,
    resolve_online_store,
)
from recsys_serving.health import DependencyProbe, dependency
from recsys_serving.invalidation import SharedStamps
from recsys_serving.metrics import ServiceMetrics
from recsys_serving.contract import CURRENT_BUNDLE, FIRST_ITEM_TOKEN, PredictionTarget, time_of_day_token_of
from recsys_serving.model import History, OnnxRanker, MaskContext, encode
from recsys_serving.schemas import (
    MAX_K,
    MODEL_REASON,
    EventOutcome,
    EventRequest,
    EventResponse,
    DependencyHealth,
    FallbackReason,
    Health,
    RecommendRequest,
    RefusedBundle,
    RecommendResponse,
)
from recsys_serving.settings import ServingSettings

logger = logging.getLogger("recsys_serving")

# Reasons whose answer describes the user's state (cacheable); the others are transient outages.
CACHEABLE_REASONS = {MODEL_REASON, FallbackReason.UNKNOWN_USER.value, FallbackReason.COLD_START.value}
FEATURE_CLIENT_RETRY_S = 5.0
# The first store read at start opens Feast and reads its registry, far longer than a request's budget.
STARTUP_PROBE_TIMEOUT_S = 30.0
# execution=auto runs inference inline only below this (warm-up) time: a longer run on the event loop
# holds up every other request of the worker, invisibly to the model budget (they wait in the socket).
INLINE_MAX_INFERENCE_MS = 5.0


@dataclass(frozen=True)
class ServingState:
    """Everything a request uses from the bundle. Immutable and replaced whole (one reference swap)
    at a switch, so a request keeps the state it started with and finishes on the old bundle."""

    bundle: LoadedBundle | None
    ranker: OnnxRanker | None
    popularity: Popularity | None
    inline: bool
    source: Path  # the bundle directory loaded (resolved), or the configured path when none is
    loaded_at: datetime | None
    degraded_reason: str | None

    @property
    def version(self) -> str | None:
        return self.bundle.version if self.bundle is not None else None

    @property
    def vocabulary(self) -> Vocabulary | None:
        return self.bundle.vocabulary if self.bundle is not None else None

    @property
    def target(self) -> PredictionTarget | None:
        return self.bundle.manifest.model.prediction_target if self.bundle is not None else None

    @property
    def removes_history(self) -> bool:
        """Whether answers leave out the user's history items (PredictionTarget.removes_history)."""
        return self.target is None or self.target.removes_history


class TargetMismatch(ValueError):
    """A request asked for another target than the served model predicts (answered 409)."""


def _writable_or_creatable(directory: Path) -> bool:
    """The event log's directory is writable, or (created on the first write) its nearest existing
    ancestor is."""
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _created_timestamp(bundle: LoadedBundle) -> float:
    try:
        created = datetime.fromisoformat(bundle.manifest.created_at)
    except ValueError:
        return 0.0
    return (created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp()


class Recommender:
    """Serves one bundle at a time. On the `bundles/current` pointer, a background thread follows its
    switches (promotion, rollback): the new bundle is loaded, verified and warmed up off the request
    path, then swapped in; one that fails is refused and the old one keeps serving."""

    def __init__(
        self,
        settings: ServingSettings,
        metrics: ServiceMetrics,
        feature_client_factory: Callable[[], FeatureStoreClient] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bundle_path = settings.resolved_bundle_path()
        # A pointer (the default bundles/current, or RECSYS_BUNDLE naming a symlink) is followed; a
        # fixed version directory or a bento's embedded bundle is served as it is.
        self.follows_current = self.bundle_path.is_symlink() or (
            settings.bundle_path is None and self.bundle_path.name == CURRENT_BUNDLE
        )
        # Public keys bundle signatures must verify with, read again at every load (a key added to the
        # configured directory is trusted without a restart). Unreadable at start: the service stops
        # with the reason; once keys were seen, a load without any is refused, never unchecked.
        self._signatures_required = False
        if not self._public_keys(None):
            logger.warning(
                "no public key configured (%s, default $RECSYS_HOME/secrets/bundle_signing_key.pub): bundle "
                "signatures are not checked", PUBLIC_KEYS_ENV,
            )
        # Shared by the worker processes of this host: an event on any worker invalidates everywhere.
        self._stamps = SharedStamps(settings.home.expanduser() / "cache" / "invalidation.u32")
        # Keyed by (user, variant); the variant includes the model version, so an answer computed by
        # the old bundle is never served after a switch.
        self._cache = AnswerCache(settings.cache_max_bytes, settings.cache_ttl_s, self._stamps)
        self.last_refused: RefusedBundle | None = None
        self._reload_lock = threading.Lock()
        self._state: ServingState | None = None
        self._seen = self._pointer_target()  # what the watcher last acted on
        self._install(self._initial_state(self._seen))
        logger.info(
            "%s execution (RECSYS_EXECUTION=%s, warm-up inference %s)",
            "inline" if self.inline else "thread",
            settings.execution,
            f"{self.ranker.inference_ms:.2f} ms" if self.ranker else "none",
        )

        self._feature_client_factory = feature_client_factory or (lambda: FeatureStoreClient(settings.feature_repo))
        self._feature_client: FeatureStoreClient | None = None
        self._feature_client_error: str | None = None
        self._feature_client_retry_at = 0.0
        self._feature_client_lock = threading.Lock()

        # Worker-thread slots (created in the event loop on first use). Few threads: dozens of threads
        # queueing on the GIL and the store's lock cost more than queueing in the loop.
        self._model_limiter: anyio.CapacityLimiter | None = None
        self._feature_limiter: anyio.CapacityLimiter | None = None
        self.event_log = EventLog(
            settings.resolved_event_log_dir(), id_retention=timedelta(days=settings.event_id_retention_days)
        )
        self._writer_client: FeatureStoreClient | None = None
        self.events = EventWriter(
            self.event_log, self._feature_writer, self._invalidate_users, max_queue=settings.events_max_queue
        )
        self.answer_log = (
            AnswerLog(
                settings.resolved_answer_log_dir(),
                max_bytes=settings.answer_log_max_bytes,
                keep=settings.answer_log_keep,
                max_total_bytes=settings.answer_log_max_total_bytes,
                on_drop=lambda reason: metrics.answer_log_dropped.labels(reason=reason).inc(),
            )
            if settings.answer_log
            else None
        )
        try:
            self._store_kind: str = resolve_online_store()
        except ValueError:  # an unknown kind: the client factory reports it
            self._store_kind = "configured"
        self._store_probe = DependencyProbe("online_store", self._check_online_store, settings.feature_timeout_ms / 1000)
        self._event_log_dir_ok = True
        self._warm_up_feature_store()

        # Each worker process runs its own watcher (the state is per process).
        self._stop = threading.Event()
        self._health_thread = threading.Thread(target=self._probe_dependencies, name="recsys-health", daemon=True)
        self._health_thread.start()
        self._watcher: threading.Thread | None = None
        if self.follows_current and settings.reload_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="recsys-bundle-watcher", daemon=True)
            self._watcher.start()

    @staticmethod
    def _resolve_inline(settings: ServingSettings, ranker: OnnxRanker | None) -> bool:
        """`execution=auto`: inline only with the local SQLite store (a read cannot hang on a network)
        and an inference short enough to block the event loop for (INLINE_MAX_INFERENCE_MS)."""
        if settings.execution != "auto":
            return settings.execution == "inline"
        try:
            local = resolve_online_store() == "sqlite"
        except ValueError:  # an unknown store kind: the client reports it; stay on the safe side
            return False
        return local and (ranker is None or ranker.inference_ms <= INLINE_MAX_INFERENCE_MS)

    # -- the served state (read once per request) -----------------------------------------------------

    @property
    def state(self) -> ServingState:
        assert self._state is not None
        return self._state

    @property
    def bundle(self) -> LoadedBundle | None:
        return self.state.bundle

    @property
    def ranker(self) -> OnnxRanker | None:
        return self.state.ranker

    @property
    def popularity(self) -> Popularity | None:
        return self.state.popularity

    @property
    def degraded_reason(self) -> str | None:
        return self.state.degraded_reason

    @property
    def inline(self) -> bool:
        return self.state.inline

    @property
    def model_version(self) -> str | None:
        return self.state.version

    # -- loading and switching -----------------------------------------------------------------------

    def _pointer_target(self) -> Path | None:
        """The directory the configured path resolves to now (None when it does not exist)."""
        path = self.bundle_path
        return Path(os.path.realpath(path)) if path.exists() else None

    def _load(self, path: Path) -> ServingState:
        """Verify (every checksum), open and warm up a bundle; BundleRefused says why it cannot serve."""
        started = time.perf_counter()
        try:
            bundle = load_bundle(path, public_keys=self._public_keys(path))
            ranker = OnnxRanker(
                bundle,
                intra_threads=self.settings.ort_intra_threads,
                use_gpu=self.settings.use_gpu,
                cache_dir=self.settings.home.expanduser() / "cache" / "tensorrt",
            )
        except BundleRefused:
            raise
        except Exception as exc:  # an unreadable file, memory: refused like a bad bundle, never a crash
            logger.exception("loading bundle %s failed", path)
            raise BundleRefused(path, "the bundle could not be loaded (an unexpected error)", detail=f"{type(exc).__name__}: {exc}") from exc
        logger.info(
            "bundle %s loaded from %s in %.2fs (providers %s, %d items, %s)",
            bundle.version,
            bundle.path,
            time.perf_counter() - started,
            ranker.providers,
            len(bundle.vocabulary.items),
            f"signature verified with key {bundle.signed_by}" if bundle.signed_by else "signature not checked",
        )
        return ServingState(
            bundle=bundle,
            ranker=ranker,
            popularity=bundle.popularity,
            inline=self._resolve_inline(self.settings, ranker),
            source=bundle.path,
            loaded_at=datetime.now(timezone.utc),
            degraded_reason=None,
        )

    def _initial_state(self, target: Path | None) -> ServingState:
        try:
            return self._load(target or self.bundle_path)
        except BundleRefused as exc:
            if target is not None:  # a bundle is there but cannot serve (nothing there is no refusal)
                self._refuse(target, exc)
            try:
                keys = self._public_keys(target or self.bundle_path)
            except BundleRefused:
                popularity = None  # no trusted key to check the manifest with: nothing is salvaged
            else:
                popularity = salvage_popularity(target or self.bundle_path, public_keys=keys)
            logger.error(
                "serving the popularity fallback only (%s); fallback list %s",
                exc,
                "salvaged from the bundle" if popularity else "unavailable: answers will be empty",
            )
            return ServingState(
                bundle=None,
                ranker=None,
                popularity=popularity,
                inline=self._resolve_inline(self.settings, None),
                source=target or self.bundle_path,
                loaded_at=None,
                degraded_reason=exc.reason,
            )

    def _public_keys(self, path: Path | None) -> list[PublicKey]:
        """The configured public keys, read now. `path`: the bundle being loaded (a read failure
        refuses it); None at start, where a failure stops the service (ValueError)."""
        try:
            keys = load_public_keys(self.settings.resolved_public_key_files())
        except ValueError as exc:
            if path is None:
                raise
            raise BundleRefused(path, "the configured public keys cannot be read", detail=str(exc)) from exc
        if not keys and self._signatures_required and path is not None:
            raise BundleRefused(path, "public keys were configured but none can be found now")
        self._signatures_required = self._signatures_required or bool(keys)
        return keys

    def _refuse(self, path: Path, exc: BundleRefused) -> None:
        self.last_refused = RefusedBundle(version=path.name, reason=exc.reason, at=datetime.now(timezone.utc))
        self.metrics.model_switches.labels(outcome="refused").inc()
        serving = self._state.version if self._state is not None else None
        logger.error("bundle %s refused, %s keeps serving: %s", path, serving or "nothing", exc)

    def _install(self, state: ServingState) -> None:
        """The switch: one reference assignment; then the cache and the metrics follow."""
        old, self._state = self._state, state
        if old is not None:
            self._cache.clear()  # memory only: the version in the cache key already keeps them apart
        info = self.metrics.model_info
        labels = (state.version or "none", state.ranker.providers[0] if state.ranker else "none")
        info.labels(*labels).set(1)
        if old is not None:
            old_labels = (old.version or "none", old.ranker.providers[0] if old.ranker else "none")
            if old_labels != labels:
                # 0, not remove(): in multiprocess mode a removed series stays in this worker's file
                info.labels(*old_labels).set(0)
        self.metrics.degraded.set(0 if state.ranker is not None else 1)
        self.metrics.dependency_up.labels(dependency="model").set(1 if state.ranker is not None else 0)
        self.metrics.model_created.set(_created_timestamp(state.bundle) if state.bundle is not None else 0)
        if state.loaded_at is not None:
            self.metrics.model_loaded.set(state.loaded_at.timestamp())
        if old is not None:
            self.metrics.model_switches.labels(outcome="switched").inc()
            logger.info("switched from bundle %s to %s", old.version or "none", state.version)

    def reload_if_changed(self) -> bool:
        """Follow the pointer once: load, verify and warm up a new target, then switch to it. A target
        that fails is refused once and not retried until the pointer changes again. True on a switch."""
        with self._reload_lock:
            target = self._pointer_target()
            if target == self._seen:
                return False
            self._seen = target
            if target is None:
                logger.warning("%s no longer resolves; %s keeps serving", self.bundle_path, self.model_version)
                return False
            if self.state.bundle is not None and target == self.state.source:
                return False  # back to the bundle already served
            try:
                state = self._load(target)
            except BundleRefused as exc:
                self._refuse(target, exc)
                return False
            self._install(state)
            return True

    def _watch(self) -> None:
        # Polling rather than inotify (watchdog): a symlink renamed over on a shared or network volume
        # gives no reliable event, and one readlink per interval costs nothing.
        while not self._stop.wait(self.settings.reload_interval_s):
            try:
                self.reload_if_changed()
            except Exception:  # noqa: BLE001 - the watcher must keep running whatever one check raised
                logger.exception("checking %s for a new bundle failed", self.bundle_path)

    def health(self) -> Health:
        """Status from what is known now; never waits on a dependency (the store is probed by the
        health thread, every RECSYS_HEALTH_PROBE_INTERVAL_S)."""
        state = self.state
        dependencies = self._dependencies(state)
        down = {name: dep for name, dep in dependencies.items() if dep.status != "ok"}
        status: Literal["ok", "degraded", "unavailable"]
        if state.ranker is None and state.popularity is None:
            status = "unavailable"
        else:
            status = "degraded" if down else "ok"
        reasons = [
            (state.degraded_reason or dep.detail) if name == "model" else f"{name}: {dep.detail}"
            for name, dep in down.items()
        ]
        signed_by = state.bundle.signed_by if state.bundle is not None else None
        return Health(
            status=status,
            degraded=status != "ok",
            reason="; ".join(reasons) or None,
            dependencies=dependencies,
            model_version=state.version,
            target=state.target.name if state.target is not None else None,
            signed=signed_by is not None,
            signing_key=signed_by,
            providers=state.ranker.providers if state.ranker else [],
            cache={**self._cache.stats(), "hit_ratio": round(self.metrics.cache_ratio(), 4)},
            loaded_at=state.loaded_at,
            follows_current=self._watcher is not None,
            last_refused=self.last_refused,
        )

    def _dependencies(self, state: ServingState) -> dict[str, DependencyHealth]:
        return {
            "model": self._model_health(state),
            "online_store": self._store_probe.latest,
            "event_log": self._event_log_health(),
        }

    @staticmethod
    def _model_health(state: ServingState) -> DependencyHealth:
        if state.ranker is not None:
            return dependency(True, f"bundle {state.version} serving", state.loaded_at)
        if state.popularity is not None:
            return dependency(False, "no usable bundle: answers come from the popularity fallback")
        return dependency(False, "no usable bundle and no popularity list: answers are empty")

    def _event_log_health(self) -> DependencyHealth:
        if self.event_log_error is not None:
            return dependency(False, "the last append to the event log failed: events are refused")
        if not self._event_log_dir_ok:
            return dependency(False, "the event log directory is missing or not writable")
        return dependency(True, "writable")

    def _check_online_store(self) -> tuple[bool, str, str | None]:
        """The store probe (a DependencyProbe check): one read of a key no user has."""
        try:
            client = self._client()
        except FeatureStoreUnavailable as exc:
            return False, "not configured: the feature repository or its registry cannot be loaded", str(exc)
        try:
            client.check()
        except FeatureStoreUnavailable as exc:
            return False, f"the {self._store_kind} online store does not answer", str(exc)
        return True, f"the {self._store_kind} online store answers", None

    def _probe_dependencies(self) -> None:
        """The health thread: probes, then publishes recsys_dependency_up, once per interval."""
        while not self._stop.wait(self.settings.health_probe_interval_s):
            try:
                self._probe_once()
            except Exception:  # noqa: BLE001 - the health thread must keep running whatever one probe raised
                logger.exception("probing the dependencies failed")

    def _probe_once(self, timeout_s: float | None = None) -> None:
        self._store_probe.probe(timeout_s)
        self._event_log_dir_ok = _writable_or_creatable(self.event_log.directory)
        for name, dep in self._dependencies(self.state).items():
            self.metrics.dependency_up.labels(dependency=name).set(1 if dep.status == "ok" else 0)

    # -- feature store ---------------------------------------------------------------------------

    def _client(self) -> FeatureStoreClient:
        with self._feature_client_lock:
            if self._feature_client is not None:
                return self._feature_client
            if time.monotonic() < self._feature_client_retry_at:
                raise FeatureStoreUnavailable(f"feature store not configured: {self._feature_client_error}")
            try:
                self._feature_client = self._feature_client_factory()
            except Exception as exc:  # a missing/invalid repo is an outage of the store, not a crash
                self._feature_client_error = f"{type(exc).__name__}: {exc}"
                self._feature_client_retry_at = time.monotonic() + FEATURE_CLIENT_RETRY_S
                raise FeatureStoreUnavailable(f"feature store not configured: {self._feature_client_error}") from exc
            return self._feature_client

    def _warm_up_feature_store(self) -> None:
        """Open the store and read once at start-up (the first probe, with the start-up budget: the
        first read loads Feast and its registry), so the first request does not pay for it and
        health is known from the start."""
        self._probe_once(STARTUP_PROBE_TIMEOUT_S)
        if self._store_probe.latest.status != "ok":
            logger.warning("feature store unavailable at start-up: requests fall back until it is back")

    async def _user_sequence(self, state: ServingState, user_id: str) -> UserSequence | None:
        """Raises FeatureStoreUnavailable on an outage or (thread execution) when the lookup exceeds
        its budget; inline, the store client's own timeouts apply."""
        if state.inline:
            return self._client().get_user_sequence(user_id)
        result: list[UserSequence | None] = []
        if self._feature_limiter is None:
            self._feature_limiter = anyio.CapacityLimiter(self.settings.feature_concurrency)
        with anyio.move_on_after(self.settings.feature_timeout_ms / 1000) as scope:
            result.append(
                await anyio.to_thread.run_sync(
                    lambda: self._client().get_user_sequence(user_id),
                    limiter=self._feature_limiter,
                    abandon_on_cancel=True,
                )
            )
        if scope.cancelled_caught:
            raise FeatureStoreUnavailable(f"lookup took longer than {self.settings.feature_timeout_ms:.0f} ms")
        return result[0]

    # -- cache -------------------------------------------------------------------------------------

    def _cache_get(self, user_id: str, variant: tuple[object, ...]) -> tuple[Answer | None, int]:
        """(cached answer or None, the user's current stamp to store a new answer under)."""
        return self._cache.get(user_id, variant)

    def _cache_put(
        self, user_id: str, variant: tuple[object, ...], answer: Answer, stamp: int, shared: bool = False
    ) -> None:
        self._cache.put(user_id, variant, answer, stamp, shared=shared)

    def invalidate(self, user_id: str) -> None:
        self._cache.invalidate(user_id)

    @staticmethod
    def _variant(state: ServingState, device: str | None, segment: str | None, tod: int) -> tuple[object, ...]:
        """The cache variant of a request. A device or segment that neither the model's vocabulary nor
        the popularity lists know gives the same answer as any other such value (encode maps them to
        the unknown token, Popularity.choose skips them), so they share one variant instead of each
        random string making its own. The time of day is part of it: model and fallback both use it."""
        vocabulary, popularity = state.vocabulary, state.popularity

        def known(dimension: ContextDimension, value: str | None, in_model: Mapping[str, int]) -> object:
            if value is None or value in in_model or (popularity is not None and popularity.knows(dimension, value)):
                return value
            return UNKNOWN_VALUE

        return (
            state.version,
            known("device", device, vocabulary.devices if vocabulary else {}),
            known("segment", segment, vocabulary.segments if vocabulary else {}),
            tod,
        )

    # -- recommend ---------------------------------------------------------------------------------

    def _fallback(
        self,
        state: ServingState,
        reason: FallbackReason,
        exclude: set[str],
        device: str | None,
        segment: str | None,
        tod: int,
    ) -> Answer:
        """Popularity for the request's context (Popularity.ranked: the most specific list of device,
        segment and time of day, topped up from the less specific ones) without the `exclude` items."""
        self.metrics.fallbacks.labels(reason=reason.value).inc()
        popularity = state.popularity
        items = popularity.ranked(device, segment, tod, MAX_K, exclude) if popularity is not None else []
        return Answer.of(items, model_version=state.version, reason=reason.value)

    @staticmethod
    def _excluded(state: ServingState, history: History) -> set[str]:
        """What a fallback leaves out: the history, where the served target removes it."""
        return set(history.item_ids) if state.removes_history else set()

    async def _run_model(
        self, state: ServingState, history: History, request: MaskContext, started: float
    ) -> Answer | FallbackReason:
        ranker, bundle = state.ranker, state.bundle
        assert ranker is not None and bundle is not None
        encoded = encode(
            history, request, ranker.vocabulary, ranker.max_len, ranker.input_names, state.removes_history
        )
        if encoded is None:
            return FallbackReason.COLD_START
        budget_s = self.settings.model_timeout_ms / 1000
        if state.inline:
            # Nothing can interrupt a run on the event loop, so the budget is applied before it starts,
            # to the time the request has already spent (waiting for the loop included): under
            # overload, requests that waited too long get the fallback at once instead of queueing on.
            if time.perf_counter() - started > budget_s:
                return FallbackReason.MODEL_TIMEOUT
            try:
                scores, tokens = ranker.rank(encoded.feeds)
            except Exception:  # noqa: BLE001 - any failure inside ORT is a model error, answered by fallback
                logger.exception("model inference failed")
                return FallbackReason.MODEL_ERROR
        else:
            if self._model_limiter is None:
                self._model_limiter = anyio.CapacityLimiter(self.settings.model_concurrency)
            run_options = ort.RunOptions()
            outputs = []
            try:
                with anyio.move_on_after(budget_s) as scope:
                    outputs.append(
                        await anyio.to_thread.run_sync(
                            ranker.rank, encoded.feeds, run_options, limiter=self._model_limiter, abandon_on_cancel=True
                        )
                    )
            except Exception:  # noqa: BLE001 - any failure inside ORT is a model error, answered by fallback
                logger.exception("model inference failed")
                return FallbackReason.MODEL_ERROR
            if scope.cancelled_caught:
                run_options.terminate = True  # stop the abandoned run instead of letting it burn a core
                return FallbackReason.MODEL_TIMEOUT
            scores, tokens = outputs[0]
        items = ranker.decode(scores, tokens, MAX_K)
        return Answer.of(items, model_version=bundle.version, reason=MODEL_REASON)

    async def recommend(self, req: RecommendRequest, started: float | None = None) -> RecommendResponse:
        """`started`: time.perf_counter() when the request arrived (default: now), for the model budget.
        Raises TargetMismatch when the request names a target the served model does not predict."""
        state = self._state  # this request's bundle from start to end, whatever a switch does meanwhile
        assert state is not None
        served = state.target
        if req.target is not None and served is not None and req.target != served.name:
            raise TargetMismatch(
                f"the served model predicts {served.label()}, not {req.target}; "
                "omit target or ask a service that serves it"
            )
        answer, cached = await self._answer(state, req, time.perf_counter() if started is None else started)
        if self.answer_log is not None:  # cached answers too: they are answers given
            self.answer_log.record(
                req.user_id,
                list(answer.item_ids[: req.k]),
                answer.model_version,
                None if answer.reason == MODEL_REASON else answer.reason,
            )
        return answer.response(req.k, cached=cached, target=served.name if served is not None else None)

    async def _answer(self, state: ServingState, req: RecommendRequest, started: float) -> tuple[Answer, bool]:
        """-> (answer, whether it came from the cache)."""
        ctx = req.context
        device = ctx.device if ctx else None
        ts = (ctx.ts if ctx and ctx.ts else None) or datetime.now(timezone.utc)
        tod = time_of_day_token_of(ts)
        segment = ctx.segment if ctx else None

        use_cache = req.recent_items is None and self._cache.enabled
        variant = self._variant(state, device, segment, tod)
        stamp = 0
        if use_cache:
            cached, stamp = self._cache_get(req.user_id, variant)
            self.metrics.cache_lookup(cached is not None)
            if cached is not None:
                return cached, True

        if req.recent_items is not None:
            history = History(item_ids=req.recent_items)
        else:
            try:
                sequence = await self._user_sequence(state, req.user_id)
            except FeatureStoreUnavailable as exc:
                logger.warning("feature store unavailable: %s", exc)
                return self._fallback(state, FallbackReason.FEATURE_STORE_UNAVAILABLE, set(), device, segment, tod), False
            if sequence is None:
                answer = self._fallback(state, FallbackReason.UNKNOWN_USER, set(), device, segment, tod)
                if use_cache:  # the same for every unknown user of this variant: stored once
                    self._cache_put(req.user_id, variant, answer, stamp, shared=True)
                return answer, False
            history = History(
                item_ids=sequence.item_ids, event_types=sequence.event_types, tod=sequence.tod, devices=sequence.devices
            )
            segment = segment or sequence.segment

        if state.ranker is None:
            excluded = self._excluded(state, history)
            return self._fallback(state, FallbackReason.MODEL_UNAVAILABLE, excluded, device, segment, tod), False
        result = await self._run_model(state, history, MaskContext(tod=tod, device=device, segment=segment), started)
        answer = (
            result
            if isinstance(result, Answer)
            else self._fallback(state, result, self._excluded(state, history), device, segment, tod)
        )
        if use_cache and answer.reason in CACHEABLE_REASONS:
            self._cache_put(req.user_id, variant, answer, stamp)
        return answer, False

    # -- events ------------------------------------------------------------------------------------

    @staticmethod
    def _category(state: ServingState, item_id: str) -> str | None:
        vocabulary = state.vocabulary
        if vocabulary is None:
            return None
        token = vocabulary.item_to_token.get(item_id)
        return vocabulary.categories[token - FIRST_ITEM_TOKEN] if token is not None else None

    @property
    def event_log_error(self) -> str | None:
        """The last failure to write the event log (None after a successful write)."""
        return self.events.log_error

    def _feature_writer(self) -> FeatureStoreClient:
        """The event writer's client: its own connection to the store (FeatureStoreClient.for_writes)."""
        with self._feature_client_lock:
            if self._writer_client is not None:
                return self._writer_client
        reader = self._client()  # raises FeatureStoreUnavailable while the store is not configured
        try:
            writer = reader.for_writes()
        except FeatureStoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a store that cannot be opened is an outage, not a crash
            raise FeatureStoreUnavailable(f"feature store writer: {type(exc).__name__}: {exc}") from exc
        with self._feature_client_lock:
            self._writer_client = self._writer_client or writer
            return self._writer_client

    def _invalidate_users(self, user_ids: list[str]) -> None:
        for user_id in user_ids:
            self.invalidate(user_id)

    async def record_event(self, req: EventRequest) -> EventResponse:
        """Queue the event for the writer (event_writer.py) and wait for its receipt: durably logged
        first (or a duplicate of an event logged before), then applied to the feature store and the cache.
        Raises EventLogUnavailable (not logged) or EventQueueFull (not queued)."""
        state = self.state
        event_id = req.event_id or uuid.uuid4().hex
        ts = req.ts or datetime.now(timezone.utc)
        record = canonical_record(
            user_id=req.user_id,
            item_id=req.item_id,
            event_type=req.event_type,
            ts=ts,
            session_id=req.session_id,
            category=self._category(state, req.item_id),
            device=req.device,
            price=req.price,
        )
        push = PushedEvent(user_id=req.user_id, item_id=req.item_id, event_type=req.event_type, ts=ts, device=req.device)
        receipt: EventReceipt = await asyncio.wrap_future(self.events.submit(PendingEvent(event_id, record, push)))
        if not receipt.duplicate:
            self.metrics.events_logged.inc()
        if receipt.duplicate:
            outcome = EventOutcome.DUPLICATE
        elif receipt.store_error is not None:
            outcome = EventOutcome.FEATURE_STORE_UNAVAILABLE
        else:
            outcome = EventOutcome.OK
        return EventResponse(
            event_id=receipt.event_id,
            accepted=True,
            duplicate=receipt.duplicate,
            durable=True,
            feature_store_updated=receipt.feature_store_updated,
            sequence_length=receipt.sequence_length,
            reason=outcome,
        )

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)  # a load in progress finishes first
        self._health_thread.join(timeout=5)  # a probe in progress waits at most its timeout
        self.events.close()  # commits what is queued
        self.event_log.close()
        if self.answer_log is not None:
            self.answer_log.close()
