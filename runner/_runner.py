"""``Runner``: the public entry point a gateway embeds.

    async with Runner(RunnerConfig(pool_size=4)) as runner:
        result = await runner.run_flow(trigger="post-login", actions=[action], event=event, tenant="acme")

Every call of ``run_flow`` returns exactly one :class:`FlowResult`; nothing
that happens inside a worker raises out of it. ``SyncRunner`` wraps the same
API for scripts, running the event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from typing import Any, Iterable, Mapping

from ._audit import AuditSink, LoggingAuditSink, audit_flow
from ._config import RunnerConfig
from ._engine import MAX_EVENT_DEPTH, FlowEngine, event_problem  # noqa: F401  (MAX_EVENT_DEPTH re-exported)
from ._errors import ConfigError, RunnerClosed, SandboxUnavailable
from ._flow import Action, FlowResult, FlowState
from ._lag import LagMonitor
from ._launch import Launcher
from ._pool import Pool
from ._services import Services
from ._triggers import profile

log = logging.getLogger("actionpool")

MAX_TENANT_HOSTS = 1024   # entries in one tenant's runtime allowlist (set_tenant_policy)


class Runner:
    """The façade: owns the life cycle of the launcher, the pool, the services and the flow engine."""

    def __init__(self, config: RunnerConfig | None = None, *, audit: AuditSink | None = None, **overrides: Any) -> None:
        config = config or RunnerConfig()
        if overrides:
            try:
                config = dataclasses.replace(config, **overrides)
            except TypeError as exc:
                raise ConfigError(str(exc)) from None
        self.config = config.validate()
        self.audit = audit if audit is not None else LoggingAuditSink()
        self._pool: Pool | None = None
        self._services: Services | None = None
        self._closed = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self.sandbox_report: dict[str, Any] = {}
        self._launcher: Launcher | None = None
        self._engine: FlowEngine | None = None
        self._start_task: asyncio.Future[None] | None = None
        self._close_task: asyncio.Future[None] | None = None
        self._lag = LagMonitor()
        self.flows = 0
        # Fetch allowlists set at runtime (set_tenant_policy), by tenant; Services reads this very dict.
        self._tenant_hosts: dict[str, tuple[str, ...]] = {}
        self._forgetting: set[asyncio.Task[None]] = set()   # forget_tenant's second pass (see there)

    # -- life cycle ------------------------------------------------------------------
    async def __aenter__(self) -> "Runner":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the runner once: concurrent callers (and the first ``run_flow`` calls) share one start task.

        The task is shielded, so a caller that is cancelled while waiting does not abandon a half-started
        runner; a failed start is re-raised to every caller and leaves nothing running.
        """
        if self._closed:
            raise RunnerClosed("runner is closed")
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start())
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        cfg = self.config
        self._lag.start()  # the loop's own lateness, in stats()
        self._services = Services(cfg, self._tenant_hosts)
        self._launcher = Launcher(cfg)
        await self._launcher.start()
        self._pool = Pool.from_config(self._launcher.launch, cfg)
        # The first worker doubles as the sandbox probe: strict mode refuses to start without it.
        try:
            w = await self._launcher.launch(self._pool.default_profile)
        except BaseException as exc:
            await self._teardown(wait_flows=False)  # the flows in flight are waiting for this very start
            if cfg.sandbox.mode == "strict" and isinstance(exc, Exception):
                raise SandboxUnavailable(f"strict sandbox mode: worker refused to start: {exc}") from None
            raise
        self.sandbox_report = dict(w.info.get("sandbox") or {})
        missing = [r for r in cfg.sandbox.require if not self.sandbox_report.get(r)]
        if missing and cfg.sandbox.mode == "degraded":
            log.warning("actionpool: DEGRADED SANDBOX: protections missing on this host: %s (%s)",
                        ", ".join(missing), "; ".join(self.sandbox_report.get("errors", [])) or "no detail")
        try:
            await w.shutdown(cfg.kill_grace_s)
            await self._pool.start()
        except BaseException:
            await self._teardown(wait_flows=False)
            raise
        self._engine = FlowEngine(cfg, self._pool, self._services)

    async def close(self, grace: float | None = None) -> None:
        """Finish in-flight flows within ``grace`` seconds, then deny the rest (``shutdown``) and stop.

        Returns when every worker and the fork template are gone and every in-flight ``run_flow``
        has returned its FlowResult.
        """
        if self._closed:
            if self._close_task is not None:
                await asyncio.shield(self._close_task)
            return
        self._closed = True
        self._close_task = asyncio.ensure_future(self._close(self.config.kill_grace_s if grace is None else grace))
        await asyncio.shield(self._close_task)

    async def _close(self, grace: float) -> None:
        if self._start_task is not None and not self._start_task.done():
            await asyncio.wait([self._start_task])  # a start in progress finishes (or fails) first
        if self._start_task is not None and self._start_task.done() and not self._start_task.cancelled() \
                and self._start_task.exception() is not None:
            return  # a failed start has torn down what it built
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=grace)
        if self._engine is not None:
            self._engine.closing = True  # what is still running now is denied as ``shutdown``
        await self._teardown(grace)

    async def _teardown(self, grace: float = 0.0, *, wait_flows: bool = True) -> None:
        self._lag.stop()
        for t in list(self._forgetting):
            t.cancel()
        if self._pool is not None:
            await self._pool.close(grace)
        if self._inflight and wait_flows:  # flows whose workers were just killed answer now
            done, pending = await asyncio.wait(list(self._inflight), timeout=max(grace, 1.0) + 5.0)
            if pending:
                log.error("actionpool: %d flow(s) did not answer after close", len(pending))
        if self._services is not None:
            await self._services.aclose()
            self._services = None
        if self._launcher is not None:
            await self._launcher.close()
            self._launcher = None

    def stats(self) -> dict[str, Any]:
        s = self._pool.stats() if self._pool else {}
        s["flows"] = self.flows
        s["flows_in_flight"] = len(self._inflight)
        if self._engine is not None and self._engine.cpu is not None:
            s.update(self._engine.cpu.stats())
        if self._engine is not None and self._engine.admission is not None:
            s.update(self._engine.admission.stats())
        if self._engine is not None:
            s.update(self._engine.co.stats())   # executions that joined a busy worker (runner/_corun.py)
        s.update(self._lag.stats())
        if self._launcher is not None:
            s.update(self._launcher.stats())
        return s

    async def prewarm(self, actions_by_tenant: Mapping[str, Iterable[Action]],
                      order: Mapping[tuple[str, str], float] | None = None, *,
                      concurrency: int | None = None) -> dict[str, Any]:
        """Start an idle worker for each deployed action before traffic comes, the hottest first.

        ``actions_by_tenant``: tenant -> its actions (decision blocks are skipped: they need no
        worker), in the order its flows run them. ``order``: (tenant, slug) -> recorded run count;
        higher counts go first; actions without a count follow round-robin over the tenants (each
        tenant's first action, then each one's second, ...). Flows are
        never delayed: a start begins only while no flow waits for a worker (``Pool.prewarm``), so
        traffic arriving mid-prewarm is served first. It never evicts and stops short of the memory
        budget. Returns what it did: ``warmed`` [(tenant, slug)] in start order, ``pids``,
        ``skipped`` (already warm or a duplicate), ``left`` (not started), ``stopped`` ("done",
        "memory budget" or "closed"). Bound it with ``asyncio.wait_for``: a cancelled prewarm leaves
        the workers it started in the pool.

        ``concurrency`` (with counts): the flows expected in flight. An action with a share ``s`` of
        the counts then gets ``ceil(s * concurrency)`` workers, the extra ones after every action has
        its first: its flows overlap, and each one missing is a start in the first seconds of traffic.
        """
        if self._closed:
            raise RunnerClosed("runner is closed")
        await self.start()
        assert self._engine is not None and self._pool is not None
        counts = order or {}
        entries: list[tuple[float, int, int, str, Action]] = []
        for t_index, (tenant, actions) in enumerate(actions_by_tenant.items()):
            if type(tenant) is not str or not tenant:
                raise ConfigError("prewarm: tenants must be non-empty strings")
            position = 0
            for a in actions:
                if not isinstance(a, Action):
                    raise ConfigError("prewarm: actions must be runner.Action")
                if getattr(a, "decide", None) is None:
                    entries.append((-float(counts.get((tenant, a.slug), 0) or 0), position, t_index, tenant, a))
                    position += 1
        # The hottest first; without counts, round-robin over tenants in their flows' order, so a budget
        # that runs out still leaves every tenant its first action warm.
        entries.sort(key=lambda e: e[:3])
        keys: list[Any] = []
        names: dict[Any, tuple[str, str]] = {}
        skipped = 0
        for _, _, _, tenant, a in entries:
            key = self._engine.worker_key(tenant, a)
            if key in names:
                skipped += 1   # the same worker serves both (worker_binding="tenant", or the same action twice)
                continue
            names[key] = (tenant, a.slug)
            keys.append(key)
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                        or concurrency < 1):
            raise ConfigError(f"prewarm: concurrency must be a positive integer, got {concurrency!r}")
        total = sum(float(counts.get(names[k], 0) or 0) for k in keys)
        if concurrency and total > 0:
            extra = []
            for k in keys:   # hottest first already
                share = float(counts.get(names[k], 0) or 0) / total
                extra.extend([k] * (math.ceil(share * concurrency - 1e-9) - 1))
            keys.extend(extra)
        started, already, tried, why = await self._pool.prewarm(keys)
        return {"warmed": [names[k] for k, _ in started], "pids": [w.pid for _, w in started],
                "skipped": skipped + already, "failed": tried - already - len(started),
                "left": [names[k] for k in keys[tried:]],
                "stopped": why}

    # -- tenants at runtime (a control plane changes them without a restart) ---------------------------
    def check_event(self, event: Any) -> str | None:
        """Why ``event`` cannot be a flow's event (not a JSON object, too deep, too large), or None.

        What ``run_flow`` checks first; a host answers a bad request with it before taking a flow slot.
        """
        return event_problem(event, self.config.limits.max_frame_bytes)

    def set_tenant_policy(self, tenant: str, *, allow_hosts: Iterable[str] | None) -> None:
        """Replace ``tenant``'s fetch allowlist from its next fetch on; other tenants are untouched.

        ``allow_hosts``: the tenant's own hosts (exact names, IPs, ``*.domain``), used with the
        runner-wide ``fetch.allow_hosts`` instead of its ``fetch.tenant_allow_hosts`` entry. ``None``
        removes the override: back to the runner's config. ConfigError names a bad entry.
        """
        if type(tenant) is not str or not tenant:
            raise ConfigError("tenant must be a non-empty string")
        if allow_hosts is None:
            self._tenant_hosts.pop(tenant, None)
            return
        if isinstance(allow_hosts, str):
            raise ConfigError("allow_hosts must be a list of host names, not a string")
        hosts = tuple(allow_hosts)
        if len(hosts) > MAX_TENANT_HOSTS:
            raise ConfigError(f"allow_hosts of tenant {tenant!r}: {len(hosts)} entries, at most {MAX_TENANT_HOSTS}")
        from ._fetch import check_allow_hosts  # lazily, like the Fetcher itself (httpx)

        check_allow_hosts(hosts, f"allow_hosts of tenant {tenant!r}")
        self._tenant_hosts[tenant] = hosts

    async def forget_tenant(self, tenant: str) -> None:
        """Free everything the runner holds for ``tenant``: a deleted tenant costs nothing, a re-created one starts clean.

        Its idle workers are killed (and reaped) before this returns; busy ones finish their
        execution and are then killed instead of reused. Its api.cache entries (every trigger), its
        fetch pool and DNS answers, and its runtime allowlist are dropped. Cache writes of executions
        still running are dropped again once their workers are gone (in the background).
        """
        if type(tenant) is not str or not tenant:
            raise ConfigError("tenant must be a non-empty string")
        self._tenant_hosts.pop(tenant, None)
        if self._pool is None or self._services is None:
            return  # not started (or closed): nothing is held for anyone
        prefix = tenant + "\x00"

        def owns(owner: Any) -> bool:  # see FlowEngine._acquire_live: the tenant, or tenant NUL action identity
            return owner == tenant or (type(owner) is str and owner.startswith(prefix)
                                       and "\x00" not in owner[len(prefix):])

        workers = self._pool.retire_tenant(tenant, owns)
        services = self._services
        await services.forget_tenant(tenant)
        grace = self.config.kill_grace_s
        busy = [w for w in workers if w.alive]
        await asyncio.gather(*(w.wait_exit(grace) for w in workers if not w.alive), return_exceptions=True)
        if busy:
            async def second_pass() -> None:
                limit = self.config.limits.flow_timeout_s + grace + 1.0
                await asyncio.gather(*(w.wait_exit(limit) for w in busy), return_exceptions=True)
                if self._services is services:
                    await services.forget_tenant(tenant)

            task = asyncio.ensure_future(second_pass())
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._pool.workers] if self._pool else []

    # -- flows ----------------------------------------------------------------------------
    async def run_flow(self, *, trigger: str, actions: Iterable[Action], event: Any, tenant: str = "default",
                       denial_message: str | None = None, flow_id: str | None = None,
                       record_fetches: bool = False) -> FlowResult:
        """Run ``actions`` in order for one login or registration; always returns one FlowResult.

        ``record_fetches``: keep each ``api.fetch`` request and its (capped) response in
        ``FlowResult.fetches``, for run history and replay; off, the fetch path keeps nothing.
        """
        if self._closed:
            raise RunnerClosed("runner is closed")
        prof = profile(trigger)
        actions = list(actions)
        if not all(isinstance(a, Action) for a in actions):
            raise ConfigError("actions must be a list of runner.Action")
        if type(tenant) is not str or not tenant:
            raise ConfigError("tenant must be a non-empty string")
        flow = FlowState(tenant=tenant, trigger=trigger, event=event if type(event) is dict else {}, actions=actions,
                         limits=self.config.limits, flow_timeout_s=self.config.limits.flow_timeout_s,
                         denial_message=denial_message or self.config.denial_message, flow_id=flow_id)
        if record_fetches:
            flow.fetches = []
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            if self._engine is None:
                await self.start()
            assert self._engine is not None
            problem = self._engine.check_event(event)
            if problem is not None:
                flow.deny(None, "invalid_event", problem, None)  # no action ran
            else:
                await self._engine.run_actions(flow, prof, actions)
        finally:
            if task is not None:
                self._inflight.discard(task)
        self.flows += 1
        result = flow.result()
        try:
            audit_flow(self.audit, result)
        except Exception:  # an audit sink failing must not change the answer
            log.exception("audit sink failed")
        return result

class SyncRunner:
    """A blocking facade for scripts: ``with SyncRunner() as r: r.run_flow(...)``."""

    def __init__(self, config: RunnerConfig | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="actionpool-loop", daemon=True)
        self._thread.start()
        self.runner = Runner(config, **kwargs)
        self._call(self.runner.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def run_flow(self, **kwargs: Any) -> FlowResult:
        return self._call(self.runner.run_flow(**kwargs))

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()

    def check_event(self, event: Any) -> str | None:
        return self.runner.check_event(event)

    def set_tenant_policy(self, tenant: str, *, allow_hosts: Iterable[str] | None) -> None:
        self._call(self._set_policy(tenant, allow_hosts))  # on the loop's thread, like every other change

    async def _set_policy(self, tenant: str, allow_hosts: Iterable[str] | None) -> None:
        self.runner.set_tenant_policy(tenant, allow_hosts=allow_hosts)

    def forget_tenant(self, tenant: str) -> None:
        self._call(self.runner.forget_tenant(tenant))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.runner.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "SyncRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
