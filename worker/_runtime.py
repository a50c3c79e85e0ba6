"""Runs one action execution inside the worker and builds its answer.

The answer is the execute request's response: ``error`` is ``None`` when the
handler returned, or a map ``{kind, type, message, traceback}`` describing why
it did not. Tracebacks keep only frames of the action's own source, so line
numbers point into the file the customer wrote.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import linecache
import os
import traceback
from collections import OrderedDict
from types import CodeType, TracebackType
from typing import Any

from ._proxy import ApiNotAvailable, Console, Execution, LogStream, build_api, install_output_capture
from ._channel import Channel, NullChannel
from ._event import view

MODULE_CACHE_SIZE = 32

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


class Runtime:
    """Worker-side state that lives across executions: compiled modules, loop, output capture."""

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.modules: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.current: Execution | None = None
        self.console = Console(lambda: self.current)
        self.streams: tuple[LogStream, LogStream] = install_output_capture(lambda: self.current)
        self._pristine_builtins = dict(builtins.__dict__)
        self._js: Any = None  # worker._js.JsRuntime, created by the first JavaScript execution

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
        """Run one execution; returns ``(error, result)`` for the response."""
        if p.get("language") == "js":
            if self._js is None:
                from ._js import JsRuntime

                self._js = JsRuntime(self.channel)
            return self._js.execute(p)
        trigger = p["trigger"]
        filename = p["filename"]
        ex = Execution(self.channel, trigger, frozenset(p["methods"]), p["max_log_bytes"])
        self.current = ex
        for s in self.streams:
            s.reset()
        try:
            ns = self.module(p["hash"], p.get("source"), filename)
            handler = self._find_handler(ns, trigger, filename)
            event = view(p["event"])
            api = build_api(ex)
            result = handler(event, api)
            if inspect.isawaitable(result):
                self._run_async(result)
            for s in self.streams:
                s.flush()
            return None, {"ok": True}
        except HandlerNotFound as exc:
            return {"kind": "uncaught_error", "type": "HandlerNotFound", "message": str(exc), "traceback": ""}, None
        except MemoryError as exc:
            return self._describe(exc, filename, kind="memory_limit"), None
        except Exception as exc:
            for s in self.streams:
                s.flush()
            return self._describe(exc, filename), None
        finally:
            ex.active = False
            self.current = None
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

    def _run_async(self, awaitable: Any) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.add_reader(self.channel.rfd, self._on_readable)
        try:
            loop.run_until_complete(_settled(awaitable, self.channel.waiting))
        finally:
            loop.remove_reader(self.channel.rfd)
            # What the action spawned and is not waiting for an api reply dies with the execution.
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

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


async def _settled(awaitable: Any, waiting: dict[int, "asyncio.Future[Any]"]) -> Any:
    """Run the handler, then let every api call it started, awaited or not, get its answer.

    Fire-and-forget (``asyncio.ensure_future(api.fetch(url))`` and return) is deterministic: the
    tasks the handler scheduled take their first step, so their requests are sent, and the
    execution ends only once no request is in flight, so the supervisor has judged each one (a
    fetch to a host off the allowlist denies the flow) before the answer. Code continuing from a
    reply runs on and may call the api again; the action's time limit bounds it all. A bare
    ``api.fetch(url)`` neither awaited nor scheduled sends nothing (a Python coroutine that never
    runs) and is logged as never awaited. Not policy: the worker only waits for its own calls.
    """
    spawned: set[asyncio.Task[Any]] = set()
    try:
        return await awaitable
    finally:
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(0)  # tasks scheduled by the handler take their first step
            spawned |= asyncio.all_tasks() - {me}
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
