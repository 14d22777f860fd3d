"""The OpenAPI document served at GET /docs.json (and read by the Swagger UI at /).

BentoML 1.4 generates one (`Service.openapi_spec`), but for this service it is wrong in ways a client
would trust: it flattens `anyOf [X, null]` into X in the inline request and response schemas (so
`model_version` and `sequence_length` look never null), declares a string `detail` for 400 where
BentoML returns pydantic's list of errors, and lists none of the statuses the edge answers (401, 403,
413, 415, 429, 503) nor the health body. `build_document` keeps BentoML's title, tags, operation ids
and descriptions and replaces the rest: schemas straight from the pydantic models of `schemas.py`
(request and response models read from the API methods' annotations), the error statuses of each
route with their bodies and headers, and the bearer security scheme. `OpenApiDocument` serves it,
built once per worker process.
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from recsys_serving.schemas import ErrorBody, Health, ValidationErrorBody
from recsys_serving.settings import ServingSettings

# 3.1's schema dialect is JSON Schema 2020-12, what pydantic emits: nullable fields stay
# `anyOf [X, {"type": "null"}]` as they are, with no translation to 3.0's `nullable`.
OPENAPI_VERSION = "3.1.0"
DOCUMENT_PATH = "/docs.json"
REF_TEMPLATE = "#/components/schemas/{model}"
BEARER = "bearerAuth"
JSON = "application/json"
PLAIN_TEXT = "text/plain"
WRITE_ROUTES = frozenset({"/events"})

RETRY_AFTER = {
    "description": "seconds to wait before trying again",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
# BentoML's own cap (traffic.max_concurrency, outside the edge) answers its 429 without the header.
RATE_LIMIT_RETRY_AFTER = {
    **RETRY_AFTER,
    "required": False,
    "description": "seconds to wait before trying again; sent by the per-client rate limit, not by BentoML's "
    "per-service concurrency cap ({\"error\": \"Too many requests\"})",
}
WWW_AUTHENTICATE = {
    "description": "the scheme to authenticate with (RFC 6750)",
    "required": True,
    "schema": {"type": "string", "pattern": "^Bearer"},
}

DESCRIPTION = """Next-item recommendations (BERT4Rec) and the event feed that keeps them fresh.

Errors: a 400 (the body is not valid JSON, or does not fit the request schema) has the body
`{"error": str, "detail": [{"type", "loc", "msg", "url"}]}` (pydantic's errors, as BentoML returns them);
every other error status the service answers has `{"error": str}`. The rate limit's 429 and every 503
(load shedding, event log unwritable) carry `Retry-After`. `POST /events` needs `Authorization: Bearer <write token>`; `POST
/recommend` needs a read or write token only where the service is configured so (`RECSYS_READ_ACCESS=token`),
and an invalid token is refused (401) either way. A path no route serves answers 404 with `{"error": str}`;
a wrong method on a route answers 405, `text/plain`, with `Allow` (BentoML's router).
"""


def _json_response(description: str, schema: dict[str, Any], **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {name.replace("_", "-"): header for name, header in headers.items()}
    return response


def _plain_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PLAIN_TEXT: {"schema": {"type": "string"}}}}


def _api_models(func: Any) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request and response models of an API method, from its annotations (service.py's)."""
    hints = typing.get_type_hints(func)
    (request,) = [hints[name] for name in inspect.signature(func).parameters if name in hints]
    return request, hints["return"]


def _api_responses(route: str, answer: dict[str, Any], refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    writes = route in WRITE_ROUTES
    error = refs[ErrorBody]
    responses = {
        "200": _json_response("the answer", answer),
        "400": _json_response(
            "the body is not valid JSON or does not fit the request schema", refs[ValidationErrorBody]
        ),
        "401": _json_response(
            "an Authorization header that is not a valid bearer token; on a route that needs one: no header, "
            "or no token configured for the route",
            error,
            WWW_Authenticate=WWW_AUTHENTICATE,
        ),
        "403": _json_response(
            "a valid token that may not write (a read token)", error, WWW_Authenticate=WWW_AUTHENTICATE
        ),
        "409": _json_response("the request's target is not the one the served model predicts", error),
        "413": _json_response("the body exceeds RECSYS_MAX_BODY_BYTES", error),
        "415": _json_response("a content type other than application/json", error),
        "429": _json_response(
            "over the client's rate limit, or over BentoML's per-service concurrency cap",
            error,
            Retry_After=RATE_LIMIT_RETRY_AFTER,
        ),
        "500": _json_response("an unexpected error (a bug; the server log has the detail)", error),
        "503": _json_response(
            "over the route's concurrency cap (load shedding)"
            + (", or the event log cannot take the event (unwritable, or its queue is full)" if writes else ""),
            error,
            Retry_After=RETRY_AFTER,
        ),
        "504": _json_response("not answered within BentoML's traffic timeout", error),
    }
    if not writes:
        del responses["403"]
    else:
        del responses["409"]
    return responses


HEALTH_DESCRIPTIONS = {
    "/healthz": "This worker's view of the model and its dependencies; 200 iff status is ok.",
    "/readyz": "Readiness: the body of /healthz, 200 iff status is ok (a worker that can only answer "
    "fallbacks leaves the rotation while others serve the model).",
}


def build_document(service: Any, settings: ServingSettings) -> dict[str, Any]:
    """The corrected OpenAPI document of `service` (the BentoML service of service.py)."""
    generated = service.openapi_spec.asdict()
    reads_need_token = settings.read_access == "token"
    api_models = {api.route: _api_models(api.func) for api in service.apis.values()}

    keys: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (ErrorBody, "serialization"), (ValidationErrorBody, "serialization"), (Health, "serialization")
    ]
    for request, response in api_models.values():
        keys += [(request, "validation"), (response, "serialization")]
    refs, definitions = models_json_schema(keys, ref_template=REF_TEMPLATE)
    outputs = {model: ref for (model, mode), ref in refs.items() if mode == "serialization"}

    paths: dict[str, Any] = {}
    for route, (request, response) in api_models.items():
        operation = {key: value for key, value in generated["paths"][route]["post"].items() if key != "responses"}
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": refs[(request, "validation")]}}}
        operation["responses"] = _api_responses(route, outputs[response], outputs)
        # `{}`: no credential is also accepted
        operation["security"] = [{BEARER: []}] if route in WRITE_ROUTES or reads_need_token else [{}, {BEARER: []}]
        paths[route] = {"post": operation}

    infra = generated["paths"]
    health = {
        "200": _json_response("status ok", outputs[Health]),
        "503": _json_response("status degraded or unavailable (`dependencies` says what is down)", outputs[Health]),
    }
    for route, description in HEALTH_DESCRIPTIONS.items():
        paths[route] = {"get": {**infra[route]["get"], "description": description, "responses": health}}
    paths["/livez"] = {"get": {**infra["/livez"]["get"], "responses": {"200": _plain_response("the process is alive")}}}
    paths["/metrics"] = {
        "get": {**infra["/metrics"]["get"], "responses": {"200": _plain_response("Prometheus text exposition")}}
    }

    return {
        "openapi": OPENAPI_VERSION,
        "info": {**generated["info"], "description": DESCRIPTION},
        "servers": generated["servers"],
        "tags": generated["tags"],
        "paths": paths,
        "components": {
            "schemas": definitions["$defs"],
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of RECSYS_WRITE_TOKENS, RECSYS_READ_TOKENS or RECSYS_API_TOKENS_FILE",
                }
            },
        },
    }


class OpenApiDocument:
    """ASGI middleware answering GET /docs.json with `build_document`; everything else passes through.

    BentoML registers its own /docs.json route with the generated document; a middleware runs before
    routing, so this one answers first."""

    def __init__(self, app: Any, service: Any, settings: ServingSettings) -> None:
        self.app = app
        self.body = json.dumps(build_document(service, settings)).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != DOCUMENT_PATH or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body if scope["method"] == "GET" else b""})
