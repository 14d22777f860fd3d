"""The OpenAPI document the service publishes (GET /docs.json) is what it does.

schemathesis loads the live document of a healthy server (trained tiny model, Feast SQLite store)
and of a degraded one (no bundle, Redis unreachable: `model_version` and `sequence_length` are null,
health is 503) and sends generated requests, valid and invalid, to every operation: no 5xx, and every
status, content type, header and body as documented. It runs as the CLI an outside tester uses
(`schemathesis run`): schemathesis' pytest loader for live schemas (`schemathesis.pytest.from_fixture`)
sets `Node._nodeid`, which pytest 9.2 no longer has. The statuses fuzzing does not reach (invalid
JSON, a foreign content type, an oversized body, missing, invalid and read-only tokens, the rate
limit of a third, strict server) are sent by hand and checked against the same document by the
same checks.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import schemathesis

from _service_harness import WRITE_TOKEN, Server, build_serving_home, free_port

HISTORIES = {"alice": [3, 4, 5], "carol": [10, 11]}
READ_TOKEN = "openapi-fuzz-read-token"
# schemathesis.toml of the run (https://schemathesis.readthedocs.io/en/stable/reference/configuration/)
FUZZ_CONFIG = """
base-url = "{url}"
headers = {{ Authorization = "Bearer {token}" }}

[generation]
max-examples = 60
deterministic = true

[phases.examples]
enabled = false  # the document has no examples
[phases.stateful]
enabled = false  # no links between the operations

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
response_headers_conformance.enabled = true

# A degraded worker's health answers the documented 503 (readiness), which is not a fault.
[[operations]]
include-path-regex = "^/(healthz|readyz)$"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    home = tmp_path_factory.mktemp("recsys_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_HOME", str(home))
        build_serving_home(home, HISTORIES)
    # every server has the harness' write token, which its client sends
    servers = {
        "main": Server("fuzz-main", home, {}),
        "degraded": Server("fuzz-degraded", home, {
            "RECSYS_BUNDLE": str(home / "bundles" / "missing"),
            "RECSYS_FEAST_ONLINE_STORE": "redis",
            "RECSYS_REDIS_CONNECTION": f"127.0.0.1:{free_port()}",
        }),
        # reads need a token, and one request per second per client
        "strict": Server("fuzz-strict", home, {
            "RECSYS_READ_TOKENS": READ_TOKEN, "RECSYS_READ_ACCESS": "token",
            "RECSYS_RATE_LIMIT_PER_S": "1", "RECSYS_RATE_LIMIT_BURST": "1",
        }),
    }
    try:
        deadline = time.monotonic() + 180
        for server in servers.values():
            server.wait_ready(deadline)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def fuzz_config(server: Server) -> str:
    return FUZZ_CONFIG.format(url=server.url, token=WRITE_TOKEN)


@pytest.mark.parametrize("name", ["main", "degraded"])
def test_the_live_service_does_what_its_document_says(servers: dict[str, Server], name: str, tmp_path: Path) -> None:
    server = servers[name]
    config = tmp_path / "schemathesis.toml"
    config.write_text(fuzz_config(server))
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
               "run", f"{server.url}/docs.json"]
    # in its own directory: schemathesis' example database and cache land there, not in the repository
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-15000:]}\n{run.stderr[-3000:]}"
    assert "No issues found" in run.stdout


def _document(server: Server) -> dict[str, Any]:
    response = server.client.get("/docs.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def test_the_document_declares_what_the_tester_found_missing(servers: dict[str, Server]) -> None:
    document = _document(servers["main"])
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]
    null = {"type": "null"}
    assert null in schemas["RecommendResponse"]["properties"]["model_version"]["anyOf"]
    assert null in schemas["EventResponse"]["properties"]["sequence_length"]["anyOf"]
    assert schemas["ValidationErrorBody"]["properties"]["detail"]["type"] == "array"
    assert schemas["ErrorBody"]["required"] == ["error"]

    paths = document["paths"]
    recommend, events = paths["/recommend"]["post"], paths["/events"]["post"]
    api_statuses = {"200", "400", "401", "413", "415", "429", "500", "503", "504"}
    # 401: an invalid token, even where reads are open; 409: a target the served model does not predict
    assert set(recommend["responses"]) == api_statuses | {"409"}
    assert set(events["responses"]) == api_statuses | {"403"}
    for operation in (recommend, events):
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
        assert operation["responses"]["503"]["headers"]["Retry-After"]["required"] is True
        assert "Retry-After" in operation["responses"]["429"]["headers"]  # not from BentoML's own cap
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert events["security"] == [{"bearerAuth": []}]
    assert recommend["security"] == [{}, {"bearerAuth": []}]  # open reads: a token is optional
    strict = _document(servers["strict"])["paths"]["/recommend"]["post"]
    assert strict["security"] == [{"bearerAuth": []}]
    for route in ("/healthz", "/readyz"):
        responses = paths[route]["get"]["responses"]
        assert set(responses) == {"200", "503"}
        assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
                   for r in responses.values())


def _checked(live: Any, route: str, response: httpx.Response) -> httpx.Response:
    """`response` validated against the live document by the fuzz checks, as if schemathesis had sent it."""
    live[route]["POST"].Case().validate_response(response)
    return response


def _live(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/docs.json",
                                         config=schemathesis.Config.from_str(fuzz_config(server)))


@pytest.mark.parametrize("name", ["main", "degraded"])
def test_error_statuses_have_their_documented_bodies(servers: dict[str, Server], name: str) -> None:
    server = servers[name]
    live, post = _live(server), server.client.post  # the client sends the write token
    event = {"user_id": "u", "item_id": "i3", "event_type": "view"}

    # the tester's finding: degraded answers have null fields, which the document now allows
    answer = _checked(live, "/recommend", post("/recommend", json={"user_id": "alice"})).json()
    receipt = _checked(live, "/events", post("/events", json=event)).json()
    degraded = name == "degraded"
    assert (answer["model_version"] is None, receipt["sequence_length"] is None) == (degraded, degraded)
    assert answer["target"] == (None if degraded else "next_item")
    other = _checked(live, "/recommend", post("/recommend", json={"user_id": "alice", "target": "next_purchase"}))
    if degraded:  # no model loaded: nothing to disagree with, popularity (none here) answers
        assert other.status_code == 200
    else:
        assert other.status_code == 409 and "predicts next_item, not next_purchase" in other.json()["error"]
        same = post("/recommend", json={"user_id": "alice", "target": "next_item"})
        assert same.status_code == 200 and same.json()["target"] == "next_item"

    invalid_json = _checked(live, "/recommend", post("/recommend", content=b'{"user_id": ',
                                                     headers={"content-type": "application/json"}))
    assert invalid_json.status_code == 400 and invalid_json.json()["detail"][0]["type"] == "json_invalid"
    invalid = _checked(live, "/events", post("/events", json={"user_id": "u", "event_type": "like"}))
    assert invalid.status_code == 400
    assert {tuple(issue["loc"]) for issue in invalid.json()["detail"]} == {("item_id",), ("event_type",)}
    form = _checked(live, "/recommend", post("/recommend", content=b"user_id=u",
                                             headers={"content-type": "application/x-www-form-urlencoded"}))
    assert form.status_code == 415
    oversized = _checked(live, "/events", post("/events", json=[1] * 40_000))
    assert oversized.status_code == 413

    with httpx.Client(base_url=server.url) as anonymous:
        missing = _checked(live, "/events", anonymous.post("/events", json=event))
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        bad = {"Authorization": "Bearer not-a-token-of-this-service"}
        for route, body in (("/events", event), ("/recommend", {"user_id": "alice"})):
            assert _checked(live, route, anonymous.post(route, json=body, headers=bad)).status_code == 401

    # a wrong method is BentoML's router's answer, a wrong path the edge's (the document's description)
    wrong_method = server.client.get("/recommend")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    not_found = server.client.get("/no-such-route")
    assert not_found.status_code == 404 and set(not_found.json()) == {"error"}


def test_access_refusals_have_their_documented_bodies(servers: dict[str, Server]) -> None:
    """Reads that need a token, a read token on a write route, and the rate limit (1/s, burst 1):
    the limiter counts per client (the token's identity, else the address) before the credential."""
    server = servers["strict"]
    live = _live(server)
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    with httpx.Client(base_url=server.url) as client:
        anonymous = _checked(live, "/recommend", client.post("/recommend", json={"user_id": "alice"}))
        assert anonymous.status_code == 401
        event = {"user_id": "alice", "item_id": "i3", "event_type": "view"}
        forbidden = _checked(live, "/events", client.post("/events", json=event, headers=read))
        assert forbidden.status_code == 403
        limited = _checked(live, "/recommend", client.post("/recommend", json={"user_id": "alice"}, headers=read))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
