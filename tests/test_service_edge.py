"""The HTTP edge of the service: tokens, rate limits, concurrency caps, abandoned requests, bounded
metric labels, one-line client-error logs and health routing.

The library parts (access.py, the log filter) are tested directly; the behaviour on the wire
against two real `bentoml serve` processes, started in parallel:
  guarded  the tiny trained model; write tokens from the environment and a token file, reads need
           a token, one event at a time, and a Redis online store that accepts connections and never
           answers (a stalled network path), so every store read takes its full socket timeout
  bare     no bundle (unavailable), no write token configured, 5 requests/s per client
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, SecretStr, ValidationError

from recsys_serving.access import (
    AccessPolicy,
    ConcurrencyCaps,
    Credentials,
    RateLimiter,
    TokenConfigError,
    TokenScope,
    TokenSource,
    client_key,
    parse_bearer,
    parse_token_file,
)
from recsys_serving.contract import SERVED_EVENTS_DIR
from recsys_serving.settings import ServingSettings

from _service_harness import WRITE_TOKEN, Server, SilentServer, build_serving_home

READ_TOKEN = secrets.token_urlsafe(32)
FILE_WRITE_TOKEN = secrets.token_urlsafe(32)
HISTORIES = {"alice": [3, 4, 5]}


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the library ---------------------------------------------------------------------------------


def test_token_file_format_and_errors_never_show_a_token(tmp_path: Path) -> None:
    text = f"# rotated 2025-01-01\n\nread {READ_TOKEN}\n  write   {FILE_WRITE_TOKEN}  \n"
    tokens = parse_token_file(text, "tokens.txt")
    assert [(scope, secret.get_secret_value()) for scope, secret in tokens] == [
        (TokenScope.READ, READ_TOKEN), (TokenScope.WRITE, FILE_WRITE_TOKEN)
    ]
    assert READ_TOKEN not in repr(tokens)
    for bad, needle in [
        (f"admin {READ_TOKEN}", "line 1: expected '<read|write> <token>'"),
        (f"read {READ_TOKEN} extra", "line 1: expected"),
        ("write", "line 1: expected"),
        ("# ok\nwrite short-token", "line 2: a token has 11 characters; use at least 16"),
    ]:
        with pytest.raises(TokenConfigError, match=needle) as caught:
            parse_token_file(bad, "tokens.txt")
        assert READ_TOKEN not in str(caught.value) and "short-token" not in str(caught.value)


def test_credentials_identify_every_token_and_the_widest_scope() -> None:
    credentials = Credentials([
        (TokenScope.READ, SecretStr(READ_TOKEN)),
        (TokenScope.WRITE, SecretStr(WRITE_TOKEN)),
        (TokenScope.READ, SecretStr(WRITE_TOKEN)),  # listed twice: the wider scope wins
    ])
    assert credentials.count == 2 and credentials.can_write
    reader, writer = credentials.identify(READ_TOKEN), credentials.identify(WRITE_TOKEN)
    assert reader is not None and reader.scope is TokenScope.READ
    assert writer is not None and writer.scope is TokenScope.WRITE
    assert reader.identity.startswith("token:") and len(reader.identity) == len("token:") + 12
    assert READ_TOKEN not in reader.identity and reader.identity != writer.identity
    assert credentials.identify(READ_TOKEN[:-1]) is None and credentials.identify(READ_TOKEN + "x") is None
    assert not Credentials([(TokenScope.READ, SecretStr(READ_TOKEN))]).can_write
    assert parse_bearer(f"Bearer {READ_TOKEN}") == READ_TOKEN == parse_bearer(f"bearer   {READ_TOKEN} ")
    assert parse_bearer(f"Basic {READ_TOKEN}") is None and parse_bearer("Bearer") is None
    assert parse_bearer("Bearer a b") is None


def test_settings_read_comma_separated_secret_tokens() -> None:
    settings = ServingSettings.from_env(
        {"RECSYS_WRITE_TOKENS": f" {WRITE_TOKEN}, ,{FILE_WRITE_TOKEN}", "RECSYS_READ_TOKENS": READ_TOKEN,
         "RECSYS_READ_ACCESS": "token"}
    )
    assert [t.get_secret_value() for t in settings.write_tokens] == [WRITE_TOKEN, FILE_WRITE_TOKEN]
    assert WRITE_TOKEN not in repr(settings) and WRITE_TOKEN not in str(settings.model_dump())
    assert settings.read_access == "token" and settings.rate_limit_per_s == 1000 and settings.rate_limit_burst == 2000
    with pytest.raises(ValueError, match="read_access"):
        ServingSettings.from_env({"RECSYS_READ_ACCESS": "public"})
    with pytest.raises(TokenConfigError, match="RECSYS_WRITE_TOKENS: a token has 5 characters") as caught:
        TokenSource(ServingSettings.from_env({"RECSYS_WRITE_TOKENS": "hunter"[:5]}))
    assert "hunte" not in str(caught.value)


def test_access_policy_answers(caplog: pytest.LogCaptureFixture) -> None:
    closed = AccessPolicy(ServingSettings(read_tokens=[READ_TOKEN], write_tokens=[WRITE_TOKEN], read_access="token"))
    reader, _ = closed.identify(f"Bearer {READ_TOKEN}")
    writer, _ = closed.identify(f"Bearer {WRITE_TOKEN}")
    assert closed.authorize("recommend", "/recommend", reader) is None
    assert closed.authorize("recommend", "/recommend", writer) is None  # a write token also reads
    assert closed.authorize("events", "/events", writer) is None
    forbidden = closed.authorize("events", "/events", reader)
    assert forbidden is not None and forbidden.status == 403
    assert 'error="insufficient_scope"' in dict(forbidden.headers)["www-authenticate"]
    missing = closed.authorize("recommend", "/recommend", None)
    assert missing is not None and missing.status == 401
    assert dict(missing.headers)["www-authenticate"].startswith("Bearer")
    principal, invalid = closed.identify("Bearer not-a-configured-token")
    assert principal is None and invalid is not None and invalid.status == 401 and "not valid" in invalid.message

    open_reads = AccessPolicy(ServingSettings(write_tokens=[WRITE_TOKEN]))
    assert open_reads.authorize("recommend", "/recommend", None) is None
    with caplog.at_level(logging.WARNING, logger="recsys_serving.access"):
        nothing = AccessPolicy(ServingSettings())
    assert [r.getMessage() for r in caplog.records if "no write token" in r.getMessage()]
    refused = nothing.authorize("events", "/events", None)
    assert refused is not None and refused.status == 401 and "no write credential configured" in refused.message


def test_token_file_is_reread_when_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"read {READ_TOKEN}\n")
    clock = ManualClock()
    source = TokenSource(ServingSettings(api_tokens_file=path, write_tokens=[WRITE_TOKEN]), clock=clock)
    assert source.current().identify(READ_TOKEN) is not None and source.current().identify(FILE_WRITE_TOKEN) is None
    path.write_text(f"write {FILE_WRITE_TOKEN}\n")  # a rotated Secret
    clock.now += 6
    assert source.current().identify(READ_TOKEN) is None
    found = source.current().identify(FILE_WRITE_TOKEN)
    assert found is not None and found.scope is TokenScope.WRITE
    assert source.current().identify(WRITE_TOKEN) is not None  # the environment's tokens stay
    path.write_text("garbage line\n")  # a broken update keeps the tokens read before, and is logged once
    with caplog.at_level(logging.ERROR, logger="recsys_serving.access"):
        for _ in range(3):
            clock.now += 6
            assert source.current().identify(FILE_WRITE_TOKEN) is not None
        path.unlink()  # the file gone: also logged once
        for _ in range(3):
            clock.now += 6
            assert source.current().identify(FILE_WRITE_TOKEN) is not None
    assert [r.getMessage().split(": ", 1)[1][:40] for r in caplog.records] == [
        f"RECSYS_API_TOKENS_FILE {path} line 1"[:40], f"RECSYS_API_TOKENS_FILE {path} cannot be"[:40]
    ]
    path.write_text(f"read {READ_TOKEN}\n")  # repaired: read again
    clock.now += 6
    assert source.current().identify(READ_TOKEN) is not None and source.current().identify(FILE_WRITE_TOKEN) is None
    with pytest.raises(TokenConfigError, match="cannot be read"):
        TokenSource(ServingSettings(api_tokens_file=tmp_path / "missing"))


def test_rate_limiter_token_bucket_with_bounded_state() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate=10, burst=20, max_clients=3, clock=clock)
    assert all(limiter.acquire("a") == 0 for _ in range(20))  # the burst
    wait = limiter.acquire("a")
    assert wait == pytest.approx(0.1)
    refusal = limiter.refusal(wait)
    assert refusal.status == 429 and dict(refusal.headers)["retry-after"] == "1"
    assert dict(limiter.refusal(2.2).headers)["retry-after"] == "3"
    clock.now += 0.5  # 5 tokens back
    assert [limiter.acquire("a") == 0 for _ in range(6)] == [True] * 5 + [False]
    assert limiter.acquire("b") == 0  # another client has its own bucket
    for key in ("c", "d", "e"):
        limiter.acquire(key)
    assert len(limiter._buckets) == 3  # bounded: the least recently seen are dropped
    assert RateLimiter(rate=0, burst=1, max_clients=1).acquire("x") == 0  # 0 = off
    assert client_key(None, ("10.0.0.7", 5123)) == "ip:10.0.0.7" and client_key(None, None) == "ip:unknown"


def test_concurrency_caps() -> None:
    caps = ConcurrencyCaps({"recommend": 2, "events": 1})
    assert caps.try_enter("events") and not caps.try_enter("events")
    assert caps.try_enter("recommend") and caps.try_enter("recommend") and not caps.try_enter("recommend")
    caps.leave("events")
    assert caps.try_enter("events")
    shed = caps.refusal("events", "/events")
    assert shed.status == 503 and dict(shed.headers)["retry-after"] == "1"


def test_client_error_log_filter_makes_one_warning_line() -> None:
    from recsys_serving.service import ClientErrorLogFilter

    class Body(BaseModel):
        k: int

    try:
        Body.model_validate_json('{"k": "x", "evil\\nkey": 1}')
    except ValidationError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/recommend", "POST"),
                               exc_info)
    assert ClientErrorLogFilter().filter(record)
    line = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert line.startswith("WARNING POST /recommend -> 400: 1 validation error(s) for Body: k:") and "\n" not in line
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        server_error = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                         ("/recommend", "POST"), sys.exc_info())
    assert ClientErrorLogFilter().filter(server_error)
    assert server_error.levelno == logging.ERROR and server_error.exc_info is not None


# -- the real service ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("recsys_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HOME", str(home))
        build_serving_home(home, HISTORIES)
    tokens_file = home / "secrets" / "api-tokens"
    tokens_file.parent.mkdir()
    tokens_file.write_text(f"# scope token\nread {READ_TOKEN}\nwrite {FILE_WRITE_TOKEN}\n")
    redis = SilentServer()
    servers = {
        "guarded": Server("guarded", home, {
            "RECSYS_API_TOKENS_FILE": str(tokens_file),
            "RECSYS_READ_ACCESS": "token",
            "RECSYS_EVENTS_MAX_CONCURRENCY": "1",
            "RECSYS_FEAST_ONLINE_STORE": "redis",
            "RECSYS_REDIS_CONNECTION": f"127.0.0.1:{redis.port}",
            "RECSYS_FEATURE_TIMEOUT_MS": "3000",
        }, expect_ok=False),
        "bare": Server("bare", home, {
            "RECSYS_WRITE_TOKENS": "",
            "RECSYS_BUNDLE": str(home / "no-such-bundle"),
            "RECSYS_RATE_LIMIT_PER_S": "5",
            "RECSYS_RATE_LIMIT_BURST": "5",
        }, token=None),
    }
    try:
        deadline = time.monotonic() + 180
        for server in servers.values():
            server.wait_ready(deadline)
        yield {**servers, "home": home}
    finally:
        redis.close()  # first: the store reads in flight end, so the servers stop at once
        for server in servers.values():
            server.stop()


def _event_log_lines(home: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in (home / SERVED_EVENTS_DIR).glob("*.jsonl"))


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _event(user: str = "alice", item: str = "i9") -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "event_type": "view"}


def _sample(server: Server, name: str, **labels: str) -> float:
    return server.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples}


def test_writes_need_a_write_token(edge: dict[str, Any]) -> None:
    guarded, home = edge["guarded"], edge["home"]
    url = f"{guarded.url}/events"
    logged = _event_log_lines(home)
    for headers, status, needle in [
        ({}, 401, "needs an 'Authorization: Bearer <token>' header"),
        (_bearer("x" * 40), 401, "not valid"),
        ({"authorization": f"Basic {WRITE_TOKEN}"}, 401, "must be 'Bearer <token>'"),
        (_bearer(READ_TOKEN), 403, "may only read"),
    ]:
        resp = httpx.post(url, json=_event(), headers=headers, timeout=30)
        assert resp.status_code == status, resp.text
        assert resp.json() == {"error": resp.json()["error"]} and needle in resp.json()["error"]
        assert resp.headers["www-authenticate"].startswith('Bearer realm="recsys"')
    assert _event_log_lines(home) == logged, "a refused event must not reach the event log"

    for token in (WRITE_TOKEN, FILE_WRITE_TOKEN):  # the environment's and the token file's
        resp = httpx.post(url, json=_event(), headers=_bearer(token), timeout=30)
        assert resp.status_code == 200 and resp.json()["accepted"], resp.text
    assert _event_log_lines(home) == logged + 2
    assert _sample(guarded, "recsys_requests_refused_total", endpoint="events", reason="unauthenticated") >= 3
    assert _sample(guarded, "recsys_requests_refused_total", endpoint="events", reason="forbidden") >= 1
    text = guarded.log.read_text()
    assert all(token not in text for token in (WRITE_TOKEN, READ_TOKEN, FILE_WRITE_TOKEN))


def test_reads_need_a_token_when_configured(edge: dict[str, Any]) -> None:
    url = f"{edge['guarded'].url}/recommend"
    body = {"user_id": "x", "k": 3, "recent_items": ["i1", "i2"]}  # no store read
    anonymous = httpx.post(url, json=body, timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    for token in (READ_TOKEN, WRITE_TOKEN):  # a write token also reads
        resp = httpx.post(url, json=body, headers=_bearer(token), timeout=30)
        assert resp.status_code == 200 and [i["item_id"] for i in resp.json()["items"]][0] == "i3", resp.text
    # open reads (the bare server): no token needed, a bad one is still refused
    bare = f"{edge['bare'].url}/recommend"
    time.sleep(1.1)  # the bare server's rate limit of 5/s, shared with other tests of this module
    assert httpx.post(bare, json={"user_id": "x"}, timeout=30).status_code == 200
    assert httpx.post(bare, json={"user_id": "x"}, headers=_bearer("y" * 40), timeout=30).status_code == 401


def test_without_a_write_token_configured_writes_are_refused(edge: dict[str, Any]) -> None:
    bare, home = edge["bare"], edge["home"]
    logged = _event_log_lines(home)
    time.sleep(1.1)
    for headers in ({}, _bearer(WRITE_TOKEN)):
        resp = httpx.post(f"{bare.url}/events", json=_event(), headers=headers, timeout=30)
        assert resp.status_code == 401 and "no write credential configured" in resp.json()["error"], resp.text
    assert _event_log_lines(home) == logged
    warnings = [line for line in bare.log.read_text().splitlines() if "no write token is configured" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]


def test_rate_limit_answers_429_with_retry_after(edge: dict[str, Any]) -> None:
    url = f"{edge['bare'].url}/recommend"
    time.sleep(1.1)  # a full bucket
    with httpx.Client(timeout=30) as client:
        answers = [client.post(url, json={"user_id": "u", "k": 2}) for _ in range(15)]
        limited = [a for a in answers if a.status_code == 429]
        assert [a.status_code for a in answers[:5]] == [200] * 5 and len(limited) >= 8
        retry_after = int(limited[0].headers["retry-after"])
        assert retry_after >= 1 and "rate limit" in limited[0].json()["error"]
        time.sleep(retry_after)
        assert client.post(url, json={"user_id": "u", "k": 2}).status_code == 200
    assert _sample(edge["bare"], "recsys_requests_refused_total", endpoint="recommend", reason="rate_limited") >= 8


def test_event_cap_sheds_events_while_recommendations_answer(edge: dict[str, Any]) -> None:
    guarded = edge["guarded"]
    shed_before = _sample(guarded, "recsys_requests_refused_total", endpoint="events", reason="overloaded")

    def post_event(n: int) -> httpx.Response:
        # unknown users: every event reads the stalled store (up to its socket timeouts)
        return httpx.post(f"{guarded.url}/events", json=_event(f"flood-{n}"), headers=_bearer(WRITE_TOKEN), timeout=30)

    def recommend(n: int) -> httpx.Response:
        return httpx.post(f"{guarded.url}/recommend", json={"user_id": f"r{n}", "k": 2, "recent_items": ["i5"]},
                          headers=_bearer(READ_TOKEN), timeout=30)

    with ThreadPoolExecutor(max_workers=16) as pool:
        events = [pool.submit(post_event, n) for n in range(10)]
        time.sleep(0.2)
        recommendations = [pool.submit(recommend, n) for n in range(6)]
        events_done = [f.result() for f in events]
        recommended = [f.result() for f in recommendations]
    statuses = [r.status_code for r in events_done]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    shed = next(r for r in events_done if r.status_code == 503)
    assert int(shed.headers["retry-after"]) >= 1 and "in progress" in shed.json()["error"]
    assert [r.status_code for r in recommended] == [200] * 6
    assert _sample(guarded, "recsys_requests_refused_total", endpoint="events", reason="overloaded") >= shed_before + 1


def test_a_client_that_disconnects_cancels_its_handler(edge: dict[str, Any]) -> None:
    guarded = edge["guarded"]
    fallbacks = _sample(guarded, "recsys_requests_total", endpoint="recommend", outcome="fallback")
    waited = guarded.recommend(user_id="alice", k=3)  # the same request, waited for: answered
    assert waited["reason"] == "feature_store_unavailable"
    answered = _sample(guarded, "recsys_requests_total", endpoint="recommend", outcome="fallback")
    assert answered == fallbacks + 1
    before = _sample(guarded, "recsys_requests_cancelled_total", endpoint="recommend")
    body = json.dumps({"user_id": "alice", "k": 3}).encode()  # a store read: the stalled Redis
    request = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {READ_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", guarded.port)) as conn:
        conn.sendall(request)
        time.sleep(0.2)  # the handler waits for the store
    deadline = time.monotonic() + 10
    while _sample(guarded, "recsys_requests_cancelled_total", endpoint="recommend") < before + 1:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)
    time.sleep(2.5)  # past the store's socket timeouts: a handler still running would have answered by now
    assert _sample(guarded, "recsys_requests_total", endpoint="recommend", outcome="fallback") == answered


def test_unknown_paths_do_not_grow_metrics(edge: dict[str, Any]) -> None:
    import bentoml._internal.server as bentoml_server

    guarded = edge["guarded"]
    client = guarded.client
    static = sorted(p.name for p in (Path(bentoml_server.__file__).parent / "static_content").iterdir())[0]
    # known paths still route (and have their series before the first snapshot)
    assert client.get("/docs.json").status_code == 200
    assert client.get(f"/static_content/{static}").status_code == 200
    assert client.get("/recommend").status_code == 405
    before_text = client.get("/metrics").text
    before = _series(before_text)
    for n in range(300):
        junk = secrets.token_hex(6)
        path = [f"/{junk}", f"/static_content/{junk}.js", f"/recommend/{junk}", f"/a/{junk}/b"][n % 4]
        resp = client.post(path, json={}) if n % 2 else client.get(path)
        assert resp.status_code == 404 and resp.json() == {"error": resp.json()["error"]}
    after_text = client.get("/metrics").text
    after = _series(after_text)
    assert after == before, sorted(after - before)[:5]
    assert len(after_text) < len(before_text) + 2048
    assert _sample(guarded, "recsys_requests_refused_total", endpoint="other", reason="not_found") >= 300


def test_client_errors_are_one_log_line_each(edge: dict[str, Any]) -> None:
    guarded = edge["guarded"]
    lines_before = guarded.log.read_text().splitlines()
    bad = [
        b'{"user_id": "a", "k": 0}', b"{not json", b'{"user_id": "a", "colour": "red"}',
        b'{"user_id": "a", "evil\\nkey\\u0000": 1}', b"[1, 2]",
    ]
    with httpx.Client(base_url=guarded.url, headers=_bearer(WRITE_TOKEN), timeout=30) as client:
        for n in range(200):
            path = "/events" if n % 5 == 4 else "/recommend"
            resp = client.post(path, content=bad[n % len(bad)], headers={"content-type": "application/json"})
            assert resp.status_code == 400, resp.text
    time.sleep(0.5)
    new = guarded.log.read_text().splitlines()[len(lines_before):]
    assert len(new) <= 220, len(new)  # 200 and a few of the server's own (the stalled store)
    assert not [line for line in new if "Traceback" in line or "Exception on" in line]
    assert max(len(line) for line in new) < 600
    assert sum("-> 400" in line and "WARNING" in line for line in new) >= 190


def test_health_routing(edge: dict[str, Any]) -> None:
    for name in ("guarded", "bare"):
        client = edge[name].client
        assert client.get("/livez").status_code == 200
        for path in ("/healthz", "/readyz"):
            resp = client.get(path)
            body = resp.json()
            assert body["status"] in ("ok", "degraded", "unavailable")
            assert (resp.status_code == 200) == (body["status"] == "ok"), (name, path, resp.status_code, body["status"])
    bare = edge["bare"].client.get("/readyz")
    assert bare.status_code == 503 and bare.json()["status"] != "ok" and bare.json()["model_version"] is None
