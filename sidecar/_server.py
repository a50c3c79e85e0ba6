"""The sidecar's ASGI app: the HTTP face of one Runner, for gateways in any language.

A plain ASGI callable with a table-driven router rather than Starlette: the
flow path is the one a login waits on (see docs/gateway.md for the measurement).
Every route, its role and its schemas are one table in sidecar/_routes.py, which
also generates ``GET /openapi.json`` (sidecar/_openapi.py); handlers register by
name (the flow path and the probes here, the management API in sidecar/_manage.py).

Roles: the flow token (``[server] token_env``) runs flows; the admin token
(``[server] admin_token_env``) manages, and runs flows too; without an admin
token the flow token does both (single-token mode, warned about at start);
without any token only loopback peers are served. healthz, readyz and
openapi.json are public.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import orjson

from ..runner import TRIGGERS, Action, ConfigError, Runner
from ..runner.hosting import (REDACTED, SLUG_RE, Decision, build_record, default_tenant_cap, flow_redactor,
                              make_decision, redact, redact_paths, set_failure_policy)
from ._action_cache import ActionCache
from ._config import ServeConfig, is_loopback
from ._logs import flow_context, log_flow
from ._metrics import CONTENT_TYPE, Metrics, TopTenants
from . import _manage  # noqa: F401  (the management API's handlers register themselves on import)
from ._openapi import document_bytes
from ._routes import EVENT_FIELD as _FIELD
from ._routes import HANDLERS, HTTPError, Request, Roles, Router, author_of, handler, parse_query
from ._store import Store, StoreUnavailable, UnknownTenant, Version, store_for
from ._tenancy import Tenant
from ._workers import WorkerSlot

log = logging.getLogger("actionpool.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
SHADOW_KEEP = 20
RECORDS_PENDING = 256            # run records waiting to be built, all tenants; more are dropped (and counted)
RECORDS_PENDING_PER_TENANT = 16  # ... and of one tenant, so one tenant's flood drops only its own history


class NotDeployed(Decision):
    """A flow entry whose action has no deployed version: the flow is denied before any action runs."""

    def decide(self, flow: Any) -> str:
        flow.deny(self.slug, "not_deployed", f"action {self.slug} has no deployed version", None)
        return "failed"


def _served(slug: str, v: Version, secrets: dict[str, str], limits: dict[str, Any], failure: str) -> Action:
    """A deployed version as an Action; its failure policy and version travel with it.

    The language is the version's own (deployed with it), never a config file's suffix: JavaScript deployed
    to a slug the config names with a ``.py`` file (or none) runs as JavaScript. ``secrets`` are the
    tenant's values of the names the version declares, and only those.
    """
    language = "js" if v.language in ("javascript", "js") else "python"
    a = Action(slug=slug, source=v.source, secrets={n: secrets[n] for n in v.secrets if n in secrets},
               limits=limits, language=language)
    set_failure_policy(a, v.failure or failure)
    object.__setattr__(a, "version", v.version)
    return a


class Sidecar:
    """The ASGI app and the state it serves from (a Runner, a Store, Metrics)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.server = config.server
        self.runner = Runner(config.runner)
        srv = config.server
        self.store: Store = store_for(config)   # every [server] store bound and the secrets keyring
        self._actions = ActionCache(srv.action_cache_max_bytes)
        self.metrics = Metrics(self.runner.stats, self.store.stats, self._actions.stats,
                               top=TopTenants(srv.metrics_top_tenants))
        from ._tracing import start_tracing   # imports OpenTelemetry only when tracing is configured

        self.tracer = start_tracing(config.tracing)   # None: off (sidecar/_tracing.py)
        self.inflight = 0
        self.tenant_inflight: dict[str, int] = {}   # flows in flight by tenant; a tenant at 0 has no entry
        self._tenant_cap: int | None = config.server.max_inflight_per_tenant
        self.draining = False
        self.started = False
        slot = WorkerSlot.from_env()   # one of `serve --workers N`'s processes, or None
        self.process_label = f"{slot.index}/{slot.count}".encode() if slot is not None else None
        self.warming = False   # the start-up prewarm runs: /readyz says not ready (bounded by prewarm_timeout_s)
        self.prewarm_report: dict[str, Any] | None = None
        self.warmed = asyncio.Event()   # the start-up prewarm is over (`serve` then freezes the warm heap)
        self.guard: Any = None   # the connection guard (sidecar/_http_guard.py), set by `serve`
        self._decisions: dict[tuple[str, str, str, int], Decision] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        # Run records are built (redacted, truncated, a pass over up to a few MB) on one thread of their own:
        # on the loop a 2 MB record stalled every tenant's flows and kill timers for tens of ms; here the loop
        # gets the GIL back within the interpreter's switch interval (5 ms).
        self._history_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actionpool-history")
        self._records_pending: dict[str, int] = {}   # by tenant; a tenant with none has no entry
        self._records_total = 0
        self._shadow_running = 0
        self._shadow_by_tenant: dict[str, int] = {}   # shadow runs in flight by tenant; at 0 no entry
        self.disagreements: dict[tuple[str, str], collections.deque[dict[str, Any]]] = {}
        self.roles = Roles(config.server.token, config.server.admin_token, is_loopback)
        self.router = Router()
        # Tenants, flows and secrets come from the store (the config only bootstraps it: sidecar/_bootstrap.py).
        # Views built from the store's local maps, dropped by on_change when a write lands on any replica.
        self._tenant_views: dict[str, Tenant] = {}
        self._secret_values: dict[str, dict[str, str]] = {}
        self._secret_gen: dict[str, int] = {}
        self.sync_config = False   # `serve --sync-config`: make the store equal to the config at start
        self.drift: list[dict[str, Any]] = []
        self.forgetting: dict[str, asyncio.Task[Any]] = {}   # deleted tenants whose workers are being freed
        # One token per live tenant that has run flows; a deletion drops it (_forget). A flow in flight keeps
        # the token it started with: when it no longer matches, the tenant was deleted (and perhaps created
        # again) meanwhile, and the flow's run record is not written, so a deleted tenant's history is freed
        # and never reaches a new tenant of the same name.
        self._incarnations: dict[str, object] = {}
        self.store.on_change = self._store_changed

    # -- life cycle ----------------------------------------------------------------------------
    async def startup(self) -> None:
        await self.runner.start()
        await self.store.start()
        from ._bootstrap import apply_config

        await apply_config(self, sync=self.sync_config)
        for name in self.store.tenants():
            self._apply_policy(name)
        if self.server.prewarm_timeout_s > 0:
            # Workers for the deployed actions before /readyz says ready; flows are served meanwhile (first).
            self.warming = True
            self._spawn(self._prewarm())
        self.started = True

    def _deployed_actions(self) -> dict[str, list[Action]]:
        """Each tenant's flow actions at their current versions, in flow order, once each (what prewarm warms)."""
        out: dict[str, list[Action]] = {}
        for name in self.store.tenants():
            try:
                tenant = self.tenant(name)
            except HTTPError:
                continue
            seen: set[str] = set()
            acts: list[Action] = []
            for trigger in self.store.flows(name):
                for a in self._resolve(tenant, trigger)[0]:
                    if getattr(a, "decide", None) is None and a.slug not in seen:
                        seen.add(a.slug)
                        acts.append(a)
            if acts:
                out[name] = acts
        return out

    async def _prewarm(self) -> None:
        """Warm start (issue 18): bounded by ``[server] prewarm_timeout_s``, then ready anyway."""
        timeout = self.server.prewarm_timeout_s
        try:
            rep = await asyncio.wait_for(self.runner.prewarm(self._deployed_actions()), timeout)
            self.prewarm_report = {"warmed": len(rep["warmed"]), "left": len(rep["left"]), "failed": rep["failed"],
                                   "stopped": rep["stopped"]}
        except asyncio.TimeoutError:
            self.prewarm_report = {"stopped": "timeout", "timeout_s": timeout}
            log.warning("sidecar: prewarm not done after prewarm_timeout_s=%gs; ready anyway", timeout)
        except Exception as exc:  # a failed prewarm costs cold starts, never the replica
            self.prewarm_report = {"stopped": "error", "error": f"{type(exc).__name__}: {exc}"[:200]}
            log.exception("sidecar: prewarm failed; ready anyway")
        finally:
            self.warming = False
            self.warmed.set()

    async def shutdown(self, grace: float | None = None) -> None:
        self.draining = True
        await self.runner.close(self.server.drain_grace_s if grace is None else grace)
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=5)
        self._history_thread.shutdown(wait=False, cancel_futures=True)
        await self.store.close()
        if self.tracer is not None:
            self.tracer.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, body, headers = await self._route(scope, receive)
        except HTTPError as exc:
            status, headers = exc.status, exc.headers
            body = {"error": exc.error} if exc.field is None else {"error": exc.error, "field": exc.field}
            self.metrics.rejected.labels(str(status)).inc()
        except UnknownTenant as exc:   # deleted (on any replica) while this request read its body or validated
            status, body = 404, {"error": f"unknown tenant {str(exc.args[0] if exc.args else '')[:64]!r}",
                                 "field": "tenant"}
            headers = []
            self.metrics.rejected.labels("404").inc()
        except StoreUnavailable as exc:  # every management route, in one place: never a 500 for an outage
            status, body = 503, {"error": f"store unavailable: {exc}"}
            headers = [(b"retry-after", str(self.server.retry_after_s).encode())]
            self.metrics.rejected.labels("503").inc()
        except Exception:  # a bug here must still answer, and must not kill the process
            log.exception("sidecar: unhandled error")
            status, body = 500, {"error": "internal error"}
        if body is None or status == 204:   # 204: no body and no Content-Type
            payload, out = b"", [(b"content-length", b"0"), *headers]
        else:
            if isinstance(body, bytes):   # bytes: the metrics' text, unless the handler names its own type
                payload, ctype = body, CONTENT_TYPE.encode()
            else:
                payload, ctype = orjson.dumps(body), b"application/json"
            typed = any(k == b"content-type" for k, _ in headers)
            out = [*(() if typed else [(b"content-type", ctype)]), (b"content-length", str(len(payload)).encode()),
                   *headers]
        if self.draining:
            out.append((b"connection", b"close"))
        if self.process_label is not None:   # serve --workers N: which of the N answered (sidecar/_workers.py)
            out.append((b"x-actionpool-process", self.process_label))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.start_error = exc   # serve exits 2 for a ConfigError (e.g. a missing secrets key), else 3
                    log.error("actionpool serve: start failed: %s", exc)
                    await self.runner.close(0)
                    await self.store.close()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                if self.roles.single_token:
                    log.warning("actionpool serve: single-token mode: the flow token (server.token_env) may also "
                                "manage tenants, actions, flows and secrets; set server.admin_token_env to "
                                "separate the roles")
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.server.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        raise HTTPError(413, f"body larger than {limit} bytes", headers=[(b"connection", b"close")])
                except ValueError:
                    raise HTTPError(400, "bad Content-Length", "Content-Length") from None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.server.body_timeout_s):  # a stalled upload holds nothing for long
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise HTTPError(400, "client went away")
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise HTTPError(413, f"body larger than {limit} bytes", headers=[(b"connection", b"close")])
                    chunks.append(chunk)
                    if not msg.get("more_body"):
                        return b"".join(chunks)
        except TimeoutError:
            raise HTTPError(408, f"request body not received within {self.server.body_timeout_s:g} s "
                                 f"(server.body_timeout_s)", headers=[(b"connection", b"close")]) from None

    # -- routing (sidecar/_routes.py holds the table) ---------------------------------------------
    def _authorize(self, scope: Scope, route: Any) -> str:
        """The caller's identity, allowed to call ``route``: 401 (no or bad token) or 403 (flow token, admin route).

        Called before any body is read, so a stranger's upload is never waited for.
        """
        identity = self.roles.identify(scope)
        self.roles.permit(route, identity)
        return identity

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        """Match, authenticate, authorize, check the parameters, then the route's handler.

        Public routes aside, the token is checked before anything about the path is answered: a stranger
        learns nothing but 401. An unknown path is 404, a known one with another method 405 with ``Allow``.
        """
        try:
            route, params = self.router.match(scope["method"], scope["path"])
        except HTTPError as exc:
            if not exc.public:
                self.roles.identify(scope)   # 401 first for a stranger
            raise
        if route.role == "public":
            identity = author = "public"
        else:
            identity = self._authorize(scope, route)
            author = author_of(scope, identity)
        self.router.check_params(params)
        fn = HANDLERS.get(route.handler)
        if fn is None:
            raise HTTPError(501, f"{route.method} {route.path} is not implemented yet")
        req = Request(scope, route, params, parse_query(scope), identity, author,
                      functools.partial(self._body, scope, receive), receive=receive)
        return await fn(self, req)

    @handler("healthz")
    async def _healthz(self, req: Request) -> tuple[int, Any, list]:
        return 200, {"status": "alive"}, []

    @handler("readyz")
    async def _readyz(self, req: Request) -> tuple[int, Any, list]:
        # "Can serve flows": a started replica serves its loaded versions while Redis is down (degraded).
        if self.draining or not self.started or self.warming:
            why = "draining" if self.draining else "starting" if not self.started else "warming"
            return 503, {"status": "not ready", "reason": why}, []
        body = {"status": "ready", **self.store.status()}
        if self.prewarm_report is not None:
            body["prewarm"] = self.prewarm_report
        return 200, body, []

    @handler("openapi")
    async def _openapi(self, req: Request) -> tuple[int, Any, list]:
        return 200, document_bytes(), [(b"content-type", b"application/json")]

    @handler("metrics")
    async def _metrics(self, req: Request) -> tuple[int, Any, list]:
        return 200, self.metrics.render(), []

    @handler("flow_run")
    async def _flow_run(self, req: Request) -> tuple[int, Any, list]:
        return await self._flow(self.tenant(req.params["tenant"]), req.params["trigger"], req.scope, req.receive)

    # -- tenants, from the store ------------------------------------------------------------------
    def tenant(self, name: str) -> Tenant:
        """The tenant's view (local reads only), or 404: unknown, or deleted on any replica."""
        view = self._tenant_views.get(name)
        if view is not None:
            return view
        rec = self.store.tenant(name)
        if rec is None:
            raise HTTPError(404, f"unknown tenant {name[:64]!r}", "tenant")
        view = self._tenant_views[name] = Tenant.of(name, rec.settings, rec.version)
        return view

    def secrets_of(self, tenant: str) -> dict[str, str]:
        """The tenant's secret values (decrypted by the store), for declared-name filtering and redaction."""
        got = self._secret_values.get(tenant)
        if got is None:
            got = self._secret_values[tenant] = dict(self.store.secret_values(tenant))
        return got

    def _store_changed(self, kind: str, tenant: str, key: str) -> None:
        """A write landed (this replica's or another's): drop the views built from it, apply runtime policy.

        Called from inside the store's reload: it must never raise (the store would count the record bad).
        """
        try:
            self._apply_change(kind, tenant, key)
        except Exception:
            log.exception("sidecar: applying a %s change of tenant %s failed", kind, tenant)

    def _apply_change(self, kind: str, tenant: str, key: str) -> None:
        if kind == "secret":
            self._secret_values.pop(tenant, None)
            self._secret_gen[tenant] = self._secret_gen.get(tenant, 0) + 1
        elif kind == "tenant":
            self._tenant_views.pop(tenant, None)
            self._secret_values.pop(tenant, None)
            if self.store.tenant(tenant) is None:
                self._forget(tenant)
            else:
                self._apply_policy(tenant)
        elif kind == "flow":
            for k in [k for k in self._decisions if k[0] == tenant and k[1] == key]:
                del self._decisions[k]

    def _apply_policy(self, tenant: str) -> None:
        rec = self.store.tenant(tenant)
        if rec is None:
            return
        try:
            self.runner.set_tenant_policy(tenant, allow_hosts=tuple(rec.settings.get("allow_hosts") or ()))
        except (ConfigError, ValueError) as exc:  # validated at PUT; a bad record from the store is logged
            log.warning("sidecar: tenant %s: allow_hosts not applied: %s", tenant, exc)

    def _forget(self, tenant: str) -> None:
        """A deleted tenant: its workers, caches, decisions and shadow reports go (its flows already 404)."""
        self._incarnations.pop(tenant, None)
        self._secret_gen.pop(tenant, None)
        self._actions.forget(tenant)
        self.metrics.forget_tenant(tenant)   # its series and its label (sidecar/_metrics.py TopTenants)
        for k in [k for k in self._decisions if k[0] == tenant]:
            del self._decisions[k]
        for k in [k for k in self.disagreements if k[0] == tenant]:
            del self.disagreements[k]
        try:
            self.runner.set_tenant_policy(tenant, allow_hosts=None)
        except (ConfigError, ValueError):
            pass
        if self.runner_started():
            t = asyncio.ensure_future(self.runner.forget_tenant(tenant))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)
            self.forgetting[tenant] = t   # the DELETE that caused it (on this replica) waits for it
            t.add_done_callback(lambda _t, name=tenant: self.forgetting.pop(name, None) if
                                self.forgetting.get(name) is _t else None)

    def runner_started(self) -> bool:
        return self.started and not self.draining

    # -- flows -----------------------------------------------------------------------------------
    def _event(self, raw: bytes) -> dict[str, Any]:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}", "body") from None
        if type(event) is not dict:
            raise HTTPError(400, f"the event must be a JSON object, got {type(event).__name__}", "event")
        problem = self._check(event)
        if problem is not None:
            m = _FIELD.match(problem)
            raise HTTPError(400, problem, m.group(1) if m else "event")
        return event

    def _check(self, event: dict[str, Any]) -> str | None:
        return self.runner.check_event(event)

    def _action(self, tenant: Tenant, slug: str, v: Version) -> Action:
        """The Action for a version or a draft, from a per-tenant LRU bounded in bytes (sidecar/_action_cache.py).

        Keyed by version, tenant settings and secrets generation: a changed secret or limit builds it anew.
        """
        spec = self.config.tenants.get(tenant.name)
        aspec = spec.actions.get(slug) if spec is not None else None
        key = f"{v.version}/{tenant.version}/{self._secret_gen.get(tenant.name, 0)}"
        return self._actions.get_or_build(
            tenant.name, slug, key,
            lambda: _served(slug, v, self.secrets_of(tenant.name),
                            {**tenant.limits, **(aspec.limits if aspec is not None else {})}, tenant.failure))

    def _resolve(self, tenant: Tenant, trigger: str) -> tuple[list[Action], dict[str, str]]:
        """The actions of the tenant's current flow for ``trigger`` at their current versions (local reads only)."""
        actions: list[Action] = []
        versions: dict[str, str] = {}
        missing: list[Action] = []
        rec = self.store.flow(tenant.name, trigger)
        for i, entry in enumerate(rec.entries if rec is not None else (), 1):
            if isinstance(entry, dict):
                key = (tenant.name, trigger, rec.version, i)
                d = self._decisions.get(key)
                if d is None:
                    try:
                        d = make_decision(i, entry["if"], deny=entry.get("deny"), allow=bool(entry.get("allow", False)),
                                          skip_to=entry.get("skip_to"), message=entry.get("message"))
                    except (KeyError, TypeError, ValueError) as exc:  # validated at PUT; a bad record fails closed
                        log.warning("sidecar: tenant %s: flow %s@%s entry %d is not a decision block (%s); the "
                                    "flow is denied", tenant.name, trigger, rec.version, i, exc)
                        d = make_decision(i, "true", deny="invalid_flow_entry")
                    self._decisions[key] = d
                actions.append(d)
                continue
            if type(entry) is not str or not SLUG_RE.match(entry):   # a bad record: fail closed, never a 500
                actions.append(make_decision(i, "true", deny="invalid_flow_entry"))
                continue
            v = self.store.current(tenant.name, entry)
            if v is None:
                missing.append(NotDeployed(slug=entry, source="", expr="false"))
                continue
            actions.append(self._action(tenant, entry, v))
            versions[entry] = v.version
        return (missing, versions) if missing else (actions, versions)

    def tenant_cap(self) -> int:
        """One tenant's flows in flight: configured, or what the runner accepts of one tenant (busy + queue).

        Never more than 3/4 of max_inflight, so the other quarter is always there for other tenants.
        """
        if self._tenant_cap is None:
            s = self.runner.stats()
            runner_cap = int(s.get("max_busy_per_tenant") or 0) + int(s.get("max_queue_per_tenant") or 0)
            self._tenant_cap = max(1, min(runner_cap or self.server.max_inflight,
                                          default_tenant_cap(self.server.max_inflight)))
        return self._tenant_cap

    def _take_slot(self, tenant: str, *, check_only: bool = False) -> None:
        """A flow slot under both caps (global, then the tenant's), or 503 naming the cap that is full."""
        if self.draining:
            raise self._overloaded("shutting down; retry on another replica")
        if self.inflight >= self.server.max_inflight:
            raise self._overloaded(f"{self.inflight} flows in flight on this sidecar (server.max_inflight); "
                                   f"retry shortly")
        held, cap = self.tenant_inflight.get(tenant, 0), self.tenant_cap()
        if held >= cap:
            raise self._overloaded(f"tenant {tenant} has {held} flows in flight, its cap "
                                   f"(server.max_inflight_per_tenant = {cap}); retry shortly")
        if not check_only:
            self.inflight += 1
            self.tenant_inflight[tenant] = held + 1

    def _release_slot(self, tenant: str) -> None:
        self.inflight -= 1
        left = self.tenant_inflight[tenant] - 1
        if left:
            self.tenant_inflight[tenant] = left
        else:
            del self.tenant_inflight[tenant]   # per-tenant state lives only while the tenant has flows

    def _overloaded(self, why: str) -> HTTPError:
        return HTTPError(503, why, headers=[(b"retry-after", str(self.server.retry_after_s).encode())])

    async def _flow(self, tenant: Tenant, trigger: str, scope: Scope, receive: Receive) -> tuple[int, Any, list]:
        if trigger not in TRIGGERS:
            raise HTTPError(400, f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}", "trigger")
        start_ns = time.time_ns()   # the flow span's start (sidecar/_tracing.py)
        self._take_slot(tenant.name, check_only=True)   # refused at once when full: no body read for nothing
        # The body is read (within server.body_timeout_s) before a slot is taken: a stalled upload holds none.
        event = self._event(await self._body(scope, receive))
        execution_id = None
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                execution_id = value.decode("latin-1")
                if not _IDEMPOTENCY_KEY.match(execution_id):
                    raise HTTPError(400, "Idempotency-Key must be 1-200 visible ASCII characters", "Idempotency-Key")
        if execution_id is None:
            execution_id = os.urandom(16).hex()
        event["execution_id"] = execution_id  # the same across the gateway's retries of one attempt
        # From here every log line of this request's task (and of the tasks it starts) names the flow.
        flow_context(execution_id, tenant.name, trigger)
        self._take_slot(tenant.name)
        incarnation = self._incarnations.setdefault(tenant.name, object())
        # The values to redact, as the flow's actions saw them: a secret deleted (or its tenant) while the flow
        # runs is still redacted from the record.
        secrets = tuple(self.secrets_of(tenant.name).values())
        try:
            actions, versions = self._resolve(tenant, trigger)
            t0, run_ns = time.perf_counter(), time.time_ns()
            result = await self.runner.run_flow(trigger=trigger, actions=actions, event=event, tenant=tenant.name,
                                                denial_message=tenant.denial_message,
                                                record_fetches=self.server.history_size > 0)
            seconds = time.perf_counter() - t0
        finally:
            self._release_slot(tenant.name)
        body = result.to_dict()
        body["versions"] = versions
        body["execution_id"] = execution_id
        self.metrics.flow(tenant.name, trigger, body, seconds)
        log_flow(body, seconds)
        if self.tracer is not None:
            self._trace(scope, start_ns, run_ns, execution_id, tenant.name, trigger, body, result.actions)
        if self.server.history_size:
            self._spawn(self._record(tenant, event, body, seconds, result.fetches, secrets=secrets,
                                     incarnation=incarnation))
        self._shadows(tenant, trigger, actions, event, body, secrets)
        if body["denial"] is not None and body["denial"]["kind"] == "overloaded":
            raise self._overloaded(body["denial"]["reason"])
        return 200, body, []

    def _trace(self, scope: Scope, start_ns: int, run_ns: int, execution_id: str, tenant: str, trigger: str,
               body: dict[str, Any], records: list[Any]) -> None:
        """The flow's spans, from its result (after the flow: nothing on the worker path); never fails a flow."""
        try:
            self.tracer.flow(scope["headers"], start_ns=start_ns, run_ns=run_ns, end_ns=time.time_ns(),
                             execution_id=execution_id, tenant=tenant, trigger=trigger, body=body, records=records)
        except Exception:
            log.exception("sidecar: tracing failed")

    async def _record(self, tenant: Tenant, event: dict[str, Any], body: dict[str, Any], seconds: float,
                      fetches: list[dict[str, Any]] | None = None, *, secrets: tuple[str, ...] = (),
                      incarnation: object | None = None) -> None:
        """Redacted (keys and values, event, whole result, fetches) and capped: runner/_history.py.

        ``secrets``: the tenant's values when the flow started (redacted with today's). ``incarnation``: the
        tenant's token when the flow started; if the tenant was deleted since, nothing is recorded.

        Built off the loop, one record at a time. At most RECORDS_PENDING_PER_TENANT of one tenant and
        RECORDS_PENDING in all wait; the rest are dropped and counted (history is best effort).
        """
        if incarnation is not None and self._incarnations.get(tenant.name) is not incarnation:
            return   # deleted meanwhile: its history was freed and stays so
        pending = self._records_pending
        mine = pending.get(tenant.name, 0)
        if mine >= RECORDS_PENDING_PER_TENANT or self._records_total >= RECORDS_PENDING:
            self.store.history_dropped += 1
            return
        pending[tenant.name] = mine + 1
        self._records_total += 1
        try:
            build = functools.partial(build_record, tenant=tenant.name, paths=tenant.redact,
                                      secrets=tuple(dict.fromkeys((*secrets, *self.secrets_of(tenant.name).values()))),
                                      event=event, body=body,
                                      seconds=seconds, recorded_at=time.time(), fetches=fetches,
                                      max_bytes=self.server.history_record_max_bytes)
            record = await asyncio.get_running_loop().run_in_executor(self._history_thread, build)
        finally:
            self._records_total -= 1
            left = pending[tenant.name] - 1
            if left:
                pending[tenant.name] = left
            else:
                del pending[tenant.name]
        if incarnation is not None and self._incarnations.get(tenant.name) is not incarnation:
            return   # deleted while the record was built
        try:
            await self.store.record_run(tenant.name, body["flow_id"], record)
        except Exception as exc:  # history is best effort; the answer was already decided
            log.warning("sidecar: run history write failed: %s", exc)

    # -- shadow versions -------------------------------------------------------------------------
    def _shadows(self, tenant: Tenant, trigger: str, actions: list[Action], event: dict[str, Any],
                 live: dict[str, Any], secrets: tuple[str, ...] = ()) -> None:
        for i, a in enumerate(actions):
            sh = self.store.shadow(tenant.name, a.slug)
            if sh is None or sh.version == getattr(a, "version", None):
                continue
            # Shared like every other slot: one tenant's slow shadow versions hold at most its share
            # (default_tenant_cap: 3 of 4), so other tenants' shadow comparisons are not all skipped.
            held = self._shadow_by_tenant.get(tenant.name, 0)
            if (self._shadow_running >= self.server.shadow_concurrency
                    or held >= default_tenant_cap(self.server.shadow_concurrency)):
                self.metrics.shadow_runs.labels(tenant.name, a.slug, "skipped").inc()
                continue
            variant = list(actions)
            variant[i] = self._action(tenant, a.slug, sh)
            self._shadow_running += 1
            self._shadow_by_tenant[tenant.name] = held + 1
            self._spawn(self._shadow(tenant, trigger, a.slug, sh.version, variant, event, live, secrets))

    async def _shadow(self, tenant: Tenant, trigger: str, slug: str, version: str, actions: list[Action],
                      event: dict[str, Any], live: dict[str, Any], secrets: tuple[str, ...] = ()) -> None:
        try:
            result = (await self.runner.run_flow(trigger=trigger, actions=actions, event=event, tenant=tenant.name,
                                                 denial_message=tenant.denial_message)).to_dict()
        except Exception as exc:
            log.warning("sidecar: shadow run failed: %s", exc)
            return
        finally:
            self._shadow_running -= 1
            left = self._shadow_by_tenant[tenant.name] - 1
            if left:
                self._shadow_by_tenant[tenant.name] = left
            else:
                del self._shadow_by_tenant[tenant.name]
        diff = {k: {"live": live[k], "shadow": result[k]}
                for k in ("outcome", "claims", "app_metadata", "user_metadata") if live[k] != result[k]}
        self.metrics.shadow_runs.labels(tenant.name, slug, "disagree" if diff else "agree").inc()
        if diff:
            q = self.disagreements.setdefault((tenant.name, slug), collections.deque(maxlen=SHADOW_KEEP))
            values = tuple(dict.fromkeys((*secrets, *self.secrets_of(tenant.name).values())))
            q.append({"flow_id": live["flow_id"], "shadow_version": version, "at": time.time(),
                      "differences": flow_redactor(values, tenant.redact, event)(diff)})

__all__ = ["Sidecar", "HTTPError", "redact", "redact_paths", "SLUG_RE"]
