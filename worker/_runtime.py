"""Runs one action execution inside the worker and builds its answer.

The answer is the execute request's response: ``error`` is ``None`` when the
handler returned, or a map ``{kind, type, message, traceback}`` describing why
it did not. Tracebacks keep only frames of the action's own source, so line
numbers point into the file the customer wrote.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import hashlib
import inspect
import linecache
import os
import traceback
from collections import OrderedDict
from types import CodeType, TracebackType
from typing import Any, NamedTuple

from ._proxy import ApiNotAvailable, Console, Execution, LogStream, build_api, install_output_capture
from ..protocol import Notification, Request, Response

from ._channel import Channel, NullChannel, TaggedChannel
from ._event import view

MODULE_CACHE_SIZE = 32
EXIT_PROTOCOL = 71   # the supervisor spoke nonsense (also worker/__main__.py's)

# The warm-up execution (Runtime.prime): the calls a typical action makes, on an event of the usual shape.
PRIME_FILENAME = "<actionpool warm-up>"
PRIME_SOURCE = """
def on_execute(event, api):
    user = event.user
    email = user.get("email") or ""
    if email.endswith("@example.invalid") or event.request.ip in ("0.0.0.0",):
        api.access.deny("warm-up", "warm-up")
    if api.cache.get("tier") is None:
        api.cache.set("tier", "gold")
    api.user.setAppMetadata("tier", user.app_metadata.get("tier", "free"))
    api.session.setCustomClaim("https://example.invalid/tier", {"tier": "gold", "n": [1, 2.5, True, None]})
    api.state.set("checked", True)
    api.log("info", f"checked {email}")
    print("warm-up")
"""
PRIME_HASH = hashlib.sha256(PRIME_SOURCE.encode()).hexdigest()
PRIME_EVENT = {
    "user": {"user_id": "auth0|1", "email": "a@example.com", "email_verified": True, "app_metadata": {"plan": "x"},
             "user_metadata": {}, "identities": [{"provider": "auth0", "connection": "db"}]},
    "request": {"ip": "127.0.0.1", "geoip": {"countryCode": "FR"}, "user_agent": "warm-up", "query": {}},
    "client": {"client_id": "c", "name": "app"}, "tenant": {"id": "t"}, "step": {},
}
PRIME_METHODS = ["access.deny", "cache.get", "cache.set", "user.setAppMetadata", "session.setCustomClaim",
                 "state.set", "log"]


class HandlerNotFound(Exception):
    """The action defines neither ``on_execute_<trigger>`` nor ``on_execute``."""


def handler_names(trigger: str) -> tuple[str, str]:
    return f"on_execute_{trigger.replace('-', '_')}", "on_execute"


# The execution whose code is running: read by print(), logging and console, and by the task
# factory (tasks belong to the execution that created them). A context variable, because several
# executions of one action may run on the loop at once, each in a context of its own.
CURRENT: contextvars.ContextVar[Execution | None] = contextvars.ContextVar("actionpool_execution", default=None)


class _Started(NamedTuple):
    """An execution whose handler returned an awaitable: the rest runs as a task on the loop."""

    ex: Execution
    awaitable: Any
    filename: str


class Runtime:
    """Worker-side state that lives across executions: compiled modules, loop, output capture.

    Executions arrive as ``execute`` requests. A handler that returns (a plain ``def``) is
    answered at once, without the event loop. An ``async def`` handler continues as a task, and
    while it awaits its replies another ``execute`` may arrive: the supervisor sends one only
    to a worker whose executions all wait on ``api.fetch`` (co-running, its decision). Each
    execution has its own ``api``, its own tagged channel, its own unfinished print line and its
    own tasks; every answer names its execute request.
    """

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.modules: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.console = Console(CURRENT.get)
        self.streams: tuple[LogStream, LogStream] = install_output_capture(CURRENT.get)
        self._pristine_builtins = dict(builtins.__dict__)
        self._js: Any = None  # worker._js.JsRuntime, created by the first JavaScript execution
        self.inflight = 0     # executions running as tasks on the loop
        self._idle: asyncio.Future[None] | None = None
        self._in_loop = False
        self._drain_scheduled = False
        self.shutdown_requested = False
        loop.set_task_factory(_task_factory)
        channel.on_message = self._on_loop_message
        channel.on_deferred = self._schedule_drain

    @property
    def current(self) -> Execution | None:
        return CURRENT.get()

    def prime(self) -> tuple[Any, Any]:
        """Run one built-in execution against a :class:`NullChannel`, then forget it.

        A forked worker shares the template's pages copy-on-write, and the first pass over the
        execution path writes to thousands of objects (reference counts, caches), each first
        write copying a page. Measured here: a new action's first execution took 1.9 ms on a
        fresh worker and 0.7 ms on one that had run another action before. A warm spare pays
        this while idle instead of in the first login it serves. Nothing of it stays: its module
        and source lines are dropped, builtins are restored by ``execute``, and the supervisor
        never hears of it.
        """
        real = self.channel
        self.channel = NullChannel(real.max_frame)
        try:
            return self.execute({"trigger": "post-login", "filename": PRIME_FILENAME, "hash": PRIME_HASH,
                          "source": PRIME_SOURCE, "event": PRIME_EVENT, "methods": PRIME_METHODS,
                          "max_log_bytes": 4096})
        finally:
            self.channel = real
            self.modules.pop(PRIME_HASH, None)
            linecache.cache.pop(PRIME_FILENAME, None)

    # -- the request loop -------------------------------------------------------
    def serve(self) -> None:
        """Answer ``execute`` requests until ``shutdown`` (or EOF: :class:`PipeClosed`)."""
        ch = self.channel
        while not self.shutdown_requested:
            msg = ch.deferred.popleft() if ch.deferred else ch.recv()
            self._on_message(msg)
        ch.flush()

    def _on_message(self, msg: Any) -> None:
        if type(msg) is Request and msg.method == "execute" and len(msg.params) == 1 and type(msg.params[0]) is dict:
            self._start_execution(msg.msgid, msg.params[0])
            if self.inflight and not self._in_loop:
                self._run_loop()
        elif type(msg) is Notification and msg.method == "shutdown":
            self.shutdown_requested = True
        elif type(msg) is Response:  # a reply to a request of a finished execution: dropped
            self.channel.stale += 1
        else:
            os._exit(EXIT_PROTOCOL)

    def _on_loop_message(self, msg: Any) -> None:
        """A request or notification read by the loop's reader, or drained after a blocking call."""
        if not self._in_loop:   # read during a blocking call outside the loop: serve() takes it next
            self.channel.deferred.append(msg)
            return
        self._on_message(msg)

    def _schedule_drain(self) -> None:
        if self._in_loop and not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain_deferred)

    def _drain_deferred(self) -> None:
        self._drain_scheduled = False
        ch = self.channel
        while ch.deferred and self._in_loop:
            self._on_message(ch.deferred.popleft())

    def _run_loop(self) -> None:
        """Run the loop until no execution is left on it, reading the pipe as it goes."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        self._in_loop = True
        loop.add_reader(self.channel.rfd, self._on_readable)
        try:
            # The last execution may end in the same loop pass that reads the next one's request.
            while self.inflight:
                self._idle = loop.create_future()
                loop.run_until_complete(self._idle)
        finally:
            self._in_loop = False
            loop.remove_reader(self.channel.rfd)
            self._idle = None

    def _start_execution(self, xid: int, p: dict[str, Any]) -> None:
        """Run the synchronous part of one execution; answer it, or leave its task on the loop."""
        if p.get("language") == "js":
            self._answer(xid, *self.execute(p))
            return
        ctx = contextvars.copy_context()
        got = ctx.run(self._begin, p, TaggedChannel(self.channel, xid))
        if type(got) is _Started:
            self.inflight += 1
            self.loop.create_task(self._finish_async(xid, got), context=ctx)
        else:
            self._answer(xid, *got)

    def _answer(self, xid: int, error: Any, result: Any) -> None:
        ch = self.channel
        ch.queue(Response(xid, error, result).wire())
        ch.flush()

    async def _finish_async(self, xid: int, st: _Started) -> None:
        try:
            try:
                await _settled(st.awaitable, st.ex)
                answer = self._succeeded(st.ex)
            except (Exception, asyncio.CancelledError) as exc:  # SystemExit ends the worker, as before
                answer = self._failed(exc, st.ex, st.filename)
            await self._end(st.ex)
            self._answer(xid, *answer)
        finally:
            self.inflight -= 1
            if not self.inflight and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    # -- compilation ----------------------------------------------------------
    def module(self, digest: str, source: str | None, filename: str) -> dict[str, Any]:
        """The action's module namespace, executed once per source hash and cached."""
        ns = self.modules.get(digest)
        if ns is not None:
            self.modules.move_to_end(digest)
            return ns
        if source is None:
            raise LookupError(f"worker has no compiled action for source hash {digest}")
        if hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest() != digest:
            raise ValueError("source does not match its hash")
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        code: CodeType = compile(source, filename, "exec", dont_inherit=True)
        ns = {"__name__": "action", "__file__": filename, "__builtins__": builtins, "console": self.console}
        self.modules[digest] = ns
        try:
            exec(code, ns)
        except BaseException:
            del self.modules[digest]
            raise
        while len(self.modules) > MODULE_CACHE_SIZE:
            self.modules.popitem(last=False)
        return ns

    # -- execution -------------------------------------------------------------
    def execute(self, p: dict[str, Any]) -> tuple[Any, Any]:
        """Run one execution to its end, alone (the warm-up, JavaScript); returns ``(error, result)``."""
        if p.get("language") == "js":
            if self._js is None:
                from ._js import JsRuntime

                self._js = JsRuntime(self.channel)
            return self._js.execute(p)
        ctx = contextvars.copy_context()
        got = ctx.run(self._begin, p, self.channel)
        if type(got) is not _Started:
            return got
        return ctx.run(self._run_alone, got)

    def _run_alone(self, st: _Started) -> tuple[Any, Any]:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.add_reader(self.channel.rfd, self._on_readable)
        try:
            try:
                loop.run_until_complete(_settled(st.awaitable, st.ex))
                return self._succeeded(st.ex)
            except Exception as exc:
                return self._failed(exc, st.ex, st.filename)
            finally:
                loop.run_until_complete(self._end(st.ex))
        finally:
            loop.remove_reader(self.channel.rfd)

    def _begin(self, p: dict[str, Any], channel: Channel | TaggedChannel) -> tuple[Any, Any] | _Started:
        """Compile, find the handler and call it: the answer, or the awaitable it returned."""
        trigger = p["trigger"]
        filename = p["filename"]
        ex = Execution(channel, trigger, frozenset(p["methods"]), p["max_log_bytes"])
        CURRENT.set(ex)
        try:
            ns = self.module(p["hash"], p.get("source"), filename)
            handler = self._find_handler(ns, trigger, filename)
            event = view(p["event"])
            api = build_api(ex)
            result = handler(event, api)
            if inspect.isawaitable(result):
                return _Started(ex, result, filename)
            answer = self._succeeded(ex)
        except Exception as exc:
            answer = self._failed(exc, ex, filename)
        self._end_sync(ex)
        return answer

    def _succeeded(self, ex: Execution) -> tuple[Any, Any]:
        for s in self.streams:
            s.flush_for(ex)
        return None, {"ok": True}

    def _failed(self, exc: BaseException, ex: Execution, filename: str) -> tuple[Any, Any]:
        if isinstance(exc, HandlerNotFound):
            return {"kind": "uncaught_error", "type": "HandlerNotFound", "message": str(exc), "traceback": ""}, None
        if isinstance(exc, MemoryError):
            return self._describe(exc, filename, kind="memory_limit"), None
        for s in self.streams:
            s.flush_for(ex)
        return self._describe(exc, filename), None

    async def _end(self, ex: Execution) -> None:
        """What the action spawned and is not waiting for an api reply dies with the execution."""
        me = asyncio.current_task()
        tasks = [t for t in ex.tasks if t is not me and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._end_sync(ex)

    def _end_sync(self, ex: Execution) -> None:
        ex.active = False
        ex.tasks.clear()
        ex.partial.clear()
        # An action that replaced builtins must not break the next one (same tenant, other action).
        d = builtins.__dict__
        if d != self._pristine_builtins:
            d.clear()
            d.update(self._pristine_builtins)

    def _find_handler(self, ns: dict[str, Any], trigger: str, filename: str) -> Any:
        for name in handler_names(trigger):
            fn = ns.get(name)
            if fn is not None:
                if not callable(fn):
                    raise HandlerNotFound(f"{filename}: {name} is not a function")
                return fn
        a, b = handler_names(trigger)
        raise HandlerNotFound(f"{filename}: no handler found; define {a}(event, api) or {b}(event, api)")

    def _on_readable(self) -> None:
        try:
            self.channel.on_readable()
        except BaseException:  # the supervisor went away or spoke nonsense: nothing to save
            os._exit(70)

    # -- errors ------------------------------------------------------------------
    def _describe(self, exc: BaseException, filename: str, kind: str = "uncaught_error") -> dict[str, Any]:
        if isinstance(exc, SyntaxError) and exc.filename == filename:
            where = f"{filename}, line {exc.lineno}"
            text = (exc.text or "").rstrip("\n")
            msg = f"{exc.msg} ({where})"
            tb = f'  File "{filename}", line {exc.lineno}\n    {text.strip()}\nSyntaxError: {exc.msg}\n'
            return {"kind": kind, "type": "SyntaxError", "message": msg, "traceback": tb}
        if isinstance(exc, ApiNotAvailable):
            kind = "uncaught_error"
        return {
            "kind": kind,
            "type": type(exc).__name__,
            "message": _safe_str(exc),
            "traceback": action_traceback(exc, filename),
        }


def _task_factory(loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None) -> Any:
    """Every task belongs to the execution current where it was created (ended with it)."""
    task = asyncio.Task(coro, loop=loop, context=context)
    ex = CURRENT.get() if context is None else context.get(CURRENT)
    if ex is not None:
        ex.tasks.add(task)
    return task


async def _settled(awaitable: Any, ex: Execution) -> Any:
    """Run the handler, then let every api call it started, awaited or not, get its answer.

    Fire-and-forget (``asyncio.ensure_future(api.fetch(url))`` and return) is deterministic: the
    tasks the handler scheduled take their first step, so their requests are sent, and the
    execution ends only once no request of its own is in flight, so the supervisor has judged
    each one (a fetch to a host off the allowlist denies the flow) before the answer. Code
    continuing from a reply runs on and may call the api again; the action's time limit bounds
    it all. A bare ``api.fetch(url)`` neither awaited nor scheduled sends nothing (a Python
    coroutine that never runs) and is logged as never awaited. Not policy: the worker only waits
    for its own calls, and an execution only for its own (others may share the loop).
    """
    waiting = getattr(ex.channel, "waiting", None)
    if waiting is None:
        waiting = {}
    spawned: set[asyncio.Task[Any]] = set()
    try:
        return await awaitable
    finally:
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(0)  # tasks scheduled by the handler take their first step
            spawned |= ex.tasks - {me}
            in_flight = [f for f in waiting.values() if not f.done()]
            if not in_flight:
                break
            await asyncio.wait(in_flight)
        for t in spawned:
            if t.done() and not t.cancelled():
                t.exception()   # an error nobody awaited is retrieved here, not logged into a later execution


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:4096]
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _action_frames(tb: TracebackType | None, filename: str) -> traceback.StackSummary:
    frames = [f for f in traceback.extract_tb(tb) if f.filename == filename]
    return traceback.StackSummary.from_list(frames)


def action_traceback(exc: BaseException, filename: str, limit_bytes: int = 8192) -> str:
    """The traceback with worker-internal frames removed, chained exceptions kept."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 8:
        seen.add(id(cur))
        stack = _action_frames(cur.__traceback__, filename)
        block = "Traceback (most recent call last):\n" + "".join(stack.format())
        block += "".join(traceback.format_exception_only(type(cur), cur))
        parts.append(block)
        nxt = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
        cur = nxt
    text = "\nThe above exception was the direct cause of the following exception:\n\n".join(reversed(parts))
    return text[-limit_bytes:]

