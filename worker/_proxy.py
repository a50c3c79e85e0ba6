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
from typing import Any, Callable

from ..protocol import LOG_LEVELS, METHODS, ApiMethod, check_json, check_params, snake_case, truncate_utf8
from ..protocol._schema import MAX_JSON_DEPTH

from ._channel import Channel, notification
from ._event import FrozenDict, FrozenList, thaw, view


class ApiError(Exception):
    """An api call the supervisor refused or that failed on the trusted side.

    ``error_kind`` is machine-readable (``http_fetch_denied``,
    ``http_fetch_timeout``, ``http_fetch_error``, ``cache_unavailable``, ...).
    """

    def __init__(self, error_kind: str, message: str) -> None:
        super().__init__(f"{error_kind}: {message}")
        self.error_kind = error_kind
        self.kind = error_kind


class ApiNotAvailable(Exception):
    """The method exists but the current trigger does not offer it."""


class ApiClosed(Exception):
    """The api object of a finished execution was used."""


# Tracebacks shown to action authors name these as api.ApiError etc., not worker internals.
for _cls in (ApiError, ApiNotAvailable, ApiClosed):
    _cls.__module__ = "api"



class Execution:
    """Per-execution state shared by the api proxy, console and log capture."""

    def __init__(self, channel: Channel, trigger: str, offered: frozenset[str], max_log_bytes: int) -> None:
        self.channel = channel
        self.trigger = trigger
        self.offered = offered
        self.max_log_bytes = max_log_bytes
        self.active = True

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
        raise ApiError(str(err.get("kind", "api_error")), str(err.get("message", "the call failed")))
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


def _make_method(m: ApiMethod) -> Callable[..., Any]:
    """One api method as a plain function of its namespace object (``self._ex`` is the execution)."""
    name = m.name

    if name in ("user.setAppMetadata", "user.setUserMetadata"):
        def set_metadata(self: Any, key_or_patch: Any, *value: Any) -> None:
            ex: Execution = self._ex
            ex.check(m)
            if value:
                if len(value) != 1:
                    raise TypeError(f"api.{name}() takes (key, value) or (patch)")
                if type(key_or_patch) is not str:
                    raise TypeError(f"api.{name}: key must be a string, got {type(key_or_patch).__name__}")
                patch = {key_or_patch: value[0]}
            else:
                patch = key_or_patch
            ex.channel.queue(notification(name, check_params(m, _plain([patch]))))
        return set_metadata

    if name == "log":
        def log(self: Any, level: Any, message: Any) -> None:
            ex: Execution = self._ex
            ex.check(m)
            check_params(m, [level, message])
            if level not in LOG_LEVELS:
                raise ValueError(f"api.log: level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
            ex.log(level, message)
        return log

    if name == "fetch":
        async def fetch(self: Any, url: Any, init: Any = None) -> Any:
            ex: Execution = self._ex
            ex.check(m)
            args = check_params(m, _plain([url, init]))
            return _response(await ex.channel.call_async(name, args))
        return fetch

    if m.returns:
        def call(self: Any, *params: Any) -> Any:
            ex: Execution = self._ex
            ex.check(m)
            return _response(ex.channel.call(name, check_params(m, _plain(list(params)))))
        return call

    def notify(self: Any, *params: Any) -> None:
        ex: Execution = self._ex
        ex.check(m)
        ex.channel.queue(notification(name, check_params(m, _plain(list(params)))))
    return notify


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
    except TypeError:
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
        self._buf = ""

    def write(self, text: str) -> int:
        if type(text) is not str:
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._buf += text
        if "\n" in self._buf:
            *lines, self._buf = self._buf.split("\n")
            ex = self._current()
            if ex is not None:
                for line in lines:
                    ex.log(self.level, line)
        elif len(self._buf) > 65536:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._buf:
            ex = self._current()
            if ex is not None:
                ex.log(self.level, self._buf)
            self._buf = ""

    def reset(self) -> None:
        self._buf = ""

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
