"""The action API as a wire schema: method names, parameters, what returns a value.

This table is the single source both sides build from. The worker builds the
``api`` proxy from it (and validates arguments at call time); the supervisor
dispatches through its own explicit handler registry keyed by these names and
validates every received call against the same table, because the worker is
untrusted. Which trigger offers which method is policy and lives in ``runner``.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Any, NamedTuple


class Kind(Enum):
    STR = "string"
    JSON = "JSON value"
    OBJECT = "object (dict with string keys)"


class Param(NamedTuple):
    name: str
    kind: Kind
    optional: bool = False  # an omitted or None optional parameter is sent as nil


class ApiMethod(NamedTuple):
    name: str                  # wire name, camelCase as in the reference, e.g. "user.setAppMetadata"
    params: tuple[Param, ...]
    returns: bool              # True: a request that waits for a value; False: a notification


MAX_JSON_DEPTH = 32

P = Param
METHODS: dict[str, ApiMethod] = {
    m.name: m
    for m in (
        ApiMethod("deny", (P("reason", Kind.STR),), False),
        ApiMethod("access.deny", (P("reason", Kind.STR), P("user_message", Kind.STR, True)), False),
        ApiMethod("validation.error", (P("error_code", Kind.STR), P("error_message", Kind.STR)), False),
        ApiMethod("state.set", (P("key", Kind.STR), P("value", Kind.JSON)), False),
        ApiMethod("log", (P("level", Kind.STR), P("message", Kind.STR)), False),
        # Both metadata forms travel as one patch object: (key, value) is {key: value}.
        ApiMethod("user.setAppMetadata", (P("patch", Kind.OBJECT),), False),
        ApiMethod("user.setUserMetadata", (P("patch", Kind.OBJECT),), False),
        ApiMethod("user.setUserId", (P("user_id", Kind.STR),), False),
        ApiMethod("session.setCustomClaim", (P("name", Kind.STR), P("value", Kind.JSON)), False),
        ApiMethod("idToken.setCustomClaim", (P("name", Kind.STR), P("value", Kind.JSON)), False),
        ApiMethod("accessToken.setCustomClaim", (P("name", Kind.STR), P("value", Kind.JSON)), False),
        ApiMethod("cache.get", (P("key", Kind.STR),), True),
        ApiMethod("cache.set", (P("key", Kind.STR), P("value", Kind.STR), P("options", Kind.OBJECT, True)), True),
        ApiMethod("cache.delete", (P("key", Kind.STR),), True),
        ApiMethod("fetch", (P("url", Kind.STR), P("init", Kind.OBJECT, True)), True),
    )
}
del P

LOG_LEVELS = ("debug", "info", "warn", "error")


def truncate_utf8(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes, never splitting a character (log messages: 4096 bytes)."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def snake_case(name: str) -> str:
    """``setAppMetadata`` -> ``set_app_metadata``; ``idToken`` -> ``id_token``."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def describe(value: Any) -> str:
    t = type(value)
    if callable(value) and t is not type:
        return "function"
    return t.__name__


def check_json(value: Any, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ``TypeError`` unless ``value`` is a plain JSON value.

    Plain means exact types only: ``None``, ``bool``, ``int`` (64-bit), finite
    ``float``, ``str``, ``list``/``tuple`` and ``dict`` with ``str`` keys.
    Functions, datetimes, sets, bytes, big ints, NaN and circular structures
    raise, mirroring "functions, Date objects, BigInt and circular references
    throw at call time".
    """
    t = type(value)
    if t is str or t is bool or value is None:  # the common case, without building a walk
        return
    if _is_plain(value, max_depth):  # the fast verdict; the walk below only runs to name what is wrong
        return
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    on_path: set[int] = set()
    # Iterative walk with an explicit exit marker so cycles are detected on the
    # current path only (a shared, non-circular sub-object is fine).
    while stack:
        v, path, depth = stack.pop()
        if v is _EXIT:
            on_path.discard(path)  # type: ignore[arg-type]
            continue
        t = type(v)
        if v is None or t is bool or t is str:
            continue
        if t is int:
            if not -(2**63) <= v < 2**64:
                raise TypeError(f"{path}: integer of {v.bit_length()} bits does not fit in 64 bits "
                                "(like BigInt, it cannot be serialised)")
            continue
        if t is float:
            if not math.isfinite(v):
                raise TypeError(f"{path}: {v} is not a JSON number")
            continue
        if t is dict or t is list or t is tuple:
            if depth >= max_depth:
                raise TypeError(f"{path}: nested deeper than {max_depth} levels")
            ident = id(v)
            if ident in on_path:
                raise TypeError(f"{path}: circular reference")
            on_path.add(ident)
            stack.append((_EXIT, ident, 0))  # type: ignore[arg-type]
            if t is dict:
                for k, item in v.items():
                    if type(k) is not str:
                        raise TypeError(f"{path}: object key of type {type(k).__name__} is not a string")
                    stack.append((item, f"{path}[{k!r:.40}]", depth + 1))
            else:
                for i, item in enumerate(v):
                    stack.append((item, f"{path}[{i}]", depth + 1))
            continue
        raise TypeError(f"{path}: {describe(v)} is not JSON-serialisable")


_EXIT = object()
_MIN_INT, _MAX_INT = -(2**63), 2**64


def _is_plain(v: Any, depth_left: int) -> bool:
    """True if ``check_json`` would accept ``v``: the same rules, without building paths.

    Recursion is bounded by ``depth_left`` (so a cycle ends as "too deep", and the
    full walk then names it). False only sends the value to the full walk.
    """
    t = type(v)
    if t is dict:
        if depth_left <= 0:
            return False
        for k, item in v.items():
            if type(k) is not str:
                return False
            ti = type(item)
            if ti is str or ti is bool or item is None:
                continue
            if ti is dict or ti is list or ti is tuple:
                if not _is_plain(item, depth_left - 1):
                    return False
            elif not _is_plain_scalar(item, ti):
                return False
        return True
    if t is list or t is tuple:
        if depth_left <= 0:
            return False
        for item in v:
            ti = type(item)
            if ti is str or ti is bool or item is None:
                continue
            if ti is dict or ti is list or ti is tuple:
                if not _is_plain(item, depth_left - 1):
                    return False
            elif not _is_plain_scalar(item, ti):
                return False
        return True
    return _is_plain_scalar(v, t)


def _is_plain_scalar(v: Any, t: type) -> bool:
    if t is str or t is bool or v is None:
        return True
    if t is int:
        return _MIN_INT <= v < _MAX_INT
    if t is float:
        return math.isfinite(v)
    return False


def check_params(method: ApiMethod, args: list[Any]) -> list[Any]:
    """Validate positional ``args`` for ``method``; return them padded with None.

    Raises ``TypeError`` with a message meant for the action author.
    """
    params = method.params
    required = sum(1 for p in params if not p.optional)
    if not required <= len(args) <= len(params):
        want = str(required) if required == len(params) else f"{required} to {len(params)}"
        raise TypeError(f"api.{method.name}() takes {want} arguments ({len(args)} given)")
    out = list(args) + [None] * (len(params) - len(args))
    for p, v in zip(params, out):
        where = f"api.{method.name}: {p.name}"
        if v is None and p.optional:
            continue
        if p.kind is Kind.STR:
            if type(v) is not str:
                raise TypeError(f"{where} must be a string, got {describe(v)}")
        elif p.kind is Kind.OBJECT:
            if type(v) is not dict:
                raise TypeError(f"{where} must be an object (dict), got {describe(v)}")
            check_json(v, where)
        else:
            check_json(v, where)
    return out
