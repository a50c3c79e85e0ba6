"""The action API as a wire schema: method names, parameters, what returns a value.

This table is the single source both sides build from. The worker builds the
``api`` proxy from it (and validates arguments at call time); the supervisor
dispatches through its own explicit handler registry keyed by these names and
validates every received call against the same table, because the worker is
untrusted. Which trigger offers which method is policy and lives in ``runner``.
"""

from __future__ import annotations

import math
import operator
import re
from bisect import bisect_right
from itertools import accumulate, chain, compress, count, repeat
from enum import Enum
from typing import Any, Callable, NamedTuple


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
# Values (objects, arrays and the scalars in them) in one api argument. A frame of tiny values
# decodes to ~50 times its size in Python objects that the cyclic GC scans while they live:
# the count, not only the bytes, is what the supervisor must bound.
MAX_JSON_VALUES = 100_000

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

# Every ``api.ApiError.code`` an action can see: the supervisor answers a failed value-returning
# call with one of these, and the worker raises it as ``api.ApiError`` inside the action.
API_ERROR_CODES: dict[str, str] = {
    "http_fetch_denied": "api.fetch refused by policy (allowlist, scheme, credentials, internal address); "
                         "the flow is denied even if the action catches it",
    "http_fetch_timeout": "api.fetch did not finish in time; the flow is denied even if the action catches it",
    "http_fetch_error": "api.fetch failed: DNS, connection, a bad init, a body over the limits, an undecodable body",
    "cache_unavailable": "the cache backend is down",
    "reply_too_large": "the result does not fit in one frame (Limits.max_frame_bytes)",
    "internal_error": "the supervisor failed unexpectedly while serving the call (logged there)",
}


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


_CONTAINERS = frozenset({dict, list, tuple})
_PLAIN = frozenset({str, bool, type(None)})          # always fine, nothing to look at
_ALLOWED = _PLAIN | {int, float} | _CONTAINERS
_INT_MIN, _INT_END = -(2**63), 2**64
_is = operator.is_
_is_container = _CONTAINERS.__contains__


def check_json(value: Any, where: str, max_depth: int = MAX_JSON_DEPTH, *, tree: bool = False,
               max_values: int | None = MAX_JSON_VALUES) -> int:
    """Raise ``TypeError`` unless ``value`` is a plain JSON value.

    Plain means exact types only: ``None``, ``bool``, ``int`` (64-bit), finite
    ``float``, ``str``, ``list``/``tuple`` and ``dict`` with ``str`` keys.
    Functions, datetimes, sets, bytes, big ints, NaN and circular structures
    raise, mirroring "functions, Date objects, BigInt and circular references
    throw at call time".

    The supervisor runs this on every value a hostile worker sends, so its cost
    is linear with a small constant: the value is walked one level at a time,
    and each level's elements are judged in a few C-level passes (``map``,
    ``compress``, ``set``), never a Python step or a string per element. It
    keeps one pointer per container (the levels, to name the path of an
    offending element; the path is built only when there is one to report).
    ``tree=True`` promises that no object appears twice (a value fresh from the
    decoder); otherwise each level is de-duplicated, so a shared sub-object
    costs once per level and a cycle ends as "circular reference".

    Returns the number of values inside ``value`` (0 for a scalar). More than
    ``max_values`` raises ``ValueError`` as soon as a level goes over it.
    """
    t = type(value)
    if t in _PLAIN:
        return 0
    if t not in _CONTAINERS:
        _check_scalars([value], [t], {t}, lambda bad: where)
        return 0
    count = 0
    levels: list[list[Any]] = []
    level, level_kinds = [value], [t]   # the containers at the current depth, and their types
    while level:
        if len(levels) >= max_depth:
            raise _too_deep(where, levels, level[0], max_depth)
        if not tree and len(level) > 1:
            level = list(dict(zip(map(id, level), level)).values())
            level_kinds = list(map(type, level))
        levels.append(level)
        kinds = set(level_kinds)
        if dict in kinds:
            dicts = level if len(kinds) == 1 else list(compress(level, map(_is, level_kinds, repeat(dict))))
            if not set(map(type, chain.from_iterable(dicts))) <= {str}:
                holder = next(c for c in dicts if any(type(k) is not str for k in c))
                key = next(k for k in holder if type(k) is not str)
                raise TypeError(f"{_path(where, levels, holder)}: object key of type {type(key).__name__} "
                                "is not a string")
            seqs = [] if len(kinds) == 1 else list(compress(level, map(operator.is_not, level_kinds, repeat(dict))))
        else:
            dicts, seqs = [], level
        # The next level's elements, gathered once (a pointer each): the passes below read a
        # flat list, and each object is touched as few times as possible (on a large frame
        # every touch of a container is a cache miss).
        members = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(seqs)))
        count += len(members)
        if max_values is not None and count > max_values:
            raise ValueError(f"{where}: more than {max_values} values (objects, arrays and their items)")
        kinds_of = list(map(type, members))
        types = set(kinds_of)
        if not types <= _PLAIN:
            _check_scalars(members, kinds_of, types, lambda bad: _path(where, levels, _holder(levels[-1], bad), bad))
        if types.isdisjoint(_CONTAINERS):
            break
        level = list(compress(members, map(_is_container, kinds_of)))
        del members
        level_kinds = list(compress(kinds_of, map(_is_container, kinds_of)))
        del kinds_of
    return count


def _check_scalars(items: list[Any], kinds: list[type], types: set[type], at: Callable[[Any], str]) -> None:
    """Ints must fit in 64 bits, floats be finite, and no type outside JSON appear (containers are the caller's).

    ``kinds`` is ``[type(x) for x in items]``, ``types`` its set.
    """
    bad = types - _ALLOWED
    if bad:
        v = next(x for x in items if type(x) in bad)
        raise TypeError(f"{at(v)}: {describe(v)} is not JSON-serialisable")
    if int in types:
        ints = list(compress(items, map(_is, kinds, repeat(int))))
        if min(ints) < _INT_MIN or max(ints) >= _INT_END:
            v = next(x for x in ints if not _INT_MIN <= x < _INT_END)
            raise TypeError(f"{at(v)}: integer of {v.bit_length()} bits does not fit in 64 bits "
                            "(like BigInt, it cannot be serialised)")
    if float in types:
        if not all(map(math.isfinite, compress(items, map(_is, kinds, repeat(float))))):
            v = next(x for x in items if type(x) is float and not math.isfinite(x))
            raise TypeError(f"{at(v)}: {v} is not a JSON number")


def _holder(level: list[Any], member: Any) -> Any:
    """The first container of ``level`` that holds ``member``, by identity (error paths only).

    C-level like the walk itself: the offending frame is the attacker's, and naming the
    path must not cost a Python step per container either.
    """
    for group in (list(compress(level, map(_is, map(type, level), repeat(dict)))),
                  list(compress(level, map(operator.is_not, map(type, level), repeat(dict))))):
        members = chain.from_iterable(map(dict.values, group)) if group and type(group[0]) is dict \
            else chain.from_iterable(group)
        pos = next(compress(count(), map(_is, members, repeat(member))), None)
        if pos is not None:
            return group[bisect_right(list(accumulate(map(len, group))), pos)]
    raise LookupError("member not found in level")  # unreachable: the walk found it there


def _too_deep(where: str, levels: list[list[Any]], container: Any, max_depth: int) -> TypeError:
    """A container one level too deep: a cycle if it is its own ancestor, else plain depth."""
    if not levels:
        return TypeError(f"{where}: nested deeper than {max_depth} levels")
    parent = _holder(levels[-1], container)
    chain_ = _ancestry(levels, parent)
    for i, anc in enumerate(chain_):
        if anc is container or any(anc is a for a in chain_[i + 1:]):
            return TypeError(f"{_path(where, levels, parent, container)}: circular reference")
    return TypeError(f"{_path(where, levels, parent, container)}: nested deeper than {max_depth} levels")


def _ancestry(levels: list[list[Any]], container: Any) -> list[Any]:
    """[root, ..., container]: each level's holder of the next, found by identity (error paths only)."""
    out = [container]
    for level in reversed(levels[:-1]):
        out.append(_holder(level, out[-1]))
    out.reverse()
    return out


def _path(where: str, levels: list[list[Any]], container: Any, member: Any = None) -> str:
    """``where[1]['b'][0]``: the route from the root to ``container`` (and ``member`` inside it)."""
    route = _ancestry(levels[: _depth_of(levels, container) + 1], container)
    if member is not None:
        route.append(member)
    parts = [where]
    for parent, child in zip(route, route[1:]):
        if type(parent) is dict:
            key = next(k for k, v in parent.items() if v is child)
            parts.append(f"[{key!r:.40}]")
        else:
            parts.append(f"[{next(i for i, v in enumerate(parent) if v is child)}]")
    return "".join(parts)


def _depth_of(levels: list[list[Any]], container: Any) -> int:
    return next(d for d in range(len(levels) - 1, -1, -1) if any(map(_is, levels[d], repeat(container))))


def check_params(method: ApiMethod, args: list[Any], *, tree: bool = False, tally: list[int] | None = None) -> list[Any]:
    """Validate positional ``args`` for ``method``; return them padded with None.

    Raises ``TypeError`` (or ``ValueError`` for an argument of more than
    ``MAX_JSON_VALUES`` values) with a message meant for the action author.
    ``tree`` as in :func:`check_json` (the supervisor checks values fresh from
    the decoder); ``tally[0]`` is increased by the number of values checked.
    """
    params = method.params
    required = sum(1 for p in params if not p.optional)
    if not required <= len(args) <= len(params):
        want = str(required) if required == len(params) else f"{required} to {len(params)}"
        raise TypeError(f"api.{method.name}() takes {want} arguments ({len(args)} given)")
    out = list(args) + [None] * (len(params) - len(args))
    for p, v in zip(params, out):
        where = f"api.{method.name}: {p.name}"
        n = 0
        if v is None and p.optional:
            continue
        if p.kind is Kind.STR:
            if type(v) is not str:
                raise TypeError(f"{where} must be a string, got {describe(v)}")
        elif p.kind is Kind.OBJECT:
            if type(v) is not dict:
                raise TypeError(f"{where} must be an object (dict), got {describe(v)}")
            n = check_json(v, where, tree=tree)
        else:
            n = check_json(v, where, tree=tree)
        if tally is not None:
            tally[0] += n
    return out
