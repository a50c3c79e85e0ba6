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
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Iterable

import orjson

from ..protocol import check_json

from ._handlers import ExecutionContext
from ._cgroup import CgroupManager
from ._audit import AuditSink, LoggingAuditSink, audit_flow
from ._config import RunnerConfig
from ._errors import ConfigError, RunnerClosed, SandboxUnavailable
from ._flow import Action, FlowResult, FlowState
from ._pool import Overloaded, Pool, PoolClosed
from ._services import Services
from ._spawn import WORKER_RFD, WORKER_WFD, spawn_worker
from ._template import Template
from ._triggers import TriggerProfile, profile
from ._worker import WorkerHandle

log = logging.getLogger("actionpool")

MAX_EVENT_DEPTH = 64


class Runner:
    """Owns the worker pool, the services (cache, fetch) and the audit sink."""

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
        self._workdir: str | None = None
        self._closed = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self._methods: dict[str, list[str]] = {}
        self.sandbox_report: dict[str, Any] = {}
        self._cgroups: CgroupManager | None = None
        self._template: Template | None = None
        self.flows = 0

    # -- life cycle ------------------------------------------------------------------
    async def __aenter__(self) -> "Runner":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        if self._pool is not None:
            return
        cfg = self.config
        self._services = Services(cfg)
        if cfg.sandbox.cgroups and cfg.sandbox.mode != "off":
            self._cgroups = CgroupManager.detect()
            if self._cgroups is None:
                log.warning("actionpool: no memory cgroups on this host (needs root or a delegated subtree); "
                            "memory is capped by RLIMIT_AS alone, and a caught MemoryError goes unnoticed")
        self._workdir = tempfile.mkdtemp(prefix="actionpool-")
        os.chmod(self._workdir, 0o555)
        if cfg.fork_template:
            self._template = Template(cfg.python, cfg.worker_start_timeout_s)
            try:
                await self._template.start()
            except Exception as exc:
                log.warning("actionpool: fork template unavailable (%s); spawning each worker", exc)
                await self._template.close()
                self._template = None
        limits = cfg.limits
        self._pool = Pool(self._launch, pool_size=cfg.pool_size, max_workers=cfg.max_workers,
                          max_queue=cfg.max_queue, max_executions=cfg.max_executions_per_worker,
                          spawn_concurrency=cfg.spawn_concurrency, idle_timeout_s=cfg.idle_timeout_s,
                          min_idle_per_tenant=cfg.min_idle_per_tenant,
                          default_profile=(limits.memory_mb, limits.cpu_seconds, limits.max_open_files))
        # The first worker doubles as the sandbox probe: strict mode refuses to start without it.
        try:
            w = await self._launch(self._pool.default_profile)
        except Exception as exc:
            await self._teardown()
            if cfg.sandbox.mode == "strict":
                raise SandboxUnavailable(f"strict sandbox mode: worker refused to start: {exc}") from None
            raise
        self.sandbox_report = dict(w.info.get("sandbox") or {})
        missing = [r for r in cfg.sandbox.require if not self.sandbox_report.get(r)]
        if missing and cfg.sandbox.mode == "degraded":
            log.warning("actionpool: DEGRADED SANDBOX: protections missing on this host: %s (%s)",
                        ", ".join(missing), "; ".join(self.sandbox_report.get("errors", [])) or "no detail")
        await w.shutdown(cfg.kill_grace_s)
        await self._pool.start()

    async def _launch(self, wprofile: tuple[Any, ...]) -> WorkerHandle:
        cfg = self.config
        memory_mb, cpu_seconds, max_open_files = wprofile
        sb = cfg.sandbox
        if self._template is not None:
            spawned = await self._template.fork()
        else:
            spawned = spawn_worker(cfg.python)
        w = WorkerHandle(spawned, max_frame=cfg.limits.max_frame_bytes, profile=wprofile)
        memory = memory_mb << 20
        address_space = memory
        if self._cgroups is not None:
            # The worker blocks reading its configuration, so it is in the cgroup before any action code.
            try:
                cg = self._cgroups.create(f"w{spawned.pid}", memory_bytes=memory, pids_max=4)
                cg.add(spawned.pid)
            except OSError as exc:
                w.kill("cgroup setup failed")
                raise RuntimeError(f"cannot put worker in a memory cgroup: {exc}") from exc
            w.memory_check = cg.oom_killed
            w.on_exit.append(lambda: self._remove_cgroup(cg))
            # The cgroup is the cap (uncatchable OOM kill); RLIMIT_AS only stops absurd reservations.
            address_space = memory * sb.address_space_factor + (256 << 20)
        configure = {
            "max_frame": cfg.limits.max_frame_bytes,
            "coalesce": True,
            "sandbox": {
                "mode": sb.mode,
                "require": list(sb.require) if sb.mode == "strict" else [],
                "keep_fds": [WORKER_RFD, WORKER_WFD],
                "memory_bytes": address_space,
                "cpu_seconds": cpu_seconds,
                "max_open_files": max_open_files,
                "file_size": 0,
                "workdir": self._workdir,
                "network_namespace": sb.network_namespace,
                "drop_uid": sb.drop_uid,
                "drop_gid": sb.drop_gid,
            },
        }
        try:
            await w.start(configure, cfg.worker_start_timeout_s)
        except BaseException:
            w.kill("failed to start")
            raise
        return w

    def _remove_cgroup(self, cg: Any, attempt: int = 0) -> None:
        """Remove a dead worker's cgroup without blocking the loop: the kernel may need a moment."""
        try:
            if cg.try_remove() or attempt >= 100:
                return
        except OSError as exc:
            log.warning("actionpool: could not remove cgroup: %s", exc)
            return
        asyncio.get_running_loop().call_later(0.02, self._remove_cgroup, cg, attempt + 1)

    async def close(self, grace: float | None = None) -> None:
        """Finish in-flight flows within ``grace`` seconds, then kill what is left."""
        if self._closed:
            return
        self._closed = True
        grace = self.config.kill_grace_s if grace is None else grace
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=grace)
        await self._teardown(grace)

    async def _teardown(self, grace: float = 0.0) -> None:
        if self._pool is not None:
            await self._pool.close(grace)
        if self._inflight:  # flows whose workers were just killed answer now
            await asyncio.wait(list(self._inflight), timeout=max(grace, 1.0))
        if self._services is not None:
            await self._services.aclose()
            self._services = None
        if self._template is not None:
            await self._template.close()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._cgroups is not None:
            try:
                self._cgroups.cleanup()
            except OSError as exc:
                log.warning("actionpool: could not remove worker cgroups: %s", exc)
            self._cgroups = None

    def stats(self) -> dict[str, Any]:
        s = self._pool.stats() if self._pool else {}
        s["flows"] = self.flows
        if self._template is not None:
            s.update(self._template.stats())
        return s

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._pool.workers] if self._pool else []

    # -- flows ----------------------------------------------------------------------------
    async def run_flow(self, *, trigger: str, actions: Iterable[Action], event: Any, tenant: str = "default",
                       denial_message: str | None = None, flow_id: str | None = None) -> FlowResult:
        """Run ``actions`` in order for one login or registration; always returns one FlowResult."""
        if self._closed:
            raise RunnerClosed("runner is closed")
        if self._pool is None:
            await self.start()
        prof = profile(trigger)
        actions = list(actions)
        if not all(isinstance(a, Action) for a in actions):
            raise ConfigError("actions must be a list of runner.Action")
        if type(tenant) is not str or not tenant:
            raise ConfigError("tenant must be a non-empty string")
        flow = FlowState(tenant=tenant, trigger=trigger, event=event if type(event) is dict else {}, actions=actions,
                         limits=self.config.limits, flow_timeout_s=self.config.limits.flow_timeout_s,
                         denial_message=denial_message or self.config.denial_message, flow_id=flow_id)
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            problem = self._check_event(event)
            if problem is not None:
                flow.deny(None, "invalid_event", problem, None)  # no action ran
            else:
                await self._run_actions(flow, prof, actions)
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

    def _check_event(self, event: Any) -> str | None:
        if type(event) is not dict:
            return f"event must be a JSON object, got {type(event).__name__}"
        try:
            check_json(event, "event", max_depth=MAX_EVENT_DEPTH)
        except TypeError as exc:
            return str(exc)
        except RecursionError:
            return "event nested too deeply"
        try:  # strings must be valid UTF-8 (lone surrogates cannot cross the wire)
            size = len(orjson.dumps(event))
        except (TypeError, orjson.JSONEncodeError) as exc:
            return f"event is not serialisable: {exc}"
        if size > self.config.limits.max_frame_bytes // 2:
            return f"event of {size} bytes exceeds the {self.config.limits.max_frame_bytes // 2}-byte limit"
        return None

    async def _acquire_live(self, flow: FlowState, action: Action, wprofile: tuple[Any, ...]) -> WorkerHandle:
        """A live idle worker; one that died between hand-over and use is replaced (a few times at most)."""
        assert self._pool is not None
        # The pool keeps workers apart by owner: the tenant, or the tenant and the action's source.
        owner = flow.tenant if self.config.worker_binding == "tenant" else f"{flow.tenant}\x00{action.digest}"
        for _ in range(3):
            remaining = flow.deadline - time.monotonic()
            w = await self._pool.acquire(owner, action.digest, wprofile,
                                         min(self.config.queue_timeout_s, max(remaining, 0.001)))
            if w.alive and w.state.value == "idle":
                return w
            self._pool.release(w, False)
        raise RuntimeError("workers kept dying before they could be used")

    def _methods_for(self, prof: TriggerProfile) -> list[str]:
        m = self._methods.get(prof.name)
        if m is None:
            m = self._methods[prof.name] = sorted(prof.methods)
        return m

    async def _run_actions(self, flow: FlowState, prof: TriggerProfile, actions: list[Action]) -> None:
        assert self._pool is not None and self._services is not None
        pool = self._pool
        for i, action in enumerate(actions):
            if flow.denial is not None:
                break
            rec = flow.records[i]
            limits = flow.limits_for(action.slug)
            now = time.monotonic()
            remaining = flow.deadline - now
            if remaining <= 0:
                flow.deny(action.slug, "flow_timeout", "flow exceeded its time limit before this action started", None)
                break
            wprofile = (limits.memory_mb, limits.cpu_seconds, limits.max_open_files)
            try:
                w = await self._acquire_live(flow, action, wprofile)
            except Overloaded as exc:
                flow.deny(action.slug, "overloaded", str(exc), None)
                rec.status = "failed"
                break
            except PoolClosed:
                flow.deny(action.slug, "worker_crash", "runner is shutting down", None)
                rec.status = "failed"
                break
            except Exception as exc:
                flow.deny(action.slug, "worker_crash", f"worker could not start: {exc}", None)
                rec.status = "failed"
                break
            remaining = flow.deadline - time.monotonic()
            if limits.action_timeout_s <= remaining:
                timeout, kind = limits.action_timeout_s, "timeout"
            else:
                timeout, kind = max(remaining, 0.001), "flow_timeout"
            ctx = ExecutionContext(flow, action.slug, prof, self._services, time.monotonic() + timeout)
            params = {
                "trigger": prof.name,
                "filename": action.filename,
                "hash": action.digest,
                "event": flow.event_for(action),
                "methods": self._methods_for(prof),
                "max_log_bytes": limits.max_log_message_bytes,
            }
            if action.digest not in w.compiled:
                params["source"] = action.source
            fut = w.execute(params, ctx, timeout, kind, limits.max_output_bytes)
            try:
                outcome = await fut
            except asyncio.CancelledError:
                w.kill("flow cancelled by the caller")
                pool.release(w, False)
                raise
            if outcome.error is None:
                w.compiled.add(action.digest)
            pool.release(w, outcome.reusable)
            rec.duration_ms = outcome.duration_ms
            if outcome.error is not None:
                err = outcome.error
                ekind = err.get("kind", "worker_crash")
                etype = err.get("type") or None
                reason = f"{etype}: {err.get('message', '')}" if etype else err.get("message", ekind)
                extra = {"traceback": err["traceback"]} if err.get("traceback") else {}
                flow.deny(action.slug, ekind, reason, None, error_code=etype, **extra)
                rec.status = "failed"
            elif ctx.denied_here:
                rec.status = "denied" if flow.denial and flow.denial["kind"] in ("denied", "validation_error") else "failed"
            else:
                rec.status = "ok"


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
