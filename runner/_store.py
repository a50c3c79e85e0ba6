"""Deployed action versions and run history, in memory (one replica) or on Redis (N replicas).

Versions are immutable and content-addressed (the first 16 hex digits of the
source's SHA-256). Each (tenant, slug) has a *stack* of deployments: a deploy
pushes, a rollback pops back to the previous one; the top is what flows run.
A *log* keeps every deploy and rollback with its time, and a *shadow* version
may run beside the live one (see runner/_server.py).

The flow path never waits on the store: each replica keeps the current and
shadow versions in a local map. On Redis, a deploy or rollback bumps a
generation counter and publishes the changed (tenant, slug); every replica
reloads that entry on the message, and a version check every
``POLL_S`` compares the counter, so a lost message (a reconnect) is caught
within a fraction of a second too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import orjson

log = logging.getLogger("actionpool.serve")

LOG_LIMIT = 100          # deploy/rollback events kept per action
RUN_TTL_S = 7 * 24 * 3600
POLL_S = 0.25


@dataclass(frozen=True)
class Version:
    version: str
    source: str
    deployed_at: float


def version_of(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class NothingToRollBack(Exception):
    """The action has one deployed version (or none): there is nothing before it."""


class Store:
    """The shared interface; ``current``/``shadow`` are local reads, everything else may do I/O."""

    def __init__(self, history_size: int) -> None:
        self.history_size = history_size
        self._current: dict[tuple[str, str], Version] = {}
        self._shadow: dict[tuple[str, str], Version] = {}
        self.on_change: Callable[[str, str], None] | None = None

    def current(self, tenant: str, slug: str) -> Version | None:
        return self._current.get((tenant, slug))

    def shadow(self, tenant: str, slug: str) -> Version | None:
        return self._shadow.get((tenant, slug))

    def _set_local(self, key: tuple[str, str], cur: Version | None, shadow: Version | None) -> None:
        for table, v in ((self._current, cur), (self._shadow, shadow)):
            if v is None:
                table.pop(key, None)
            else:
                table[key] = v
        if self.on_change is not None:
            self.on_change(*key)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: return True

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version: raise NotImplementedError
    async def rollback(self, tenant: str, slug: str) -> Version: raise NotImplementedError
    async def describe(self, tenant: str, slug: str) -> dict[str, Any]: raise NotImplementedError
    async def seed(self, tenant: str, slug: str, source: str) -> None: raise NotImplementedError
    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None: raise NotImplementedError
    async def get_run(self, flow_id: str) -> dict[str, Any] | None: raise NotImplementedError


def _describe(cur: Version | None, shadow: Version | None, events: list[dict[str, Any]]) -> dict[str, Any]:
    versions: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["op"] in ("deploy", "shadow"):
            v = versions.setdefault(e["version"], {"version": e["version"], "deployed_at": []})
            v["deployed_at"].append(_iso(e["at"]))
    return {"current": cur.version if cur else None, "shadow": shadow.version if shadow else None,
            "versions": list(versions.values()),
            "history": [{"op": e["op"], "version": e["version"], "at": _iso(e["at"])} for e in events]}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ------------------------------------------------------------------ memory


class MemoryStore(Store):
    """One replica: everything in this process (gone on restart, apart from what the config seeds)."""

    def __init__(self, history_size: int) -> None:
        super().__init__(history_size)
        self._sources: dict[tuple[str, str], str] = {}
        self._stacks: dict[tuple[str, str], list[Version]] = {}
        self._logs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._seeded: dict[tuple[str, str], str] = {}
        self._runs: dict[str, OrderedDict[str, dict[str, Any]]] = {}
        self._run_tenant: dict[str, str] = {}

    def _log(self, key: tuple[str, str], op: str, version: str, at: float) -> None:
        events = self._logs.setdefault(key, [])
        events.append({"op": op, "version": version, "at": at})
        del events[:-LOG_LIMIT]

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version:
        key = (tenant, slug)
        v = Version(version_of(source), source, time.time())
        stack = self._stacks.setdefault(key, [])
        if not shadow and stack and stack[-1].version == v.version:
            return stack[-1]  # re-deploying the live version changes nothing
        self._log(key, "shadow" if shadow else "deploy", v.version, v.deployed_at)
        if shadow:
            self._set_local(key, self._current.get(key), v)
            return v
        stack.append(v)
        sh = self._shadow.get(key)
        self._set_local(key, v, None if sh is not None and sh.version == v.version else sh)
        return v

    async def rollback(self, tenant: str, slug: str) -> Version:
        key = (tenant, slug)
        stack = self._stacks.get(key, [])
        if len(stack) < 2:
            raise NothingToRollBack(f"{slug} has no earlier version to roll back to")
        stack.pop()
        v = stack[-1]
        self._log(key, "rollback", v.version, time.time())
        self._set_local(key, v, self._shadow.get(key))
        return v

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]:
        key = (tenant, slug)
        return _describe(self._current.get(key), self._shadow.get(key), self._logs.get(key, []))

    async def seed(self, tenant: str, slug: str, source: str) -> None:
        key = (tenant, slug)
        if self._seeded.get(key) != version_of(source):
            self._seeded[key] = version_of(source)
            await self.deploy(tenant, slug, source)

    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None:
        if self.history_size <= 0:
            return
        runs = self._runs.setdefault(tenant, OrderedDict())
        runs[flow_id] = record
        self._run_tenant[flow_id] = tenant
        while len(runs) > self.history_size:
            old, _ = runs.popitem(last=False)
            self._run_tenant.pop(old, None)

    async def get_run(self, flow_id: str) -> dict[str, Any] | None:
        tenant = self._run_tenant.get(flow_id)
        return None if tenant is None else self._runs[tenant].get(flow_id)


# ------------------------------------------------------------------- redis

_P = "actionpool:serve:"
CHANNEL = _P + "changes"

# KEYS[1] stack, KEYS[2] log, KEYS[3] gen. ARGV[1] now, ARGV[2] log limit. Pops the top when there is one below it.
_ROLLBACK_LUA = """
if redis.call('LLEN', KEYS[1]) < 2 then return false end
redis.call('RPOP', KEYS[1])
local top = redis.call('LINDEX', KEYS[1], -1)
local v = cjson.decode(top)['version']
redis.call('RPUSH', KEYS[2], cjson.encode({op='rollback', version=v, at=tonumber(ARGV[1])}))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('INCR', KEYS[3])
return top
"""

# KEYS[1] the tenant's run list. ARGV[1] flow id, ARGV[2] record, ARGV[3] keep, ARGV[4] ttl, ARGV[5] run prefix.
_RUN_LUA = """
redis.call('SET', ARGV[5] .. ARGV[1], ARGV[2], 'EX', tonumber(ARGV[4]))
redis.call('LPUSH', KEYS[1], ARGV[1])
local keep = tonumber(ARGV[3])
for _, old in ipairs(redis.call('LRANGE', KEYS[1], keep, -1)) do redis.call('DEL', ARGV[5] .. old) end
redis.call('LTRIM', KEYS[1], 0, keep - 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


class RedisStore(Store):
    """N replicas on one Redis; see the module docstring for how changes reach every replica."""

    def __init__(self, url: str, history_size: int) -> None:
        super().__init__(history_size)
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0,
                                              socket_connect_timeout=2.0)
        self._rollback = self._redis.register_script(_ROLLBACK_LUA)
        self._run = self._redis.register_script(_RUN_LUA)
        self._gen: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._stop = asyncio.Event()

    @staticmethod
    def _keys(tenant: str, slug: str) -> tuple[str, str, str]:
        base = f"{_P}action:{tenant}:{slug}:"
        return base + "stack", base + "log", base + "shadow"

    async def start(self) -> None:
        await self._reload_all()
        self._tasks = [asyncio.create_task(self._listen(), name="actionpool-store-listen"),
                       asyncio.create_task(self._poll(), name="actionpool-store-poll")]
        try:  # the first deploy after start should already arrive by message
            await asyncio.wait_for(self._subscribed.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("store: pub/sub not subscribed yet; the version check covers it")

    async def close(self) -> None:
        # A stop flag as well as cancel(): redis-py can swallow a CancelledError that lands inside a command.
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    # -- the local view ---------------------------------------------------------------------
    async def _load(self, tenant: str, slug: str) -> None:
        stack_k, _log_k, shadow_k = self._keys(tenant, slug)
        top, sh = await asyncio.gather(self._redis.lindex(stack_k, -1), self._redis.get(shadow_k))
        out: list[Version | None] = []
        for raw in (top, sh):
            if raw is None:
                out.append(None)
                continue
            meta = orjson.loads(raw)
            source = await self._redis.get(f"{_P}src:{tenant}:{meta['version']}")
            out.append(None if source is None else Version(meta["version"], source, meta["at"]))
        key = (tenant, slug)
        if self._current.get(key) != out[0] or self._shadow.get(key) != out[1]:
            self._set_local(key, out[0], out[1])

    async def _reload_all(self) -> None:
        gen = await self._redis.get(_P + "gen")
        for member in await self._redis.smembers(_P + "actions"):
            tenant, _, slug = member.partition(":")
            await self._load(tenant, slug)
        self._gen = gen

    async def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        tenant, _, slug = str(msg["data"]).partition(":")
                        await self._load(tenant, slug)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:
                log.warning("store: pub/sub lost (%s); reconnecting", exc)
                await pubsub.aclose()
                await asyncio.sleep(0.5)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), POLL_S)
                return
            except asyncio.TimeoutError:
                pass
            try:
                if await self._redis.get(_P + "gen") != self._gen:
                    await self._reload_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store: version check failed: %s", exc)

    async def _changed(self, tenant: str, slug: str) -> None:
        await self._load(tenant, slug)
        await self._redis.publish(CHANNEL, f"{tenant}:{slug}")

    # -- writes ----------------------------------------------------------------------------------
    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version:
        stack_k, log_k, shadow_k = self._keys(tenant, slug)
        v = Version(version_of(source), source, time.time())
        meta = orjson.dumps({"version": v.version, "at": v.deployed_at}).decode()
        event = orjson.dumps({"op": "shadow" if shadow else "deploy", "version": v.version, "at": v.deployed_at})
        await self._load(tenant, slug)
        cur = self.current(tenant, slug)
        if not shadow and cur is not None and cur.version == v.version:
            return cur  # re-deploying the live version changes nothing
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{_P}src:{tenant}:{v.version}", source, nx=True)
            pipe.sadd(_P + "actions", f"{tenant}:{slug}")
            if shadow:
                pipe.set(shadow_k, meta)
            else:
                pipe.rpush(stack_k, meta)
                pipe.ltrim(stack_k, -LOG_LIMIT, -1)
            pipe.rpush(log_k, event.decode())
            pipe.ltrim(log_k, -LOG_LIMIT, -1)
            pipe.incr(_P + "gen")
            await pipe.execute()
        if not shadow:
            sh = await self._redis.get(shadow_k)
            if sh is not None and orjson.loads(sh)["version"] == v.version:  # promoted: no longer a shadow
                await self._redis.delete(shadow_k)
        await self._changed(tenant, slug)
        return v

    async def rollback(self, tenant: str, slug: str) -> Version:
        stack_k, log_k, _ = self._keys(tenant, slug)
        top = await self._rollback(keys=[stack_k, log_k, _P + "gen"], args=[time.time(), LOG_LIMIT])
        if top is None:
            raise NothingToRollBack(f"{slug} has no earlier version to roll back to")
        await self._changed(tenant, slug)
        v = self.current(tenant, slug)
        assert v is not None
        return v

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]:
        _, log_k, _ = self._keys(tenant, slug)
        await self._load(tenant, slug)
        events = [orjson.loads(e) for e in await self._redis.lrange(log_k, 0, -1)]
        return _describe(self.current(tenant, slug), self.shadow(tenant, slug), events)

    async def seed(self, tenant: str, slug: str, source: str) -> None:
        """Deploy a config file's content unless this exact content was seeded before (API deploys win)."""
        ver = version_of(source)
        if await self._redis.getset(f"{_P}seeded:{tenant}:{slug}", ver) != ver:
            await self.deploy(tenant, slug, source)

    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None:
        if self.history_size <= 0:
            return
        await self._run(keys=[f"{_P}runs:{tenant}"],
                        args=[flow_id, orjson.dumps(record).decode(), self.history_size, RUN_TTL_S, _P + "run:"])

    async def get_run(self, flow_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(_P + "run:" + flow_id)
        return None if raw is None else orjson.loads(raw)


def open_store(url: str | None, history_size: int) -> Store:
    return RedisStore(url, history_size) if url else MemoryStore(history_size)
