"""api.cache semantics: one suite, run against the memory backend and a real redis-server.

Expiry: the memory backend gets an injected clock that the test advances;
redis expires entries on its own clock, so those tests use short real TTLs
and poll for the entry to vanish (with a deadline, never a fixed sleep).
"""


import asyncio
import functools
import time
from typing import Any, Awaitable, Callable

import pytest

from actionpool.runner._cache import CacheBackend, CacheLimits, CacheUnavailable, MemoryCache, open_cache, resolve_expiry
from actionpool.runner._errors import ConfigError
from net_fixtures import *  # noqa: F401,F403  (fixtures and helper classes)

HOUR = 3600 * 1000
DAY = 24 * HOUR
OK = {"type": "success"}
S = "tenant-a\x00post-login"  # a scope as the runner might build it


def err(code: str) -> dict:
    return {"type": "error", "code": code}


def async_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return wrapper


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


class MemoryEnv:
    name = "memory"
    short_ttl = 1000       # advanced past by the clock, so any value works
    tolerance = 0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self._shared: CacheBackend | None = None

    def now(self) -> int:
        return self.clock.now

    def open(self) -> CacheBackend:
        # "Two instances" of the memory backend are the same store: it is per process.
        if self._shared is None:
            self._shared = open_cache("memory://", clock=self.clock)
        return self._shared

    async def wait_expired(self, cache: CacheBackend, scope: str, key: str, ttl: int) -> None:
        self.clock.now += ttl
        assert await cache.get(scope, key) is None


class RedisEnv:
    name = "redis"
    short_ttl = 1500       # long enough to finish the few writes that need the entry alive
    tolerance = 1000       # redis' clock vs ours (same machine; generous)

    def __init__(self, url: str) -> None:
        self.url = url

    def now(self) -> int:
        return time.time_ns() // 1_000_000

    def open(self) -> CacheBackend:
        return open_cache(self.url)

    async def wait_expired(self, cache: CacheBackend, scope: str, key: str, ttl: int) -> None:
        deadline = time.monotonic() + ttl / 1000 + 5
        while await cache.get(scope, key) is not None:
            assert time.monotonic() < deadline, "redis did not expire the entry"
            await asyncio.sleep(0.01)  # polling a condition with a deadline


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def env(request: pytest.FixtureRequest, redis_server_optional: str | None) -> Any:
    # redis_server_optional is requested statically so redis-server starts before the
    # per-test leak check snapshots the child processes (see net_fixtures).
    if request.param == "memory":
        return MemoryEnv()
    if redis_server_optional is None:
        pytest.skip("redis-server not found on PATH (install it: apt-get install -y redis-server)")
    flush_redis(redis_server_optional)
    return RedisEnv(redis_server_optional)


class Caches:
    """Opens backends inside the test's event loop and closes them all at the end."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.opened: list[CacheBackend] = []

    def open(self) -> CacheBackend:
        c = self.env.open()
        if c not in self.opened:
            self.opened.append(c)
        return c

    async def __aenter__(self) -> "Caches":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for c in self.opened:
            await c.aclose()


# ------------------------------------------------------------------- basics


@async_test
async def test_get_set_delete(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        assert await c.get(S, "k") is None
        assert await c.set(S, "k", "v1", None) == OK
        rec = await c.get(S, "k")
        assert rec is not None and rec["value"] == "v1"
        assert abs(rec["expires_at"] - (env.now() + DAY)) <= env.tolerance + 5000
        assert await c.set(S, "k", "v2", {}) == OK
        assert (await c.get(S, "k"))["value"] == "v2"
        assert await c.delete(S, "k") == OK
        assert await c.get(S, "k") is None
        assert await c.delete(S, "k") == OK  # missing key: success
        assert await c.delete(S, "never-set") == OK
        assert await c.set(S, "empty", "", None) == OK
        assert (await c.get(S, "empty"))["value"] == ""
        assert await c.set(S, "ünï:cødé {k}", "välue ✓", None) == OK
        assert (await c.get(S, "ünï:cødé {k}"))["value"] == "välue ✓"


@async_test
async def test_ttl_expiry(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        ttl = env.short_ttl
        assert await c.set(S, "short", "x", {"ttl": ttl}) == OK
        assert await c.set(S, "long", "y", {"ttl": HOUR}) == OK
        rec = await c.get(S, "short")
        assert rec is not None and abs(rec["expires_at"] - (env.now() + ttl)) <= env.tolerance + 200
        await env.wait_expired(c, S, "short", ttl)
        assert (await c.get(S, "long"))["value"] == "y"


@async_test
async def test_expires_at_expiry(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        at = env.now() + env.short_ttl
        assert await c.set(S, "k", "x", {"expires_at": at}) == OK
        assert (await c.get(S, "k"))["expires_at"] == at
        await env.wait_expired(c, S, "k", env.short_ttl)


@async_test
async def test_earlier_of_ttl_and_expires_at_wins(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        now = env.now()
        assert await c.set(S, "a", "x", {"ttl": HOUR, "expires_at": now + 10 * 60_000}) == OK
        assert abs((await c.get(S, "a"))["expires_at"] - (now + 10 * 60_000)) <= env.tolerance
        assert await c.set(S, "b", "x", {"ttl": 10 * 60_000, "expires_at": now + HOUR}) == OK
        assert abs((await c.get(S, "b"))["expires_at"] - (now + 10 * 60_000)) <= env.tolerance


@async_test
async def test_lifetime_is_clamped_to_24h(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        now = env.now()
        assert await c.set(S, "ttl", "x", {"ttl": 7 * DAY}) == OK
        assert await c.set(S, "at", "x", {"expires_at": now + 7 * DAY}) == OK
        assert await c.set(S, "huge", "x", {"ttl": 2**63, "expires_at": 2**64}) == OK
        for k in ("ttl", "at", "huge"):
            assert abs((await c.get(S, k))["expires_at"] - (now + DAY)) <= env.tolerance


@pytest.mark.parametrize("options,code", [
    ({"ttl": 0}, "InvalidExpiry"),
    ({"ttl": -5}, "InvalidExpiry"),
    ({"ttl": 1.5}, "InvalidExpiry"),
    ({"ttl": 1000.0}, "InvalidExpiry"),
    ({"ttl": "1000"}, "InvalidExpiry"),
    ({"ttl": True}, "InvalidExpiry"),
    ({"expires_at": 0}, "InvalidExpiry"),
    ({"expires_at": -1}, "InvalidExpiry"),
    ({"expires_at": "tomorrow"}, "InvalidExpiry"),
    ({"ttl": 1000, "expires_at": -1}, "InvalidExpiry"),
    ({"expires_at": 1}, "ItemAlreadyExpired"),
    ({"ttl": 60_000, "expires_at": 1000}, "ItemAlreadyExpired"),
    ({"tll": 1000}, "InvalidOptions"),
])
@async_test
async def test_invalid_lifetimes(options: dict, code: str, env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        assert await c.set(S, "k", "v", options) == err(code)
        assert await c.get(S, "k") is None


@async_test
async def test_expires_at_just_past_is_already_expired(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        assert await c.set(S, "k", "v", {"expires_at": env.now() - 1000}) == err("ItemAlreadyExpired")


# ------------------------------------------------------------------- limits


@async_test
async def test_key_and_value_size_limits(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        assert await c.set(S, "", "v", None) == err("CacheKeySizeExceeded")
        assert await c.set(S, "k" * 65, "v", None) == err("CacheKeySizeExceeded")
        assert await c.set(S, "é" * 33, "v", None) == err("CacheKeySizeExceeded")  # 66 bytes
        assert await c.set(S, "é" * 32, "v", None) == OK                          # 64 bytes
        assert await c.set(S, "k" * 64, "v", None) == OK
        assert await c.set(S, "big", "v" * 4097, None) == err("CacheValueSizeExceeded")
        assert await c.set(S, "big", "é" * 2049, None) == err("CacheValueSizeExceeded")  # 4098 bytes
        assert await c.set(S, "big", "v" * 4096, None) == OK
        assert await c.get(S, "k" * 65) is None
        assert await c.delete(S, "k" * 65) == err("CacheKeySizeExceeded")


@async_test
async def test_entry_count_limit(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        for i in range(20):
            assert await c.set(S, f"k{i}", "v", None) == OK
        assert await c.set(S, "k20", "v", None) == err("CacheSizeExceeded")
        assert await c.set(S, "k7", "overwritten", None) == OK  # overwriting is fine
        # the failing write evicted nothing
        for i in range(20):
            assert await c.get(S, f"k{i}") is not None
        assert await c.delete(S, "k3") == OK
        assert await c.set(S, "k20", "v", None) == OK


@async_test
async def test_scope_byte_limit(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        assert await c.set(S, "a", "x" * 4095, None) == OK   # 4096
        assert await c.set(S, "b", "x" * 4095, None) == OK   # 8192 total: exactly the limit
        assert await c.set(S, "c", "", None) == err("CacheSizeExceeded")
        assert await c.set(S, "b", "x" * 4096, None) == err("CacheSizeExceeded")  # would be 8193
        assert (await c.get(S, "b"))["value"] == "x" * 4095
        assert await c.set(S, "b", "x" * 10, None) == OK     # shrinking an entry frees room
        assert await c.set(S, "c", "x" * 4000, None) == OK


@async_test
async def test_expired_entries_do_not_count(env: Any) -> None:
    async with Caches(env) as cs:
        c = cs.open()
        for i in range(19):
            assert await c.set(S, f"long{i}", "v", {"ttl": HOUR}) == OK
        assert await c.set(S, "short", "x" * 4000, {"ttl": env.short_ttl}) == OK
        assert await c.set(S, "new", "v", None) == err("CacheSizeExceeded")
        await env.wait_expired(c, S, "short", env.short_ttl)
        assert await c.set(S, "new", "x" * 4000, None) == OK


# ------------------------------------------------------------------ scoping


@async_test
async def test_scoped_by_tenant_and_trigger(env: Any) -> None:
    scopes = ["t1\x00post-login", "t2\x00post-login", "t1\x00pre-user-registration"]
    async with Caches(env) as cs:
        c = cs.open()
        for i, s in enumerate(scopes):
            assert await c.set(s, "k", f"v{i}", None) == OK
        for i, s in enumerate(scopes):
            assert (await c.get(s, "k"))["value"] == f"v{i}"
        # limits are per scope: a full scope does not affect its neighbours
        for i in range(19):
            assert await c.set(scopes[0], f"f{i}", "v", None) == OK
        assert await c.set(scopes[0], "over", "v", None) == err("CacheSizeExceeded")
        assert await c.set(scopes[1], "over", "v", None) == OK
        assert await c.delete(scopes[0], "k") == OK
        assert (await c.get(scopes[1], "k"))["value"] == "v1"
        # scope strings that look alike stay apart
        assert await c.get("t1", "k") is None
        assert await c.set("a}:e:b", "c", "x", None) == OK
        assert await c.get("a", "b:e:c") is None and await c.get("a", "c") is None


@async_test
async def test_two_instances_share_the_store(env: Any) -> None:
    async with Caches(env) as cs:
        a, b = cs.open(), cs.open()
        assert await a.set(S, "k", "from-a", None) == OK
        assert (await b.get(S, "k"))["value"] == "from-a"
        assert await b.delete(S, "k") == OK
        assert await a.get(S, "k") is None


@async_test
async def test_parallel_writers_never_exceed_the_entry_limit(env: Any) -> None:
    async with Caches(env) as cs:
        a, b = cs.open(), cs.open()
        results = await asyncio.gather(*(
            (a if i % 2 else b).set(S, f"key{i}", "v" * 100, None) for i in range(50)))
        assert sum(r == OK for r in results) == 20
        assert all(r in (OK, err("CacheSizeExceeded")) for r in results)
        live = [await a.get(S, f"key{i}") for i in range(50)]
        assert sum(r is not None for r in live) == 20


@async_test
async def test_parallel_writers_never_exceed_the_byte_limit(env: Any) -> None:
    async with Caches(env) as cs:
        a, b = cs.open(), cs.open()
        results = await asyncio.gather(*(
            (a if i % 2 else b).set(S, f"k{i:02d}", "v" * 997, None) for i in range(50)))  # 1000 bytes each
        assert sum(r == OK for r in results) == 8


# --------------------------------------------------------- backend-specific


def test_resolve_expiry_rules() -> None:
    lim = CacheLimits()
    assert resolve_expiry(1000, None, None, lim) == 1000 + DAY
    assert resolve_expiry(1000, 5, None, lim) == 1005
    assert resolve_expiry(1000, 5, 1003, lim) == 1003
    assert resolve_expiry(1000, None, 1000, lim) == "ItemAlreadyExpired"
    assert resolve_expiry(1000, 2 * DAY, None, lim) == 1000 + DAY


def test_open_cache_rejects_bad_urls() -> None:
    for url in ["", "memcached://x", "redis://", "redis://h:0/0", "redis://h:abc/0", "redis://h/x",
                "memory://x", "redis://h:6379/0?ssl=1", 42]:
        with pytest.raises(ConfigError):
            open_cache(url)  # type: ignore[arg-type]


@async_test
async def test_memory_cache_stays_bounded() -> None:
    clock = FakeClock()
    c = MemoryCache(clock=clock, max_scopes=10)
    for i in range(50):
        assert await c.set(f"scope{i}", "k", "v", None) == OK
    assert len(c._scopes) <= 10
    assert await c.get("scope49", "k") is not None  # the most recent scopes survive
    clock.now += DAY + 1
    for i in range(MemoryCache.SWEEP_EVERY):
        await c.set("one", f"k{i % 5}", "v", None)
    assert list(c._scopes) == ["one"]  # the sweep dropped every expired scope


@pytest.mark.redis
@async_test
async def test_redis_keys_are_namespaced_and_expire_in_redis(redis_url: str) -> None:
    import redis.asyncio as aioredis

    c = open_cache(redis_url)
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await c.set(S, "k", "v", {"ttl": 60_000}) == OK
        keys = sorted(await r.keys("*"))
        assert len(keys) == 2 and all(k.startswith("actionpool:cache:{") for k in keys)
        for k in keys:
            assert 0 < await r.pttl(k) <= 60_000
        assert await c.delete(S, "k") == OK
        assert await r.keys("actionpool:cache:*:e:*") == []
    finally:
        await r.aclose()
        await c.aclose()


@async_test
async def test_unreachable_redis_raises_cache_unavailable() -> None:
    port = free_port()
    c = open_cache(f"redis://127.0.0.1:{port}/0")
    try:
        for op in (c.get(S, "k"), c.set(S, "k", "v", None), c.delete(S, "k")):
            with pytest.raises(CacheUnavailable, match=f"^redis at 127.0.0.1:{port} is unavailable: "
                                                       "ConnectionError: Error 111"):
                await op
    finally:
        await c.aclose()
