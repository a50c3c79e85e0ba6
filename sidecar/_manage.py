"""The management API's handlers: tenants, actions, flows, secrets, audit and drift (docs/gateway.md).

Every handler is registered by name with ``@handler`` (sidecar/_routes.py holds the route table, roles
and OpenAPI schemas) and answers ``(status, body, headers)``. Every write goes to the store, which
replicates it to all replicas within a second and appends it to the tenant's audit trail; this module
validates first, so a bad deploy or flow answers 422 and nothing changes. Secret values are write-only:
no answer, log line or error message here ever holds one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ..runner import TRIGGERS, ActionError
from ..runner.hosting import (
    MIN_SECRET_CHARS,
    SLUG_RE,
    FlowProblem,
    ValidationBusy,
    flow_problem_async,
    flow_redactor,
    validate_source_async,
)
from ._config import FAILURE_POLICIES, LANGUAGES, SECRET_NAME_RE
from ._diff import unified
from ._routes import EVENT_FIELD as _FIELD
from ._routes import HTTPError, Request, handler
from ._store import (
    NothingToRollBack,
    SecretsUnavailable,
    StoreFull,
    UnknownVersion,
    Version,
)
from ._tenancy import SettingsError, Tenant, validate_settings

if TYPE_CHECKING:   # sidecar/_server.py imports this module (its handlers register on import): no cycle
    from ._server import Sidecar

Reply = tuple[int, Any, list[tuple[bytes, bytes]]]

MAX_SECRET_CHARS = 4096
MAX_MESSAGE_CHARS = 1000
MAX_DECLARED_SECRETS = 64
RAW_LANGUAGES = {"text/x-python": "python", "text/python": "python", "application/x-python": "python",
                 "application/javascript": "javascript", "text/javascript": "javascript",
                 "application/x-javascript": "javascript"}
# Raw bodies whose type says nothing of the language: the slug's own language, else Python.
RAW_UNTYPED = frozenset({"text/plain", "application/octet-stream"})


def _busy(exc: ValidationBusy) -> HTTPError:
    """The validation queue is full (runner/_validate.py): 429 for this tenant's own cap, 503 for everyone's."""
    return HTTPError(429 if exc.scope == "tenant" else 503, str(exc), "source",
                     [(b"retry-after", str(exc.retry_after_s).encode())])


def _who(req: Request) -> str:
    """The author recorded with a version and as the audit's ``who`` (identity, or ``admin:<header>``)."""
    return getattr(req, "author", "") or req.identity


def _content_type(req: Request) -> str:
    return req.content_type


async def _json(req: Request) -> Any:
    return await req.json()


async def _body(req: Request) -> bytes:
    return await req.body()


def _slug(req: Request) -> str:
    slug = req.params["slug"]
    if not SLUG_RE.match(slug):
        raise HTTPError(400, f"action slugs must match {SLUG_RE.pattern}", "slug")
    return slug


def _trigger(req: Request) -> str:
    trigger = req.params["trigger"]
    if trigger not in TRIGGERS:
        raise HTTPError(400, f"unknown trigger {trigger[:64]!r}; expected one of {', '.join(TRIGGERS)}", "trigger")
    return trigger


def _message(req: Request, body: Any = None) -> str:
    msg = body.get("message", "") if isinstance(body, dict) else ""
    if msg is None:
        msg = ""
    if type(msg) is not str or len(msg) > MAX_MESSAGE_CHARS:
        raise HTTPError(400, f"message must be a string of at most {MAX_MESSAGE_CHARS} characters", "message")
    return msg


def _full(exc: StoreFull, field: str) -> HTTPError:
    return HTTPError(413, str(exc), field)


# ------------------------------------------------------------------ tenants


@handler("tenants_list")
async def tenants_list(app: Sidecar, req: Request) -> Reply:
    out = [{"name": r.name, "version": r.version, "updated_at": _iso(r.updated_at)}
           for r in sorted(app.store.tenants().values(), key=lambda r: r.name)]
    return 200, {"tenants": out}, []


def _tenant_body(rec: Any) -> dict[str, Any]:
    return {"tenant": rec.name, **rec.settings, "version": rec.version, "updated_at": _iso(rec.updated_at)}


@handler("tenant_put")
async def tenant_put(app: Sidecar, req: Request) -> Reply:
    name = req.params["tenant"]
    if not SLUG_RE.match(name):
        raise HTTPError(400, f"tenant names must match {SLUG_RE.pattern}", "tenant")
    try:
        raw = await _body(req)   # no body: every setting at its default
        settings = validate_settings(await _json(req) if raw.strip() else {}, app.config.runner.limits)
    except SettingsError as exc:
        raise HTTPError(422, str(exc), exc.field) from None
    try:
        created, rec = await app.store.put_tenant(name, settings, author=_who(req))
    except StoreFull as exc:
        raise _full(exc, "tenant") from None
    app._tenant_views.pop(name, None)
    app._apply_policy(name)   # this replica at once; the others from on_change
    return (201 if created else 200), _tenant_body(rec), []


@handler("tenant_get")
async def tenant_get(app: Sidecar, req: Request) -> Reply:
    app.tenant(req.params["tenant"])
    return 200, _tenant_body(app.store.tenant(req.params["tenant"])), []


@handler("tenant_delete")
async def tenant_delete(app: Sidecar, req: Request) -> Reply:
    name = req.params["tenant"]
    app.tenant(name)
    if not await app.store.delete_tenant(name, author=_who(req)):
        raise HTTPError(404, f"unknown tenant {name[:64]!r}", "tenant")
    # on_change already dropped its views and caches (sidecar/_server.py _forget) and began freeing its idle
    # workers, api.cache entries and fetch pools: the answer waits for that, so 204 means freed.
    task = app.forgetting.get(name)
    if task is not None:
        await asyncio.shield(task)
    else:
        app._forget(name)
        await app.runner.forget_tenant(name)
    return 204, None, []


# ------------------------------------------------------------------ actions


def _bound_triggers(app: Sidecar, tenant: str, slug: str) -> list[str]:
    """The triggers whose current flow runs ``slug``: its source needs a handler for each."""
    out = []
    for trigger in TRIGGERS:
        rec = app.store.flow(tenant, trigger)
        if rec is not None and slug in [e for e in rec.entries if isinstance(e, str)]:
            out.append(trigger)
    return out


def _inherited(app: Sidecar, tenant: str, slug: str) -> tuple[str | None, tuple[str, ...], str | None]:
    """(language, declared secrets, failure) of the current version, else of the config's action, else none."""
    cur = app.store.current(tenant, slug)
    if cur is not None:
        return cur.language, tuple(cur.secrets), cur.failure
    spec = app.config.tenants.get(tenant)
    aspec = spec.actions.get(slug) if spec is not None else None
    if aspec is not None:
        return aspec.language, aspec.secrets, aspec.failure
    return None, (), None


def _declared(value: Any) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_DECLARED_SECRETS:
        raise HTTPError(400, f"secrets must be a list of at most {MAX_DECLARED_SECRETS} secret names", "secrets")
    for n in value:
        if type(n) is not str or not SECRET_NAME_RE.match(n):
            raise HTTPError(400, f"secrets: {str(n)[:80]!r} is not a secret name ({SECRET_NAME_RE.pattern})",
                            "secrets")
    return tuple(sorted(set(value)))


async def _deploy_request(app: Sidecar, req: Request, tenant: str, slug: str) -> dict[str, Any]:
    """The deploy's source, language, secrets, failure and message, from a JSON body or a raw source."""
    ctype = _content_type(req)
    language, secrets, failure = _inherited(app, tenant, slug)
    if ctype == "application/json":
        body = await _json(req)
        if type(body) is not dict:
            raise HTTPError(400, "the body must be {\"source\", \"language\", \"secrets\"?, \"failure\"?, "
                                 "\"message\"?}", "body")
        unknown = sorted(set(body) - {"source", "language", "secrets", "failure", "message"})
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(u[:64] for u in unknown)}", unknown[0][:64])
        source = body.get("source")
        if type(source) is not str or not source.strip():
            raise HTTPError(400, "source must be a non-empty string", "source")
        language = body.get("language")
        if language not in LANGUAGES:
            raise HTTPError(400, f"language must be \"python\" or \"javascript\", got {str(language)[:40]!r}",
                            "language")
        if body.get("secrets") is not None:
            secrets = _declared(body["secrets"])
        if "failure" in body:
            failure = body["failure"]
            if failure is not None and failure not in FAILURE_POLICIES:
                raise HTTPError(400, f"failure must be \"open\" or \"closed\", got {str(failure)[:40]!r}", "failure")
        return {"source": source, "language": language, "secrets": secrets, "failure": failure,
                "message": _message(req, body)}
    if ctype and ctype not in RAW_LANGUAGES and ctype not in RAW_UNTYPED:
        # curl -d sends form encoding: taken as a source, a JSON body would compile as a Python dict literal
        raise HTTPError(415, f"Content-Type {ctype[:80]!r} is not a deploy: send application/json "
                             f"{{\"source\", \"language\", ...}} or a raw source as text/x-python or "
                             f"application/javascript", "content-type")
    raw = await _body(req)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the action source must be UTF-8", "body") from None
    if not source.strip():
        raise HTTPError(400, "the action source is empty", "body")
    if ctype in RAW_LANGUAGES:
        language = RAW_LANGUAGES[ctype]
    elif language is None:   # no Content-Type that says: the slug's own language, else Python
        language = "python"
    return {"source": source, "language": language, "secrets": secrets, "failure": failure,
            "message": req.query.get("message", "")[:MAX_MESSAGE_CHARS]}


@handler("action_put")
async def action_put(app: Sidecar, req: Request) -> Reply:
    tenant, slug = app.tenant(req.params["tenant"]).name, _slug(req)
    d = await _deploy_request(app, req, tenant, slug)
    try:
        problem = await validate_source_async(d["source"], d["language"], _bound_triggers(app, tenant, slug),
                                              tenant=tenant)
    except ValidationBusy as exc:   # the body is dropped now, not held in an unbounded queue
        raise _busy(exc) from None
    if problem is not None:   # nothing changes: the live version keeps running
        return 422, {"error": problem.message, "line": problem.line, "column": problem.column}, []
    shadow = req.query.get("shadow", "0") not in ("0", "", "false")
    app.tenant(tenant)   # again: deleted while the body was read or validated -> 404, never versions of no tenant
    try:
        v = await app.store.deploy(tenant, slug, d["source"], shadow=shadow, language=d["language"],
                                   secrets=d["secrets"], failure=d["failure"], message=d["message"],
                                   author=_who(req))
    except StoreFull as exc:
        raise _full(exc, "body") from None
    out: dict[str, Any] = {"slug": slug, "version": v.version}
    if shadow:
        out["shadow"] = True
    names = {s["name"] for s in app.store.secret_names(tenant)}
    missing = [n for n in d["secrets"] if n not in names]
    if missing:
        out["missing_secrets"] = missing
    return 201, out, []


@handler("action_get")
async def action_get(app: Sidecar, req: Request) -> Reply:
    tenant, slug = app.tenant(req.params["tenant"]).name, _slug(req)
    described = await app.store.describe(tenant, slug)
    if not described.get("versions") and described.get("current") is None:
        raise HTTPError(404, f"tenant {tenant} has no action {slug!r}", "slug")
    out = {"slug": slug, **described}
    out["shadow_disagreements"] = list(app.disagreements.get((tenant, slug), ()))
    return 200, out, []


@handler("action_rollback")
async def action_rollback(app: Sidecar, req: Request) -> Reply:
    tenant, slug = app.tenant(req.params["tenant"]).name, _slug(req)
    to = await _rollback_to(req)
    if to is not None:
        v = await app.store.get_version(tenant, slug, to)
        if v is not None:
            try:
                problem = await validate_source_async(v.source, v.language, _bound_triggers(app, tenant, slug),
                                                      tenant=tenant)
            except ValidationBusy as exc:
                raise _busy(exc) from None
            if problem is not None:   # bound since to a trigger it has no handler for: nothing changes
                raise HTTPError(409, f"version {to} cannot run in this tenant's flows now: {problem.message}",
                                "version")
    v = await _rolled_back(app.store.rollback(tenant, slug, to=to, author=_who(req)), "slug", slug, to)
    return 200, {"slug": slug, "version": v.version}, []


async def _rolled_back(rollback: Awaitable[Any], field: str, what: str, to: str | None) -> Any:
    """A store rollback's record; nothing to go back to is 409 (naming ``field``), an unknown ``to`` 404."""
    try:
        return await rollback
    except NothingToRollBack as exc:
        raise HTTPError(409, str(exc), field) from None
    except UnknownVersion:
        raise HTTPError(404, f"{what} keeps no version {to!r}", "version") from None


async def _rollback_to(req: Request) -> str | None:
    raw = await _body(req)
    if not raw.strip():
        return None
    body = await _json(req)
    if body is None:
        return None
    if type(body) is not dict or set(body) - {"version"}:
        raise HTTPError(400, "the body must be empty or {\"version\"}", "body")
    to = body.get("version")
    if to is not None and (type(to) is not str or not 1 <= len(to) <= 64):
        raise HTTPError(400, "version must be a version id", "version")
    return to


@handler("action_diff")
async def action_diff(app: Sidecar, req: Request) -> Reply:
    tenant, slug = app.tenant(req.params["tenant"]).name, _slug(req)
    a, b = req.params["a"], req.params["b"]
    va = await app.store.get_version(tenant, slug, a)
    vb = await app.store.get_version(tenant, slug, b)
    for vid, v, field in ((a, va, "a"), (b, vb, "b")):
        if v is None:
            raise HTTPError(404, f"{slug} keeps no version {vid[:64]!r}", field)
    assert va is not None and vb is not None
    # Bounded (sidecar/_diff.py: difflib matches a middle of at most MAX_LINE_PAIRS line pairs) and on a
    # thread, one diff at a time: the loop gets the GIL back every switch interval while it runs.
    async with _diff_slot():
        diff, exact = await asyncio.to_thread(unified, va.source, vb.source, f"{slug}@{a}", f"{slug}@{b}")
    return 200, {"slug": slug, "a": a, "b": b, "diff": diff, "exact": exact}, []


_diffs: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None


def _diff_slot() -> asyncio.Semaphore:
    """One diff at a time per event loop (a second waits): a burst of diffs cannot take every thread."""
    global _diffs
    loop = asyncio.get_running_loop()
    if _diffs is None or _diffs[0] is not loop:
        _diffs = (loop, asyncio.Semaphore(1))
    return _diffs[1]


@handler("action_test")
async def action_test(app: Sidecar, req: Request) -> Reply:
    """A draft (or the current version) run once, like a login; nothing deployed."""
    tenant = app.tenant(req.params["tenant"])
    slug = _slug(req)
    # A draft runs in the tenant's workers like a login, so it takes the same slots (server.max_inflight and
    # the tenant's cap) the same way: refused at once when full, the body read first.
    app._take_slot(tenant.name, check_only=True)
    body = await _json(req)
    if type(body) is not dict:
        raise HTTPError(400, "the body must be {\"trigger\", \"event\", \"source\"?, \"language\"?}", "body")
    unknown = set(body) - {"trigger", "event", "source", "language"}
    if unknown:
        raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
    trigger = body.get("trigger")
    if trigger not in TRIGGERS:
        raise HTTPError(400, f"unknown trigger {str(trigger)[:64]!r}; expected one of {', '.join(TRIGGERS)}",
                        "trigger")
    event = body.get("event", {})
    if type(event) is not dict:
        raise HTTPError(400, "event must be a JSON object", "event")
    problem = app._check(event)
    if problem is not None:
        m = _FIELD.match(problem)
        raise HTTPError(400, problem, m.group(1) if m else "event")
    source = body.get("source")
    cur = app.store.current(tenant.name, slug)
    if source is None:
        if cur is None:
            raise HTTPError(409, f"{slug} has no deployed version; send a source to test a draft", "source")
        v = cur
    elif type(source) is not str or not source.strip():
        raise HTTPError(400, "source must be a non-empty string", "source")
    else:
        language, secrets, failure = _inherited(app, tenant.name, slug)
        language = body.get("language", language or "python")
        if language not in LANGUAGES:
            raise HTTPError(400, "language must be \"python\" or \"javascript\"", "language")
        draft = hashlib.sha256(f"{language}\0{source}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
        v = Version(version=draft, source=source, language=language, secrets=secrets, failure=failure)
    event = {**event, "execution_id": os.urandom(16).hex()}
    try:
        action = app._action(tenant, slug, v)
    except ActionError as exc:
        raise HTTPError(400, str(exc), "source") from None
    before = tuple(app.secrets_of(tenant.name).values())   # redacted even if deleted while the draft runs
    app._take_slot(tenant.name)
    try:
        result = await app.runner.run_flow(trigger=trigger, actions=[action], event=event, tenant=tenant.name,
                                           denial_message=tenant.denial_message)
    finally:
        app._release_slot(tenant.name)
    out = result.to_dict()
    out["versions"] = {slug: v.version}
    out["draft"] = source is not None
    # Not a login: a debugging answer, redacted like run history (the tenant's secrets, the redact paths).
    secrets = tuple(dict.fromkeys((*before, *app.secrets_of(tenant.name).values())))
    return 200, flow_redactor(secrets, tenant.redact, event)(out), []


@handler("run_get")
async def run_get(app: Sidecar, req: Request) -> Reply:
    tenant = app.tenant(req.params["tenant"])
    flow_id = req.params["flow_id"]
    run = await app.store.get_run(flow_id)
    if run is None or run.get("tenant") != tenant.name:
        raise HTTPError(404, f"no recorded run {flow_id[:64]!r}", "flow_id")
    return 200, run, []


# ------------------------------------------------------------------ flows


def _flow_entries(body: Any) -> tuple[list[Any], str]:
    """A JSON array of entries, or ``{"flow": [...], "message"?}``."""
    message = ""
    if isinstance(body, dict):
        unknown = set(body) - {"flow", "message"}
        if unknown:
            raise HTTPError(422, f"unknown field(s): {', '.join(sorted(u[:64] for u in unknown))}", "flow")
        message = body.get("message") or ""
        if type(message) is not str or len(message) > MAX_MESSAGE_CHARS:
            raise HTTPError(422, f"message must be a string of at most {MAX_MESSAGE_CHARS} characters", "message")
        body = body.get("flow")
    if type(body) is not list:
        raise HTTPError(422, "a flow is a JSON array of action slugs and decision blocks", "flow")
    return body, message


async def check_flow(app: Sidecar, tenant: str, trigger: str, entries: list[Any]) -> FlowProblem | None:
    """Why ``entries`` cannot be this tenant's flow for ``trigger`` (runner's validate_flow), or None."""
    slugs: dict[str, tuple[str, str]] = {}
    for e in entries:
        if isinstance(e, str) and e not in slugs and SLUG_RE.match(e):
            v = app.store.current(tenant, e)
            if v is not None:
                slugs[e] = ("js" if v.language in ("js", "javascript") else "python", v.source)
    try:   # large sources are checked off the loop, within the validation queue's caps
        return await flow_problem_async(entries, slugs, trigger, tenant=tenant)
    except ValidationBusy as exc:
        raise _busy(exc) from None


@handler("flow_put")
async def flow_put(app: Sidecar, req: Request) -> Reply:
    tenant, trigger = app.tenant(req.params["tenant"]).name, _trigger(req)
    entries, message = _flow_entries(await _json(req))
    app.tenant(tenant)   # again: deleted while the body arrived -> 404, not "unknown action"
    problem = await check_flow(app, tenant, trigger, entries)
    if problem is not None:
        raise HTTPError(422, str(problem), problem.where)
    try:
        rec = await app.store.put_flow(tenant, trigger, entries, author=_who(req), message=message)
    except StoreFull as exc:
        raise _full(exc, "flow") from None
    return 200, {"version": rec.version}, []


@handler("flow_get")
async def flow_get(app: Sidecar, req: Request) -> Reply:
    tenant, trigger = app.tenant(req.params["tenant"]).name, _trigger(req)
    rec = app.store.flow(tenant, trigger)
    if rec is None:
        raise HTTPError(404, f"tenant {tenant} has no {trigger} flow", "trigger")
    return 200, {"flow": rec.entries, "version": rec.version, "updated_at": _iso(rec.updated_at),
                 "author": rec.author, "message": rec.message}, []


@handler("flow_rollback")
async def flow_rollback(app: Sidecar, req: Request) -> Reply:
    tenant, trigger = app.tenant(req.params["tenant"]).name, _trigger(req)
    to = await _rollback_to(req)
    rec = await _rolled_back(app.store.rollback_flow(tenant, trigger, to=to, author=_who(req)), "trigger",
                             f"the {trigger} flow", to)
    return 200, {"version": rec.version}, []


@handler("flow_versions")
async def flow_versions(app: Sidecar, req: Request) -> Reply:
    tenant, trigger = app.tenant(req.params["tenant"]).name, _trigger(req)
    versions = await app.store.flow_versions(tenant, trigger)
    if not versions:
        raise HTTPError(404, f"tenant {tenant} has no {trigger} flow", "trigger")
    return 200, {"versions": [{**v, "at": _iso(v["at"]) if isinstance(v.get("at"), (int, float)) else v.get("at")}
                              for v in versions]}, []


# ------------------------------------------------------------------ secrets


def _secret_name(req: Request) -> str:
    name = req.params["name"]
    if not SECRET_NAME_RE.match(name):
        raise HTTPError(400, f"secret names must match {SECRET_NAME_RE.pattern}", "name")
    return name


@handler("secret_put")
async def secret_put(app: Sidecar, req: Request) -> Reply:
    tenant, name = app.tenant(req.params["tenant"]).name, _secret_name(req)
    body = await _json(req)
    if type(body) is not dict or set(body) != {"value"}:
        raise HTTPError(422, "the body must be {\"value\": \"...\"}", "value")
    value = body["value"]
    # Never echo the value: every message below names only the rule.
    if type(value) is not str or not MIN_SECRET_CHARS <= len(value) <= MAX_SECRET_CHARS:
        raise HTTPError(422, f"value must be a string of {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters (a "
                             "shorter one cannot be redacted from run history without redacting ordinary text)",
                        "value")
    try:
        await app.store.put_secret(tenant, name, value, author=_who(req))
    except StoreFull as exc:
        raise _full(exc, "name") from None
    except SecretsUnavailable as exc:   # Redis without ACTIONPOOL_SECRETS_KEY: never stored in the clear
        raise HTTPError(409, str(exc), "value") from None
    return 204, None, []


@handler("secret_delete")
async def secret_delete(app: Sidecar, req: Request) -> Reply:
    tenant, name = app.tenant(req.params["tenant"]).name, _secret_name(req)
    if not await app.store.delete_secret(tenant, name, author=_who(req)):
        raise HTTPError(404, f"tenant {tenant} has no secret {name!r}", "name")
    return 204, None, []


@handler("secrets_list")
async def secrets_list(app: Sidecar, req: Request) -> Reply:
    tenant = app.tenant(req.params["tenant"]).name
    return 200, [{"name": s["name"], "updated_at": _iso(s["updated_at"]) if isinstance(s["updated_at"], (int, float))
                  else s["updated_at"]} for s in app.store.secret_names(tenant)], []


# ------------------------------------------------------------------ audit and drift


@handler("audit_get")
async def audit_get(app: Sidecar, req: Request) -> Reply:
    tenant = req.params["tenant"]
    if app.store.tenant(tenant) is None and not SLUG_RE.match(tenant):
        raise HTTPError(404, f"unknown tenant {tenant[:64]!r}", "tenant")
    raw = req.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise HTTPError(400, "limit must be an integer from 1 to 1000", "limit")
    entries = await app.store.audit(tenant, int(raw))
    if not entries and app.store.tenant(tenant) is None:
        raise HTTPError(404, f"unknown tenant {tenant[:64]!r}", "tenant")
    return 200, {"entries": entries}, []


@handler("drift_get")
async def drift_get(app: Sidecar, req: Request) -> Reply:
    from ._bootstrap import drift

    return 200, {"drift": drift(app)}, []


def _iso(t: Any) -> Any:
    if not isinstance(t, (int, float)):
        return t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


__all__ = ["Tenant", "check_flow"]
