"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the route table (sidecar/_routes.py).

Built once per process and served as cached bytes: the table is fixed at import, so the document
cannot differ from what the router serves. Its security schemes say which token each route takes
(``flowToken`` and ``adminToken``, both HTTP bearer); error answers share one ``Error`` schema.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from ._routes import EMPTY, ERROR, PARAMS, ROUTES, Route

STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad request", 401: "Unauthorized",
               403: "Forbidden", 404: "Not found", 408: "Request timeout", 409: "Conflict", 413: "Too large",
               422: "Invalid", 501: "Not implemented", 503: "Unavailable"}
_SECURITY = {
    "flow": [{"flowToken": []}, {"adminToken": []}],
    "any": [{"flowToken": []}, {"adminToken": []}],
    "admin": [{"adminToken": []}],
    "public": [],
}


def _content(schema: Any) -> dict[str, Any] | None:
    if schema is EMPTY or schema == EMPTY:
        return None
    if isinstance(schema, dict) and set(schema) and all("/" in k for k in schema):   # {"text/plain": {...}}
        return {ctype: {"schema": s} for ctype, s in schema.items()}
    return {"application/json": {"schema": schema}}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "tags": ["public" if route.role == "public" else
                                   "flows" if route.role == "flow" else "management" if route.role == "admin"
                                   else "operations"],
                          "security": _SECURITY[route.role]}
    params: list[dict[str, Any]] = []
    for name in route.params:
        schema = dict(PARAMS[name])
        example = schema.pop("example", None)
        description = schema.pop("description", name)
        p = {"name": name, "in": "path", "required": True, "description": description, "schema": schema}
        if example is not None:
            p["example"] = example
        params.append(p)
    for name, schema in route.query.items():
        schema = dict(schema)
        example = schema.pop("example", None)
        q = {"name": name, "in": "query", "required": False, "schema": schema}
        if example is not None:
            q["example"] = example
        params.append(q)
    if route.role != "public":
        params.append({"name": "X-Actionpool-Author", "in": "header", "required": False,
                       "description": "who makes the change (1-64 printable ASCII); recorded as <identity>:<name>",
                       "schema": {"type": "string", "pattern": r"^[\x21-\x7e]([\x20-\x7e]{0,62}[\x21-\x7e])?$"}})
    if params:
        op["parameters"] = params
    if route.body is not None or route.raw:
        content: dict[str, Any] = {}
        if route.body is not None:
            content["application/json"] = {"schema": route.body}
        for ctype in route.raw:
            content[ctype] = {"schema": {"type": "string", "minLength": 1}}
        op["requestBody"] = {"required": route.body_required, "content": content}
    responses: dict[str, Any] = {}
    for status, schema in sorted(route.responses.items()):
        r: dict[str, Any] = {"description": STATUS_TEXT.get(status, str(status))}
        content = _content(schema)
        if content is not None:
            r["content"] = content
        responses[str(status)] = r
    for status, why in sorted(route.errors().items()):
        if str(status) not in responses:
            error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            responses[str(status)] = {"description": why, "content": error}
    op["responses"] = responses
    return op


def document(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in the table."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "actionpool sidecar", "version": version,
                 "description": "The HTTP face of actionpool: the gateway's flow path and the management API. "
                                "Flow routes take the flow token or the admin token; management routes take the "
                                "admin token (or, in single-token mode, the flow token). docs/gateway.md."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "flowToken": {"type": "http", "scheme": "bearer",
                              "description": "the flow token ([server] token_env): the gateway's login path"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "the admin token ([server] admin_token_env): management"},
            },
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as JSON bytes, built once."""
    try:
        from importlib.metadata import version

        v = version("actionpool")
    except Exception:  # not installed (a source checkout): the document still serves
        v = "0.1.0"
    return orjson.dumps(document(v))


__all__ = ["document", "document_bytes"]
