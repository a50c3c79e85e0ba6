"""The sidecar's routes: one table that serves requests and describes them (``GET /openapi.json``).

Every route the sidecar answers is a :class:`Route` in :data:`ROUTES`, with its role and the JSON Schemas
of its parameters, body and answers; the router (:class:`Router`) and the OpenAPI document
(sidecar/_openapi.py) are both built from it, so neither can drift from the other. Handlers register
themselves by name with :func:`handler` in the module that implements them (sidecar/_server.py: the
flow path, metrics, the probes and this document; sidecar/_manage.py: the management API, runs included);
a route whose handler is registered nowhere answers 501 (tests/test_openapi.py asserts there is none).

Matching walks a trie of path segments: one dict look-up per segment, never a regular expression over
the path and never a backtrack, so a request costs time linear in its path. Parameter values are then
checked one by one against their schema (a bounded length first, then an anchored character class).

Roles (:class:`Roles`): ``public`` routes need no token; ``flow`` routes (the gateway's login path) take
the flow token or the admin token; ``admin`` routes (management) take the admin token only, and the flow
token gets 403; ``any`` (``/metrics``) takes either. Without an admin token (single-token mode) the flow
token may do everything, as before management existed; without any token only loopback peers are served.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from ..runner import TRIGGERS
from ..runner.hosting import MIN_SECRET_CHARS, SLUG_RE

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Reply = tuple[int, Any, list[tuple[bytes, bytes]]]   # status, JSON-able body or bytes (or None: empty), headers

ROLES = ("public", "flow", "admin", "any")
AUTHOR_HEADER = b"x-actionpool-author"
_AUTHOR = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?")   # 1-64 printable ASCII, no edge spaces
MAX_SEGMENTS = 16   # no route is deeper; a longer path is a 404 without being looked at further
MAX_QUERY_FIELDS = 64   # no route takes more than two
EVENT_FIELD = re.compile(r"^(event[^\s:]*)")   # the event field an event check's message names: the error's field


class HTTPError(Exception):
    """An answer other than success: status, ``{"error", "field"?}`` and extra headers."""

    def __init__(self, status: int, error: str, field: str | None = None,
                 headers: list[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, list(headers)
        self.public = False   # a 405 on a public path: no token needed to learn it


# ------------------------------------------------------------------ schemas


def _string(pattern: str, max_length: int, example: str, description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern, "maxLength": max_length, "example": example,
            "description": description}


PARAMS: dict[str, dict[str, Any]] = {
    "tenant": _string(SLUG_RE.pattern, 64, "acme", "tenant name"),
    "slug": _string(SLUG_RE.pattern, 64, "tag-tier", "action slug"),
    "trigger": {"type": "string", "enum": list(TRIGGERS), "example": "post-login", "description": "flow trigger"},
    "name": _string(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", 64, "API_KEY", "secret name"),
    "a": _string(r"^[0-9a-f]{16}$", 16, "0123456789abcdef", "version id"),
    "b": _string(r"^[0-9a-f]{16}$", 16, "fedcba9876543210", "version id"),
    "flow_id": _string(r"^[A-Za-z0-9_.:-]{1,200}$", 200, "5f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5",
                       "flow id of a recorded run"),
}

ERROR = {"type": "object", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {"type": "string"}, "field": {"type": "string"}}}
SOURCE_ERROR = {"type": "object", "required": ["error", "line", "column"],
                "properties": {"error": {"type": "string"}, "line": {"type": ["integer", "null"]},
                               "column": {"type": ["integer", "null"]}, "field": {"type": "string"}}}
INVALID = {"anyOf": [SOURCE_ERROR, ERROR], "description": "a source problem (line, column) or a field's"}
_STR_LIST = {"type": "array", "items": {"type": "string"}}
_SLUG = {"type": "string", "pattern": SLUG_RE.pattern}
_VERSION = {"type": "string", "pattern": r"^[0-9a-f]{16}$"}
_FAILURE = {"type": "string", "enum": ["open", "closed"]}
_ISO = {"type": "string"}
_TIME = {"oneOf": [{"type": "string"}, {"type": "number"}], "description": "ISO 8601 (UTC) or epoch seconds"}

TENANT_SETTINGS = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "denial_message": {"type": ["string", "null"], "description": "shown to the user on a denial"},
        "allow_hosts": {**_STR_LIST, "description": "hosts the tenant's actions may fetch"},
        "limits": {"type": "object", "description": "runner limits, each within the operator's [runner.limits]"},
        "redact": {**_STR_LIST, "description": "event paths replaced in run history"},
        "failure": {**_FAILURE, "description": "default failure policy of the tenant's actions"},
    },
    "example": {"denial_message": "Sign-in is not possible right now.", "allow_hosts": ["api.example.com"]},
}
TENANT = {"type": "object", "required": ["denial_message", "allow_hosts"],
          "properties": {**TENANT_SETTINGS["properties"], "name": {"type": "string"}, "version": {"type": "string"},
                         "updated_at": _TIME}}
TENANTS = {"type": "object", "required": ["tenants"],
           "properties": {"tenants": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                                "properties": {"name": {"type": "string"}}}}}}
ACTION_DEPLOY = {
    "type": "object", "required": ["source"], "additionalProperties": False,
    "properties": {
        "source": {"type": "string", "minLength": 1},
        "language": {"type": "string", "enum": ["python", "javascript"], "default": "python"},
        "secrets": {"type": "array", "items": PARAMS["name"] | {"example": "API_KEY"}, "uniqueItems": True},
        "failure": _FAILURE,
        "message": {"type": "string", "maxLength": 1000},
    },
    "example": {"source": "def on_execute_post_login(event, api):\n"
                          "    api.access_token.set_custom_claim('tier', 'gold')\n",
                "language": "python", "message": "gold tier"},
}
DEPLOYED = {"type": "object", "required": ["slug", "version"],
            "properties": {"slug": _SLUG, "version": _VERSION, "shadow": {"type": "boolean"},
                           "missing_secrets": _STR_LIST}}
ACTION = {"type": "object", "required": ["slug", "current", "versions", "history"],
          "properties": {"slug": _SLUG, "current": {"type": ["string", "null"]}, "shadow": {"type": ["string", "null"]},
                         "versions": {"type": "array", "items": {"type": "object", "required": ["version"]}},
                         "history": {"type": "array", "items": {"type": "object"}},
                         "shadow_disagreements": {"type": "array", "items": {"type": "object"}}}}
ROLLBACK = {"type": "object", "additionalProperties": False,
            "properties": {"version": {**_VERSION, "description": "a kept version; absent: the previous one"}}}
DIFF = {"type": "object", "required": ["diff", "exact"],
        "properties": {"diff": {"type": "string", "description": "unified diff of a -> b"},
                       "exact": {"type": "boolean", "description": "false: the changed middle was too large to "
                                                                    "match line by line and is shown whole"},
                       "slug": _SLUG, "a": _VERSION, "b": _VERSION}}
DRAFT_TEST = {"type": "object", "required": ["trigger"], "additionalProperties": False,
              "properties": {"trigger": {"type": "string", "enum": list(TRIGGERS)}, "event": {"type": "object"},
                             "source": {"type": "string", "description": "a draft; absent: the current version"},
                             "language": {"type": "string", "enum": ["python", "javascript"]}}}
FLOW_RESULT = {
    "type": "object",
    "required": ["outcome", "denial", "app_metadata", "user_metadata", "user_id", "claims", "state", "logs",
                 "actions", "flow_id", "tenant", "trigger", "duration_ms", "versions", "execution_id"],
    "properties": {
        "outcome": {"type": "string", "enum": ["allow", "deny"]},
        "denial": {"type": ["object", "null"]},
        "app_metadata": {"type": "object"}, "user_metadata": {"type": "object"},
        "user_id": {"type": ["string", "null"]},
        "claims": {"type": "object"}, "state": {"type": "object"},
        "logs": {"type": "array", "items": {"type": "object"}},
        "actions": {"type": "array", "items": {"type": "object", "required": ["slug", "status"]}},
        "flow_id": {"type": "string"}, "tenant": {"type": "string"}, "trigger": {"type": "string"},
        "duration_ms": {"type": "number"},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "execution_id": {"type": "string"},
    },
}
DRAFT_RESULT = {**FLOW_RESULT, "required": [*FLOW_RESULT["required"][:-1], "draft"],
                "properties": {**FLOW_RESULT["properties"], "draft": {"type": "boolean"}}}
FLOW_ENTRY = {"oneOf": [
    {**_SLUG, "description": "an action slug"},
    {"type": "object", "required": ["if", "deny"], "additionalProperties": False,
     "properties": {"if": {"type": "string"}, "deny": {"type": "string"}, "message": {"type": "string"}},
     "description": "deny when the CEL expression is true"},
    {"type": "object", "required": ["if", "allow"], "additionalProperties": False,
     "properties": {"if": {"type": "string"}, "allow": {"const": True}},
     "description": "end the flow allowed when true (the rest is skipped)"},
    {"type": "object", "required": ["if", "skip_to"], "additionalProperties": False,
     "properties": {"if": {"type": "string"}, "skip_to": _SLUG},
     "description": "jump forward to a later slug entry when true"},
]}
FLOW_DEF = {"type": "array", "items": FLOW_ENTRY,
            "example": ["check-country", {"if": "step['check-country'].blocked == true", "deny": "country-blocked"}]}
FLOW_PUT = {"oneOf": [FLOW_DEF, {"type": "object", "required": ["flow"], "additionalProperties": False,
                                 "properties": {"flow": FLOW_DEF, "message": {"type": "string", "maxLength": 1000}}}],
            "description": "the entries, or {\"flow\": entries, \"message\"}"}
FLOW = {"type": "object", "required": ["flow", "version"],
        "properties": {"flow": FLOW_DEF, "version": {"type": ["string", "null"]}}}
FLOW_VERSION = {"type": "object", "required": ["version"], "properties": {"version": _VERSION, "flow": FLOW_DEF}}
FLOW_VERSIONS = {"type": "object", "required": ["versions"],
                 "properties": {"versions": {"type": "array", "items": {
                     "type": "object", "required": ["version", "current"],
                     "properties": {"version": _VERSION, "at": _TIME, "author": {"type": "string"},
                                    "message": {"type": "string"}, "current": {"type": "boolean"}}}}}}
SECRET_VALUE = {"type": "object", "required": ["value"], "additionalProperties": False,
                "properties": {"value": {"type": "string", "minLength": MIN_SECRET_CHARS, "writeOnly": True}},
                "example": {"value": "sk_live_0123456789"}}
SECRETS = {"type": "array", "items": {"type": "object", "required": ["name", "updated_at"],
                                      "additionalProperties": False,   # names and times, never a value
                                      "properties": {"name": {"type": "string"}, "updated_at": _TIME}}}
AUDIT = {"type": "object", "required": ["entries"],
         "properties": {"entries": {"type": "array", "items": {
             "type": "object", "required": ["at", "who", "op", "kind", "key", "old", "new", "message"],
             "properties": {"at": _ISO, "who": {"type": "string"},
                            "op": {"type": "string", "enum": ["create", "update", "delete", "deploy", "rollback",
                                                              "shadow", "sync"]},
                            "kind": {"type": "string", "enum": ["tenant", "action", "flow", "secret"]},
                            "key": {"type": "string"}, "old": {"type": ["string", "null"]},
                            "new": {"type": ["string", "null"]}, "message": {"type": "string"}}}}}}
DRIFT = {"type": "object", "required": ["drift"],
         "properties": {"drift": {"type": "array", "items": {"type": "object"}}}}
RUN = {"type": "object", "required": ["flow_id", "tenant"], "properties": {"flow_id": {"type": "string"},
                                                                           "tenant": {"type": "string"}}}
STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
TEXT = {"text/plain": {"type": "string"}}
EMPTY = "empty"   # a response without a body (204)


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Route:
    """One method on one path: how it is served (handler, role) and described (schemas)."""

    method: str
    path: str                      # OpenAPI template: "/v1/tenants/{tenant}/actions/{slug}/rollback"
    handler: str                   # key in HANDLERS
    role: str                      # "public" | "flow" | "admin" | "any"
    summary: str
    body: dict[str, Any] | None = None          # JSON Schema of a JSON body (None: no JSON body)
    raw: tuple[str, ...] = ()                   # other accepted content types, as a string body
    body_required: bool = True
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    responses: dict[int, Any] = field(default_factory=dict)   # status -> JSON Schema, TEXT-like dict, or EMPTY

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(s[1:-1] for s in self.path.split("/") if s.startswith("{"))

    @property
    def operation_id(self) -> str:
        return self.handler

    def errors(self) -> dict[int, str]:
        """The error statuses this route may answer besides its documented successes, and why."""
        out: dict[int, str] = {}
        if self.params or self.body is not None or self.raw or self.query or self.role != "public":
            out[400] = "bad parameter, query, body or X-Actionpool-Author"
        if self.role != "public":
            out[401] = "missing or bad bearer token"
        if self.role == "admin":
            out[403] = "the flow token may not manage (an admin token is configured)"
        if "tenant" in self.params:
            out[404] = "unknown tenant, or an unknown object of it"
        if self.body is not None or self.raw:
            out[408] = "body not received within server.body_timeout_s"
            out[413] = "body or store bound exceeded"
        if self.role == "admin" and (self.body is not None or self.raw):
            out[429] = "this tenant's large sources already fill its places in the validation queue (Retry-After)"
        if self.role != "public":
            out[503] = "store unavailable, overloaded or draining (Retry-After)"
        return out


def _r(method: str, path: str, handler: str, role: str, summary: str, **kw: Any) -> Route:
    return Route(method, path, handler, role, summary, **kw)


T = "/v1/tenants/{tenant}"
ROUTES: tuple[Route, ...] = (
    _r("GET", "/healthz", "healthz", "public", "Liveness: the process answers", responses={200: STATUS}),
    _r("GET", "/readyz", "readyz", "public", "Readiness: serving flows (503 while starting or draining)",
       responses={200: STATUS, 503: STATUS}),
    _r("GET", "/openapi.json", "openapi", "public", "This document (OpenAPI 3.1)", responses={200: {"type": "object"}}),
    _r("GET", "/metrics", "metrics", "any", "Prometheus metrics", responses={200: TEXT}),
    # the gateway's login path
    _r("POST", f"{T}/flows/{{trigger}}", "flow_run", "flow", "Run the tenant's flow for a trigger",
       body={"type": "object", "description": "the event", "example": {"user": {"user_id": "u1"}}},
       responses={200: FLOW_RESULT}),
    # tenants
    _r("GET", "/v1/tenants", "tenants_list", "admin", "List tenants", responses={200: TENANTS}),
    _r("PUT", T, "tenant_put", "admin", "Create (201) or replace (200) a tenant's settings",
       body=TENANT_SETTINGS, responses={200: TENANT, 201: TENANT, 409: ERROR, 422: ERROR}),
    _r("GET", T, "tenant_get", "admin", "A tenant's settings", responses={200: TENANT}),
    _r("DELETE", T, "tenant_delete", "admin", "Delete a tenant: its flows stop, its workers, cache and history go",
       responses={204: EMPTY}),
    # actions
    _r("PUT", f"{T}/actions/{{slug}}", "action_put", "admin",
       "Deploy a version (validated: 422 with line and column); ?shadow=1 deploys a shadow version",
       body=ACTION_DEPLOY, raw=("text/x-python", "application/javascript"),
       query={"shadow": {"type": "string", "enum": ["0", "1", "true", "false"]},
              "message": {"type": "string", "maxLength": 1000,
                          "description": "with a raw body: the version's message"}},
       responses={201: DEPLOYED, 409: ERROR, 415: ERROR, 422: INVALID}),
    _r("GET", f"{T}/actions/{{slug}}", "action_get", "admin", "Versions, deploy history, shadow disagreements",
       responses={200: ACTION}),
    _r("GET", f"{T}/actions/{{slug}}/versions/{{a}}/diff/{{b}}", "action_diff", "admin",
       "Unified diff of two kept versions' sources", responses={200: DIFF}),
    _r("POST", f"{T}/actions/{{slug}}/rollback", "action_rollback", "admin",
       "Back to the previous version, or to a kept one", body=ROLLBACK, body_required=False,
       responses={200: DEPLOYED, 409: ERROR, 422: INVALID}),
    _r("POST", f"{T}/actions/{{slug}}/test", "action_test", "admin",
       "Run one action (a draft or the current version) on an event; nothing is deployed",
       body=DRAFT_TEST, responses={200: DRAFT_RESULT, 409: ERROR}),
    # flow definitions
    _r("PUT", f"{T}/flows/{{trigger}}", "flow_put", "admin", "Define the flow: ordered slugs and decision blocks",
       body=FLOW_PUT, responses={200: FLOW_VERSION, 409: ERROR, 422: ERROR}),
    _r("GET", f"{T}/flows/{{trigger}}", "flow_get", "admin", "The flow and its version", responses={200: FLOW}),
    _r("POST", f"{T}/flows/{{trigger}}/rollback", "flow_rollback", "admin",
       "Back to the previous flow version, or to a kept one", body=ROLLBACK, body_required=False,
       responses={200: FLOW_VERSION, 409: ERROR, 422: ERROR}),
    _r("GET", f"{T}/flows/{{trigger}}/versions", "flow_versions", "admin", "The kept versions of the flow",
       responses={200: FLOW_VERSIONS}),
    # secrets (write-only)
    _r("PUT", f"{T}/secrets/{{name}}", "secret_put", "admin", "Set a secret (never readable back)",
       body=SECRET_VALUE, responses={204: EMPTY, 409: ERROR, 422: ERROR}),
    _r("DELETE", f"{T}/secrets/{{name}}", "secret_delete", "admin", "Delete a secret", responses={204: EMPTY}),
    _r("GET", f"{T}/secrets", "secrets_list", "admin", "Secret names and update times, never values",
       responses={200: SECRETS}),
    # audit, history, drift
    _r("GET", f"{T}/audit", "audit_get", "admin", "The tenant's audit trail, newest first",
       query={"limit": {"type": "string", "pattern": r"^[0-9]{1,4}$", "example": "100",
                        "description": "newest entries to return, 1-1000 (default 100)"}}, responses={200: AUDIT}),
    _r("GET", f"{T}/runs/{{flow_id}}", "run_get", "admin", "One recorded run (redacted)", responses={200: RUN}),
    _r("GET", "/v1/drift", "drift_get", "admin", "Differences between the config file and the store",
       responses={200: DRIFT}),
)

HANDLERS: dict[str, Callable[[Any, "Request"], Awaitable[Reply]]] = {}


def handler(name: str) -> Callable[[Callable[..., Awaitable[Reply]]], Callable[..., Awaitable[Reply]]]:
    """Register ``fn(sidecar, request) -> Reply`` as the handler ``name`` (a method works: ``self`` is the sidecar)."""
    if name not in {r.handler for r in ROUTES}:
        raise ValueError(f"no route uses a handler named {name!r}")

    def register(fn: Callable[..., Awaitable[Reply]]) -> Callable[..., Awaitable[Reply]]:
        old = HANDLERS.get(name)
        if old is not None and old.__qualname__ != fn.__qualname__:   # a re-imported module is no conflict
            raise ValueError(f"handler {name!r} is registered twice ({old.__qualname__}, {fn.__qualname__})")
        HANDLERS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------ requests


@dataclass
class Request:
    """One matched request as a handler sees it; the body is read only when asked for (after auth)."""

    scope: Scope
    route: Route
    params: dict[str, str]
    query: dict[str, str]
    identity: str                 # "admin" | "flow" | "loopback"
    author: str                   # identity, or "<identity>:<X-Actionpool-Author>"
    _read: Callable[[], Awaitable[bytes]]
    _raw: bytes | None = None
    receive: Receive | None = None   # the ASGI receive, for handlers that stream (none do yet)

    @property
    def method(self) -> str:
        return self.scope["method"]

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.scope["headers"]:
            if k == name:
                return v
        return None

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        raw = self.header(b"content-type") or b""
        return raw.split(b";", 1)[0].strip().lower().decode("latin-1")

    async def body(self) -> bytes:
        """The whole body, bounded by server.max_body_bytes and server.body_timeout_s (read once)."""
        if self._raw is None:
            self._raw = await self._read()
        return self._raw

    async def json(self) -> Any:
        """The body as JSON; 400 naming ``body`` when it is not."""
        import orjson

        raw = await self.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}", "body") from None


def parse_query(scope: Scope) -> dict[str, str]:
    """The query string's parameters, last value wins (linear in its length)."""
    raw = scope.get("query_string", b"")
    if not raw:
        return {}
    try:
        parsed = parse_qs(raw.decode("latin-1"), max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HTTPError(400, f"more than {MAX_QUERY_FIELDS} query parameters", "query") from None
    return {k: v[-1] for k, v in parsed.items()}


# ------------------------------------------------------------------ matching


class _Node:
    __slots__ = ("static", "param", "routes")

    def __init__(self) -> None:
        self.static: dict[str, _Node] = {}
        self.param: tuple[str, _Node] | None = None
        self.routes: dict[str, Route] = {}


class Router:
    """Path templates in a trie of segments: a lookup is one step per segment, without backtracking."""

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self.root = _Node()
        self._checks = {name: _param_check(name, schema) for name, schema in PARAMS.items()}
        for r in routes:
            if r.role not in ROLES:
                raise ValueError(f"{r.method} {r.path}: unknown role {r.role!r}")
            node = self.root
            for seg in r.path.split("/")[1:]:
                if seg.startswith("{"):
                    name = seg[1:-1]
                    if name not in PARAMS:
                        raise ValueError(f"{r.path}: parameter {name!r} has no schema in PARAMS")
                    if node.static or (node.param is not None and node.param[0] != name):
                        raise ValueError(f"{r.path}: a parameter beside another segment would make matching ambiguous")
                    if node.param is None:
                        node.param = (name, _Node())
                    node = node.param[1]
                else:
                    if node.param is not None:
                        raise ValueError(f"{r.path}: a literal beside a parameter would make matching ambiguous")
                    node = node.static.setdefault(seg, _Node())
            if r.method in node.routes:
                raise ValueError(f"{r.method} {r.path} is in the table twice")
            node.routes[r.method] = r

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its raw parameters; HTTPError 404 (no such path) or 405 (with ``Allow``)."""
        node: _Node | None = self.root
        params: dict[str, str] = {}
        if not path.startswith("/") or path.count("/") > MAX_SEGMENTS:
            raise HTTPError(404, "no such route")
        for seg in path.split("/")[1:]:
            nxt = node.static.get(seg)
            if nxt is None and node.param is not None and seg:
                params[node.param[0]] = seg
                nxt = node.param[1]
            if nxt is None:
                raise HTTPError(404, "no such route")
            node = nxt
        if not node.routes:
            raise HTTPError(404, "no such route")
        route = node.routes.get(method)
        if route is None:
            allow = ", ".join(sorted(node.routes))
            exc = HTTPError(405, f"{method} is not served here; use {allow}", headers=[(b"allow", allow.encode())])
            exc.public = all(r.role == "public" for r in node.routes.values())   # answered without a token
            raise exc
        return route, params

    def check_params(self, params: dict[str, str]) -> None:
        """Each parameter against its schema: 400 naming it."""
        for name, value in params.items():
            problem = self._checks[name](value)
            if problem is not None:
                raise HTTPError(400, f"{name} {problem}", name)


def _param_check(name: str, schema: dict[str, Any]) -> Callable[[str], str | None]:
    if "enum" in schema:
        allowed = frozenset(schema["enum"])
        listing = ", ".join(schema["enum"])

        def check_enum(value: str) -> str | None:
            return None if value in allowed else f"{value[:80]!r} is not one of: {listing}"

        return check_enum
    pattern, longest = re.compile(schema["pattern"]), schema["maxLength"]

    def check_pattern(value: str) -> str | None:
        if len(value) > longest or pattern.fullmatch(value) is None:   # length first: the match is bounded
            return f"must match {schema['pattern']} (at most {longest} characters)"
        return None

    return check_pattern


# ------------------------------------------------------------------ roles


class Roles:
    """Who a request is (``admin``, ``flow`` or ``loopback``) and what that may call."""

    def __init__(self, flow_token: str | None, admin_token: str | None, loopback: Callable[[str], bool]) -> None:
        if admin_token is not None and flow_token is None:
            raise ValueError("an admin token needs a flow token")
        self.flow = flow_token.encode() if flow_token else None
        self.admin = admin_token.encode() if admin_token else None
        self._loopback = loopback

    @property
    def single_token(self) -> bool:
        """The flow token also manages (no admin token configured)."""
        return self.flow is not None and self.admin is None

    def identify(self, scope: Scope) -> str:
        """The caller's identity from its bearer token; 401 (before any body is read) when there is none."""
        if self.flow is None:
            client = scope.get("client")
            if client is not None and not self._loopback(client[0]):
                raise HTTPError(401, "no token configured: only loopback peers are served")
            return "loopback"
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    break
                token = token.strip()
                # Both compared, in constant time, whichever matches: the time taken tells nothing.
                is_flow = hmac.compare_digest(token, self.flow)
                is_admin = self.admin is not None and hmac.compare_digest(token, self.admin)
                if is_admin:
                    return "admin"
                if is_flow:
                    return "flow"
                break
        raise HTTPError(401, "missing or bad bearer token", headers=[(b"www-authenticate", b"Bearer")])

    def permit(self, route: Route, identity: str) -> None:
        """403 when the flow token calls a management route while an admin token is configured."""
        if route.role == "admin" and identity == "flow" and self.admin is not None:
            raise HTTPError(403, f"this token may not manage: {route.method} {route.path} needs the admin token "
                                 "(server.admin_token_env)")


def author_of(scope: Scope, identity: str) -> str:
    """``identity``, or ``identity:name`` from a valid ``X-Actionpool-Author`` (400 when invalid)."""
    for name, value in scope["headers"]:
        if name == AUTHOR_HEADER:
            text = value.decode("latin-1")
            if _AUTHOR.fullmatch(text) is None:
                raise HTTPError(400, "X-Actionpool-Author must be 1-64 printable ASCII characters",
                                "X-Actionpool-Author")
            return f"{identity}:{text}"
    return identity


__all__ = ["AUTHOR_HEADER", "HANDLERS", "HTTPError", "PARAMS", "ROUTES", "Reply", "Request", "Roles", "Route",
           "Router", "author_of", "handler", "parse_query"]
