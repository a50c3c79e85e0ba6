"""``api.cache`` on the trusted side: a small, per-scope, expiring string store.

The runner builds the scope string from (tenant, trigger), as the reference
scopes values "to the Trigger in which they are set". Semantics shared by both
backends (the shared test suite runs against each):

* ``set`` options: ``ttl`` (ms, positive int) and/or ``expires_at`` (ms since
  the epoch, positive int). Both given: the earlier wins. Neither: 24 h.
  "Lifetimes may not exceed the maximum": a longer lifetime is *clamped* to
  24 h from now (not an error). Non-integer, zero or negative ->
  ``InvalidExpiry``; ``expires_at`` not in the future -> ``ItemAlreadyExpired``;
  any other option -> ``InvalidOptions``.
* Limits per scope (:class:`CacheLimits`): key 1..64 UTF-8 bytes
  (``CacheKeySizeExceeded``), value <= 4096 bytes (``CacheValueSizeExceeded``),
  at most 20 live entries and 8192 bytes of keys+values
  (``CacheSizeExceeded``; overwriting a key counts its new size only).
* Errors are results (``{"type": "error", "code": ...}``), never exceptions,
  and a failing write never evicts anything. Expired entries are invisible and
  do not count. Deleting a missing key succeeds.
* Only a broken backend (redis down) raises, :class:`CacheUnavailable`, so the
  runner decides what the action sees.

The reference warns that items "may not be available in later transactions";
the memory backend uses that latitude to stay bounded (see :class:`MemoryCache`).
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from ._errors import ConfigError
from ._errors import CacheUnavailable

__all__ = ["CacheBackend", "CacheLimits", "CacheUnavailable", "MemoryCache", "RedisCache", "open_cache"]

Clock = Callable[[], int]  # milliseconds since the epoch

SUCCESS: dict[str, str] = {"type": "success"}


def _error(code: str) -> dict[str, str]:
    return {"type": "error", "code": code}


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class CacheLimits:
    entries: int = 20
    key_bytes: int = 64
    value_bytes: int = 4096
    scope_bytes: int = 8192                 # keys + values of the live entries of one scope
    max_ttl_ms: int = 24 * 3600 * 1000
    default_ttl_ms: int = 24 * 3600 * 1000


class CacheBackend(Protocol):
    async def get(self, scope: str, key: str) -> dict | None: ...
    async def set(self, scope: str, key: str, value: str, options: dict | None) -> dict: ...
    async def delete(self, scope: str, key: str) -> dict: ...
    async def drop_scope(self, scope: str) -> None: ...
    async def aclose(self) -> None: ...


# ------------------------------------------------------------ shared checks


def _check_types(scope: str, key: str, value: str | None = None) -> None:
    # The protocol layer already guarantees strings; a non-string here is a runner bug.
    if type(scope) is not str or type(key) is not str or (value is not None and type(value) is not str):
        raise TypeError("cache scope, key and value must be str")


def _key_ok(key: str, limits: CacheLimits) -> bool:
    return 0 < len(key.encode("utf-8", "surrogatepass")) <= limits.key_bytes


def _positive_int(v: Any) -> bool:
    return type(v) is int and v > 0


def _parse_options(options: Any, limits: CacheLimits) -> tuple[int | None, int | None] | str:
    """(ttl, expires_at) pre-clamped to sane magnitudes, or an error code."""
    if options is None:
        return None, None
    if not isinstance(options, dict):
        return "InvalidOptions"
    if set(options) - {"ttl", "expires_at"}:
        return "InvalidOptions"
    ttl = options.get("ttl")
    at = options.get("expires_at")
    for v in (ttl, at):
        if v is not None and not _positive_int(v):
            return "InvalidExpiry"
    # Clamping here changes nothing (the result is clamped to max_ttl anyway)
    # but keeps the numbers exact in Lua's doubles.
    if ttl is not None:
        ttl = min(ttl, limits.max_ttl_ms + 1)
    if at is not None:
        at = min(at, 2**52)
    return ttl, at


def resolve_expiry(now: int, ttl: int | None, expires_at: int | None, limits: CacheLimits) -> int | str:
    """Absolute expiry (ms) from the options, or ``"ItemAlreadyExpired"``. Mirrored by the Lua script."""
    exp = now + ttl if ttl is not None else None
    if expires_at is not None:
        exp = expires_at if exp is None else min(exp, expires_at)
    if exp is None:
        exp = now + limits.default_ttl_ms
    if exp <= now:
        return "ItemAlreadyExpired"
    return min(exp, now + limits.max_ttl_ms)


def _validate_set(key: str, value: str, options: Any, limits: CacheLimits) -> tuple[int | None, int | None] | str:
    if not _key_ok(key, limits):
        return "CacheKeySizeExceeded"
    if len(value.encode("utf-8", "surrogatepass")) > limits.value_bytes:
        return "CacheValueSizeExceeded"
    return _parse_options(options, limits)


# ------------------------------------------------------------------ memory


class MemoryCache:
    """In-process backend (one runner only), lazily expired.

    Bounded: each scope holds at most ``limits.entries`` entries; every 1024
    writes all scopes are swept of expired entries, and when more than
    ``max_scopes`` scopes are live the least recently written whole scopes are
    dropped (the reference allows items to vanish before their lifetime ends).
    """

    SWEEP_EVERY = 1024

    def __init__(self, limits: CacheLimits | None = None, *, clock: Clock | None = None,
                 max_scopes: int = 100_000) -> None:
        self._limits = limits or CacheLimits()
        self._clock = clock or _wall_clock_ms
        self._max_scopes = max_scopes
        # scope -> key -> (value, expires_at, key+value bytes)
        self._scopes: OrderedDict[str, dict[str, tuple[str, int, int]]] = OrderedDict()
        self._writes = 0

    def _live(self, scope: str, now: int) -> dict[str, tuple[str, int, int]] | None:
        entries = self._scopes.get(scope)
        if entries is None:
            return None
        for k in [k for k, e in entries.items() if e[1] <= now]:
            del entries[k]
        if not entries:
            del self._scopes[scope]
            return None
        return entries

    def _sweep(self, now: int) -> None:
        for scope in list(self._scopes):
            self._live(scope, now)
        while len(self._scopes) > self._max_scopes:
            self._scopes.popitem(last=False)

    async def get(self, scope: str, key: str) -> dict | None:
        _check_types(scope, key)
        entries = self._live(scope, self._clock())
        e = entries.get(key) if entries else None
        return None if e is None else {"value": e[0], "expires_at": e[1]}

    async def set(self, scope: str, key: str, value: str, options: dict | None = None) -> dict:
        _check_types(scope, key, value)
        lim = self._limits
        parsed = _validate_set(key, value, options, lim)
        if isinstance(parsed, str):
            return _error(parsed)
        now = self._clock()
        exp = resolve_expiry(now, parsed[0], parsed[1], lim)
        if isinstance(exp, str):
            return _error(exp)
        size = len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
        entries = self._live(scope, now) or {}
        others = [e for k, e in entries.items() if k != key]
        if len(others) + 1 > lim.entries or sum(e[2] for e in others) + size > lim.scope_bytes:
            return _error("CacheSizeExceeded")
        entries[key] = (value, exp, size)
        self._scopes[scope] = entries
        self._scopes.move_to_end(scope)
        self._writes += 1
        if self._writes % self.SWEEP_EVERY == 0 or len(self._scopes) > self._max_scopes:
            self._sweep(now)
        return dict(SUCCESS)

    async def delete(self, scope: str, key: str) -> dict:
        _check_types(scope, key)
        if not _key_ok(key, self._limits):
            return _error("CacheKeySizeExceeded")
        entries = self._live(scope, self._clock())
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._scopes[scope]
        return dict(SUCCESS)

    async def drop_scope(self, scope: str) -> None:
        """Every entry of ``scope`` (a forgotten tenant's), at once."""
        _check_types(scope, "")
        self._scopes.pop(scope, None)

    async def aclose(self) -> None:
        self._scopes.clear()


# ------------------------------------------------------------------- redis

# One scope = a sorted-set index (member = key, score = expires_at) plus one
# hash per entry {v = value, x = expires_at} that redis expires itself with
# PEXPIREAT. All names share the hash tag {<scope>} so a scope lives in one
# cluster slot. The scope is base64url-encoded, so no scope can forge the
# names of another. Time comes from the redis server (TIME), the same clock
# that expires the entries, so runners with skewed clocks still agree.
#
# KEYS[1] index, KEYS[2] entry.  ARGV: key, value, ttl|"", expires_at|"",
# default_ttl, max_ttl, max_entries, max_scope_bytes, entry_prefix.
_SET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, value = ARGV[1], ARGV[2]
local ttl, at = tonumber(ARGV[3]), tonumber(ARGV[4])
local exp = nil
if ttl then exp = now + ttl end
if at then if (not exp) or at < exp then exp = at end end
if not exp then exp = now + tonumber(ARGV[5]) end
if exp <= now then return 'ItemAlreadyExpired' end
local max_exp = now + tonumber(ARGV[6])
if exp > max_exp then exp = max_exp end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count, bytes = 0, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if m ~= key then
    local entry = ARGV[9] .. m
    if redis.call('EXISTS', entry) == 1 then
      count = count + 1
      bytes = bytes + #m + redis.call('HSTRLEN', entry, 'v')
    else
      redis.call('ZREM', KEYS[1], m)
    end
  end
end
if count + 1 > tonumber(ARGV[7]) or bytes + #key + #value > tonumber(ARGV[8]) then
  return 'CacheSizeExceeded'
end
local exps = string.format('%.0f', exp)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'v', value, 'x', exps)
redis.call('PEXPIREAT', KEYS[2], exps)
redis.call('ZADD', KEYS[1], exps, key)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 'OK'
"""


# KEYS[1] index. ARGV[1] entry prefix. Deletes the scope's entries and its index.
_DROP_LUA = """
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. m)
end
redis.call('DEL', KEYS[1])
return 'OK'
"""


class RedisCache:
    """Shared backend: every runner on the same redis sees the same cache.

    Limits are enforced inside one Lua script (EVALSHA), so concurrent writers
    on any number of runners can never exceed them.
    """

    def __init__(self, url: str, limits: CacheLimits | None = None, *,
                 socket_timeout_s: float = 2.0, max_connections: int = 64) -> None:
        import redis.asyncio as aioredis

        self._limits = limits or CacheLimits()
        parts = urlsplit(url)
        self._where = f"redis at {parts.hostname}:{parts.port or 6379}"
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s, max_connections=max_connections,
        )
        self._set_script = self._redis.register_script(_SET_LUA)
        self._drop_script = self._redis.register_script(_DROP_LUA)

    @staticmethod
    def _prefix(scope: str) -> str:
        tag = base64.urlsafe_b64encode(scope.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")
        return f"actionpool:cache:{{{tag}}}:"

    async def get(self, scope: str, key: str) -> dict | None:
        _check_types(scope, key)
        if not _key_ok(key, self._limits):
            return None
        with _unavailable(self._where):
            v, x = await self._redis.hmget(self._prefix(scope) + "e:" + key, ["v", "x"])
        if v is None or x is None:
            return None
        return {"value": v, "expires_at": int(x)}

    async def set(self, scope: str, key: str, value: str, options: dict | None = None) -> dict:
        _check_types(scope, key, value)
        lim = self._limits
        parsed = _validate_set(key, value, options, lim)
        if isinstance(parsed, str):
            return _error(parsed)
        ttl, at = parsed
        prefix = self._prefix(scope)
        with _unavailable(self._where):
            result = await self._set_script(
                keys=[prefix + "i", prefix + "e:" + key],
                args=[key, value, "" if ttl is None else ttl, "" if at is None else at, lim.default_ttl_ms,
                      lim.max_ttl_ms, lim.entries, lim.scope_bytes, prefix + "e:"],
            )
        return dict(SUCCESS) if result == "OK" else _error(str(result))

    async def delete(self, scope: str, key: str) -> dict:
        _check_types(scope, key)
        if not _key_ok(key, self._limits):
            return _error("CacheKeySizeExceeded")
        prefix = self._prefix(scope)
        with _unavailable(self._where):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(prefix + "e:" + key)
                pipe.zrem(prefix + "i", key)
                await pipe.execute()
        return dict(SUCCESS)

    async def drop_scope(self, scope: str) -> None:
        """Every entry of ``scope`` (a forgotten tenant's): its index and the entries it names, in one script.

        The index holds at most the scope's live entries plus expired ones not yet trimmed; entries
        it no longer names have expired on their own (PEXPIREAT), so nothing of the scope is left.
        """
        _check_types(scope, "")
        prefix = self._prefix(scope)
        with _unavailable(self._where):
            await self._drop_script(keys=[prefix + "i"], args=[prefix + "e:"])

    async def aclose(self) -> None:
        await self._redis.aclose()


class _unavailable:
    """Map redis failures to CacheUnavailable naming the server (host:port) and the cause."""

    def __init__(self, where: str) -> None:
        self._where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        import redis.exceptions

        if isinstance(exc, (redis.exceptions.RedisError, OSError)):
            cause = str(exc).strip() or "no detail"
            raise CacheUnavailable(f"{self._where} is unavailable: {type(exc).__name__}: {cause}") from exc
        return False


def open_cache(url: str, *, clock: Clock | None = None, limits: CacheLimits | None = None) -> CacheBackend:
    """``memory://`` or ``redis://host[:port][/db]``; anything else is a ConfigError.

    ``clock`` (ms since the epoch) drives the memory backend; redis uses its
    own server clock.
    """
    if not isinstance(url, str):
        raise ConfigError(f"cache_url must be a string, got {type(url).__name__}")
    if url == "memory://":
        return MemoryCache(limits, clock=clock)
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigError(f"cache_url must be memory:// or redis://host:port/db, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"cache_url has an invalid port: {url!r}") from None
    if not parts.hostname:
        raise ConfigError(f"cache_url has no host: {url!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"cache_url database must be a number, got {db!r}")
    if parts.query or parts.fragment or port == 0:
        raise ConfigError(f"cache_url must be redis://host:port/db without options, got {url!r}")
    return RedisCache(url, limits)
