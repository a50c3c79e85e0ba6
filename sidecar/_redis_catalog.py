"""The catalog (tenants, flows, secrets, audit) on Redis; the contract is in sidecar/_catalog.py.

Keys (prefix ``actionpool:serve:``): ``tenants`` (hash name -> record), ``tgen`` (hash name -> a
counter bumped by every write of that tenant), ``flows:<t>`` (hash trigger -> current record),
``flowstack:<t>:<trigger>`` (list of kept versions, oldest first), ``secrets:<t>`` (hash name ->
``{"value": "v1:<key-id>:<nonce>:<ciphertext>", "updated_at"}``, never a plain value) and
``audit:<t>`` (list, newest first). Every write is one Lua script keyed by a request id; it bumps
``gen`` and ``tgen[t]`` and appends the audit entry in the same step.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

from ._catalog import (Catalog, FlowRecord, SecretsKeyMissing, SecretsUnavailable, StoreFull, TenantRecord,
                       UnknownTenant, audit_entry, content_version, rollback_refused, flow_record_from,
                       tenant_record_from, AUDIT_MESSAGE_CHARS, AUTHOR_CHARS)
from ._secrets import DecryptError, Keyring, SecretKeyError

log = logging.getLogger("actionpool.serve")

P = "actionpool:serve:"
CHANNEL = P + "changes"
UNLINK_BATCH = 500
OP_TTL_S = 300           # how long a write's request id answers a retry (as sidecar/_store.py)

# Shared by the rollback scripts of actions (sidecar/_store.py) and flows (below): a kept-versions list, oldest
# first, rolled back by popping its top (to == '') or by pushing the kept record whose version is ``to`` again
# (history stays linear), trimmed to ``kept``. ``version_of(raw)`` reads a record's version (nil if malformed).
# Returns 'none' (nothing below the top) | 'unknown' (``to`` not kept) | 'same' (``to`` is the top) | 'moved',
# and the top record before the call.
STACK_ROLLBACK_LUA = """
local function stack_rollback(stack, to, kept, version_of)
  local top = redis.call('LINDEX', stack, -1)
  if to == '' then
    if redis.call('LLEN', stack) < 2 then return 'none', top end
    redis.call('RPOP', stack)
    return 'moved', top
  end
  local found = nil
  for _, raw in ipairs(redis.call('LRANGE', stack, 0, -1)) do
    if version_of(raw) == to then found = raw end
  end
  if not found then return 'unknown', top end
  if top and version_of(top) == to then return 'same', top end
  redis.call('RPUSH', stack, found)
  redis.call('LTRIM', stack, -kept, -1)
  return 'moved', top
end
"""

# Shared by every write script of actions and of the catalog: refuse, before the first write, when a key holds
# another Redis type than ``want`` maps it to, or the generation counter is not a number (a script that failed
# half way is not rolled back; retried after RedisStore._repair, it would apply twice).
KEY_CHECK_LUA = """
local function check_types(want, gen_key)
  for k, t in pairs(want) do
    local got = redis.call('TYPE', k)['ok']
    if got ~= 'none' and got ~= t then error({err = 'WRONGTYPE ' .. k .. ' is a ' .. got}) end
  end
  local g = redis.call('GET', gen_key)
  if g and not string.match(g, '^%-?%d+$') then error({err = 'ERR gen is not an integer'}) end
end
"""

_CAT_LIB = KEY_CHECK_LUA + """
local P, tenant = ARGV[1], ARGV[2]
local function done(result)
  redis.call('SET', P .. 'op:' .. ARGV[3], result, 'EX', tonumber(ARGV[4]))
  return result
end
local prior = redis.call('GET', P .. 'op:' .. ARGV[3])
if prior then return prior end
local function check(extra)
  local want = {[P .. 'tenants'] = 'hash', [P .. 'tgen'] = 'hash', [P .. 'flows:' .. tenant] = 'hash',
                [P .. 'secrets:' .. tenant] = 'hash', [P .. 'audit:' .. tenant] = 'list', [P .. 'gen'] = 'string'}
  if extra then want[extra] = 'list' end
  check_types(want, P .. 'gen')
end
local function audit(template, op_if_old, old_exists, old, new, max)
  local e = cjson.decode(template)
  if old_exists and e['op'] == 'create' then e['op'] = op_if_old end
  e['old'] = old or cjson.null
  e['new'] = new or cjson.null
  redis.call('LPUSH', P .. 'audit:' .. tenant, cjson.encode(e))
  redis.call('LTRIM', P .. 'audit:' .. tenant, 0, max - 1)
end
local function bump()
  redis.call('INCR', P .. 'gen')
  redis.call('HINCRBY', P .. 'tgen', tenant, 1)
end
local function version_of(raw)
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' and type(m['version']) == 'string' then return m['version'] end
  return nil
end
"""

# ARGV: P, tenant, rid, ttl, record, version, tenants max, audit, audit max. 'created' | 'updated' | 'same' | 'full'
_PUT_TENANT = _CAT_LIB + """
check(nil)
local old = redis.call('HGET', P .. 'tenants', tenant)
local oldv = old and version_of(old)
if oldv == ARGV[6] then return done('same') end
if not old and redis.call('HLEN', P .. 'tenants') >= tonumber(ARGV[7]) then return 'full' end
redis.call('HSET', P .. 'tenants', tenant, ARGV[5])
audit(ARGV[8], 'update', old ~= false and old ~= nil, oldv, ARGV[6], tonumber(ARGV[9]))
bump()
return done(old and 'updated' or 'created')
"""

# ARGV: P, tenant, rid, ttl, audit, audit max. Drops the catalog records and the action/run indexes at once;
# the keys they index are unlinked by the caller in batches (SCAN). 'none' | 'gone:<runs list renamed to>'
_DELETE_TENANT = _CAT_LIB + """
check(nil)
check_types({[P .. 'slugs:' .. tenant] = 'set', [P .. 'actions'] = 'set', [P .. 'runs:' .. tenant] = 'list',
             [P .. 'srcs:' .. tenant] = 'hash'}, P .. 'gen')
local old = redis.call('HGET', P .. 'tenants', tenant)
if not old then return done('none') end
redis.call('HDEL', P .. 'tenants', tenant)
for _, trigger in ipairs(redis.call('HKEYS', P .. 'flows:' .. tenant)) do
  redis.call('UNLINK', P .. 'flowstack:' .. tenant .. ':' .. trigger)
end
-- the indexed action keys and sources go now, with the record: a tenant re-created before the sweep below
-- must not push onto (and roll back into) its predecessor's stacks
for _, v in ipairs(redis.call('HKEYS', P .. 'srcs:' .. tenant)) do
  redis.call('UNLINK', P .. 'src:' .. tenant .. ':' .. v)
end
redis.call('UNLINK', P .. 'flows:' .. tenant, P .. 'secrets:' .. tenant, P .. 'srcs:' .. tenant,
           P .. 'runbytes:' .. tenant)
for _, slug in ipairs(redis.call('SMEMBERS', P .. 'slugs:' .. tenant)) do
  redis.call('SREM', P .. 'actions', tenant .. ':' .. slug)
  local base = P .. 'action:' .. tenant .. ':' .. slug .. ':'
  redis.call('UNLINK', base .. 'stack', base .. 'log', base .. 'shadow', P .. 'seeded:' .. tenant .. ':' .. slug)
end
redis.call('UNLINK', P .. 'slugs:' .. tenant)
local gone = P .. 'gone:runs:' .. ARGV[3]
if redis.call('EXISTS', P .. 'runs:' .. tenant) == 1 then
  redis.call('RENAME', P .. 'runs:' .. tenant, gone)
  redis.call('EXPIRE', gone, 3600)
end
audit(ARGV[5], 'delete', true, version_of(old), nil, tonumber(ARGV[6]))
redis.call('INCR', P .. 'gen')
redis.call('HDEL', P .. 'tgen', tenant)
return done('gone:' .. gone)
"""

# ARGV: P, tenant, keys... The delete's sweep of keys no index named (strays): unlinked unless the tenant was
# re-created meanwhile, whose new keys share the pattern. 'swept' | 'back'
_SWEEP_IF_GONE = """
if redis.call('HEXISTS', ARGV[1] .. 'tenants', ARGV[2]) == 1 then return 'back' end
for i = 3, #ARGV do redis.call('UNLINK', ARGV[i]) end
return 'swept'
"""

# ARGV: P, tenant, rid, ttl, trigger, record, version, kept, flows max, audit, audit max.
# 'pushed' | 'same' | 'full' | 'notenant'
_PUT_FLOW = _CAT_LIB + """
local trigger = ARGV[5]
local stack = P .. 'flowstack:' .. tenant .. ':' .. trigger
check(stack)
if redis.call('HEXISTS', P .. 'tenants', tenant) == 0 then return done('notenant') end
local top = redis.call('HGET', P .. 'flows:' .. tenant, trigger)
local oldv = top and version_of(top)
if oldv == ARGV[7] then return done('same') end
if not top and redis.call('HLEN', P .. 'flows:' .. tenant) >= tonumber(ARGV[9]) then return 'full' end
redis.call('RPUSH', stack, ARGV[6])
redis.call('LTRIM', stack, -tonumber(ARGV[8]), -1)
redis.call('HSET', P .. 'flows:' .. tenant, trigger, ARGV[6])
audit(ARGV[10], 'update', top ~= false and top ~= nil, oldv, ARGV[7], tonumber(ARGV[11]))
bump()
return done('pushed')
"""

# ARGV: P, tenant, rid, ttl, trigger, to ('' = pop one), kept, audit, audit max.
# 'to:<record>' | 'none' | 'unknown' | 'notenant'
_ROLLBACK_FLOW = _CAT_LIB + STACK_ROLLBACK_LUA + """
local trigger = ARGV[5]
local stack = P .. 'flowstack:' .. tenant .. ':' .. trigger
check(stack)
if redis.call('HEXISTS', P .. 'tenants', tenant) == 0 then return done('notenant') end
local moved, top = stack_rollback(stack, ARGV[6], tonumber(ARGV[7]), version_of)
if moved == 'none' or moved == 'unknown' then return done(moved) end
if moved == 'same' then return done('to:' .. top) end
local oldv = top and version_of(top)
local now = redis.call('LINDEX', stack, -1)
redis.call('HSET', P .. 'flows:' .. tenant, trigger, now)
audit(ARGV[8], 'rollback', true, oldv, version_of(now), tonumber(ARGV[9]))
bump()
return done('to:' .. now)
"""

# ARGV: P, tenant, rid, ttl, name, record, secrets max, audit, audit max. 'created' | 'updated' | 'full' | 'notenant'
_PUT_SECRET = _CAT_LIB + """
check(nil)
if redis.call('HEXISTS', P .. 'tenants', tenant) == 0 then return done('notenant') end
local had = redis.call('HEXISTS', P .. 'secrets:' .. tenant, ARGV[5]) == 1
if not had and redis.call('HLEN', P .. 'secrets:' .. tenant) >= tonumber(ARGV[7]) then return 'full' end
redis.call('HSET', P .. 'secrets:' .. tenant, ARGV[5], ARGV[6])
audit(ARGV[8], 'update', had, nil, nil, tonumber(ARGV[9]))
bump()
return done(had and 'updated' or 'created')
"""

# ARGV: P, tenant, rid, ttl, name, audit, audit max. 'deleted' | 'none'
_DELETE_SECRET = _CAT_LIB + """
check(nil)
if redis.call('HDEL', P .. 'secrets:' .. tenant, ARGV[5]) == 0 then return done('none') end
audit(ARGV[6], 'delete', true, nil, nil, tonumber(ARGV[7]))
bump()
return done('deleted')
"""

# ARGV: P, tenant, rid, ttl, name, expected record, new record. Compare-and-set (the rekey pass). 'set' | 'moved'
_REKEY_SECRET = _CAT_LIB + """
check(nil)
if redis.call('HGET', P .. 'secrets:' .. tenant, ARGV[5]) ~= ARGV[6] then return done('moved') end
redis.call('HSET', P .. 'secrets:' .. tenant, ARGV[5], ARGV[7])
bump()
return done('set')
"""

# ARGV: P, tenant, rid, ttl, record, flows (JSON {trigger: record}), secrets (JSON {name: record}).
# Re-creates a tenant a replica holds after Redis came back empty, unless it exists already.
_RESTORE_TENANT = _CAT_LIB + """
if redis.call('HEXISTS', P .. 'tenants', tenant) == 1 then return done('exists') end
redis.call('HSET', P .. 'tenants', tenant, ARGV[5])
for trigger, rec in pairs(cjson.decode(ARGV[6])) do
  redis.call('HSETNX', P .. 'flows:' .. tenant, trigger, rec)
  redis.call('RPUSH', P .. 'flowstack:' .. tenant .. ':' .. trigger, rec)
end
for name, rec in pairs(cjson.decode(ARGV[7])) do
  redis.call('HSETNX', P .. 'secrets:' .. tenant, name, rec)
end
bump()
return done('restored')
"""

# ARGV: P, tenant. The tenant's record, flow tops and secret records, read at once.
_READ_TENANT = """
local P, tenant = ARGV[1], ARGV[2]
return {redis.call('HGET', P .. 'tenants', tenant) or '', redis.call('HGETALL', P .. 'flows:' .. tenant),
        redis.call('HGETALL', P .. 'secrets:' .. tenant), redis.call('GET', P .. 'gen') or ''}
"""

# ARGV: P. The generation counter and every tenant's counter, read at once.
_READ_GENS = """
return {redis.call('GET', ARGV[1] .. 'gen') or '', redis.call('HGETALL', ARGV[1] .. 'tgen')}
"""

_PARSE_ERRORS = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisCatalog(Catalog):
    """Mixed into RedisStore: uses its client, write/IO wrappers, bad-record counter and health."""

    _redis: Any
    _redis_errors: tuple[type[BaseException], ...]
    keyring: Keyring | None

    def _catalog_redis_init(self) -> None:
        r = self._redis
        self._s_put_tenant = r.register_script(_PUT_TENANT)
        self._s_delete_tenant = r.register_script(_DELETE_TENANT)
        self._s_sweep = r.register_script(_SWEEP_IF_GONE)
        self._s_put_flow = r.register_script(_PUT_FLOW)
        self._s_rollback_flow = r.register_script(_ROLLBACK_FLOW)
        self._s_put_secret = r.register_script(_PUT_SECRET)
        self._s_delete_secret = r.register_script(_DELETE_SECRET)
        self._s_rekey = r.register_script(_REKEY_SECRET)
        self._s_restore_tenant = r.register_script(_RESTORE_TENANT)
        self._s_read_tenant = r.register_script(_READ_TENANT)
        self._s_read_gens = r.register_script(_READ_GENS)
        self._tgens: dict[str, str] = {}
        self._secret_raw: dict[str, dict[str, str]] = {}   # tenant -> name -> stored record (ciphertext)
        self._unknown_keys: set[str] = set()               # key ids met that this keyring lacks
        if self.keyring is None:
            try:
                self.keyring = Keyring.from_env(os.environ)
            except SecretKeyError as exc:
                log.warning("store: %s; secrets cannot be read or written", exc)
                self.keyring = Keyring(None)

    # -- writes -----------------------------------------------------------------------------------
    async def _cat_write(self, script: Any, tenant: str, *args: Any) -> str:
        rid = os.urandom(12).hex()
        res = await self._write(  # type: ignore[attr-defined]
            lambda: script(args=[P, tenant, rid, OP_TTL_S, *args]), tenant, None)
        return str(res)

    async def _cat_changed(self, tenant: str) -> None:
        """After a committed write: reload the tenant here and tell the others; a failure does not undo it."""
        try:
            await self._load_tenant(tenant)
            await self._redis.publish(CHANNEL, "#" + tenant)
        except self._redis_errors as exc:
            self._failed(exc, None, f"tenant {tenant}")  # type: ignore[attr-defined]

    @staticmethod
    def _audit_json(op: str, kind: str, key: str, author: str, message: str = "") -> str:
        return orjson.dumps(audit_entry(op, kind, key, None, None, author, message)).decode()

    async def put_tenant(self, name: str, settings: dict[str, Any], *, author: str) -> tuple[bool, TenantRecord]:
        raw = self._settings_bytes(name, settings)
        clean = orjson.loads(raw)
        version = content_version(clean)
        record = orjson.dumps({"settings": clean, "version": version, "updated_at": time.time()}).decode()
        res = await self._cat_write(self._s_put_tenant, name, record, version, self.bounds.tenants_max,
                                    self._audit_json("create", "tenant", name, author), self.bounds.audit_max)
        if res == "full":
            raise StoreFull(f"at most {self.bounds.tenants_max} tenants (tenants_max)")
        await self._cat_changed(name)
        rec = self._tenants.get(name)
        if rec is None or rec.version != version:
            rec = tenant_record_from(name, record)
        return res == "created", rec

    async def delete_tenant(self, name: str, *, author: str) -> bool:
        res = await self._cat_write(self._s_delete_tenant, name, self._audit_json("delete", "tenant", name, author),
                                    self.bounds.audit_max)
        if res == "none":
            return False
        await self._unlink_tenant_keys(name, res[5:])
        self._drop_tenant_local(name)
        await self._cat_changed(name)
        return True

    async def _unlink_tenant_keys(self, tenant: str, gone_runs: str) -> None:
        """The run records the deleted index pointed at, then a sweep for stray action/source keys; batched, no KEYS.

        The indexed action keys went with the delete's script; the sweep stops if the tenant is re-created.
        """
        r = self._redis

        async def unlink(keys: list[str]) -> None:
            for i in range(0, len(keys), UNLINK_BATCH):
                await self._io(r.unlink(*keys[i:i + UNLINK_BATCH]), f"delete {tenant}")  # type: ignore[attr-defined]

        start = 0
        while True:
            chunk = await self._io(r.lrange(gone_runs, start, start + UNLINK_BATCH - 1))  # type: ignore[attr-defined]
            if not chunk:
                break
            await unlink([P + "run:" + str(e).partition(":")[2] for e in chunk if ":" in str(e)])
            start += UNLINK_BATCH
        await unlink([gone_runs])

        async def sweep(keys: list[str]) -> bool:
            if not keys:
                return True
            res = await self._io(  # type: ignore[attr-defined]
                self._s_sweep(args=[P, tenant, *keys]), f"delete {tenant}")
            return bool(res == "swept")

        for pattern in (f"{P}action:{tenant}:*", f"{P}src:{tenant}:*", f"{P}seeded:{tenant}:*"):
            batch: list[str] = []
            async for k in r.scan_iter(match=pattern, count=1000):
                batch.append(str(k))
                if len(batch) >= UNLINK_BATCH:
                    if not await sweep(batch):
                        return   # re-created: what matches now is the new tenant's
                    batch = []
            if not await sweep(batch):
                return

    async def put_flow(self, tenant: str, trigger: str, entries: list[Any], *, author: str,
                       message: str = "") -> FlowRecord:
        raw = self._flow_bytes(tenant, trigger, entries)
        clean = orjson.loads(raw)
        rec = FlowRecord(clean, content_version(clean), time.time(), (author or "")[:AUTHOR_CHARS],
                         (message or "")[:AUDIT_MESSAGE_CHARS])
        res = await self._cat_write(self._s_put_flow, tenant, trigger, orjson.dumps(rec.to_json()).decode(),
                                    rec.version, self.versions_kept, self.bounds.flows_max,
                                    self._audit_json("create", "flow", trigger, author, message),
                                    self.bounds.audit_max)
        if res == "notenant":
            raise UnknownTenant(tenant)
        if res == "full":
            raise self._full_count(tenant, "flows", "flows_max")
        await self._cat_changed(tenant)
        got = self._flows.get((tenant, trigger))
        return got if got is not None and got.version == rec.version else rec

    async def rollback_flow(self, tenant: str, trigger: str, *, to: str | None = None,
                            author: str = "") -> FlowRecord:
        res = await self._cat_write(self._s_rollback_flow, tenant, trigger, to or "", self.versions_kept,
                                    self._audit_json("rollback", "flow", trigger, author), self.bounds.audit_max)
        rollback_refused(res, tenant, f"flow {trigger}", to)
        await self._cat_changed(tenant)
        return flow_record_from(res[3:])

    async def flow_versions(self, tenant: str, trigger: str) -> list[dict[str, Any]]:
        from ._catalog import _versions_listing

        key = f"{P}flowstack:{tenant}:{trigger}"
        stack = []
        for raw in await self._io(self._redis.lrange(key, 0, -1), key):  # type: ignore[attr-defined]
            try:
                stack.append(flow_record_from(raw))
            except _PARSE_ERRORS:
                self._bad(key, "a flow version is not a record")  # type: ignore[attr-defined]
        return _versions_listing(stack)

    def _keyring_for_writes(self) -> Keyring:
        kr = self.keyring
        if kr is None or not kr.can_encrypt:
            raise SecretsUnavailable("secrets are stored encrypted on Redis and no key is configured: set "
                                     f"{getattr(kr, 'env_name', None) or 'ACTIONPOOL_SECRETS_KEY'} (32 bytes, "
                                     "base64) in the sidecar's environment")
        return kr

    async def put_secret(self, tenant: str, name: str, value: str, *, author: str) -> None:
        self._check_secret(tenant, name, value)
        kr = self._keyring_for_writes()
        record = orjson.dumps({"value": kr.encrypt(tenant, name, value), "updated_at": time.time()}).decode()
        res = await self._cat_write(self._s_put_secret, tenant, name, record, self.bounds.secrets_max,
                                    self._audit_json("create", "secret", name, author), self.bounds.audit_max)
        if res == "notenant":
            raise UnknownTenant(tenant)
        if res == "full":
            raise self._full_count(tenant, "secrets", "secrets_max")
        await self._cat_changed(tenant)

    async def delete_secret(self, tenant: str, name: str, *, author: str) -> bool:
        res = await self._cat_write(self._s_delete_secret, tenant, name,
                                    self._audit_json("delete", "secret", name, author), self.bounds.audit_max)
        if res == "none":
            return False
        await self._cat_changed(tenant)
        return True

    async def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        n = max(0, min(limit, self.bounds.audit_max))
        if n == 0:
            return []
        key = f"{P}audit:{tenant}"
        out = []
        for raw in await self._io(self._redis.lrange(key, 0, n - 1), key):  # type: ignore[attr-defined]
            try:
                e = orjson.loads(raw)
                if not isinstance(e, dict):
                    raise TypeError("not an object")
                out.append(e)
            except _PARSE_ERRORS:
                self._bad(key, "an audit entry is not JSON")  # type: ignore[attr-defined]
        return out

    async def rekey_secrets(self) -> int:
        """Re-encrypt, with the current key, every secret this replica holds under a previous key."""
        kr = self._keyring_for_writes()
        done = 0
        for tenant, raws in list(self._secret_raw.items()):
            for name, record in list(raws.items()):
                try:
                    stored = orjson.loads(record)["value"]
                    if Keyring.key_of(stored) == kr.current_id:
                        continue
                    value = kr.decrypt(tenant, name, stored)
                except (DecryptError, *_PARSE_ERRORS):
                    continue  # counted as a bad record when loaded; nothing to re-encrypt
                new = orjson.dumps({"value": kr.encrypt(tenant, name, value),
                                    "updated_at": orjson.loads(record)["updated_at"]}).decode()
                if await self._cat_write(self._s_rekey, tenant, name, record, new) == "set":
                    done += 1
            await self._cat_changed(tenant)
        if done:
            log.warning("store: re-encrypted %d secret(s) with the current key %s", done, kr.current_id)
        return done

    # -- the local view ---------------------------------------------------------------------------
    async def _load_tenant(self, tenant: str) -> None:
        """Refresh one tenant's record, flow tops and secrets; a malformed item is skipped and counted."""
        try:
            raw, flows_flat, secrets_flat, gen = await self._s_read_tenant(args=[P, tenant])
        except self._redis_errors as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            self._bad(f"tenant {tenant}", f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
            return
        if not raw:
            if not gen:  # Redis lost everything (restarted empty): never a reason to forget; the restore follows
                return
            if tenant in self._tenants or tenant in self._secret_raw or any(k[0] == tenant for k in self._flows):
                self._drop_tenant_local(tenant)
            self._secret_raw.pop(tenant, None)
            return
        try:
            self._set_tenant_local(tenant, tenant_record_from(tenant, raw))
        except _PARSE_ERRORS as exc:
            self._bad(f"tenants:{tenant}", f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
            if tenant not in self._tenants:
                return
        flows = _pairs(flows_flat)
        for trigger, rec in flows.items():
            try:
                self._set_flow_local(tenant, trigger, flow_record_from(rec))
            except _PARSE_ERRORS as exc:
                self._bad(f"flows:{tenant}:{trigger}", f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
        for trigger in [k[1] for k in self._flows if k[0] == tenant and k[1] not in flows]:
            self._set_flow_local(tenant, trigger, None)
        secrets = _pairs(secrets_flat)
        self._secret_raw[tenant] = secrets
        for name, rec in secrets.items():
            self._load_secret(tenant, name, rec)
        for name in [n for n in self._secret_meta.get(tenant, {}) if n not in secrets]:
            self._set_secret_local(tenant, name, None)

    def _load_secret(self, tenant: str, name: str, record: str) -> None:
        kr = self.keyring or Keyring(None)
        try:
            d = orjson.loads(record)
            stored, at = d["value"], float(d["updated_at"])
            if not isinstance(stored, str):
                raise TypeError("value is not a string")
        except _PARSE_ERRORS as exc:
            self._bad(f"secrets:{tenant}:{name}", f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
            self._set_secret_local(tenant, name, None)
            return
        try:
            value = kr.decrypt(tenant, name, stored)
        except DecryptError as exc:
            kid = Keyring.key_of(stored)
            if kid is not None and kid not in kr.key_ids:
                self._unknown_keys.add(kid)
            self._bad(f"secrets:{tenant}:{name}", f"does not decrypt: {exc}")  # type: ignore[attr-defined]
            self._set_secret_local(tenant, name, None)  # absent, never a wrong value
            return
        self._set_secret_local(tenant, name, value, at)

    async def _reload_catalog(self) -> None:
        """Reload the tenants whose counter moved (and those gone from Redis)."""
        gen, flat = await self._s_read_gens(args=[P])  # one snapshot: gen and the tenants' counters
        if not gen:  # an emptied Redis drops nothing here (the version check writes it back)
            return
        gens = _pairs(flat)
        for tenant in sorted(set(gens) | set(self._tenants) | set(self._secret_raw)):
            if gens.get(tenant) != self._tgens.get(tenant) or tenant not in gens:
                await self._load_tenant(tenant)
        self._tgens = gens

    def _check_secrets_keys(self) -> None:
        """At start: secrets under a key this process lacks stop it (serve exits 2), rather than run without them."""
        if self._unknown_keys:
            env = getattr(self.keyring, "env_name", None) or "ACTIONPOOL_SECRETS_KEY"
            raise SecretsKeyMissing(
                f"the store holds tenant secrets encrypted with key id(s) {', '.join(sorted(self._unknown_keys))}, "
                f"which is neither {env} (current: {getattr(self.keyring, 'current_id', None) or 'not set'}) nor in "
                f"{env}_PREVIOUS; set the key they were written with (see docs/gateway.md, 'Secrets')")

    async def _restore_catalog(self) -> None:
        """Redis came back empty: write back the tenants, flow tops and secret ciphertexts this replica holds."""
        for name, rec in sorted(self._tenants.items()):
            flows = {t: orjson.dumps(f.to_json()).decode() for (tn, t), f in self._flows.items() if tn == name}
            record = orjson.dumps({"settings": rec.settings, "version": rec.version,
                                   "updated_at": rec.updated_at}).decode()
            await self._s_restore_tenant(args=[P, name, os.urandom(8).hex(), OP_TTL_S, record,
                                               orjson.dumps(flows).decode(),
                                               orjson.dumps(self._secret_raw.get(name, {})).decode()])

