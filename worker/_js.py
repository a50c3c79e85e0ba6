"""JavaScript actions: a QuickJS context per action, behind the same api messages as Python.

The engine is ``quickjs-ng``'s C extension ``_quickjs`` (imported directly:
the package's ``quickjs/__init__.py`` starts a thread pool at import, which
the worker's seccomp filter forbids and the fork template must not carry).
It runs on the worker's only thread.

One context per action source, compiled once and kept (like a Python
action's module): the prelude (``_js_prelude.PRELUDE``) and the action are
one script, module-level code runs once, every execution calls the handler
with a freshly frozen event and a fresh ``api``. Every api call arrives here
as ``host(method, json_args)`` and is checked with the protocol's own table
(``check_params``, the offered methods) before it becomes the same message a
Python action would send; the supervisor decides.

Limits: the context's memory limit is set below the worker's cap. An engine
out-of-memory ends the execution as ``memory_limit`` whatever the action
catches: the host notices it (``_js_oom``: the engine formats the message
through a watched ``vsnprintf`` before it tries to allocate the error, which
it may not manage, throwing ``null``), refuses every api call after it,
interrupts the action at its next interrupt check and answers
``memory_limit`` whatever the JavaScript returned. The engine's interrupt
handler also stops the action at its time limit, after which the worker goes
quiet and the supervisor's timer kills it exactly as for Python (``timeout``).

The interrupt handler is installed through the engine's C API
(``JS_SetInterruptHandler``, exported by the extension) because the
binding's own ``set_time_limit`` refuses every call into Python while it is
set, and an action's api calls are calls into Python. The handler checks a
wall-clock deadline; it is created at import (in the fork template, before
the sandbox), so no executable memory is needed later.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import time
from collections import OrderedDict
from typing import Any

import _quickjs
import orjson

from ..protocol import LOG_LEVELS, METHODS, InvalidMessage, Request, Response, check_params
from ._channel import Channel, PipeClosed, notification
from . import _js_oom
from ._js_prelude import PRELUDE
from ._proxy import ApiClosed, ApiNotAvailable, Execution

CONTEXT_CACHE_SIZE = 8
EXIT_PROTOCOL = 71
EXIT_PIPE = 70
DEFAULT_MEMORY = 64 << 20

# Both file forms are .js: a module assigns exports.onExecute... (or module.exports); anything else is a bare
# body, run as the body of `async (event, api) => { ... }`.
_MODULE_RE = re.compile(r"(?<![\w$.])(?:module\s*\.\s*)?exports\s*(?:\.\s*onExecute|\[|=[^=])")
_INPUT_POS = re.compile(r"<input>:(\d+):(\d+)")
_TABLE = orjson.dumps([[m.name, m.returns, len(m.params)] for m in METHODS.values()]).decode()


# -- the engine's interrupt handler --------------------------------------------------------------
_lib = ctypes.CDLL(_quickjs.__file__)
_lib.JS_GetRuntime.restype = ctypes.c_void_p
_lib.JS_GetRuntime.argtypes = [ctypes.c_void_p]
_INTERRUPT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_lib.JS_SetInterruptHandler.restype = None
_lib.JS_SetInterruptHandler.argtypes = [ctypes.c_void_p, _INTERRUPT_FN, ctypes.c_void_p]
_deadline = [float("inf")]  # monotonic time at which the running execution is interrupted


def _should_interrupt(_rt: int | None, _opaque: int | None) -> int:
    """Stop at the deadline, and at once after an out-of-memory (the error the engine throws for it is catchable)."""
    return 1 if _js_oom.seen[0] or time.monotonic() >= _deadline[0] else 0


_on_interrupt = _INTERRUPT_FN(_should_interrupt)
# None when every engine out-of-memory is noticed on the host side; else why not (then only the prelude's
# Error.prepareStackTrace hook sees them, and not one so deep that the engine throws null).
OOM_WATCH_ERROR = _js_oom.install(_lib, _quickjs.__file__)


def install_interrupt(ctx: Any) -> bool:
    """Attach the deadline check to ``ctx``'s runtime; False if the binding's layout is not the expected one.

    A ``_quickjs.Context`` object is ``PyObject_HEAD; JSRuntime *runtime; JSContext *context; ...``.
    The two pointers are only trusted if the engine agrees that the context belongs to the runtime.
    """
    base = id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)
    rt = ctypes.c_void_p.from_address(base).value
    jctx = ctypes.c_void_p.from_address(base + ctypes.sizeof(ctypes.c_void_p)).value
    if not rt or not jctx or rt == jctx or _lib.JS_GetRuntime(jctx) != rt:
        return False
    _lib.JS_SetInterruptHandler(rt, _on_interrupt, None)
    return True


def is_module(source: str) -> bool:
    return _MODULE_RE.search(source) is not None


def handler_names(trigger: str) -> list[str]:
    """``post-login`` -> ``onExecutePostLogin``, then the generic ``onExecute``."""
    return ["onExecute" + "".join(part[:1].upper() + part[1:] for part in trigger.split("-")), "onExecute"]


def source_digest(source: str) -> str:
    """The hash the supervisor names a JS action by (``Action.digest``): distinct from any Python source's."""
    return hashlib.sha256(b"js\x00" + source.encode("utf-8", "surrogatepass")).hexdigest()


class _Compiled:
    """One action's live context and the function that runs an execution in it."""

    def __init__(self, source: str, filename: str, host: Any, max_text: int) -> None:
        module = is_module(source)
        head_cfg = {"filename": filename, "module": module, "max_text": max_text}
        # The prelude's line count fixes where the action's first line lands in the script.
        probe = PRELUDE.replace("__AP_TABLE__", _TABLE)
        wrapper = "function (exports, module, require) {\n" if module else "async function (event, api) {\n"
        first = (probe + wrapper).count("\n") + 1
        head_cfg["first_line"] = first
        head_cfg["last_line"] = first + source.count("\n")
        self.filename = filename
        self.first_line = first
        script = probe.replace("__AP_CONFIG__", orjson.dumps(head_cfg).decode()) + wrapper + source + "\n})"
        self.ctx = _quickjs.Context()
        self.interruptible = install_interrupt(self.ctx)
        self.ctx.add_callable("__ap_host", host)
        self.script = script
        self.entry: Any = None


class JsRuntime:
    """Runs ``language == "js"`` executions for :class:`worker._runtime.Runtime`."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.compiled: OrderedDict[str, _Compiled] = OrderedDict()
        self.ex: Execution | None = None
        self.done: list[Any] | None = None        # [error or None, oom] once the handler settled
        self.pending: set[int] = set()            # msgids of api.fetch requests in flight
        self.arrived: list[Response] = []         # their responses, read while waiting for something else
        self.deadline = 0.0

    # -- execution ---------------------------------------------------------------------
    def execute(self, p: dict[str, Any]) -> tuple[Any, Any]:
        filename = p["filename"]
        self.ex = ex = Execution(self.channel, p["trigger"], frozenset(p["methods"]), p["max_log_bytes"])
        _js_oom.reset()
        self.done = None
        self.pending.clear()
        self.arrived.clear()
        self.deadline = time.monotonic() + float(p.get("timeout_s") or 5.0)
        c: _Compiled | None = None
        try:
            c = self._context(p, filename)
            if c.entry is None:
                c.ctx.set_memory_limit(int(p.get("memory_bytes") or DEFAULT_MEMORY))
                try:
                    c.entry = self._enter(c, c.ctx.eval, c.script)
                finally:
                    if c.entry is None:  # a compile error: never keep a context without its action
                        self.compiled.pop(p["hash"], None)
            self._enter(c, c.entry, "run", orjson.dumps(p["event"]).decode(), orjson.dumps(handler_names(p["trigger"])).decode())
            self._wait(c)
            error, oom = self.done if self.done is not None else (None, False)
            if _js_oom.seen[0] and (error is None or not str(error[1]).startswith("out of memory")):
                return _OOM_ERROR, None  # caught by the action, which then returned or threw something else
            oom = oom or _js_oom.seen[0]
            if error is None and not oom:
                return None, {"ok": True}
            etype, message, stack = error if error is not None else ("InternalError", "out of memory", "")
            kind = "memory_limit" if oom else "uncaught_error"
            return {"kind": kind, "type": etype, "message": message[:4096], "traceback": stack[-8192:]}, None
        except _quickjs.StackOverflow as exc:  # a JSException too: caught first
            if _js_oom.seen[0]:
                return _OOM_ERROR, None
            return {"kind": "uncaught_error", "type": "RangeError", "message": _first_line(str(exc)), "traceback": ""}, None
        except _quickjs.JSException as exc:
            if _js_oom.seen[0]:  # whatever ended the run (the interrupt that followed, or what the action threw)
                return _OOM_ERROR, None
            return self._engine_error(str(exc), filename, c), None
        except (LookupError, ValueError) as exc:  # the supervisor named a source this worker does not hold
            return {"kind": "uncaught_error", "type": type(exc).__name__, "message": str(exc), "traceback": ""}, None
        finally:
            ex.active = False
            self.ex = None

    def _context(self, p: dict[str, Any], filename: str) -> _Compiled:
        digest = p["hash"]
        c = self.compiled.get(digest)
        if c is not None:
            self.compiled.move_to_end(digest)
            return c
        source = p.get("source")
        if source is None:
            raise LookupError(f"worker has no compiled action for source hash {digest}")
        if source_digest(source) != digest:
            raise ValueError("source does not match its hash")
        c = _Compiled(source, filename, self._host, self.channel.max_frame)
        self.compiled[digest] = c
        while len(self.compiled) > CONTEXT_CACHE_SIZE:
            self.compiled.popitem(last=False)
        return c

    def _enter(self, c: _Compiled, fn: Any, *args: Any) -> Any:
        """Call into the engine; an interrupt at the deadline means the time is up."""
        _deadline[0] = self.deadline
        try:
            return fn(*args)
        except _quickjs.JSException as exc:
            if (str(exc).startswith("InternalError: interrupted") and time.monotonic() >= self.deadline
                    and not _js_oom.seen[0]):
                self._quiet()
            raise
        finally:
            _deadline[0] = float("inf")

    def _wait(self, c: _Compiled) -> None:
        """Run promise jobs and deliver fetch replies until the handler's promise settles."""
        ctx = c.ctx
        while True:
            while self._enter(c, ctx.execute_pending_job):
                pass
            if self.done is not None or _js_oom.seen[0]:
                return
            if self.arrived:
                msg = self.arrived.pop(0)
            elif self.pending:
                self.channel.flush()
                msg = self._recv_response()
            else:
                self.done = [["Error", "the action's promise never settled (nothing left to wait for)",
                              "Error: the action's promise never settled"], False]
                return
            self.pending.discard(msg.msgid)
            if msg.error is not None:
                err = msg.error if type(msg.error) is dict else {}
                reply = [["ApiError", f"{err.get('kind', 'api_error')}: {err.get('message', 'the call failed')}",
                          str(err.get("kind", "api_error"))], None]
            else:
                reply = [None, msg.result]
            self._enter(c, c.entry, "deliver", str(msg.msgid), orjson.dumps(reply).decode())

    def _recv_response(self) -> Response:
        try:
            msg = self.channel.recv()
        except PipeClosed:
            os._exit(EXIT_PIPE)
        if type(msg) is not Response or msg.msgid not in self.pending:
            os._exit(EXIT_PROTOCOL)  # the supervisor spoke nonsense: nothing to save
        return msg

    def _quiet(self) -> None:
        """The action's time is up: stop running it and wait for the supervisor's kill (it answers ``timeout``)."""
        try:
            self.channel.flush()
            while os.read(self.channel.rfd, 1 << 16):
                pass
        finally:
            os._exit(0)

    # -- the one way out of the context ----------------------------------------------------
    def _host(self, op: str, text: str) -> str:
        """``"0"``: done; ``"1" + json``: a value; ``"2" + json``: an error ``[type, message, kind]`` to throw."""
        try:
            return self._dispatch(op, text)
        except (TypeError, ValueError, ApiNotAvailable, ApiClosed, LookupError) as exc:
            if isinstance(exc, orjson.JSONDecodeError):
                exc = TypeError("a string argument is not valid UTF-8 (it contains a lone surrogate)")
            return "2" + orjson.dumps([type(exc).__name__, str(exc)[:4096], None]).decode()
        except PipeClosed:
            os._exit(EXIT_PIPE)
        except InvalidMessage:
            os._exit(EXIT_PROTOCOL)
        except MemoryError:
            return "2" + '["RangeError","out of memory in the worker",null]'
        except Exception as exc:  # never let an exception escape into the engine: the binding cannot carry it
            return "2" + orjson.dumps(["Error", f"{type(exc).__name__}: {exc}"[:4096], None]).decode()

    def _dispatch(self, op: str, text: str) -> str:
        if op == "$done":
            self.done = orjson.loads(text)
            return "0"
        ex = self.ex
        if ex is None:
            raise ApiClosed("this api object belongs to a finished execution")
        if _js_oom.seen[0]:  # nothing an action does after running out of memory reaches the supervisor
            raise ValueError(f"api.{op:.40}: this execution already ran out of memory")
        if op == "console":
            level, message = orjson.loads(text)
            ex.log(level, message)
            return "0"
        m = METHODS.get(op)
        if m is None:
            raise TypeError(f"api.{op:.40} does not exist")
        ex.check(m)
        params = check_params(m, orjson.loads(text))
        if op == "log" and params[0] not in LOG_LEVELS:
            raise ValueError(f"api.log: level must be one of {', '.join(LOG_LEVELS)}, got {params[0]!r:.40}")
        if op == "fetch":
            msgid = self.channel.new_id()
            self.channel.send(Request(msgid, op, params).wire())
            self.pending.add(msgid)
            return "1" + str(msgid)
        if not m.returns:
            self.channel.queue(notification(op, params))
            return "0"
        resp = self._call(op, params)
        if resp.error is not None:
            err = resp.error if type(resp.error) is dict else {}
            kind = str(err.get("kind", "api_error"))
            return "2" + orjson.dumps(["ApiError", f"{kind}: {err.get('message', 'the call failed')}", kind]).decode()
        return "1" + orjson.dumps(resp.result).decode()

    def _call(self, method: str, params: list[Any]) -> Response:
        """A value-returning call; replies to fetches in flight that arrive meanwhile are kept for later."""
        ch = self.channel
        msgid = ch.new_id()
        ch.send(Request(msgid, method, params).wire())
        while True:
            msg = ch.recv()
            if type(msg) is Response and msg.msgid == msgid:
                return msg
            if type(msg) is Response and msg.msgid in self.pending:
                self.arrived.append(msg)
                continue
            raise InvalidMessage(f"unexpected {type(msg).__name__} while waiting for a reply")

    # -- errors the engine raised outside the action's promise -----------------------------------
    def _engine_error(self, text: str, filename: str, c: _Compiled | None) -> dict[str, Any]:
        """A compile error or an uncatchable engine error: name the action's file and line."""
        head = _first_line(text)
        etype, _, message = head.partition(": ")
        where = ""
        m = _INPUT_POS.search(text)
        if m is not None and c is not None:
            line = int(m.group(1)) - c.first_line + 1
            if line >= 1:
                where = f"{filename}:{line}:{m.group(2)}"
        if etype == "SyntaxError" and where:
            message = f"{message} ({filename}, line {where.split(':')[1]})"
        kind = "memory_limit" if message == "out of memory" else "uncaught_error"
        tb = f"{head}\n    at {where}" if where else head
        return {"kind": kind, "type": etype or "Error", "message": message[:4096], "traceback": tb}


_OOM_ERROR = {"kind": "memory_limit", "type": "InternalError", "message": "out of memory",
              "traceback": "InternalError: out of memory (the JavaScript engine's memory limit)"}


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()
