"""Deployed action versions and run history, in memory (one replica) or on Redis (N replicas).

Versions are immutable and content-addressed (the first 16 hex digits of the
source's SHA-256). Each (tenant, slug) has a *stack* of deployments: a deploy
pushes, a rollback pops back to the previous one; the top is what flows run.
A *log* keeps every deploy and rollback with its time, and a *shadow* version
may run beside the live one (see sidecar/_server.py).

Bounded per tenant, in bytes (issue 16, class 4): a stack keeps ``versions_kept``
deployments; a source is kept only while its version is *reachable* (on a
stack, so a rollback can reach it, or the shadow) and the tenant's reachable
sources stay within ``sources_max_bytes`` (the oldest rollback targets go
first; a deploy whose live and shadow sources alone would not fit is refused
with :class:`StoreFull`). Run history stays within ``history_max_bytes`` per
tenant, oldest runs evicted first; a record larger than the budget is never
stored whole: a marked stub takes its place.

The flow path never waits on the store: each replica keeps the current and
shadow versions in a local map. On Redis, a deploy or rollback bumps a
generation counter and publishes the changed (tenant, slug); every replica
reloads that entry on the message, and a version check every ``POLL_S``
compares the counter, so a lost message (a reconnect) is caught within a
fraction of a second too.

Redis failing (issue 16, class 7): flows keep the loaded versions; management
calls raise :class:`StoreUnavailable` (the server answers 503). Writes are Lua
scripts keyed by a request id, so redis-py's retry after a lost reply cannot
push or pop twice. A malformed record is skipped and counted, never fatal; a
key of the wrong Redis type (or a ``gen`` that is not a number) is one too, not
an outage, and the write or start that meets it replaces it (:meth:`RedisStore._repair`). A
Redis that comes back empty (restarted without persistence) is re-written
from what this replica holds. Replicas publish a digest of their loaded
versions and report peers that disagree for two checks in a row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import orjson

log = logging.getLogger("actionpool.serve")

LOG_LIMIT = 100          # deploy/rollback events kept per action
RUN_TTL_S = 7 * 24 * 3600
POLL_S = 0.25
REPLICA_S = 1.0          # how often a replica publishes its digest and compares its peers'
REPLICA_TTL_S = 10
OUTAGE_LOG_S = 30.0      # at most one "still down" line per this many seconds
OP_TTL_S = 300           # how long a write's request id answers a retry
BAD_LOG_S = 300.0        # one log line per bad key per this many seconds
HISTORY_WRITES = 64      # run records being written to Redis at once; more are dropped (and counted)
HISTORY_MAX_BYTES = 4 << 20
SOURCES_MAX_BYTES = 16 << 20
VERSIONS_KEPT = 10


@dataclass(frozen=True)
class Version:
    version: str
    source: str
    deployed_at: float


def version_of(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _size(source: str) -> int:
    return len(source.encode("utf-8", "surrogatepass"))


class NothingToRollBack(Exception):
    """The action has one deployed version (or none): there is nothing before it."""


class StoreUnavailable(Exception):
    """The store (Redis) did not answer; the write was not done, or a retry of it is safe (idempotent)."""


class StoreFull(Exception):
    """The tenant's live and shadow sources alone would exceed ``sources_max_bytes``."""


def _truncated_stub(tenant: str, flow_id: str, record: dict[str, Any], size: int, budget: int) -> bytes:
    """What is stored instead of a record larger than the tenant's whole history budget."""
    keep = {k: record[k] for k in ("flow_id", "tenant", "trigger", "execution_id", "recorded_at")
            if k in record and isinstance(record[k], (str, int, float)) and len(str(record[k])) <= 256}
    keep.setdefault("flow_id", flow_id)
    keep.setdefault("tenant", tenant)
    keep["truncated"] = {"reason": f"record of {size} bytes is larger than history_max_bytes ({budget})",
                         "original_bytes": size}
    return orjson.dumps(keep)


class _Health:
    """Up/down of the store, with rate-limited logs: one line on the way down, one on recovery."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.up = True
        self.down_since: float | None = None
        self.outages = 0
        self._last_log = 0.0
        self._recovered_at = 0.0

    def ok(self) -> None:
        if not self.up:
            assert self.down_since is not None
            log.warning("store: Redis reachable again after %.1f s; versions reload now", self._clock()
                        - self.down_since)
            self.up, self.down_since, self._recovered_at = True, None, self._clock()

    def failed(self, exc: BaseException, started: float | None = None) -> None:
        """An operation begun at ``started`` (monotonic) failed; one begun before the last recovery says nothing."""
        now = self._clock()
        if started is not None and started < self._recovered_at:
            return
        if self.up:
            self.up, self.down_since, self._last_log = False, now, now
            self.outages += 1
            log.warning("store: Redis unreachable (%s: %s); flows keep the loaded versions, management calls "
                        "answer 503", type(exc).__name__, exc)
        elif now - self._last_log >= OUTAGE_LOG_S:
            self._last_log = now
            log.warning("store: Redis still unreachable after %.0f s (%s)", now - (self.down_since or now), exc)

    def down_seconds(self) -> float:
        return 0.0 if self.down_since is None else self._clock() - self.down_since


class Store:
    """The shared interface; ``current``/``shadow`` are local reads, everything else may do I/O."""

    def __init__(self, history_size: int, *, history_max_bytes: int = HISTORY_MAX_BYTES,
                 sources_max_bytes: int = SOURCES_MAX_BYTES, versions_kept: int = VERSIONS_KEPT) -> None:
        self.history_size = history_size
        self.history_max_bytes = history_max_bytes
        self.sources_max_bytes = sources_max_bytes
        self.versions_kept = max(1, versions_kept)
        self._current: dict[tuple[str, str], Version] = {}
        self._shadow: dict[tuple[str, str], Version] = {}
        self.on_change: Callable[[str, str], None] | None = None
        self.health = _Health()
        self.bad_records = 0
        self.history_dropped = 0
        self.history_truncated = 0
        self.restores = 0
        self.disagreeing: list[str] = []

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

    def digest(self) -> str:
        """A short digest of the loaded versions: equal on replicas that serve the same thing."""
        h = hashlib.sha256()
        for key in sorted(set(self._current) | set(self._shadow)):
            cur, sh = self._current.get(key), self._shadow.get(key)
            h.update(f"{key[0]}:{key[1]}={cur.version if cur else '-'}/{sh.version if sh else '-'}\n".encode())
        return h.hexdigest()[:16]

    def stats(self) -> dict[str, Any]:
        """Read at scrape time by sidecar/_metrics.py."""
        return {"up": self.health.up, "down_seconds": self.health.down_seconds(), "outages": self.health.outages,
                "bad_records": self.bad_records, "history_dropped": self.history_dropped,
                "history_truncated": self.history_truncated, "restores": self.restores,
                "disagreeing": len(self.disagreeing)}

    def status(self) -> dict[str, Any]:
        """The store's part of ``/readyz``'s body."""
        out: dict[str, Any] = {"store": "ok" if self.health.up else "degraded"}
        if not self.health.up:
            out["store_down_s"] = round(self.health.down_seconds(), 1)
        if self.disagreeing:
            out["disagreeing_replicas"] = list(self.disagreeing)
        return out

    def _record_bytes(self, tenant: str, flow_id: str, record: dict[str, Any]) -> bytes:
        raw = orjson.dumps(record)
        if len(raw) > self.history_max_bytes:
            self.history_truncated += 1
            raw = _truncated_stub(tenant, flow_id, record, len(raw), self.history_max_bytes)
        return raw

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: return True

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version: raise NotImplementedError
    async def rollback(self, tenant: str, slug: str) -> Version: raise NotImplementedError
    async def describe(self, tenant: str, slug: str) -> dict[str, Any]: raise NotImplementedError
    async def seed(self, tenant: str, slug: str, source: str) -> None: raise NotImplementedError
    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None: raise NotImplementedError
    async def get_run(self, flow_id: str) -> dict[str, Any] | None: raise NotImplementedError
    async def usage(self, tenant: str) -> dict[str, int]: raise NotImplementedError


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

    def __init__(self, history_size: int, **bounds: int) -> None:
        super().__init__(history_size, **bounds)
        self._stacks: dict[tuple[str, str], list[Version]] = {}
        self._logs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._seeded: dict[tuple[str, str], str] = {}
        self._runs: dict[str, OrderedDict[str, bytes]] = {}
        self._run_bytes: dict[str, int] = {}
        self._run_tenant: dict[str, str] = {}

    def _log(self, key: tuple[str, str], op: str, version: str, at: float) -> None:
        events = self._logs.setdefault(key, [])
        events.append({"op": op, "version": version, "at": at})
        del events[:-LOG_LIMIT]

    def _tenant_keys(self, tenant: str) -> list[tuple[str, str]]:
        return [k for k in set(self._stacks) | set(self._shadow) if k[0] == tenant]

    def _source_bytes(self, tenant: str, pinned_only: bool = False) -> int:
        sizes: dict[str, int] = {}
        for key in self._tenant_keys(tenant):
            stack = self._stacks.get(key, [])
            for v in (stack[-1:] if pinned_only else stack):
                sizes[v.version] = _size(v.source)
            sh = self._shadow.get(key)
            if sh is not None:
                sizes[sh.version] = _size(sh.source)
        return sum(sizes.values())

    def _evict_sources(self, tenant: str) -> None:
        """Drop the oldest rollback targets of the tenant until its reachable sources fit."""
        while self._source_bytes(tenant) > self.sources_max_bytes:
            deep = [(s[0].deployed_at, k) for k in self._tenant_keys(tenant) if len(s := self._stacks.get(k, [])) > 1]
            if not deep:
                return
            _, k = min(deep)
            self._stacks[k].pop(0)

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version:
        key = (tenant, slug)
        v = Version(version_of(source), source, time.time())
        stack = self._stacks.setdefault(key, [])
        if not shadow and stack and stack[-1].version == v.version:
            return stack[-1]  # re-deploying the live version changes nothing
        sh = self._shadow.get(key)
        if shadow and sh is not None and sh.version == v.version:
            return sh
        # live and shadow sources only, with this deploy in place: must fit, or nothing changes
        pinned: dict[str, int] = {}
        for k in self._tenant_keys(tenant):
            top = self._stacks.get(k, [])[-1:]
            ksh = self._shadow.get(k)
            if k == key:
                top = top if shadow else [v]
                ksh = v if shadow else (None if ksh is not None and ksh.version == v.version else ksh)
            for x in (*top, *([ksh] if ksh is not None else [])):
                pinned[x.version] = _size(x.source)
        pinned[v.version] = _size(source)
        if sum(pinned.values()) > self.sources_max_bytes:
            raise StoreFull(f"tenant {tenant}: live and shadow sources would take {sum(pinned.values())} bytes, "
                            f"more than sources_max_bytes ({self.sources_max_bytes})")
        self._log(key, "shadow" if shadow else "deploy", v.version, v.deployed_at)
        if shadow:
            self._set_local(key, self._current.get(key), v)
        else:
            stack.append(v)
            del stack[:-self.versions_kept]
            self._set_local(key, v, None if sh is not None and sh.version == v.version else sh)
        self._evict_sources(tenant)
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
        raw = self._record_bytes(tenant, flow_id, record)
        runs = self._runs.setdefault(tenant, OrderedDict())
        old = runs.pop(flow_id, None)
        total = self._run_bytes.get(tenant, 0) - (len(old) if old is not None else 0) + len(raw)
        runs[flow_id] = raw
        self._run_tenant[flow_id] = tenant
        while runs and (len(runs) > self.history_size or total > self.history_max_bytes):
            gone, data = runs.popitem(last=False)
            total -= len(data)
            self._run_tenant.pop(gone, None)
        self._run_bytes[tenant] = total

    async def get_run(self, flow_id: str) -> dict[str, Any] | None:
        tenant = self._run_tenant.get(flow_id)
        raw = None if tenant is None else self._runs[tenant].get(flow_id)
        return None if raw is None else orjson.loads(raw)

    async def usage(self, tenant: str) -> dict[str, int]:
        """Bytes the tenant holds: run history and reachable sources (tests and operators)."""
        return {"history_bytes": self._run_bytes.get(tenant, 0), "runs": len(self._runs.get(tenant, ())),
                "source_bytes": self._source_bytes(tenant),
                "versions": len({v.version for k in self._tenant_keys(tenant) for v in self._stacks.get(k, [])})}


# ------------------------------------------------------------------- redis

_P = "actionpool:serve:"
CHANNEL = _P + "changes"

# Shared by the write scripts. Sizes of a tenant's sources live in the hash KEYS[srcs] (version -> bytes);
# its slugs in a set, so reachability is computed inside the script, atomically.
_LUA_LIB = """
local P = ARGV[1]
local tenant = ARGV[2]
local function ver(raw)
  if not raw then return nil end
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' and type(m['version']) == 'string' then return m['version'] end
  return nil
end
local function akey(slug, part) return P .. 'action:' .. tenant .. ':' .. slug .. ':' .. part end
local function reachable()
  local seen, total = {}, 0
  for _, slug in ipairs(redis.call('SMEMBERS', P .. 'slugs:' .. tenant)) do
    local vs = redis.call('LRANGE', akey(slug, 'stack'), 0, -1)
    table.insert(vs, redis.call('GET', akey(slug, 'shadow')))
    for _, raw in ipairs(vs) do
      local v = ver(raw)
      if v and not seen[v] then
        seen[v] = true
        total = total + (tonumber(redis.call('HGET', P .. 'srcs:' .. tenant, v)) or 0)
      end
    end
  end
  return seen, total
end
-- the oldest rollback targets go first, until the reachable sources fit; then unreachable sources are deleted
local function collect(budget)
  local seen, total = reachable()
  while total > budget do
    local best, best_at = nil, nil
    for _, slug in ipairs(redis.call('SMEMBERS', P .. 'slugs:' .. tenant)) do
      if redis.call('LLEN', akey(slug, 'stack')) > 1 then
        local ok, m = pcall(cjson.decode, redis.call('LINDEX', akey(slug, 'stack'), 0))
        local at = (ok and type(m) == 'table' and tonumber(m['at'])) or 0
        if best == nil or at < best_at then best, best_at = slug, at end
      end
    end
    if best == nil then break end
    redis.call('LPOP', akey(best, 'stack'))
    seen, total = reachable()
  end
  local srcs = P .. 'srcs:' .. tenant
  for _, v in ipairs(redis.call('HKEYS', srcs)) do
    if not seen[v] then
      redis.call('DEL', P .. 'src:' .. tenant .. ':' .. v)
      redis.call('HDEL', srcs, v)
    end
  end
end
local function done(result)
  redis.call('SET', P .. 'op:' .. ARGV[3], result, 'EX', tonumber(ARGV[4]))
  return result
end
local prior = redis.call('GET', P .. 'op:' .. ARGV[3])
if prior then return prior end
-- Every key a write touches is checked before the first write: a script that failed half way (Redis does not
-- roll back) and was retried after RedisStore._repair would pop a rollback twice.
local function check(slug)
  local want = {[P .. 'actions'] = 'set', [P .. 'slugs:' .. tenant] = 'set', [P .. 'srcs:' .. tenant] = 'hash',
                [akey(slug, 'stack')] = 'list', [akey(slug, 'log')] = 'list', [akey(slug, 'shadow')] = 'string',
                [P .. 'gen'] = 'string'}
  for k, t in pairs(want) do
    local got = redis.call('TYPE', k)['ok']
    if got ~= 'none' and got ~= t then error({err = 'WRONGTYPE ' .. k .. ' is a ' .. got}) end
  end
  local g = redis.call('GET', P .. 'gen')
  if g and not string.match(g, '^%-?%d+$') then error({err = 'ERR gen is not an integer'}) end
end
"""

# ARGV: prefix, tenant, request id, op ttl, slug, version, meta, event, source, shadow ('1'/'0'), kept,
# log limit, sources budget. Returns 'pushed' | 'same' | 'full:<bytes>'.
_DEPLOY_LUA = _LUA_LIB + """
local slug, version, meta, event, source = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
check(slug)
local shadow, kept, loglimit, budget = ARGV[10] == '1', tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local stack, shadowk = akey(slug, 'stack'), akey(slug, 'shadow')
if shadow then
  if ver(redis.call('GET', shadowk)) == version then return done('same') end
elseif ver(redis.call('LINDEX', stack, -1)) == version then
  return done('same')
end
-- the live and shadow sources, with this deploy in place, must fit
local pinned, total = {}, 0
local function pin(v) if v and not pinned[v] then
  pinned[v] = true
  total = total + (v == version and #source or (tonumber(redis.call('HGET', P .. 'srcs:' .. tenant, v)) or 0))
end end
pin(version)
for _, s in ipairs(redis.call('SMEMBERS', P .. 'slugs:' .. tenant)) do
  local top, sh = ver(redis.call('LINDEX', akey(s, 'stack'), -1)), ver(redis.call('GET', akey(s, 'shadow')))
  if s == slug then
    if shadow then sh = nil else top = nil; if sh == version then sh = nil end end
  end
  pin(top); pin(sh)
end
if total > budget then return 'full:' .. total end
redis.call('SET', P .. 'src:' .. tenant .. ':' .. version, source)
redis.call('HSET', P .. 'srcs:' .. tenant, version, #source)
redis.call('SADD', P .. 'actions', tenant .. ':' .. slug)
redis.call('SADD', P .. 'slugs:' .. tenant, slug)
if shadow then
  redis.call('SET', shadowk, meta)
else
  redis.call('RPUSH', stack, meta)
  redis.call('LTRIM', stack, -kept, -1)
  if ver(redis.call('GET', shadowk)) == version then redis.call('DEL', shadowk) end
end
redis.call('RPUSH', akey(slug, 'log'), event)
redis.call('LTRIM', akey(slug, 'log'), -loglimit, -1)
redis.call('INCR', P .. 'gen')
collect(budget)
return done('pushed')
"""

# ARGV: prefix, tenant, request id, op ttl, slug, now, log limit, budget. Pops the top when there is one below it.
_ROLLBACK_LUA = _LUA_LIB + """
local slug, now, loglimit, budget = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
check(slug)
local stack = akey(slug, 'stack')
if redis.call('LLEN', stack) < 2 then return done('none') end
redis.call('RPOP', stack)
local v = ver(redis.call('LINDEX', stack, -1)) or '?'
redis.call('RPUSH', akey(slug, 'log'), cjson.encode({op='rollback', version=v, at=now}))
redis.call('LTRIM', akey(slug, 'log'), -loglimit, -1)
redis.call('INCR', P .. 'gen')
collect(budget)
return done('to:' .. v)
"""

# ARGV: prefix, tenant, request id, op ttl, slug, version, meta, source, shadow meta ('' none), shadow version,
# shadow source, seeded version ('' none). Re-creates one action a replica holds, unless it exists already.
_RESTORE_LUA = _LUA_LIB + """
local slug = ARGV[5]
if ARGV[12] ~= '' then redis.call('SET', P .. 'seeded:' .. tenant .. ':' .. slug, ARGV[12], 'NX') end
if redis.call('EXISTS', akey(slug, 'stack')) == 1 or redis.call('EXISTS', akey(slug, 'shadow')) == 1 then
  return done('exists')
end
local function put(v, source)
  redis.call('SET', P .. 'src:' .. tenant .. ':' .. v, source)
  redis.call('HSET', P .. 'srcs:' .. tenant, v, #source)
end
if ARGV[6] ~= '' then put(ARGV[6], ARGV[8]); redis.call('RPUSH', akey(slug, 'stack'), ARGV[7]) end
if ARGV[9] ~= '' then put(ARGV[10], ARGV[11]); redis.call('SET', akey(slug, 'shadow'), ARGV[9]) end
redis.call('SADD', P .. 'actions', tenant .. ':' .. slug)
redis.call('SADD', P .. 'slugs:' .. tenant, slug)
redis.call('RPUSH', akey(slug, 'log'), cjson.encode({op='restore', version=(ARGV[6] ~= '' and ARGV[6] or ARGV[10]),
  at=tonumber(redis.call('TIME')[1])}))
redis.call('INCR', P .. 'gen')
return done('restored')
"""

# ARGV: prefix, tenant, slug. One action's top and shadow records with their sources, read atomically (a write
# between two separate reads could delete a source just read about). '' stands for "absent".
_READ_LUA = """
local P, tenant, slug = ARGV[1], ARGV[2], ARGV[3]
local base = P .. 'action:' .. tenant .. ':' .. slug .. ':'
local function src(raw)
  if not raw then return '' end
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' and type(m['version']) == 'string' then
    return redis.call('GET', P .. 'src:' .. tenant .. ':' .. m['version']) or ''
  end
  return ''
end
local top, sh = redis.call('LINDEX', base .. 'stack', -1), redis.call('GET', base .. 'shadow')
return {top or '', src(top), sh or '', src(sh)}
"""

# KEYS[1] the tenant's run list ("size:flow_id", newest first), KEYS[2] its byte total.
# ARGV: flow id, record, keep (count), ttl, run prefix, budget (bytes).
_RUN_LUA = """
local size = #ARGV[2]
local prior = redis.call('GET', ARGV[5] .. ARGV[1])
if prior then
  redis.call('LREM', KEYS[1], 1, #prior .. ':' .. ARGV[1])
  redis.call('DECRBY', KEYS[2], #prior)
end
redis.call('SET', ARGV[5] .. ARGV[1], ARGV[2], 'EX', tonumber(ARGV[4]))
redis.call('LPUSH', KEYS[1], size .. ':' .. ARGV[1])
local total = redis.call('INCRBY', KEYS[2], size)
local keep, budget = tonumber(ARGV[3]), tonumber(ARGV[6])
while redis.call('LLEN', KEYS[1]) > keep or (total > budget and redis.call('LLEN', KEYS[1]) > 0) do
  local old = redis.call('RPOP', KEYS[1])
  local sep = string.find(old, ':', 1, true)
  if sep then  -- an entry not "size:flow_id" (malformed) is dropped; it failed every later write before
    local n = tonumber(string.sub(old, 1, sep - 1)) or 0
    redis.call('DEL', ARGV[5] .. string.sub(old, sep + 1))
    total = redis.call('DECRBY', KEYS[2], n)
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return total
"""


def _reset(seen: str | None, now: str | None) -> bool:
    """The generation counter vanished or went backwards: Redis lost its data (or someone flushed it)."""
    if seen is None:
        return False
    if now is None:
        return True
    try:
        return int(now) < int(seen)
    except ValueError:
        return False


class _BadRecord(Exception):
    """A version record that cannot be read (not JSON, no version, its source missing, a wrong Redis type)."""


def _is_bad_data(exc: BaseException) -> bool:
    """Redis answered, and refused because of what a key holds (a list where a set belongs, ``gen = "abc"``).

    That is a malformed record, not an outage: counted as a bad record and never marks the store down (a
    down store drops every tenant's run history and turns readiness to degraded). Other refusals (OOM,
    READONLY after a failover, MISCONF) stay outages.
    """
    from redis.exceptions import ResponseError

    text = str(exc)
    return isinstance(exc, ResponseError) and ("WRONGTYPE" in text or "not an integer" in text
                                               or "not a valid float" in text)


class RedisStore(Store):
    """N replicas on one Redis; see the module docstring for how changes reach every replica."""

    def __init__(self, url: str, history_size: int, **bounds: int) -> None:
        super().__init__(history_size, **bounds)
        import redis.asyncio as aioredis
        from redis.backoff import ExponentialBackoff
        from redis.asyncio.retry import Retry
        from redis.exceptions import ConnectionError as RConnectionError, RedisError, TimeoutError as RTimeoutError

        self._redis_errors: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
        # A lost connection or a stale pooled one (Redis restarted) is retried: every write is idempotent.
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=1.0,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.02), 3), retry_on_error=[RConnectionError, RTimeoutError],
            health_check_interval=5)
        self._url = url
        self._deploy = self._redis.register_script(_DEPLOY_LUA)
        self._rollback = self._redis.register_script(_ROLLBACK_LUA)
        self._restore = self._redis.register_script(_RESTORE_LUA)
        self._run = self._redis.register_script(_RUN_LUA)
        self._read = self._redis.register_script(_READ_LUA)
        self._gen: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._stop = asyncio.Event()
        self._seeded: dict[tuple[str, str], str] = {}
        self._bad_logged: dict[str, float] = {}
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._peer_differs: set[str] = set()
        self._last_replica_check = 0.0
        self._history_writes = 0

    @staticmethod
    def _keys(tenant: str, slug: str) -> tuple[str, str, str]:
        base = f"{_P}action:{tenant}:{slug}:"
        return base + "stack", base + "log", base + "shadow"

    def _failed(self, exc: BaseException, started: float | None, where: str) -> None:
        """A Redis call failed: a malformed record at ``where`` (counted) or an outage (the store is down)."""
        if _is_bad_data(exc):
            self._bad(where, f"{type(exc).__name__}: {exc}")
        else:
            self.health.failed(exc, started)

    async def _io(self, coro: Any, where: str = "management call") -> Any:
        """Await one Redis call of a management route: a failure becomes StoreUnavailable (503)."""
        t0 = time.monotonic()
        try:
            out = await coro
        except self._redis_errors as exc:
            self._failed(exc, t0, where)
            if _is_bad_data(exc):
                raise StoreUnavailable(f"a malformed record in the store ({where}): {exc}") from None
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        self.health.ok()
        return out

    async def _repair(self, tenant: str, slug: str | None = None) -> bool:
        """Replace the keys a write touches that hold the wrong Redis type (or a counter that is not a number).

        Such a key cannot be read by any replica, so it carries nothing to keep; left in place it would fail
        every deploy of the tenant, and ``gen``, ``actions`` or ``seeded:`` failed every start. The index keys
        are rebuilt from the records they index (one SCAN). Counted and logged as bad records. Returns True when
        something was replaced (the caller retries its write once).
        """
        want: dict[str, str] = {_P + "gen": "counter", _P + "actions": "set", _P + "replicas": "zset",
                                f"{_P}slugs:{tenant}": "set", f"{_P}srcs:{tenant}": "hash"}
        if slug is not None:
            stack_k, log_k, shadow_k = self._keys(tenant, slug)
            want.update({stack_k: "list", log_k: "list", shadow_k: "string", f"{_P}seeded:{tenant}:{slug}": "string"})
        fixed = False
        for key, kind in want.items():
            got = await self._redis.type(key)
            if got == "none" or got == kind:
                continue
            if kind == "counter" and got == "string" and str(await self._redis.get(key)).lstrip("-").isdigit():
                continue
            self._bad(key, f"a Redis {got} where a {kind} belongs; replaced")
            await self._redis.delete(key)
            fixed = True
            if kind == "counter":  # forward of any value a replica saw, so each one's version check reloads
                await self._redis.set(key, int(time.time() * 1000))
            elif key == _P + "actions":
                async for k in self._redis.scan_iter(match=_P + "action:*", count=1000):
                    parts = str(k)[len(_P) + 7:].rsplit(":", 1)[0].partition(":")
                    if parts[0] and parts[2]:
                        await self._redis.sadd(key, f"{parts[0]}:{parts[2]}")
            elif kind == "set":
                async for k in self._redis.scan_iter(match=f"{_P}action:{tenant}:*", count=1000):
                    await self._redis.sadd(key, str(k)[len(f"{_P}action:{tenant}:"):].rsplit(":", 1)[0])
            elif kind == "hash":
                async for k in self._redis.scan_iter(match=f"{_P}src:{tenant}:*", count=1000):
                    if await self._redis.type(k) == "string":
                        await self._redis.hset(key, str(k).rsplit(":", 1)[1], await self._redis.strlen(k))
        return fixed

    async def _write(self, call: Callable[[], Any], tenant: str, slug: str | None) -> Any:
        """Run a write script; refused for a malformed key, repair (:meth:`_repair`) and run it once more."""
        t0 = time.monotonic()
        try:
            out = await call()
        except self._redis_errors as exc:
            if not _is_bad_data(exc):
                self.health.failed(exc, t0)
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
            try:
                repaired = await self._repair(tenant, slug)
            except self._redis_errors as exc2:
                self._failed(exc2, t0, f"{tenant}:{slug}")
                raise StoreUnavailable(f"{type(exc2).__name__}: {exc2}") from None
            if not repaired:
                self._bad(f"{tenant}:{slug}", f"{type(exc).__name__}: {exc}")
                raise StoreUnavailable(f"a malformed record in the store ({tenant}:{slug}): {exc}") from None
            return await self._io(call(), f"{tenant}:{slug}")
        self.health.ok()
        return out

    async def start(self) -> None:
        await self._reload_all()
        await self._warn_without_persistence()
        self._tasks = [asyncio.create_task(self._listen(), name="actionpool-store-listen"),
                       asyncio.create_task(self._poll(), name="actionpool-store-poll")]
        try:  # the first deploy after start should already arrive by message
            await asyncio.wait_for(self._subscribed.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("store: pub/sub not subscribed yet; the version check covers it")

    async def _warn_without_persistence(self) -> None:
        problem = await persistence_problem(self._redis)
        if problem:
            log.warning("store: %s: %s; see docs/gateway.md, 'The store failing'", self._url.split("@")[-1], problem)

    async def close(self) -> None:
        # A stop flag as well as cancel(): redis-py can swallow a CancelledError that lands inside a command.
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        try:
            await asyncio.wait_for(self._redis.delete(f"{_P}replica:{self.replica_id}"), 1.0)
        except Exception:
            pass
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    # -- the local view ---------------------------------------------------------------------
    def _bad(self, key: str, why: str) -> None:
        self.bad_records += 1
        now = time.monotonic()
        if now - self._bad_logged.get(key, -BAD_LOG_S) >= BAD_LOG_S:
            if len(self._bad_logged) > 1000:
                self._bad_logged.clear()
            self._bad_logged[key] = now
            log.warning("store: skipped a malformed record %s (%s); the replica keeps what it had for it", key, why)

    async def _load(self, tenant: str, slug: str) -> None:
        """Refresh one action's local view; a malformed record is skipped (counted) and the old view kept."""
        stack_k, _log_k, shadow_k = self._keys(tenant, slug)
        try:
            top, top_src, sh, sh_src = await self._read(args=[_P, tenant, slug])
            out: list[Version | None] = []
            for k, raw, source in ((stack_k, top, top_src), (shadow_k, sh, sh_src)):
                if not raw:
                    out.append(None)
                    continue
                try:
                    meta = orjson.loads(raw)
                    version, at = meta["version"], float(meta["at"])
                    if type(version) is not str:
                        raise TypeError("version is not a string")
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise _BadRecord(f"{k}: {type(exc).__name__}: {exc}") from None
                if not source:
                    raise _BadRecord(f"{k}: the source of version {version} is missing")
                out.append(Version(version, source, at))
        except _BadRecord as exc:
            self._bad(f"{tenant}:{slug}", str(exc))
            return
        except Exception as exc:
            if isinstance(exc, self._redis_errors) and "WRONGTYPE" not in str(exc):
                raise
            self._bad(f"{tenant}:{slug}", f"{type(exc).__name__}: {exc}")
            return
        key = (tenant, slug)
        if self._current.get(key) != out[0] or self._shadow.get(key) != out[1]:
            self._set_local(key, out[0], out[1])

    async def _reload_all(self) -> None:
        try:
            gen = await self._redis.get(_P + "gen")
            members = await self._redis.smembers(_P + "actions")
        except self._redis_errors as exc:  # a malformed gen or actions key must not stop a start: rebuilt
            if not _is_bad_data(exc) or not await self._repair("-"):
                raise
            gen = await self._redis.get(_P + "gen")
            members = await self._redis.smembers(_P + "actions")
        for member in members:
            tenant, _, slug = str(member).partition(":")
            if not tenant or not slug:
                self._bad(str(member), "not tenant:slug")
                continue
            await self._load(tenant, slug)
        self._gen = gen

    async def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._redis.pubsub()
            t0 = time.monotonic()
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        tenant, _, slug = str(msg["data"]).partition(":")
                        if tenant == "*":  # a refill (see _restore_all): everything may have changed
                            await self._reload_all()
                        else:
                            await self._load(tenant, slug)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:  # the outage is logged once, by _Health; the version check re-syncs
                if isinstance(exc, self._redis_errors):
                    self._failed(exc, t0, "pub/sub listener")  # a malformed key is a bad record, not an outage
                else:
                    log.warning("store: pub/sub listener: %s: %s", type(exc).__name__, exc)
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), POLL_S)
                return
            except asyncio.TimeoutError:
                pass
            t0 = time.monotonic()
            try:
                gen = await self._redis.get(_P + "gen")
                self.health.ok()
                if _reset(self._gen, gen) and (self._current or self._shadow):
                    await self._restore_all()
                elif gen != self._gen:
                    await self._reload_all()
                if time.monotonic() - self._last_replica_check >= REPLICA_S:
                    self._last_replica_check = time.monotonic()
                    await self._compare_replicas()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, self._redis_errors):
                    self._failed(exc, t0, "version-check")  # a malformed replicas/gen key: counted, not an outage
                    if _is_bad_data(exc):
                        try:
                            await self._repair("-")
                        except self._redis_errors:
                            pass
                else:  # a bug, not an outage: still rate-limited
                    self._bad("version-check", f"{type(exc).__name__}: {exc}")

    async def _restore_all(self) -> None:
        """Redis came back empty (no persistence): write back what this replica serves, so the fleet converges."""
        keys = sorted(set(self._current) | set(self._shadow))
        log.error("store: Redis came back EMPTY (restarted without persistence?): re-writing the %d action "
                  "version(s) this replica serves; rollback depth and run history were lost", len(keys))
        self.restores += 1
        for tenant, slug in keys:
            cur, sh = self._current.get((tenant, slug)), self._shadow.get((tenant, slug))
            meta = "" if cur is None else orjson.dumps({"version": cur.version, "at": cur.deployed_at}).decode()
            smeta = "" if sh is None else orjson.dumps({"version": sh.version, "at": sh.deployed_at}).decode()
            await self._restore(args=[_P, tenant, os.urandom(8).hex(), OP_TTL_S, slug,
                                      cur.version if cur else "", meta, cur.source if cur else "",
                                      smeta, sh.version if sh else "", sh.source if sh else "",
                                      self._seeded.get((tenant, slug), "")])
        # Past every counter a replica may hold, so each one's version check reloads (the message may be lost).
        await self._redis.incrby(_P + "gen", int(self._gen or 0) + 1 if (self._gen or "").isdigit() else 1)
        await self._redis.publish(CHANNEL, "*:restore")
        await self._reload_all()

    async def _compare_replicas(self) -> None:
        """Publish this replica's digest; report peers whose digest differed on two checks in a row."""
        now = time.time()
        mine = self.digest()
        me = f"{_P}replica:{self.replica_id}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(me, orjson.dumps({"digest": mine, "gen": self._gen, "at": now}).decode(), ex=REPLICA_TTL_S)
            pipe.zadd(_P + "replicas", {self.replica_id: now})
            pipe.zremrangebyscore(_P + "replicas", "-inf", now - 6 * REPLICA_TTL_S)
            pipe.zrangebyscore(_P + "replicas", now - REPLICA_TTL_S, "+inf", start=0, num=256)
            peers = [p for p in (await pipe.execute())[3] if p != self.replica_id]
        raws = await self._redis.mget([f"{_P}replica:{p}" for p in peers]) if peers else []
        differs: set[str] = set()
        for peer, raw in zip(peers, raws):
            try:
                if raw is not None and orjson.loads(raw)["digest"] != mine:
                    differs.add(peer)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self._bad(f"replica:{peer}", "not a replica record")
        now_disagreeing = sorted(differs & self._peer_differs)
        if now_disagreeing and now_disagreeing != self.disagreeing:
            log.warning("store: replicas disagree on the deployed versions: this one (%s) and %s",
                        self.replica_id, ", ".join(now_disagreeing))
        elif self.disagreeing and not now_disagreeing:
            log.warning("store: replicas agree again on the deployed versions")
        self._peer_differs, self.disagreeing = differs, now_disagreeing

    async def _changed(self, tenant: str, slug: str) -> None:
        """After a committed write: refresh and tell the others. A failure here does not undo the write."""
        try:
            await self._load(tenant, slug)
            await self._redis.publish(CHANNEL, f"{tenant}:{slug}")
        except self._redis_errors as exc:
            self._failed(exc, None, f"{tenant}:{slug}")

    # -- writes ----------------------------------------------------------------------------------
    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False) -> Version:
        v = Version(version_of(source), source, time.time())
        meta = orjson.dumps({"version": v.version, "at": v.deployed_at}).decode()
        event = orjson.dumps({"op": "shadow" if shadow else "deploy", "version": v.version,
                              "at": v.deployed_at}).decode()
        # One request id for every retry redis-py makes: a deploy whose reply was lost answers the first outcome.
        args = [_P, tenant, os.urandom(12).hex(), OP_TTL_S, slug, v.version, meta, event, source,
                "1" if shadow else "0", self.versions_kept, LOG_LIMIT, self.sources_max_bytes]
        res = await self._write(lambda: self._deploy(args=args), tenant, slug)
        if str(res).startswith("full:"):
            raise StoreFull(f"tenant {tenant}: live and shadow sources would take {str(res)[5:]} bytes, more than "
                            f"sources_max_bytes ({self.sources_max_bytes})")
        key = (tenant, slug)
        if res == "pushed":  # the local view now, whatever the reload below finds
            if shadow:
                self._set_local(key, self._current.get(key), v)
            else:
                sh = self._shadow.get(key)
                self._set_local(key, v, None if sh is not None and sh.version == v.version else sh)
        await self._changed(tenant, slug)
        got = self.shadow(tenant, slug) if shadow else self.current(tenant, slug)
        return got if got is not None and got.version == v.version else v

    async def rollback(self, tenant: str, slug: str) -> Version:
        args = [_P, tenant, os.urandom(12).hex(), OP_TTL_S, slug, time.time(), LOG_LIMIT, self.sources_max_bytes]
        res = await self._write(lambda: self._rollback(args=args), tenant, slug)
        if res == "none":
            raise NothingToRollBack(f"{slug} has no earlier version to roll back to")
        await self._changed(tenant, slug)
        v = self.current(tenant, slug)
        if v is None or v.version != str(res)[3:]:  # committed; this replica loads it with the next check
            return Version(str(res)[3:], v.source if v is not None and v.version == str(res)[3:] else "", time.time())
        return v

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]:
        _, log_k, _ = self._keys(tenant, slug)
        await self._io(self._load(tenant, slug))
        events = []
        for raw in await self._io(self._redis.lrange(log_k, 0, -1), log_k):
            try:
                e = orjson.loads(raw)
                events.append({"op": str(e["op"]), "version": str(e["version"]), "at": float(e["at"])})
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._bad(log_k, "a log entry is not {op, version, at}")
        return _describe(self.current(tenant, slug), self.shadow(tenant, slug), events)

    async def seed(self, tenant: str, slug: str, source: str) -> None:
        """Deploy a config file's content unless this exact content was seeded before (API deploys win)."""
        ver = version_of(source)
        self._seeded[(tenant, slug)] = ver
        if await self._write(lambda: self._redis.getset(f"{_P}seeded:{tenant}:{slug}", ver), tenant, slug) != ver:
            await self.deploy(tenant, slug, source)

    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None:
        """Best effort: while Redis is down the run is dropped and counted (the flow's answer was already sent)."""
        if self.history_size <= 0:
            return
        # A Redis that hangs rather than refuses must not pile up records in memory while the check notices.
        if not self.health.up or self._history_writes >= HISTORY_WRITES:
            self.history_dropped += 1
            return
        raw = self._record_bytes(tenant, flow_id, record).decode()
        t0 = time.monotonic()
        self._history_writes += 1
        try:
            await self._run(keys=[f"{_P}runs:{tenant}", f"{_P}runbytes:{tenant}"],
                            args=[flow_id, raw, self.history_size, RUN_TTL_S, _P + "run:", self.history_max_bytes])
        except self._redis_errors as exc:
            self._failed(exc, t0, f"runs:{tenant}")  # a malformed runs: key is this tenant's, not an outage
            self.history_dropped += 1
            if _is_bad_data(exc):  # replaced, so the tenant's next runs are kept again (their run: keys expire)
                try:
                    for key, kind in ((f"{_P}runs:{tenant}", "list"), (f"{_P}runbytes:{tenant}", "string")):
                        got = await self._redis.type(key)
                        if got not in ("none", kind) or (kind == "string" and not str(
                                await self._redis.get(key)).lstrip("-").isdigit()):
                            await self._redis.delete(key)
                except self._redis_errors:
                    pass
        finally:
            self._history_writes -= 1

    async def get_run(self, flow_id: str) -> dict[str, Any] | None:
        raw = await self._io(self._redis.get(_P + "run:" + flow_id))
        if raw is None:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._bad(f"run:{flow_id}", "not JSON")
            return None

    async def usage(self, tenant: str) -> dict[str, int]:
        """Bytes the tenant holds in Redis: run history and sources (tests and operators)."""
        sizes = await self._io(self._redis.hvals(f"{_P}srcs:{tenant}"))
        versions = 0
        for slug in await self._io(self._redis.smembers(f"{_P}slugs:{tenant}")):
            versions += await self._io(self._redis.llen(self._keys(tenant, slug)[0]))
        return {"history_bytes": int(await self._io(self._redis.get(f"{_P}runbytes:{tenant}")) or 0),
                "runs": int(await self._io(self._redis.llen(f"{_P}runs:{tenant}"))),
                "source_bytes": sum(int(s) for s in sizes), "versions": versions}


async def persistence_problem(client: Any) -> str | None:
    """Why a restart of this Redis would empty it (no RDB snapshots, no AOF), or None (or unknown: CONFIG refused)."""
    try:
        save = (await client.config_get("save")).get("save", "")
        aof = (await client.config_get("appendonly")).get("appendonly", "no")
    except Exception:
        return None
    if not str(save).strip() and str(aof).lower() == "no":
        return ("has no persistence (save \"\" and appendonly no): a restart empties it, and the replicas then "
                "re-write the versions they serve")
    return None


def open_store(url: str | None, history_size: int, **bounds: int) -> Store:
    return RedisStore(url, history_size, **bounds) if url else MemoryStore(history_size, **bounds)
