"""The flow engine: runs one flow's actions in order, one worker execution each.

``Runner`` is the façade (life cycle, the public ``run_flow``); this module
holds what happens between "the event is accepted" and "the FlowState has its
answer": the event check, acquiring a live worker, the ``execute`` request,
and turning each execution's outcome into the flow's records and denial.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable

import orjson

from ..protocol import check_json, pack

from ._admission import Admission, Token
from ._config import RunnerConfig
from ._corun import CoRunners
from ._cpu import CpuGovernor
from ._decisions import ALLOW
from ._errors import DenialKind, Overloaded, PoolClosed
from ._failure import environment_kind
from ._flow import Action, FlowState, js_heap_bytes
from ._handlers import ExecutionContext
from ._hints import failure_reason
from ._pool import Pool
from ._services import Services
from ._triggers import TriggerProfile
from ._worker import WorkerHandle

MAX_EVENT_DEPTH = 64
# How an execution ends when its worker is killed under it (the exit status read, or not in time).
_KILLED_KINDS = frozenset({"worker_crash", "protocol_error", "worker_lost"})


def event_problem(event: Any, max_frame_bytes: int) -> str | None:
    """Why ``event`` cannot be a flow's event (not an object, not plain JSON, too deep, too large), or None.

    Size first, then structure: orjson (C, linear, stops at the first value it cannot
    write) measures the serialised size before any per-element check runs, so an
    oversized event is refused for the cost of one encode; ``check_json`` then judges
    exact types, finite numbers and depth on a value already known to be small.
    """
    if type(event) is not dict:
        return f"event must be a JSON object, got {type(event).__name__}"
    limit = max_frame_bytes // 2
    try:  # strings must be valid UTF-8 (lone surrogates cannot cross the wire)
        size = len(orjson.dumps(event))
    except (TypeError, orjson.JSONEncodeError) as exc:
        try:  # a precise message (the path of the bad value) when there is one
            check_json(event, "event", max_depth=MAX_EVENT_DEPTH, max_values=None)
        except TypeError as precise:
            return str(precise)
        return f"event is not serialisable: {exc}"
    if size > limit:
        return f"event of {size} bytes exceeds the {limit}-byte limit"
    try:
        # tree=True: orjson bounded the expanded size and refused cycles already.
        check_json(event, "event", max_depth=MAX_EVENT_DEPTH, tree=True, max_values=None)
    except TypeError as exc:
        return str(exc)
    return None


def carry_problem(flow: FlowState, nxt: Action, max_frame_bytes: int) -> str | None:
    """Why the next action's execute request would not fit in one frame, or None.

    Later actions receive the state and metadata earlier ones set in their event
    (``event.step``, ``event.user``). When they no longer fit, the action that just set
    them is blamed, not the next one, whose request could not even be encoded.
    """
    size = len(pack(flow.event_for(nxt))) + len(nxt.source.encode("utf-8", "surrogatepass")) + 1024
    if size > max_frame_bytes:
        return (f"state and metadata set by this action make the next action's request {size} bytes, "
                f"over the {max_frame_bytes}-byte frame limit")
    return None


class _AdmittedContext(ExecutionContext):
    """An execution admitted to the CPU (runner/_admission.py): its first request ends its admission.

    A request (fetch, cache read) makes the worker wait for the supervisor's answer: from then on the
    execution is waiting, not computing, and holds no share of the CPU, so it gives its token back.
    """

    token: Token | None = None

    def request(self, method: str, params: list[Any]) -> Awaitable[Any]:
        tok, self.token = self.token, None
        if tok is not None:
            tok.leave()
        return super().request(method, params)


class FlowEngine:
    """Runs flows against one pool and one set of services."""

    def __init__(self, config: RunnerConfig, pool: Pool, services: Services) -> None:
        self.config = config
        self._pool = pool
        self._services = services
        self._methods: dict[str, list[str]] = {}
        # Set by Runner.close() once the grace period is over: whatever fails from then on failed
        # because the runner killed it, and says so (``shutdown``), not ``worker_crash SIGKILL``.
        self.closing = False
        self.cpu = CpuGovernor(config.cpu_budget_ms, config.worker_nice, config.worker_batch) \
            if config.cpu_budget_ms else None
        running = config.running_limit()
        self.admission = Admission(running, config.running_hold_ms / 1000) if running else None
        self.co = CoRunners(self._left)   # busy workers other executions of their action may join (runner/_corun.py)

    def owner_of(self, tenant: str, action: Action) -> str:
        """Whose workers may run ``action`` for ``tenant`` (see ``_acquire_live``)."""
        return tenant if self.config.worker_binding == "tenant" else f"{tenant}\x00{action.identity}"

    def worker_key(self, tenant: str, action: Action) -> tuple[str, tuple[Any, ...]]:
        """The pool key a flow of ``action`` acquires under: (owner, worker profile); ``Runner.prewarm`` uses it."""
        limits = self.config.limits.merged(action.limits)
        return self.owner_of(tenant, action), (limits.memory_mb, limits.cpu_seconds, limits.max_open_files)

    def check_event(self, event: Any) -> str | None:
        return event_problem(event, self.config.limits.max_frame_bytes)

    async def _acquire_live(self, flow: FlowState, action: Action, wprofile: tuple[Any, ...],
                            owner: str) -> WorkerHandle:
        """A live idle worker; one that died between hand-over and use is replaced (a few times at most)."""
        # The pool keeps workers apart by owner. worker_binding="action" (the default): one action of one
        # tenant, i.e. tenant + slug + source + secrets (Action.identity), because module globals live on
        # in a warm worker and must not carry one action's secrets into another's execution.
        # worker_binding="tenant": any action of the tenant; its actions can then see each other's
        # module globals and secrets (a tenant is one trust domain).
        for _ in range(3):
            remaining = flow.deadline - time.monotonic()
            w = await self._pool.acquire(owner, action.digest, wprofile,
                                         min(self.config.queue_timeout_s, max(remaining, 0.001)), flow.tenant)
            if w.alive and w.state.value == "idle":
                return w
            self._pool.release(w, False)
        raise RuntimeError("workers kept dying before they could be used")

    def _left(self, w: WorkerHandle, reusable: bool) -> None:
        """A flow is done with ``w``: the last one to leave gives it back to the pool."""
        if self.co.leave(w):
            if self.cpu is not None:
                self.cpu.end(w)
            self._pool.release(w, reusable and not w.draining)

    def _methods_for(self, prof: TriggerProfile) -> list[str]:
        m = self._methods.get(prof.name)
        if m is None:
            m = self._methods[prof.name] = sorted(prof.methods)
        return m

    async def run_actions(self, flow: FlowState, prof: TriggerProfile, actions: list[Action]) -> None:
        resume = 0  # a skip_to block passes over the entries before this index (their records stay "skipped")
        for i, action in enumerate(actions):
            if flow.denial is not None:
                break
            if i < resume:
                continue
            rec = flow.records[i]
            decide = getattr(action, "decide", None)
            if decide is not None:  # a decision block (runner/_decisions.py): evaluated here, no worker
                rec.status = decide(flow)
                goto, flow.goto = flow.goto, None
                if goto is None:
                    continue
                if goto == ALLOW:
                    break  # the flow ends allowed; the later entries stay "skipped"
                resume = next((j for j in range(i + 1, len(actions)) if actions[j].slug == goto), -1)
                if resume < 0:  # an embedder's list without the target: fail closed, never run past it
                    flow.deny(action.slug, "decision_error", f"skip_to {goto!r} is not a later entry of this flow",
                              None)
                    rec.status = "failed"
                    break
                continue
            limits = flow.limits_for(action.slug)
            now = time.monotonic()
            remaining = flow.deadline - now
            if remaining <= 0:
                flow.deny(action.slug, "flow_timeout", "flow exceeded its time limit before this action started", None)
                break
            wprofile = (limits.memory_mb, limits.cpu_seconds, limits.max_open_files)
            # Co-running (runner/_corun.py): Python actions only (a JavaScript execution blocks its worker's
            # loop), and not under cpu_limit_ms (CPU time is counted per worker, not per execution).
            co = limits.co_run if limits.co_run > 1 and action.language != "js" and not limits.cpu_limit_ms else 1
            try:
                # FIFO admission to the CPU (runner/_admission.py); an unused token expires by itself.
                tok = await self.admission.enter() if self.admission is not None else None
                owner = self.owner_of(flow.tenant, action)
                key = (owner, wprofile)
                w = None
                if co > 1:
                    w = self.co.join(key, action.digest, co) or await self.co.join_wait(
                        key, action.digest, co, min(self.config.co_run_wait_ms / 1000, max(remaining, 0.001)))
                joined = w is not None
                if w is None:
                    w = await self._acquire_live(flow, action, wprofile, owner)
                    self.co.hold(key, w, action.digest if co > 1 else None)
            except Overloaded as exc:
                flow.deny(action.slug, "overloaded", str(exc), None)
                rec.status = "failed"
                break
            except PoolClosed:
                flow.deny(action.slug, DenialKind.SHUTDOWN, "the runner closed before the action started", None)
                rec.status = "failed"
                break
            except Exception as exc:
                if self.closing:
                    flow.deny(action.slug, DenialKind.SHUTDOWN, f"the runner closed while a worker started: {exc}",
                              None)
                else:
                    flow.deny(action.slug, "worker_crash", f"worker could not start: {exc}", None)
                rec.status = "failed"
                break
            remaining = flow.deadline - time.monotonic()
            if limits.action_timeout_s <= remaining:
                timeout, kind = limits.action_timeout_s, "timeout"
            else:
                timeout, kind = max(remaining, 0.001), "flow_timeout"
            began = time.monotonic()
            rec.started_ms = (began - flow.started) * 1000.0   # when the span of this action starts (tracing)
            if tok is None:
                ctx = ExecutionContext(flow, action.slug, prof, self._services, began + timeout)
            else:
                ctx = _AdmittedContext(flow, action.slug, prof, self._services, began + timeout)
                ctx.token = tok
            params = {
                "trigger": prof.name,
                "filename": action.filename,
                "hash": action.digest,
                "event": flow.event_for(action),
                "methods": self._methods_for(prof),
                "max_log_bytes": limits.max_log_message_bytes,
            }
            if action.language == "js":  # the engine's own limits, below the worker's (which stay behind them)
                params.update(language="js", timeout_s=timeout, memory_bytes=js_heap_bytes(limits))
            if action.digest not in w.compiled:
                params["source"] = action.source
            fut = w.execute(params, ctx, timeout, kind, limits.max_output_bytes,
                            max_queued=limits.max_queued_reply_bytes, cpu_budget_s=limits.supervisor_cpu_ms / 1000)
            cpu = self.cpu
            if cpu is not None:
                if joined:   # every execution there waits on a fetch: its CPU window starts again
                    cpu.end(w)
                cpu.begin(w, ctx.action_deadline - timeout, limits.cpu_limit_ms)
            try:
                outcome = await fut
            except asyncio.CancelledError:
                if self.co.holders(w) > 1:
                    # Others run beside it: this one ends there unread (its own timer still bounds it),
                    # and the worker is discarded after the last.
                    w.draining = True
                    fut.add_done_callback(lambda _f, w=w: self._left(w, False))
                else:
                    w.kill("flow cancelled by the caller")
                    self._left(w, False)
                raise
            finally:
                if tok is not None:
                    tok.leave()
            if outcome.error is None:
                w.compiled.add(action.digest)
            self._left(w, outcome.reusable)
            rec.duration_ms = outcome.duration_ms
            if outcome.error is not None and self.closing and outcome.error.get("kind") in _KILLED_KINDS:
                flow.deny(action.slug, DenialKind.SHUTDOWN, "the runner closed while the action ran; worker stopped",
                          None)
                rec.status = "failed"
            elif outcome.error is not None:
                err = outcome.error
                # An uncaught ApiError of the environment (cache down, fetch timed out or failed) is denied
                # as its code, once the supervisor confirms this execution's calls failed so.
                ekind = environment_kind(err, ctx.failed_calls) or err.get("kind", "worker_crash")
                etype = err.get("type") or None
                reason = failure_reason(err, ekind, limits.memory_mb)  # with a hint for newcomers' mistakes
                extra = {"traceback": err["traceback"]} if err.get("traceback") else {}
                fails_open = getattr(action, "fails_open", None)  # failure = "open" (runner/_failure.py)
                # Open only if whatever this execution itself denied (a fetch timeout is recorded as it
                # happens) may open too: an action that called deny and then failed stays denied.
                if fails_open is not None and fails_open(ekind) and \
                        (not ctx.denied_here or flow.denial is None or fails_open(flow.denial["kind"])):
                    flow.log(action.slug, "warn", f"failed open: {ekind}: {reason}")
                    if ctx.denied_here:
                        flow.denial = None
                    rec.status = "failed_open"
                    continue
                flow.deny(action.slug, ekind, reason, None, error_code=etype, **extra)
                rec.status = "failed"
            elif ctx.denied_here:
                fails_open = getattr(action, "fails_open", None)
                if flow.denial and fails_open is not None and fails_open(flow.denial["kind"]):
                    flow.log(action.slug, "warn", f"failed open: {flow.denial['kind']}: {flow.denial['reason']}")
                    flow.denial = None
                    rec.status = "failed_open"
                    continue
                rec.status = "denied" if flow.denial and flow.denial["kind"] in ("denied", "validation_error") else "failed"
            elif ctx.grew_event and i + 1 < len(actions) and \
                    (problem := carry_problem(flow, actions[i + 1], flow.limits_for(actions[i + 1].slug).max_frame_bytes)):
                # Blamed here, on the action that produced the data, not on the next one whose
                # execute request could no longer be encoded.
                flow.deny(action.slug, DenialKind.OUTPUT_LIMIT, problem, None)
                rec.status = "failed"
            else:
                rec.status = "ok"
