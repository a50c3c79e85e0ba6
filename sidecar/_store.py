"""Deployed action versions, the tenant catalog and run history, in memory (one replica) or on Redis (N replicas).

Versions are immutable and content-addressed: the first 16 hex digits of SHA-256 over the source and its
metadata (language, sorted declared secrets, failure policy; a plain Python version with neither hashes the
source alone, so ids from before metadata stay). :class:`Version` also carries message, author and ``at``
(``deployed_at`` is an alias). Each (tenant, slug) has a *stack* of deployments: a deploy pushes, a rollback
pops back to the previous one or, with ``to=``, pushes a kept version again (history stays linear; a version
not kept raises :class:`UnknownVersion`, a KeyError); the top is what flows run. A *log* keeps every deploy
and rollback with its time, and a *shadow* version may run beside the live one (see sidecar/_server.py).

The interface beyond the deploy/rollback of issue 16:
``deploy(..., language, secrets, failure, message, author)``, ``rollback(..., to=, author=)``,
``get_version``, ``describe`` (each version with language/secrets/failure/author/message/kept),
``deployed_count()``, and the catalog of sidecar/_catalog.py (tenants, flows, secrets, audit, ``is_empty``,
``rekey_secrets``). Action (deploy, shadow, rollback, seed), flow and secret writes for a tenant the store
does not hold raise :class:`UnknownTenant` (a KeyError), checked atomically with the write (on Redis inside
its script), so a write racing a tenant DELETE never lands for a deleted or re-created tenant;
malformed names or values raise ValueError; a Redis store without a secrets key raises
:class:`SecretsUnavailable` on ``put_secret``, and :class:`SecretsKeyMissing` (a ConfigError: serve exits 2)
from ``start()`` when Redis holds secrets under a key it lacks. ``store_for(config)`` builds the store a
ServeConfig names, with every bound and the keyring. ``on_change(kind, tenant, key)`` follows every local
change (kind "action" | "tenant" | "flow" | "secret"). Every write lands in the tenant's audit trail; the
author "config" records op "sync".

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
versions and catalog and report peers that disagree for two checks in a row. A gen that vanished while this
replica holds data means Redis lost it: nothing is forgotten, the catalog (tenants, flow tops, secrets as
ciphertext) is written back with the actions.
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

from ._catalog import (BOUND_NAMES, Catalog, CatalogBounds, FlowRecord, MemoryCatalog, NothingToRollBack,
                       SecretsKeyMissing, SecretsUnavailable, StoreFull, StoreUnavailable, TenantRecord,
                       UnknownTenant, UnknownVersion, audit_entry, rollback_refused, stack_rollback,
                       AUDIT_MESSAGE_CHARS, AUTHOR_CHARS)
from ._redis_catalog import CHANNEL, KEY_CHECK_LUA, P, STACK_ROLLBACK_LUA, RedisCatalog
from ._secrets import Keyring

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
    """One deployed version: the source and what travels with it (all of it is in the version id)."""

    version: str
    source: str
    language: str = "python"         # "python" | "javascript"
    secrets: tuple[str, ...] = ()    # declared secret names: the run sees these (those that exist), no others
    failure: str | None = None       # "open" | "closed" | None: the tenant's default
    message: str = ""
    author: str = ""
    at: float = 0.0                  # deployed, epoch seconds

    @property
    def deployed_at(self) -> float:
        return self.at

    def meta(self) -> dict[str, Any]:
        """The version's record on a stack (everything but the source, kept once per version)."""
        out: dict[str, Any] = {"version": self.version, "at": self.at}
        if self.language != "python":
            out["language"] = self.language
        if self.secrets:
            out["secrets"] = list(self.secrets)
        if self.failure is not None:
            out["failure"] = self.failure
        if self.message:
            out["message"] = self.message
        if self.author:
            out["author"] = self.author
        return out


def version_of(source: str, language: str = "python", secrets: tuple[str, ...] | list[str] = (),
               failure: str | None = None) -> str:
    """The first 16 hex of SHA-256 over the source and its metadata.

    A Python version with no declared secrets and the tenant's failure default hashes the source alone, so
    versions deployed before metadata existed keep their ids.
    """
    data = source.encode("utf-8", "surrogatepass")
    if language != "python" or secrets or failure is not None:
        data += b"\0" + orjson.dumps({"language": language, "secrets": sorted(set(secrets)), "failure": failure},
                                      option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:16]


def version_from_meta(meta: dict[str, Any], source: str) -> Version:
    """A Version from its stack record; TypeError/KeyError/ValueError when the record is malformed."""
    version, at = meta["version"], float(meta["at"])
    language, secrets = meta.get("language", "python"), meta.get("secrets", [])
    failure, message, author = meta.get("failure"), meta.get("message", ""), meta.get("author", "")
    if type(version) is not str:
        raise TypeError("version is not a string")
    if language not in LANGUAGES or failure not in (None, "open", "closed"):
        raise ValueError(f"language {language!r} or failure {failure!r} unknown")
    if not isinstance(secrets, list) or not all(isinstance(x, str) for x in secrets):
        raise TypeError("secrets is not a list of names")
    if not isinstance(message, str) or not isinstance(author, str):
        raise TypeError("message or author is not a string")
    return Version(version, source, language, tuple(secrets), failure, message, author, at)


LANGUAGES = ("python", "javascript")


def _size(source: str) -> int:
    return len(source.encode("utf-8", "surrogatepass"))


__all__ = ["Version", "version_of", "Store", "MemoryStore", "RedisStore", "open_store", "store_for", "TenantRecord",
           "FlowRecord", "CatalogBounds", "NothingToRollBack", "UnknownVersion", "UnknownTenant", "StoreUnavailable",
           "StoreFull",           "SecretsUnavailable", "SecretsKeyMissing", "persistence_problem"]


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


class Store(Catalog):
    """The shared interface; ``current``/``shadow`` and the catalog reads are local, everything else may do I/O.

    ``keyring`` encrypts tenant secrets on Redis (None: read ``ACTIONPOOL_SECRETS_KEY`` from the environment;
    memory:// never needs one). The catalog bounds (sidecar/_catalog.py) are keyword arguments too.
    """

    def __init__(self, history_size: int, *, history_max_bytes: int = HISTORY_MAX_BYTES,
                 sources_max_bytes: int = SOURCES_MAX_BYTES, versions_kept: int = VERSIONS_KEPT,
                 keyring: Keyring | None = None, **catalog_bounds: int) -> None:
        self.history_size = history_size
        self.history_max_bytes = history_max_bytes
        self.sources_max_bytes = sources_max_bytes
        self.versions_kept = max(1, versions_kept)
        self._catalog_init(CatalogBounds(**catalog_bounds))
        self.keyring = keyring
        self._current: dict[tuple[str, str], Version] = {}
        self._shadow: dict[tuple[str, str], Version] = {}
        self.on_change: Callable[[str, str, str], None] | None = None  # (kind, tenant, key) after a local change
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

    def slugs(self, tenant: str) -> list[str]:
        """The tenant's slugs with a live version (local; the drift report, not the flow path)."""
        return sorted(slug for t, slug in self._current if t == tenant)

    def deployed_count(self) -> int:
        """Actions with a live version, all tenants (local; the ready line of ``serve``)."""
        return len(self._current)

    def _set_local(self, key: tuple[str, str], cur: Version | None, shadow: Version | None) -> None:
        for table, v in ((self._current, cur), (self._shadow, shadow)):
            if v is None:
                table.pop(key, None)
            else:
                table[key] = v
        if self.on_change is not None:
            self.on_change("action", *key)

    def _drop_actions_local(self, tenant: str) -> None:
        for key in [k for k in set(self._current) | set(self._shadow) if k[0] == tenant]:
            self._set_local(key, None, None)

    def digest(self) -> str:
        """A short digest of the loaded versions and catalog: equal on replicas that serve the same thing."""
        h = hashlib.sha256()
        for key in sorted(set(self._current) | set(self._shadow)):
            cur, sh = self._current.get(key), self._shadow.get(key)
            h.update(f"{key[0]}:{key[1]}={cur.version if cur else '-'}/{sh.version if sh else '-'}\n".encode())
        for line in self.catalog_digest_lines():
            h.update(line.encode() + b"\n")
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

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False, language: str = "python",
                     secrets: tuple[str, ...] | list[str] = (), failure: str | None = None, message: str = "",
                     author: str = "") -> Version:
        """Push a version (or set the shadow); StoreFull over a bound. Re-deploying the live version is a no-op."""
        raise NotImplementedError

    async def rollback(self, tenant: str, slug: str, *, to: str | None = None, author: str = "") -> Version:
        """Pop one version, or push ``to`` (a kept version) again; NothingToRollBack / UnknownVersion."""
        raise NotImplementedError

    async def get_version(self, tenant: str, slug: str, version: str) -> Version | None:
        """Any kept version (on the stack or the shadow), for diffs."""
        raise NotImplementedError

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]: raise NotImplementedError
    async def seed(self, tenant: str, slug: str, source: str) -> None: raise NotImplementedError
    # the catalog (sidecar/_catalog.py has the contract of each)
    async def put_tenant(self, name: str, settings: dict[str, Any], *, author: str) -> tuple[bool, TenantRecord]:
        raise NotImplementedError
    async def delete_tenant(self, name: str, *, author: str) -> bool: raise NotImplementedError
    async def put_flow(self, tenant: str, trigger: str, entries: list[Any], *, author: str,
                       message: str = "") -> FlowRecord: raise NotImplementedError
    async def rollback_flow(self, tenant: str, trigger: str, *, to: str | None = None,
                            author: str = "") -> FlowRecord: raise NotImplementedError
    async def flow_versions(self, tenant: str, trigger: str) -> list[dict[str, Any]]: raise NotImplementedError
    async def put_secret(self, tenant: str, name: str, value: str, *, author: str) -> None: raise NotImplementedError
    async def delete_secret(self, tenant: str, name: str, *, author: str) -> bool: raise NotImplementedError
    async def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]: raise NotImplementedError
    async def rekey_secrets(self) -> int:
        """Re-encrypt every secret under a previous key with the current one; the number re-encrypted."""
        raise NotImplementedError
    async def record_run(self, tenant: str, flow_id: str, record: dict[str, Any]) -> None: raise NotImplementedError
    async def get_run(self, flow_id: str) -> dict[str, Any] | None: raise NotImplementedError
    async def usage(self, tenant: str) -> dict[str, int]: raise NotImplementedError


def _event(op: str, version: str, at: float, v: Version | None = None) -> dict[str, Any]:
    """A deploy/rollback log entry; a deploy carries the version's author, message and language."""
    e: dict[str, Any] = {"op": op, "version": version, "at": at}
    if v is not None:
        e.update({k: x for k, x in (("author", v.author), ("message", v.message), ("language", v.language)) if x})
    return e


def _new_version(tenant: str, slug: str, source: str, language: str, secrets: tuple[str, ...] | list[str],
                 failure: str | None, message: str, author: str) -> Version:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    if failure not in (None, "open", "closed"):
        raise ValueError(f"failure must be \"open\", \"closed\" or absent, got {failure!r}")
    names = tuple(sorted(set(secrets)))
    return Version(version_of(source, language, names, failure), source, language, names, failure,
                   (message or "")[:AUDIT_MESSAGE_CHARS], (author or "")[:AUTHOR_CHARS], time.time())


def _describe(cur: Version | None, shadow: Version | None, events: list[dict[str, Any]],
              kept: list[Version]) -> dict[str, Any]:
    """The action's current and shadow versions, every version the log names (with its metadata) and the log."""
    meta = {v.version: v for v in (*kept, *([shadow] if shadow else []))}
    versions: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["op"] in ("deploy", "shadow", "restore"):
            v = versions.setdefault(e["version"], {"version": e["version"], "deployed_at": [],
                                                   "language": e.get("language", "python"),
                                                   "author": e.get("author", ""), "message": e.get("message", "")})
            v["deployed_at"].append(_iso(e["at"]))
    for x in kept:  # kept versions the log no longer names (it holds LOG_LIMIT events)
        versions.setdefault(x.version, {"version": x.version, "deployed_at": [_iso(x.at)]})
    for version, v in versions.items():
        m = meta.get(version)
        v["kept"] = m is not None
        if m is not None:
            v.update(language=m.language, secrets=list(m.secrets), failure=m.failure, author=m.author,
                     message=m.message)
    return {"current": cur.version if cur else None, "shadow": shadow.version if shadow else None,
            "versions": list(versions.values()),
            "history": [{"op": e["op"], "version": e["version"], "at": _iso(e["at"]),
                         **({"author": e["author"]} if e.get("author") else {})} for e in events]}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# ------------------------------------------------------------------ memory


class MemoryStore(MemoryCatalog, Store):
    """One replica: everything in this process (gone on restart, apart from what the config seeds)."""

    def __init__(self, history_size: int, **bounds: Any) -> None:
        super().__init__(history_size, **bounds)
        self._memory_catalog_init()
        self._stacks: dict[tuple[str, str], list[Version]] = {}
        self._logs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._seeded: dict[tuple[str, str], str] = {}
        self._runs: dict[str, OrderedDict[str, bytes]] = {}
        self._run_bytes: dict[str, int] = {}
        self._run_tenant: dict[str, str] = {}

    def _tenant_held(self, tenant: str) -> None:
        """An action write for a tenant the catalog lacks (deleted mid-request) lands nowhere: UnknownTenant.

        Checked with no await before the write, so no tenant DELETE can come between; a tenant re-created
        under the name starts with no versions.
        """
        if tenant not in self._tenants:
            raise UnknownTenant(tenant)

    def _log(self, key: tuple[str, str], op: str, version: str, at: float, v: Version | None = None) -> None:
        events = self._logs.setdefault(key, [])
        events.append(_event(op, version, at, v))
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

    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False, language: str = "python",
                     secrets: tuple[str, ...] | list[str] = (), failure: str | None = None, message: str = "",
                     author: str = "") -> Version:
        key = (tenant, slug)
        v = _new_version(tenant, slug, source, language, secrets, failure, message, author)
        self._tenant_held(tenant)
        stack = self._stacks.get(key, [])
        if not shadow and stack and stack[-1].version == v.version:
            return stack[-1]  # re-deploying the live version changes nothing
        sh = self._shadow.get(key)
        if shadow and sh is not None and sh.version == v.version:
            return sh
        if key not in self._stacks and key not in self._shadow and len(self._tenant_keys(tenant)) >= \
                self.bounds.actions_max:
            raise self._full_count(tenant, "actions", "actions_max")
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
        op = "shadow" if shadow else "deploy"
        self._log(key, op, v.version, v.at, v)
        old = sh if shadow else (stack[-1] if stack else None)
        self._audit_add(tenant, audit_entry(op, "action", slug, old.version if old else None, v.version, author,
                                            message))
        if shadow:
            self._set_local(key, self._current.get(key), v)
        else:
            self._stacks[key] = stack
            stack.append(v)
            del stack[:-self.versions_kept]
            self._set_local(key, v, None if sh is not None and sh.version == v.version else sh)
        self._evict_sources(tenant)
        return v

    async def rollback(self, tenant: str, slug: str, *, to: str | None = None, author: str = "") -> Version:
        key = (tenant, slug)
        self._tenant_held(tenant)
        stack = self._stacks.get(key, [])
        old = stack[-1].version if stack else None
        v = stack_rollback(stack, to, self.versions_kept, slug)
        if v.version != old:
            self._log(key, "rollback", v.version, time.time())
            self._audit_add(tenant, audit_entry("rollback", "action", slug, old, v.version, author))
        self._set_local(key, v, self._shadow.get(key))
        return v

    async def get_version(self, tenant: str, slug: str, version: str) -> Version | None:
        key = (tenant, slug)
        for v in (*reversed(self._stacks.get(key, [])), self._shadow.get(key)):
            if v is not None and v.version == version:
                return v
        return None

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]:
        key = (tenant, slug)
        return _describe(self._current.get(key), self._shadow.get(key), self._logs.get(key, []),
                         self._stacks.get(key, []))

    async def delete_tenant(self, name: str, *, author: str) -> bool:
        if not await super().delete_tenant(name, author=author):
            return False
        for table in (self._stacks, self._logs, self._seeded):
            for key in [k for k in table if k[0] == name]:
                del table[key]
        for flow_id in self._runs.pop(name, {}):
            self._run_tenant.pop(flow_id, None)
        self._run_bytes.pop(name, None)
        return True

    async def seed(self, tenant: str, slug: str, source: str) -> None:
        key = (tenant, slug)
        if self._seeded.get(key) != version_of(source):
            self._tenant_held(tenant)
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

_P = P

# Shared by the write scripts. Sizes of a tenant's sources live in the hash KEYS[srcs] (version -> bytes);
# its slugs in a set, so reachability is computed inside the script, atomically.
_LUA_LIB = KEY_CHECK_LUA + """
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
-- one audit entry, newest first, the list trimmed to its bound
local function audit(template, old, new, max)
  local e = cjson.decode(template)
  e['old'] = old or cjson.null
  e['new'] = new or cjson.null
  redis.call('LPUSH', P .. 'audit:' .. tenant, cjson.encode(e))
  redis.call('LTRIM', P .. 'audit:' .. tenant, 0, max - 1)
end
local prior = redis.call('GET', P .. 'op:' .. ARGV[3])
if prior then return prior end
-- Every key a write touches is checked before the first write: a script that failed half way (Redis does not
-- roll back) and was retried after RedisStore._repair would pop a rollback twice.
local function check(slug)
  check_types({[P .. 'actions'] = 'set', [P .. 'slugs:' .. tenant] = 'set', [P .. 'srcs:' .. tenant] = 'hash',
               [akey(slug, 'stack')] = 'list', [akey(slug, 'log')] = 'list', [akey(slug, 'shadow')] = 'string',
               [P .. 'gen'] = 'string', [P .. 'audit:' .. tenant] = 'list', [P .. 'tenants'] = 'hash'}, P .. 'gen')
end
"""

# ARGV: prefix, tenant, request id, op ttl, slug, version, meta, event, source, shadow ('1'/'0'), kept,
# log limit, sources budget, actions max, audit entry (JSON, old/new filled here), audit max.
# Returns 'pushed' | 'same' | 'full:<bytes>' | 'many' | 'notenant' (no tenant record: deleted, never created).
_DEPLOY_LUA = _LUA_LIB + """
local slug, version, meta, event, source = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
check(slug)
if redis.call('HEXISTS', P .. 'tenants', tenant) == 0 then return done('notenant') end
local shadow, kept, loglimit, budget = ARGV[10] == '1', tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local stack, shadowk = akey(slug, 'stack'), akey(slug, 'shadow')
if shadow then
  if ver(redis.call('GET', shadowk)) == version then return done('same') end
elseif ver(redis.call('LINDEX', stack, -1)) == version then
  return done('same')
end
if redis.call('SISMEMBER', P .. 'slugs:' .. tenant, slug) == 0
    and redis.call('SCARD', P .. 'slugs:' .. tenant) >= tonumber(ARGV[14]) then
  return 'many'
end
local old = shadow and ver(redis.call('GET', shadowk)) or ver(redis.call('LINDEX', stack, -1))
audit(ARGV[15], old, version, tonumber(ARGV[16]))
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

# ARGV: prefix, tenant, request id, op ttl, slug, now, log limit, budget, to ('' = pop one), audit entry, audit max,
# kept. Pops the top when there is one below it, or pushes the kept version ``to`` again.
# Returns 'to:<version>' | 'none' | 'unknown' | 'notenant'.
_ROLLBACK_LUA = _LUA_LIB + STACK_ROLLBACK_LUA + """
local slug, now, loglimit, budget = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
check(slug)
if redis.call('HEXISTS', P .. 'tenants', tenant) == 0 then return done('notenant') end
local stack = akey(slug, 'stack')
local moved, top = stack_rollback(stack, ARGV[9], tonumber(ARGV[12]), ver)
if moved == 'none' or moved == 'unknown' then return done(moved) end
local old = ver(top)
if moved == 'same' then return done('to:' .. old) end
local v = ver(redis.call('LINDEX', stack, -1)) or '?'
audit(ARGV[10], old, v, tonumber(ARGV[11]))
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

# ARGV: prefix, tenant, slug, version. A kept version's record (stack or shadow) and its source, or {'', ''}.
_GETV_LUA = """
local P, tenant, slug, want = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local base = P .. 'action:' .. tenant .. ':' .. slug .. ':'
local recs = redis.call('LRANGE', base .. 'stack', 0, -1)
table.insert(recs, redis.call('GET', base .. 'shadow'))
for _, raw in ipairs(recs) do
  if raw then
    local ok, m = pcall(cjson.decode, raw)
    if ok and type(m) == 'table' and m['version'] == want then
      return {raw, redis.call('GET', P .. 'src:' .. tenant .. ':' .. want) or ''}
    end
  end
end
return {'', ''}
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


def _stored(record: str) -> str:
    """The ciphertext of a secret record, '' when malformed (counted when loaded)."""
    try:
        value = orjson.loads(record)["value"]
        return value if isinstance(value, str) else ""
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


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


class RedisStore(RedisCatalog, Store):
    """N replicas on one Redis; see the module docstring for how changes reach every replica."""

    def __init__(self, url: str, history_size: int, **bounds: Any) -> None:
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
        self._getv = self._redis.register_script(_GETV_LUA)
        self._catalog_redis_init()
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
                                f"{_P}slugs:{tenant}": "set", f"{_P}srcs:{tenant}": "hash",
                                _P + "tenants": "hash", _P + "tgen": "hash", f"{_P}flows:{tenant}": "hash",
                                f"{_P}secrets:{tenant}": "hash", f"{_P}audit:{tenant}": "list",
                                f"{_P}runs:{tenant}": "list"}
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
            elif kind == "set" and key == f"{_P}slugs:{tenant}":
                async for k in self._redis.scan_iter(match=f"{_P}action:{tenant}:*", count=1000):
                    await self._redis.sadd(key, str(k)[len(f"{_P}action:{tenant}:"):].rsplit(":", 1)[0])
            elif key == f"{_P}srcs:{tenant}":  # the catalog's hashes hold records: nothing to rebuild them from
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
        self._check_secrets_keys()
        if self.keyring is not None and self.keyring.can_encrypt and any(
                Keyring.key_of(_stored(r)) != self.keyring.current_id for t in self._secret_raw.values()
                for r in t.values()):
            await self.rekey_secrets()  # the start-up rekey pass: values under a previous key get the current one
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
        # The version check ends by itself at its next wait; cancelled inside a Redis call it would drop its
        # pooled connection without closing the socket. The listener blocks in listen() and is cancelled.
        poll = [t for t in self._tasks if t.get_name() == "actionpool-store-poll"]
        if poll:
            await asyncio.wait(poll, timeout=2.0)
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
                    v = version_from_meta(orjson.loads(raw), source)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                    raise _BadRecord(f"{k}: {type(exc).__name__}: {exc}") from None
                if not source:
                    raise _BadRecord(f"{k}: the source of version {v.version} is missing")
                out.append(v)
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
        await self._reload_catalog()
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
                        if tenant.startswith("#"):  # a catalog change of one tenant
                            await self._load_tenant(tenant[1:])
                        elif tenant == "*":  # a refill (see _restore_all): everything may have changed
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
                # gen gone while this replica holds what Redis gave it (even before its first check saw a gen)
                if (gen is None or _reset(self._gen, gen)) and (self._current or self._shadow or self._tenants):
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
                  "version(s), %d tenant(s) with their flows and (encrypted) secrets this replica serves; rollback "
                  "depth, audit trails and run history were lost", len(keys), len(self._tenants))
        self.restores += 1
        await self._restore_catalog()
        for tenant, slug in keys:
            cur, sh = self._current.get((tenant, slug)), self._shadow.get((tenant, slug))
            meta = "" if cur is None else orjson.dumps(cur.meta()).decode()
            smeta = "" if sh is None else orjson.dumps(sh.meta()).decode()
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
    async def deploy(self, tenant: str, slug: str, source: str, *, shadow: bool = False, language: str = "python",
                     secrets: tuple[str, ...] | list[str] = (), failure: str | None = None, message: str = "",
                     author: str = "") -> Version:
        v = _new_version(tenant, slug, source, language, secrets, failure, message, author)
        meta = orjson.dumps(v.meta()).decode()
        op = "shadow" if shadow else "deploy"
        event = orjson.dumps(_event(op, v.version, v.at, v)).decode()
        entry = orjson.dumps(audit_entry(op, "action", slug, None, None, author, message)).decode()
        # One request id for every retry redis-py makes: a deploy whose reply was lost answers the first outcome.
        args = [_P, tenant, os.urandom(12).hex(), OP_TTL_S, slug, v.version, meta, event, source,
                "1" if shadow else "0", self.versions_kept, LOG_LIMIT, self.sources_max_bytes,
                self.bounds.actions_max, entry, self.bounds.audit_max]
        res = await self._write(lambda: self._deploy(args=args), tenant, slug)
        if res == "notenant":
            raise UnknownTenant(tenant)
        if str(res).startswith("full:"):
            raise StoreFull(f"tenant {tenant}: live and shadow sources would take {str(res)[5:]} bytes, more than "
                            f"sources_max_bytes ({self.sources_max_bytes})")
        if res == "many":
            raise self._full_count(tenant, "actions", "actions_max")
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

    async def rollback(self, tenant: str, slug: str, *, to: str | None = None, author: str = "") -> Version:
        entry = orjson.dumps(audit_entry("rollback", "action", slug, None, None, author)).decode()
        args = [_P, tenant, os.urandom(12).hex(), OP_TTL_S, slug, time.time(), LOG_LIMIT, self.sources_max_bytes,
                to or "", entry, self.bounds.audit_max, self.versions_kept]
        res = await self._write(lambda: self._rollback(args=args), tenant, slug)
        rollback_refused(str(res), tenant, slug, to)
        await self._changed(tenant, slug)
        v = self.current(tenant, slug)
        if v is None or v.version != str(res)[3:]:  # committed; this replica loads it with the next check
            got = await self.get_version(tenant, slug, str(res)[3:])
            return got if got is not None else Version(str(res)[3:], "", at=time.time())
        return v

    async def get_version(self, tenant: str, slug: str, version: str) -> Version | None:
        raw = await self._io(self._getv(args=[_P, tenant, slug, version]), f"{tenant}:{slug}")
        if not raw or not raw[0]:
            return None
        try:
            return version_from_meta(orjson.loads(raw[0]), raw[1] or "")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self._bad(f"{tenant}:{slug}", f"version {version}: {type(exc).__name__}: {exc}")
            return None

    async def describe(self, tenant: str, slug: str) -> dict[str, Any]:
        stack_k, log_k, _ = self._keys(tenant, slug)
        await self._io(self._load(tenant, slug))
        events = []
        for raw in await self._io(self._redis.lrange(log_k, 0, -1), log_k):
            try:
                e = orjson.loads(raw)
                ev = {"op": str(e["op"]), "version": str(e["version"]), "at": float(e["at"])}
                ev.update({k: str(e[k]) for k in ("author", "message", "language") if isinstance(e.get(k), str)})
                events.append(ev)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                self._bad(log_k, "a log entry is not {op, version, at}")
        kept = []
        for raw in await self._io(self._redis.lrange(stack_k, 0, -1), stack_k):
            try:
                kept.append(version_from_meta(orjson.loads(raw), ""))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                self._bad(stack_k, "a stack entry is not a version record")
        return _describe(self.current(tenant, slug), self.shadow(tenant, slug), events, kept)

    async def seed(self, tenant: str, slug: str, source: str) -> None:
        """Deploy a config file's content unless this exact content was seeded before (API deploys win)."""
        ver = version_of(source)
        if self.tenant(tenant) is None:  # before the marker: a refused seed must not count as seeded
            raise UnknownTenant(tenant)
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


def open_store(url: str | None, history_size: int, **bounds: Any) -> Store:
    return RedisStore(url, history_size, **bounds) if url else MemoryStore(history_size, **bounds)


def store_for(config: Any) -> Store:
    """The store a ServeConfig names, with every bound and the secrets keyring of its ``[server]`` table."""
    srv = config.server
    keyring = Keyring.from_env(os.environ, srv.secrets_key_env) if config.store_url else None
    return open_store(config.store_url, srv.history_size, history_max_bytes=srv.history_max_bytes,
                      sources_max_bytes=srv.sources_max_bytes, versions_kept=srv.versions_kept, keyring=keyring,
                      **{name: getattr(srv, name) for name in BOUND_NAMES})
