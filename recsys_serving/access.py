"""Who may call the service and how much: bearer tokens, per-client rate limits, per-endpoint caps.

Used by the HTTP edge (`service.ApiGuard`) before a request body is parsed. Everything here runs
on the event loop of one worker process, so the state is per process and needs no locks.

Tokens come from `RECSYS_WRITE_TOKENS` / `RECSYS_READ_TOKENS` (comma-separated) and from
`RECSYS_API_TOKENS_FILE` (one `<read|write> <token>` per line, `#` comments; e.g. a Kubernetes
Secret mounted as a file, re-read when it changes). Only SHA-256 digests of the tokens are kept;
a token is never logged, and a client is identified by a digest prefix (`Principal.identity`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from cachetools import LRUCache
from pydantic import SecretStr

from recsys_serving.settings import ServingSettings

logger = logging.getLogger("recsys_serving.access")

MIN_TOKEN_CHARS = 16
TOKEN_FILE_RECHECK_S = 5.0
REALM = "recsys"


class TokenScope(str, Enum):
    READ = "read"
    WRITE = "write"  # writes and reads


@dataclass(frozen=True, slots=True)
class Principal:
    scope: TokenScope
    identity: str  # "token:<first 12 hex digits of the token's SHA-256>": loggable, never the token


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer the edge gives instead of the application's: status, `{"error": message}`, headers."""

    status: int
    reason: str  # the `reason` label of recsys_requests_refused_total
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class TokenConfigError(ValueError):
    """A configured token or token file is unusable; the message never contains a token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenConfigError(f"{where}: a token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                               '(python -c "import secrets; print(secrets.token_urlsafe(32))")')
    if any(c.isspace() or not c.isprintable() for c in token):
        raise TokenConfigError(f"{where}: a token contains whitespace or control characters")
    return token


def parse_token_file(text: str, source: str) -> list[tuple[TokenScope, SecretStr]]:
    """`<read|write> <token>` per line; blank lines and `#` comments are skipped."""
    tokens: list[tuple[TokenScope, SecretStr]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in (TokenScope.READ.value, TokenScope.WRITE.value):
            raise TokenConfigError(f"{source} line {number}: expected '<read|write> <token>'")
        tokens.append((TokenScope(parts[0]), SecretStr(_check_token(parts[1], f"{source} line {number}"))))
    return tokens


class Credentials:
    """A set of tokens held as SHA-256 digests.

    `identify` hashes the presented token once and compares the digest with every configured one
    (`hmac.compare_digest`, no early exit): the time taken depends neither on how much of a token
    matched nor on which token did.
    """

    def __init__(self, tokens: Iterable[tuple[TokenScope, SecretStr]]) -> None:
        by_digest: dict[bytes, TokenScope] = {}
        for scope, secret in tokens:
            digest = _digest(secret.get_secret_value())
            if by_digest.get(digest) != TokenScope.WRITE:  # the same token listed twice: the wider scope
                by_digest[digest] = scope
        self._entries = [
            (digest, Principal(scope=scope, identity=f"token:{digest.hex()[:12]}"))
            for digest, scope in by_digest.items()
        ]
        self.can_write = any(p.scope is TokenScope.WRITE for _, p in self._entries)
        self.count = len(self._entries)

    def identify(self, token: str) -> Principal | None:
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


class TokenSource:
    """The tokens of the settings; the token file is re-read when it changes (a rotated Secret)."""

    def __init__(self, settings: ServingSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._env: list[tuple[TokenScope, SecretStr]] = [
            (scope, SecretStr(_check_token(token.get_secret_value(), variable)))
            for scope, variable, tokens in (
                (TokenScope.WRITE, "RECSYS_WRITE_TOKENS", settings.write_tokens),
                (TokenScope.READ, "RECSYS_READ_TOKENS", settings.read_tokens),
            )
            for token in tokens
        ]
        self._file = settings.api_tokens_file.expanduser() if settings.api_tokens_file is not None else None
        self._clock = clock
        self._file_stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self.credentials = Credentials(self._env)
        if self._file is not None:
            try:
                self._reload(self._stamp())  # a missing or bad file stops the service at start
            except OSError as exc:
                raise TokenConfigError(f"RECSYS_API_TOKENS_FILE {self._file} cannot be read ({exc.strerror})") from exc

    def _stamp(self) -> tuple[int, int, int]:
        assert self._file is not None
        st = os.stat(self._file)  # follows the symlinks a Kubernetes Secret volume swaps on update
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reload(self, stamp: tuple[int, int, int]) -> None:
        assert self._file is not None
        tokens = parse_token_file(self._file.read_text(encoding="utf-8"), f"RECSYS_API_TOKENS_FILE {self._file}")
        self.credentials = Credentials(self._env + tokens)
        self._file_stamp = stamp
        logger.info("API tokens: %d from the environment, %d from %s", len(self._env), len(tokens), self._file)

    def current(self) -> Credentials:
        if self._file is None or self._clock() < self._next_check:
            return self.credentials
        self._next_check = self._clock() + TOKEN_FILE_RECHECK_S
        # A failed update keeps the tokens read before; it is logged once, and retried when the file changes.
        try:
            stamp: tuple[int, int, int] | None = self._stamp()
        except OSError as exc:
            stamp, problem = None, f"RECSYS_API_TOKENS_FILE {self._file} cannot be read ({exc.strerror})"
        else:
            if stamp == self._file_stamp:
                return self.credentials
            try:
                self._reload(stamp)
                return self.credentials
            except (OSError, TokenConfigError) as exc:
                problem = str(exc)
        if stamp != self._file_stamp:
            logger.error("API token file not re-read, the previous tokens stay in force: %s", problem)
        self._file_stamp = stamp
        return self.credentials


def parse_bearer(header: str) -> str | None:
    """The token of `Bearer <token>` (scheme case-insensitive, RFC 6750), else None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _challenge(error: str | None = None, scope: str | None = None) -> tuple[tuple[str, str], ...]:
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
    if scope:
        value += f', scope="{scope}"'
    return (("www-authenticate", value),)


class AccessPolicy:
    """Which endpoint needs which scope, and the answer to a request that lacks it."""

    def __init__(self, settings: ServingSettings, tokens: TokenSource | None = None) -> None:
        self.tokens = tokens or TokenSource(settings)
        self.read_access = settings.read_access
        credentials = self.tokens.current()
        if not credentials.can_write:
            logger.warning("no write token is configured (RECSYS_WRITE_TOKENS, RECSYS_API_TOKENS_FILE): "
                           "every POST /events is refused with 401")
        if self.read_access == "token" and credentials.count == 0:
            logger.warning("RECSYS_READ_ACCESS=token and no token is configured: every /recommend is refused with 401")

    def required(self, endpoint: str) -> TokenScope | None:
        if endpoint == "events":
            return TokenScope.WRITE
        return TokenScope.READ if self.read_access == "token" else None

    def identify(self, authorization: str | None) -> tuple[Principal | None, Refusal | None]:
        """The caller's principal (None: anonymous), or the refusal of a credential that is not valid."""
        if authorization is None:
            return None, None
        token = parse_bearer(authorization)
        if token is None:
            return None, Refusal(401, "unauthenticated", "the Authorization header must be 'Bearer <token>'",
                                 _challenge("invalid_request"))
        principal = self.tokens.current().identify(token)
        if principal is None:
            return None, Refusal(401, "unauthenticated", "the bearer token is not valid", _challenge("invalid_token"))
        return principal, None

    def authorize(
        self, endpoint: str, path: str, principal: Principal | None, bad_credential: Refusal | None = None
    ) -> Refusal | None:
        """None when the request may go on; `bad_credential` is `identify`'s refusal, if any."""
        needed = self.required(endpoint)
        if needed is None:
            return bad_credential  # open, but a credential that is sent must be valid
        credentials = self.tokens.current()
        if needed is TokenScope.WRITE and not credentials.can_write:
            return Refusal(401, "unauthenticated", f"{path} is refused: this service has no write credential "
                           "configured (RECSYS_WRITE_TOKENS or RECSYS_API_TOKENS_FILE)", _challenge())
        if needed is TokenScope.READ and credentials.count == 0:
            return Refusal(401, "unauthenticated", f"{path} needs a token (RECSYS_READ_ACCESS=token) and this "
                           "service has none configured", _challenge())
        if bad_credential is not None:
            return bad_credential
        if principal is None:
            return Refusal(401, "unauthenticated", f"{path} needs an 'Authorization: Bearer <token>' header",
                           _challenge())
        if needed is TokenScope.WRITE and principal.scope is not TokenScope.WRITE:
            return Refusal(403, "forbidden", f"this token may only read; {path} needs a write token",
                           _challenge("insufficient_scope", TokenScope.WRITE.value))
        return None


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


class RateLimiter:
    """A token bucket per client key: `rate` requests per second, bursts up to `burst`.

    Hand-written: `limits`' in-memory storage costs several times more per hit (README), keeps
    unbounded per-key state and restarts a timer thread every 10 ms. State is an LRU of at most
    `max_clients` buckets; a client dropped from it starts again with a full bucket, so a flood of
    new keys can only let requests through, never refuse a client wrongly.
    """

    def __init__(self, rate: float, burst: int, max_clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self._buckets: LRUCache[str, _Bucket] = LRUCache(maxsize=max_clients)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str) -> float:
        """0.0 when the request may pass, else the seconds until the client's next request would."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(self.burst - 1.0, now)
            return 0.0
        tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return 0.0
        bucket.tokens = tokens
        return (1.0 - tokens) / self.rate

    def refusal(self, wait_s: float) -> Refusal:
        retry_after = max(1, math.ceil(wait_s))
        return Refusal(429, "rate_limited", f"rate limit of {self.rate:g} requests/s (burst {self.burst:g}) "
                       f"exceeded; retry after {retry_after} s", (("retry-after", str(retry_after)),))


class ConcurrencyCaps:
    """Requests in progress per endpoint; over the cap a request is shed at once (no queueing)."""

    RETRY_AFTER_S = 1

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = dict(caps)
        self.in_flight = dict.fromkeys(caps, 0)

    def try_enter(self, endpoint: str) -> bool:
        if self.in_flight[endpoint] >= self.caps[endpoint]:
            return False
        self.in_flight[endpoint] += 1
        return True

    def leave(self, endpoint: str) -> None:
        self.in_flight[endpoint] -= 1

    def refusal(self, endpoint: str, path: str) -> Refusal:
        return Refusal(503, "overloaded", f"{self.caps[endpoint]} {path} requests are in progress on this worker "
                       f"(its limit); retry after {self.RETRY_AFTER_S} s", (("retry-after", str(self.RETRY_AFTER_S)),))


def client_key(principal: Principal | None, client: Sequence[object] | None) -> str:
    """Rate-limit key: the token's identity, else the peer address (a proxy's, behind one)."""
    if principal is not None:
        return principal.identity
    return f"ip:{client[0]}" if client else "ip:unknown"


@dataclass
class EdgeControls:
    """The access policy, rate limiter and concurrency caps of one worker process."""

    policy: AccessPolicy
    limiter: RateLimiter
    caps: ConcurrencyCaps

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> "EdgeControls":
        return cls(
            policy=AccessPolicy(settings),
            limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst, settings.rate_limit_clients),
            caps=ConcurrencyCaps(
                {"recommend": settings.recommend_max_concurrency, "events": settings.events_max_concurrency}
            ),
        )

