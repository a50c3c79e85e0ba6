"""The ``api`` object an action receives, built from the protocol's API table.

Every method validates its arguments here, in the worker, so a bad value
raises ``TypeError`` at call time inside the action (as the references
require), then becomes exactly one message. The worker decides nothing: which
methods a trigger offers arrives with the execute request, and the
supervisor checks every call again.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Callable

from ..protocol import LOG_LEVELS, METHODS, ApiMethod, check_json, check_params, snake_case, truncate_utf8
from ..protocol._schema import MAX_JSON_DEPTH

from ._channel import Channel, TaggedChannel, notification
from ._event import FrozenDict, FrozenList, thaw, view


class ApiError(Exception):
    """A value-returning api call the supervisor refused or that failed on the trusted side.

    ``code`` is machine-readable and one of ``protocol.API_ERROR_CODES``:
    ``http_fetch_denied``, ``http_fetch_timeout``, ``http_fetch_error``,
    ``cache_unavailable``, ``reply_too_large``, ``internal_error``.
    ``error_kind`` and ``kind`` are the same value (the references' name).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.error_kind = code
        self.kind = code
        self.message = message


class ApiNotAvailable(Exception):
    """The method exists but the current trigger does not offer it."""


class ApiClosed(Exception):
    """The api object of a finished execution was used."""


# Tracebacks shown to action authors name these as api.ApiError etc., not worker internals.
for _cls in (ApiError, ApiNotAvailable, ApiClosed):
    _cls.__module__ = "api"



class Execution:
    """Per-execution state shared by the api proxy, console and log capture."""

    def __init__(self, channel: Channel | TaggedChannel, trigger: str, offered: frozenset[str],
                 max_log_bytes: int) -> None:
        self.channel = channel
        self.trigger = trigger
        self.offered = offered
        self.max_log_bytes = max_log_bytes
        self.active = True
        self.partial: dict[str, str] = {}     # printed text not yet ended by a newline, per stream level
        self.tasks: set[Any] = set()          # asyncio tasks created while this execution was current

    def check(self, m: ApiMethod) -> None:
        if not self.active:
            raise ApiClosed(f"api.{m.name}: this api object belongs to a finished execution")
        if m.name not in self.offered:
            raise ApiNotAvailable(f"api.{m.name} is not available in the {self.trigger} trigger")

    def log(self, level: str, message: str) -> None:
        if self.active:
            self.channel.queue(notification("log", [level, truncate_utf8(message, self.max_log_bytes)]))
            # Written now, not coalesced: a line logged before a timeout or memory kill must reach the
            # supervisor, which reads what is left in the pipe before it gives a killed execution's verdict.
            self.channel.flush()


def _response(resp: Any) -> Any:
    if resp.error is not None:
        err = resp.error if type(resp.error) is dict else {}
        raise ApiError(str(err.get("kind", "internal_error")), str(err.get("message", "the call failed")))
    return view(resp.result)


def _plain_value(v: Any, path: frozenset[int] = frozenset()) -> Any:
    """Replace event views inside ``v`` by plain copies; anything else is left for ``check_json`` to judge.

    A container already on the path (a cycle) or past the depth limit is returned as it is, so the
    check that follows reports "circular reference" or "nested deeper" instead of recursing here.
    """
    t = type(v)
    if t is FrozenDict or t is FrozenList:
        return thaw(v)  # views come from a decoded event: finite and acyclic
    if t is dict or t is list or t is tuple:
        i = id(v)
        if i in path or len(path) > MAX_JSON_DEPTH:
            return v
        inner = path | {i}
        if t is dict:
            return {k: _plain_value(x, inner) for k, x in v.items()}
        return [_plain_value(x, inner) for x in v]
    return v


def _plain(args: list[Any]) -> list[Any]:
    """Views of the event passed back to the api (``api.state.set("u", event.user)``) become plain data."""
    return [_plain_value(a) if type(a) in (FrozenDict, FrozenList, dict, list, tuple) else a for a in args]


_MISSING: Any = object()


def camel_case(name: str) -> str:
    """``user_message`` -> ``userMessage`` (the references' spelling of a parameter)."""
    first, *rest = name.split("_")
    return first + "".join(w[:1].upper() + w[1:] for w in rest)


def _keywords(m: ApiMethod) -> dict[str, int]:
    """Parameter index by keyword, snake_case and camelCase alike (``user_message``, ``userMessage``)."""
    out: dict[str, int] = {}
    for i, p in enumerate(m.params):
        out[p.name] = out[camel_case(p.name)] = i
    return out


def _bind(m: ApiMethod, kw: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Positional and keyword arguments as the wire's positional list, with Python's own TypeErrors."""
    if not kwargs:
        return list(args)
    params = m.params
    if len(args) > len(params):
        raise TypeError(f"api.{m.name}() takes at most {len(params)} arguments ({len(args) + len(kwargs)} given)")
    out = list(args) + [_MISSING] * (len(params) - len(args))
    for k, v in kwargs.items():
        i = kw.get(k)
        if i is None:
            raise TypeError(f"api.{m.name}() got an unexpected keyword argument {k!r}")
        if out[i] is not _MISSING:
            raise TypeError(f"api.{m.name}() got multiple values for argument {params[i].name!r}")
        out[i] = v
    for i, p in enumerate(params):
        if out[i] is _MISSING:
            if not p.optional:
                raise TypeError(f"api.{m.name}() missing required argument {p.name!r}")
            out[i] = None
    return out


def _make_method(m: ApiMethod) -> Callable[..., Any]:
    """One api method as a plain function of its namespace object (``self._ex`` is the execution)."""
    name = m.name

    kw = _keywords(m)

    if name in ("user.setAppMetadata", "user.setUserMetadata"):
        def set_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
            """``(patch)`` or ``(key, value)``; as keywords ``patch=`` or ``key=``/``value=``."""
            ex: Execution = self._ex
            ex.check(m)
            if kwargs:
                unknown = set(kwargs) - {"patch", "key", "value"}
                if unknown:
                    raise TypeError(f"api.{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
                if "patch" in kwargs:
                    if args or len(kwargs) > 1:
                        raise TypeError(f"api.{name}() takes (key, value) or (patch)")
                    args = (kwargs["patch"],)
                else:
                    if "key" in kwargs and args:
                        raise TypeError(f"api.{name}() got multiple values for argument 'key'")
                    args = (*args, kwargs["key"]) if "key" in kwargs else args
                    if "value" not in kwargs or len(args) != 1:
                        raise TypeError(f"api.{name}() takes (key, value) or (patch)")
                    args = (args[0], kwargs["value"])
            if len(args) == 2:
                key, value = args
                if type(key) is not str:
                    raise TypeError(f"api.{name}: key must be a string, got {type(key).__name__}")
                patch = {key: value}
            elif len(args) == 1:
                patch = args[0]
            else:
                raise TypeError(f"api.{name}() takes (key, value) or (patch) ({len(args)} arguments given)")
            ex.channel.queue(notification(name, check_params(m, _plain([patch]))))
        return set_metadata

    if name == "log":
        def log(self: Any, *args: Any, **kwargs: Any) -> None:
            ex: Execution = self._ex
            ex.check(m)
            level, message = check_params(m, _bind(m, kw, args, kwargs))
            if level not in LOG_LEVELS:
                raise ValueError(f"api.log: level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
            ex.log(level, message)
        return log

    if name == "user.setUserId":
        def set_user_id(self: Any, *args: Any, **kwargs: Any) -> None:
            ex: Execution = self._ex
            ex.check(m)
            params = check_params(m, _bind(m, kw, args, kwargs))
            if not params[0]:
                raise ValueError("api.user.setUserId: user_id must be a non-empty string")
            ex.channel.queue(notification(name, params))
        return set_user_id

    if name == "fetch":
        def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
            ex: Execution = self._ex
            ex.check(m)
            params = check_params(m, _plain(_bind(m, kw, args, kwargs)))
            return _Pending(ex.channel, params, sys._getframe(1))
        return fetch

    if m.returns:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            ex: Execution = self._ex
            ex.check(m)
            return _response(ex.channel.call(name, check_params(m, _plain(_bind(m, kw, args, kwargs)))))
        return call

    def notify(self: Any, *args: Any, **kwargs: Any) -> None:
        ex: Execution = self._ex
        ex.check(m)
        ex.channel.queue(notification(name, check_params(m, _plain(_bind(m, kw, args, kwargs)))))
    return notify


class _Pending:
    """What ``api.fetch(...)`` returns: a coroutine-like object that sends the request when first run.

    Not a coroutine of this module, so an action that forgets ``await`` gets a warning naming
    its own line (``a.py:7: RuntimeWarning: api.fetch(...) was never awaited``) rather than a
    path inside the worker, and no request is sent. It has the coroutine protocol (``send``,
    ``throw``, ``close``, ``__await__``), so ``await``, ``asyncio.gather``, ``ensure_future`` and
    ``create_task`` all accept it.
    """

    __slots__ = ("_channel", "_params", "_file", "_line", "_inner")

    def __init__(self, channel: Channel, params: list[Any], caller: Any) -> None:
        self._channel = channel
        self._params = params
        self._file = caller.f_code.co_filename
        self._line = caller.f_lineno
        self._inner: Any = None

    def _start(self) -> Any:
        if self._inner is None:
            self._inner = _fetch(self._channel, self._params)
        return self._inner

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self._start().send(None)

    def send(self, value: Any) -> Any:
        return self._start().send(value)

    def throw(self, *exc: Any) -> Any:
        return self._start().throw(*exc)

    def close(self) -> None:
        if self._inner is None:
            self._inner = False  # closed before it ran: nothing was sent, nothing to warn about
        elif self._inner is not False:
            self._inner.close()

    def __del__(self) -> None:
        if self._inner is None:
            warnings.warn_explicit("api.fetch(...) was never awaited; no request was sent", RuntimeWarning,
                                   self._file, self._line)


async def _fetch(channel: Channel, params: list[Any]) -> Any:
    return _response(await channel.call_async("fetch", params))


class _Namespace:
    """Base of ``api`` and ``api.user``, ``api.cache``, ...: read-only, bound to one execution."""

    __slots__ = ("_ex",)
    _name = ""

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError(f"api{'.' + self._name if self._name else ''} is read-only")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<api{'.' + self._name if self._name else ''}>"


def _build_classes() -> tuple[type, dict[str, type]]:
    """Generate the namespace classes once, from the protocol's API table.

    Methods live on the classes, so binding an api object to an execution
    costs a handful of object allocations, not a closure per method.
    """
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for m in METHODS.values():
        fn = _make_method(m)
        *ns, leaf = m.name.split(".")
        target = top if not ns else groups.setdefault(ns[0], {})
        fn.__name__ = fn.__qualname__ = leaf
        target[leaf] = fn
        target[snake_case(leaf)] = fn
    ns_classes = {
        ns: type(f"api.{ns}", (_Namespace,), {"__slots__": (), "_name": ns, **methods})
        for ns, methods in groups.items()
    }
    slots = tuple(sorted({*ns_classes, *(snake_case(n) for n in ns_classes)}))
    api_cls = type("api", (_Namespace,), {"__slots__": slots, "ApiError": ApiError, **top})
    return api_cls, ns_classes


_API_CLASS, _NS_CLASSES = _build_classes()
_SNAKE_NS = {ns: snake_case(ns) for ns in _NS_CLASSES}


def build_api(ex: Execution) -> Any:
    """A fresh ``api`` bound to ``ex``: camelCase names and snake_case aliases for every method."""
    setter = object.__setattr__
    api = _API_CLASS.__new__(_API_CLASS)
    setter(api, "_ex", ex)
    for ns, cls in _NS_CLASSES.items():
        inst = cls.__new__(cls)
        setter(inst, "_ex", ex)
        setter(api, ns, inst)
        alias = _SNAKE_NS[ns]
        if alias != ns:
            setter(api, alias, inst)
    return api


class Console:
    """``console.log/debug/info/warn/error``: aliases of ``api.log``, arguments joined by a space."""

    _LEVELS = {"log": "info", "debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}

    def __init__(self, current: Callable[[], Execution | None]) -> None:
        self._current = current
        for name, level in self._LEVELS.items():
            setattr(self, name, self._emitter(level))

    def _emitter(self, level: str) -> Callable[..., None]:
        def emit(*args: Any) -> None:
            ex = self._current()
            if ex is not None:
                ex.log(level, " ".join(a if type(a) is str else _to_text(a) for a in args))
        return emit


def _to_text(value: Any) -> str:
    try:
        check_json(value, "value")
    except (TypeError, ValueError):
        return str(value)
    import orjson

    try:
        return orjson.dumps(value).decode()
    except Exception:
        return str(value)


class LogStream:
    """``sys.stdout``/``sys.stderr`` replacement: each printed line becomes one log entry."""

    def __init__(self, level: str, current: Callable[[], Execution | None]) -> None:
        self.level = level
        self._current = current

    def write(self, text: str) -> int:
        if type(text) is not str:
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        ex = self._current()
        if ex is None:  # printed outside any execution (module import of the warm-up): nobody's log
            return len(text)
        # The unfinished line is the execution's own: executions running side by side never mix lines.
        buf = ex.partial.get(self.level, "") + text
        if "\n" in buf:
            *lines, buf = buf.split("\n")
            for line in lines:
                ex.log(self.level, line)
        elif len(buf) > 65536:
            ex.log(self.level, buf)
            buf = ""
        ex.partial[self.level] = buf
        return len(text)

    def flush(self) -> None:
        ex = self._current()
        if ex is not None:
            self.flush_for(ex)

    def flush_for(self, ex: Execution) -> None:
        """Log the unfinished line ``ex`` printed, if any (at the end of the execution)."""
        buf = ex.partial.pop(self.level, "")
        if buf:
            ex.log(self.level, buf)

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class LogHandler(logging.Handler):
    """Routes the ``logging`` module of an action to ``api.log`` at the matching level."""

    def __init__(self, current: Callable[[], Execution | None]) -> None:
        super().__init__(logging.DEBUG)
        self._current = current

    def emit(self, record: logging.LogRecord) -> None:
        ex = self._current()
        if ex is None:
            return
        no = record.levelno
        level = "error" if no >= logging.ERROR else "warn" if no >= logging.WARNING else "info" if no >= logging.INFO else "debug"
        try:
            ex.log(level, record.getMessage())
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # never print to the (closed) stderr
        pass


def install_output_capture(current: Callable[[], Execution | None]) -> tuple[LogStream, LogStream]:
    out, err = LogStream("info", current), LogStream("error", current)
    sys.stdout = out  # type: ignore[assignment]
    sys.stderr = err  # type: ignore[assignment]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(LogHandler(current))
    root.setLevel(logging.DEBUG)
    return out, err
