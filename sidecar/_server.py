"""The sidecar's ASGI app: the HTTP face of one Runner, for gateways in any language.

A plain ASGI callable with a hand-written router rather than Starlette: ten
routes do not need a framework, and the flow path is the one a login waits
on (see docs/gateway.md for the measurement). Routes::

    POST /v1/tenants/{t}/flows/{trigger}          run the tenant's flow; 200 FlowResult + versions
    PUT  /v1/tenants/{t}/actions/{slug}[?shadow=1] deploy a version (201) or a shadow version
    GET  /v1/tenants/{t}/actions/{slug}           versions, deploy times, shadow disagreements
    POST /v1/tenants/{t}/actions/{slug}/rollback  back to the previous version
    POST /v1/tenants/{t}/actions/{slug}/test      a draft run of one action; nothing deployed
    GET  /v1/tenants/{t}/runs/{flow_id}           one recorded run
    GET  /healthz  /readyz  /metrics

Every answer but healthz and readyz needs the bearer token when the config
names one (``[server] token_env``); without one the process only binds to
loopback and refuses any other peer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import orjson

from ..runner import TRIGGERS, Action, ActionError, ConfigError, Runner
from ..runner.hosting import (REDACTED, SLUG_RE, Decision, build_record, default_tenant_cap, flow_redactor,
                              make_decision, redact, redact_paths, set_failure_policy)
from ._action_cache import ActionCache
from ._config import DecisionSpec, ServeConfig, TenantSpec, is_loopback
from ._metrics import CONTENT_TYPE, Metrics
from ._store import NothingToRollBack, Store, StoreFull, StoreUnavailable, Version, open_store

log = logging.getLogger("actionpool.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
_FIELD = re.compile(r"^(event[^\s:]*)")
SHADOW_KEEP = 20
RECORDS_PENDING = 256            # run records waiting to be built, all tenants; more are dropped (and counted)
RECORDS_PENDING_PER_TENANT = 16  # ... and of one tenant, so one tenant's flood drops only its own history


class HTTPError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, headers: list[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, list(headers)


class NotDeployed(Decision):
    """A flow entry whose action has no deployed version: the flow is denied before any action runs."""

    def decide(self, flow: Any) -> str:
        flow.deny(self.slug, "not_deployed", f"action {self.slug} has no deployed version", None)
        return "failed"


def _served(slug: str, v: Version, secrets: dict[str, str], limits: dict[str, Any], failure: str,
            suffix: str = ".py") -> Action:
    """A deployed version as an Action; its failure policy and version travel with it.

    The language is the configured file's (``.js``: JavaScript, via Action's file name); an action with
    no file in the config is Python.
    """
    a = Action(slug=slug, source=v.source, secrets=secrets, limits=limits, filename=f"{slug}{suffix}")
    set_failure_policy(a, failure)
    object.__setattr__(a, "version", v.version)
    return a


class Sidecar:
    """The ASGI app and the state it serves from (a Runner, a Store, Metrics)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.server = config.server
        self.runner = Runner(config.runner)
        srv = config.server
        self.store: Store = open_store(config.store_url, srv.history_size, history_max_bytes=srv.history_max_bytes,
                                       sources_max_bytes=srv.sources_max_bytes, versions_kept=srv.versions_kept)
        self._actions = ActionCache(srv.action_cache_max_bytes)
        self.metrics = Metrics(self.runner.stats, self.store.stats, self._actions.stats)
        self.inflight = 0
        self.tenant_inflight: dict[str, int] = {}   # flows in flight by tenant; a tenant at 0 has no entry
        self._tenant_cap: int | None = config.server.max_inflight_per_tenant
        self.draining = False
        self.started = False
        self.guard: Any = None   # the connection guard (sidecar/_http_guard.py), set by `serve`
        self._decisions: dict[tuple[str, str, int], Decision] = {}
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
        self._token = config.server.token.encode() if config.server.token else None
        # Every secret is redacted from history: the config refuses one too short for that (MIN_SECRET_CHARS).
        self._secrets = {name: tuple(t.secrets.values()) for name, t in config.tenants.items()}

    # -- life cycle ----------------------------------------------------------------------------
    async def startup(self) -> None:
        await self.runner.start()
        await self.store.start()
        for tenant in self.config.tenants.values():
            for spec in tenant.actions.values():
                if spec.file is not None:
                    try:
                        source = spec.file.read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError) as exc:
                        raise ConfigError(f"{self.config.path}: tenants.{tenant.name}.actions.{spec.slug}.file: "
                                          f"cannot read {spec.file}: {exc}") from None
                    await self.store.seed(tenant.name, spec.slug, source)
        self.started = True

    async def shutdown(self, grace: float | None = None) -> None:
        self.draining = True
        await self.runner.close(self.server.drain_grace_s if grace is None else grace)
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=5)
        self._history_thread.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

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
        except StoreUnavailable as exc:  # every management route, in one place: never a 500 for an outage
            status, body = 503, {"error": f"store unavailable: {exc}"}
            headers = [(b"retry-after", str(self.server.retry_after_s).encode())]
            self.metrics.rejected.labels("503").inc()
        except Exception:  # a bug here must still answer, and must not kill the process
            log.exception("sidecar: unhandled error")
            status, body = 500, {"error": "internal error"}
        if isinstance(body, bytes):
            payload, ctype = body, CONTENT_TYPE.encode()
        else:
            payload, ctype = orjson.dumps(body), b"application/json"
        out = [(b"content-type", ctype), (b"content-length", str(len(payload)).encode()), *headers]
        if self.draining:
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.error("actionpool serve: start failed: %s", exc)
                    await self.runner.close(0)
                    await self.store.close()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
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

    def _authorize(self, scope: Scope) -> None:
        if self._token is None:
            client = scope.get("client")
            if client is not None and not is_loopback(client[0]):
                raise HTTPError(401, "no token configured: only loopback peers are served")
            return
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token):
                    return
                break
        raise HTTPError(401, "missing or bad bearer token", headers=[(b"www-authenticate", b"Bearer")])

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            return 200, {"status": "alive"}, []
        if path == "/readyz":
            # "Can serve flows": a started replica serves its loaded versions while Redis is down (degraded).
            if self.draining or not self.started:
                return 503, {"status": "not ready", "reason": "draining" if self.draining else "starting"}, []
            return 200, {"status": "ready", **self.store.status()}, []
        self._authorize(scope)
        if path == "/metrics":
            return 200, self.metrics.render(), []
        parts = path.split("/")
        if len(parts) < 6 or parts[:3] != ["", "v1", "tenants"]:
            raise HTTPError(404, "no such route")
        tenant = self.config.tenants.get(parts[3])
        if tenant is None:
            raise HTTPError(404, f"unknown tenant {parts[3]!r}", "tenant")
        what, rest = parts[4], parts[5:]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        if what == "flows" and len(rest) == 1:
            _method(method, "POST")
            return await self._flow(tenant, rest[0], scope, receive)
        if what == "runs" and len(rest) == 1:
            _method(method, "GET")
            run = await self.store.get_run(rest[0])
            if run is None or run.get("tenant") != tenant.name:
                raise HTTPError(404, f"no recorded run {rest[0]!r}", "flow_id")
            return 200, run, []
        if what == "actions" and rest:
            slug = rest[0]
            if slug not in self._known_slugs(tenant):
                raise HTTPError(404, f"tenant {tenant.name} has no action {slug!r} (name it under [tenants.{tenant.name}."
                                     f"actions] or in a flow)", "slug")
            if len(rest) == 1 and method == "PUT":
                return await self._deploy(tenant, slug, query, scope, receive)
            if len(rest) == 1:
                _method(method, "GET")
                return 200, await self._describe(tenant, slug), []
            if rest[1:] == ["rollback"]:
                _method(method, "POST")
                try:
                    v = await self.store.rollback(tenant.name, slug)
                except NothingToRollBack as exc:
                    raise HTTPError(409, str(exc), "slug") from None
                return 200, {"slug": slug, "version": v.version}, []
            if rest[1:] == ["test"]:
                _method(method, "POST")
                return await self._test(tenant, slug, scope, receive)
        raise HTTPError(404, "no such route")

    @staticmethod
    def _known_slugs(tenant: TenantSpec) -> set[str]:
        slugs = set(tenant.actions)
        for entries in tenant.flows.values():
            slugs.update(e for e in entries if isinstance(e, str))
        return slugs

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
        if self.runner._engine is None:  # not started: nothing is served before startup anyway
            return None
        return self.runner._engine.check_event(event)

    def _action(self, tenant: TenantSpec, slug: str, v: Version) -> Action:
        """The Action for a version or a draft, from a per-tenant LRU bounded in bytes (sidecar/_action_cache.py)."""
        spec = tenant.actions.get(slug)
        return self._actions.get_or_build(
            tenant.name, slug, v.version,
            lambda: _served(slug, v, tenant.secrets, spec.limits if spec else {}, spec.failure if spec else "closed",
                            spec.file.suffix if spec and spec.file else ".py"))

    def _resolve(self, tenant: TenantSpec, trigger: str) -> tuple[list[Action], dict[str, str]]:
        """The actions of the tenant's flow for ``trigger`` at their current versions (local reads only)."""
        actions: list[Action] = []
        versions: dict[str, str] = {}
        missing: list[Action] = []
        for i, entry in enumerate(tenant.flows.get(trigger, ()), 1):
            if isinstance(entry, DecisionSpec):
                key = (tenant.name, trigger, i)
                d = self._decisions.get(key)
                if d is None:
                    d = self._decisions[key] = make_decision(i, entry.expr, entry.deny)
                actions.append(d)
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

    async def _flow(self, tenant: TenantSpec, trigger: str, scope: Scope, receive: Receive) -> tuple[int, Any, list]:
        if trigger not in TRIGGERS:
            raise HTTPError(400, f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}", "trigger")
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
        self._take_slot(tenant.name)
        try:
            actions, versions = self._resolve(tenant, trigger)
            t0 = time.perf_counter()
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
        if self.server.history_size:
            self._spawn(self._record(tenant, event, body, seconds, result.fetches))
        self._shadows(tenant, trigger, actions, event, body)
        if body["denial"] is not None and body["denial"]["kind"] == "overloaded":
            raise self._overloaded(body["denial"]["reason"])
        return 200, body, []

    async def _record(self, tenant: TenantSpec, event: dict[str, Any], body: dict[str, Any], seconds: float,
                      fetches: list[dict[str, Any]] | None = None) -> None:
        """Redacted (keys and values, event, whole result, fetches) and capped: runner/_history.py.

        Built off the loop, one record at a time. At most RECORDS_PENDING_PER_TENANT of one tenant and
        RECORDS_PENDING in all wait; the rest are dropped and counted (history is best effort).
        """
        pending = self._records_pending
        mine = pending.get(tenant.name, 0)
        if mine >= RECORDS_PENDING_PER_TENANT or self._records_total >= RECORDS_PENDING:
            self.store.history_dropped += 1
            return
        pending[tenant.name] = mine + 1
        self._records_total += 1
        try:
            build = functools.partial(build_record, tenant=tenant.name, paths=tenant.redact,
                                      secrets=self._secrets.get(tenant.name, ()), event=event, body=body,
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
        try:
            await self.store.record_run(tenant.name, body["flow_id"], record)
        except Exception as exc:  # history is best effort; the answer was already decided
            log.warning("sidecar: run history write failed: %s", exc)

    # -- shadow versions -------------------------------------------------------------------------
    def _shadows(self, tenant: TenantSpec, trigger: str, actions: list[Action], event: dict[str, Any],
                 live: dict[str, Any]) -> None:
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
            self._spawn(self._shadow(tenant, trigger, a.slug, sh.version, variant, event, live))

    async def _shadow(self, tenant: TenantSpec, trigger: str, slug: str, version: str, actions: list[Action],
                      event: dict[str, Any], live: dict[str, Any]) -> None:
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
            q.append({"flow_id": live["flow_id"], "shadow_version": version, "at": time.time(),
                      "differences": flow_redactor(self._secrets.get(tenant.name, ()), tenant.redact, event)(diff)})

    # -- actions ---------------------------------------------------------------------------------
    async def _deploy(self, tenant: TenantSpec, slug: str, query: dict[str, str], scope: Scope,
                      receive: Receive) -> tuple[int, Any, list]:
        raw = await self._body(scope, receive)
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "the action source must be UTF-8", "body") from None
        if not source.strip():
            raise HTTPError(400, "the action source is empty", "body")
        shadow = query.get("shadow", "0") not in ("0", "", "false")
        try:
            v = await self.store.deploy(tenant.name, slug, source, shadow=shadow)
        except StoreFull as exc:
            raise HTTPError(413, str(exc), "body") from None
        out = {"slug": slug, "version": v.version}
        if shadow:
            out["shadow"] = True
        return 201, out, []

    async def _describe(self, tenant: TenantSpec, slug: str) -> dict[str, Any]:
        out = {"slug": slug, **await self.store.describe(tenant.name, slug)}
        out["shadow_disagreements"] = list(self.disagreements.get((tenant.name, slug), ()))
        return out

    async def _test(self, tenant: TenantSpec, slug: str, scope: Scope, receive: Receive) -> tuple[int, Any, list]:
        # A draft runs in the tenant's workers like a login, so it takes the same slots (server.max_inflight and
        # the tenant's cap) the same way: refused at once when full, the body read first. Without them drafts
        # were the one way past the HTTP layer's caps (30 concurrent drafts all admitted, the runner refusing 18).
        self._take_slot(tenant.name, check_only=True)
        try:
            req = orjson.loads(await self._body(scope, receive))
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}", "body") from None
        if type(req) is not dict:
            raise HTTPError(400, "the body must be {\"trigger\", \"event\", \"source\"?}", "body")
        unknown = set(req) - {"trigger", "event", "source"}
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
        trigger = req.get("trigger")
        if trigger not in TRIGGERS:
            raise HTTPError(400, f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}", "trigger")
        event = req.get("event", {})
        if type(event) is not dict:
            raise HTTPError(400, "event must be a JSON object", "event")
        problem = self._check(event)
        if problem is not None:
            m = _FIELD.match(problem)
            raise HTTPError(400, problem, m.group(1) if m else "event")
        source = req.get("source")
        if source is None:
            v = self.store.current(tenant.name, slug)
            if v is None:
                raise HTTPError(409, f"{slug} has no deployed version; send a source to test a draft", "source")
        elif type(source) is not str or not source.strip():
            raise HTTPError(400, "source must be a non-empty string", "source")
        else:
            from ._store import version_of

            v = Version(version_of(source), source, time.time())
        event = {**event, "execution_id": os.urandom(16).hex()}
        try:
            action = self._action(tenant, slug, v)
        except ActionError as exc:
            raise HTTPError(400, str(exc), "source") from None
        self._take_slot(tenant.name)
        try:
            result = await self.runner.run_flow(trigger=trigger, actions=[action], event=event, tenant=tenant.name,
                                                denial_message=tenant.denial_message)
        finally:
            self._release_slot(tenant.name)
        body = result.to_dict()
        body["versions"] = {slug: v.version}
        body["draft"] = source is not None
        # Not a login: a debugging answer to whoever holds the management token, like replay's report, and
        # redacted like it (the tenant's secrets and the event's redact-path values, keys and values), so a
        # log line that prints an API key does not hand it to everyone who can test a draft.
        return 200, flow_redactor(self._secrets.get(tenant.name, ()), tenant.redact, event)(body), []


def _method(got: str, want: str) -> None:
    if got != want:
        raise HTTPError(405, f"use {want}", headers=[(b"allow", want.encode())])


__all__ = ["Sidecar", "HTTPError", "redact", "redact_paths", "SLUG_RE"]
