"""Tenants, flows, secrets and the audit trail: the store's control-plane catalog (issue 17).

The interface is on :class:`~actionpool.sidecar._store.Store` (this module holds the
records, the bounds and the memory/Redis halves the stores mix in):

- ``tenants()``, ``tenant(name)``: local reads; ``put_tenant(name, settings, author=)`` ->
  ``(created, TenantRecord)``; ``delete_tenant(name, author=)`` drops the tenant's actions and
  their versions, flows, secrets and run history (its audit trail stays, under its name).
- ``flow(tenant, trigger)``: local; ``put_flow`` / ``rollback_flow(to=)`` / ``flow_versions``
  keep a stack of ``versions_kept`` flow versions like actions.
- ``put_secret`` / ``delete_secret``; ``secret_names(tenant)`` ([{"name", "updated_at"}]) and
  ``secret_values(tenant)`` (decrypted, for runs and redaction) are local.
- ``audit(tenant, limit)``: newest first; ``author == "config"`` records op "sync".
- ``is_empty()``: no tenant at all (the TOML bootstrap applies).

Every write bumps the store's generation counter and the tenant's own counter (Redis hash
``tgen``), publishes ``#<tenant>`` on the changes channel and lands in the tenant's audit list,
all in one Lua script keyed by a request id (a retry after a lost reply answers the first
outcome). Each replica reloads a changed tenant's record, flow tops and secrets on the message,
or within ``POLL_S`` from the counters when the message is lost; ``on_change(kind, tenant,
key)`` follows each local change.

Bounds (``[server]`` keys of ServerSpec, per tenant unless said): ``tenants_max`` (in all),
``tenant_settings_max_bytes``, ``actions_max`` (slugs), ``flows_max``, ``flow_entries_max``,
``flow_max_bytes`` (one version's canonical JSON), ``secrets_max``, ``secret_max_bytes`` (one
value), ``audit_max`` (entries kept, oldest dropped; an entry's message is cut to
``AUDIT_MESSAGE_CHARS``). A write over a count or byte bound raises :class:`StoreFull` and
changes nothing.

Secrets on Redis are stored only as AES-GCM ciphertext (sidecar/_secrets.py); without a key
:meth:`put_secret` raises :class:`SecretsUnavailable`, and a start that finds values under an
unknown key raises :class:`SecretsKeyMissing` (serve exits 2). A value that fails to decrypt
later (tampered, moved) is a bad record: counted, logged once, that secret absent.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from ..runner import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")          # tenants, slugs, triggers (runner SLUG_RE)
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MIN_SECRET_CHARS = 8
AUDIT_MESSAGE_CHARS = 1024
AUTHOR_CHARS = 128


class NothingToRollBack(Exception):
    """The action (or flow) has one version (or none): there is nothing before it."""


class UnknownVersion(KeyError):
    """``rollback(to=...)``: that version is not among the kept ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown version"


class UnknownTenant(KeyError):
    """A flow or secret write for a tenant the store does not hold (deleted meanwhile, or never created)."""

    def __str__(self) -> str:
        return f"unknown tenant {self.args[0]}" if self.args else "unknown tenant"


class StoreUnavailable(Exception):
    """The store (Redis) did not answer; the write was not done, or a retry of it is safe (idempotent)."""


class StoreFull(Exception):
    """A write would take the tenant (or the store) over one of its bounds; nothing changed."""


class SecretsUnavailable(Exception):
    """Redis store without a secrets key: values are never stored in the clear (set ACTIONPOOL_SECRETS_KEY)."""


class SecretsKeyMissing(ConfigError):
    """At start: the store holds secrets encrypted under a key this process does not have (serve exits 2)."""


@dataclass(frozen=True)
class CatalogBounds:
    tenants_max: int = 10000
    tenant_settings_max_bytes: int = 64 << 10
    actions_max: int = 256
    flows_max: int = 32
    flow_entries_max: int = 64
    flow_max_bytes: int = 64 << 10
    secrets_max: int = 128
    secret_max_bytes: int = 8 << 10
    audit_max: int = 1000


BOUND_NAMES = tuple(CatalogBounds.__dataclass_fields__)


@dataclass(frozen=True)
class TenantRecord:
    name: str
    settings: dict[str, Any]
    version: str
    updated_at: float


@dataclass(frozen=True)
class FlowRecord:
    entries: list[Any]
    version: str
    updated_at: float
    author: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"entries": self.entries, "version": self.version, "updated_at": self.updated_at,
                "author": self.author, "message": self.message}


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def content_version(obj: Any) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()[:16]


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def audit_entry(op: str, kind: str, key: str, old: str | None, new: str | None, who: str,
                message: str = "", at: float | None = None) -> dict[str, Any]:
    """One audit record: who did what to which object, old -> new version. Never a secret value."""
    return {"at": iso(time.time() if at is None else at), "who": (who or "unknown")[:AUTHOR_CHARS],
            "op": "sync" if who == "config" and op not in ("delete",) else op, "kind": kind, "key": key,
            "old": old, "new": new, "message": (message or "")[:AUDIT_MESSAGE_CHARS]}


def flow_record_from(raw: Any) -> FlowRecord:
    """A FlowRecord from its JSON form; TypeError/KeyError/ValueError when malformed."""
    d = orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw
    entries, version = d["entries"], d["version"]
    if not isinstance(entries, list) or type(version) is not str:
        raise TypeError("entries is not a list or version not a string")
    return FlowRecord(entries, version, float(d["updated_at"]), str(d.get("author", "")), str(d.get("message", "")))


def tenant_record_from(name: str, raw: Any) -> TenantRecord:
    d = orjson.loads(raw)
    settings, version = d["settings"], d["version"]
    if not isinstance(settings, dict) or type(version) is not str:
        raise TypeError("settings is not an object or version not a string")
    return TenantRecord(name, settings, version, float(d["updated_at"]))


class Catalog:
    """The local maps and checks both stores share; the flow path reads only these (no I/O)."""

    bounds: CatalogBounds
    versions_kept: int

    def _catalog_init(self, bounds: CatalogBounds) -> None:
        self.bounds = bounds
        self._tenants: dict[str, TenantRecord] = {}
        self._flows: dict[tuple[str, str], FlowRecord] = {}
        self._secret_meta: dict[str, dict[str, float]] = {}      # tenant -> name -> updated_at
        self._secret_vals: dict[str, dict[str, str]] = {}        # tenant -> name -> value (decrypted)

    # -- local reads ------------------------------------------------------------------------------
    def tenants(self) -> dict[str, TenantRecord]:
        return dict(self._tenants)

    def tenant(self, name: str) -> TenantRecord | None:
        return self._tenants.get(name)

    def is_empty(self) -> bool:
        return not self._tenants

    def flow(self, tenant: str, trigger: str) -> FlowRecord | None:
        return self._flows.get((tenant, trigger))

    def flows(self, tenant: str) -> dict[str, FlowRecord]:
        return {k[1]: f for k, f in self._flows.items() if k[0] == tenant}

    def secret_names(self, tenant: str) -> list[dict[str, Any]]:
        return [{"name": n, "updated_at": iso(t)} for n, t in sorted(self._secret_meta.get(tenant, {}).items())]

    def secret_values(self, tenant: str) -> dict[str, str]:
        return dict(self._secret_vals.get(tenant, {}))

    def catalog_digest_lines(self) -> list[str]:
        out = [f"t:{n}={r.version}" for n, r in self._tenants.items()]
        out += [f"f:{t}:{g}={f.version}" for (t, g), f in self._flows.items()]
        out += [f"s:{t}:{n}={u}" for t, m in self._secret_meta.items() for n, u in m.items()]
        return sorted(out)

    def _notify(self, kind: str, tenant: str, key: str) -> None:
        cb = getattr(self, "on_change", None)
        if cb is not None:
            cb(kind, tenant, key)

    # -- checks (names and bounds; both stores) -----------------------------------------------------
    @staticmethod
    def _check_name(what: str, value: str, pattern: re.Pattern[str] = NAME_RE) -> None:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"{what} {value!r} must match {pattern.pattern}")

    def _settings_bytes(self, name: str, settings: dict[str, Any]) -> bytes:
        self._check_name("tenant", name)
        if not isinstance(settings, dict):
            raise ValueError("tenant settings must be an object")
        raw = canonical(settings)
        if len(raw) > self.bounds.tenant_settings_max_bytes:
            raise StoreFull(f"tenant {name}: settings of {len(raw)} bytes exceed tenant_settings_max_bytes "
                            f"({self.bounds.tenant_settings_max_bytes})")
        return raw

    def _flow_bytes(self, tenant: str, trigger: str, entries: list[Any]) -> bytes:
        self._check_name("tenant", tenant)
        self._check_name("trigger", trigger)
        if not isinstance(entries, list):
            raise ValueError("a flow is a list of entries")
        if len(entries) > self.bounds.flow_entries_max:
            raise StoreFull(f"tenant {tenant}: flow {trigger} has {len(entries)} entries, more than "
                            f"flow_entries_max ({self.bounds.flow_entries_max})")
        raw = canonical(entries)
        if len(raw) > self.bounds.flow_max_bytes:
            raise StoreFull(f"tenant {tenant}: flow {trigger} is {len(raw)} bytes, more than flow_max_bytes "
                            f"({self.bounds.flow_max_bytes})")
        return raw

    def _check_secret(self, tenant: str, name: str, value: str) -> None:
        self._check_name("tenant", tenant)
        self._check_name("secret name", name, SECRET_NAME_RE)
        if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
            raise ValueError(f"secret {name}: a value needs at least {MIN_SECRET_CHARS} characters (a shorter one "
                             "cannot be redacted from run history)")
        if len(value.encode("utf-8", "surrogatepass")) > self.bounds.secret_max_bytes:
            raise StoreFull(f"tenant {tenant}: secret {name} is longer than secret_max_bytes "
                            f"({self.bounds.secret_max_bytes})")

    def _full_count(self, tenant: str, what: str, bound: str) -> StoreFull:
        return StoreFull(f"tenant {tenant}: at most {getattr(self.bounds, bound)} {what} ({bound})")

    # -- local map updates (both stores) ------------------------------------------------------------
    def _set_tenant_local(self, name: str, rec: TenantRecord | None) -> None:
        if rec is None:
            if self._tenants.pop(name, None) is None:
                return
        else:
            if self._tenants.get(name) == rec:
                return
            self._tenants[name] = rec
        self._notify("tenant", name, name)

    def _set_flow_local(self, tenant: str, trigger: str, rec: FlowRecord | None) -> None:
        key = (tenant, trigger)
        if rec is None:
            if self._flows.pop(key, None) is None:
                return
        else:
            old = self._flows.get(key)
            if old is not None and old.version == rec.version and old.updated_at == rec.updated_at:
                return
            self._flows[key] = rec
        self._notify("flow", tenant, trigger)

    def _set_secret_local(self, tenant: str, name: str, value: str | None, updated_at: float = 0.0) -> None:
        meta, vals = self._secret_meta.setdefault(tenant, {}), self._secret_vals.setdefault(tenant, {})
        if value is None:
            if name not in meta and name not in vals:
                return
            meta.pop(name, None)
            vals.pop(name, None)
        else:
            if meta.get(name) == updated_at and vals.get(name) == value:
                return
            meta[name], vals[name] = updated_at, value
        if not meta:
            self._secret_meta.pop(tenant, None)
            self._secret_vals.pop(tenant, None)
        self._notify("secret", tenant, name)

    def _drop_tenant_local(self, tenant: str) -> None:
        """Forget everything of a deleted tenant in this replica's maps (actions too)."""
        for trigger in [k[1] for k in self._flows if k[0] == tenant]:
            self._set_flow_local(tenant, trigger, None)
        for name in list(self._secret_meta.get(tenant, {})):
            self._set_secret_local(tenant, name, None)
        self._drop_actions_local(tenant)
        self._set_tenant_local(tenant, None)

    def _drop_actions_local(self, tenant: str) -> None:
        raise NotImplementedError


class MemoryCatalog(Catalog):
    """One replica: the catalog in this process."""

    def _memory_catalog_init(self) -> None:
        self._flow_stacks: dict[tuple[str, str], list[FlowRecord]] = {}
        self._audit: dict[str, deque[dict[str, Any]]] = {}

    def _audit_add(self, tenant: str, entry: dict[str, Any]) -> None:
        self._audit.setdefault(tenant, deque(maxlen=self.bounds.audit_max)).appendleft(entry)

    async def put_tenant(self, name: str, settings: dict[str, Any], *, author: str) -> tuple[bool, TenantRecord]:
        raw = self._settings_bytes(name, settings)
        old = self._tenants.get(name)
        if old is None and len(self._tenants) >= self.bounds.tenants_max:
            raise StoreFull(f"at most {self.bounds.tenants_max} tenants (tenants_max)")
        rec = TenantRecord(name, orjson.loads(raw), content_version(orjson.loads(raw)), time.time())
        if old is not None and old.version == rec.version:
            return False, old
        self._audit_add(name, audit_entry("create" if old is None else "update", "tenant", name,
                                          old.version if old else None, rec.version, author))
        self._set_tenant_local(name, rec)
        return old is None, rec

    async def delete_tenant(self, name: str, *, author: str) -> bool:
        old = self._tenants.get(name)
        if old is None:
            return False
        for key in [k for k in self._flow_stacks if k[0] == name]:
            del self._flow_stacks[key]
        self._drop_tenant_local(name)
        self._audit_add(name, audit_entry("delete", "tenant", name, old.version, None, author))
        return True

    async def put_flow(self, tenant: str, trigger: str, entries: list[Any], *, author: str,
                       message: str = "") -> FlowRecord:
        raw = self._flow_bytes(tenant, trigger, entries)
        if tenant not in self._tenants:
            raise UnknownTenant(tenant)
        key = (tenant, trigger)
        stack = self._flow_stacks.get(key, [])
        if not stack and sum(1 for k in self._flow_stacks if k[0] == tenant) >= self.bounds.flows_max:
            raise self._full_count(tenant, "flows", "flows_max")
        rec = FlowRecord(orjson.loads(raw), content_version(orjson.loads(raw)), time.time(), author[:AUTHOR_CHARS],
                         message[:AUDIT_MESSAGE_CHARS])
        if stack and stack[-1].version == rec.version:
            return stack[-1]
        old = stack[-1].version if stack else None
        stack.append(rec)
        del stack[:-self.versions_kept]
        self._flow_stacks[key] = stack
        self._audit_add(tenant, audit_entry("create" if old is None else "update", "flow", trigger, old,
                                            rec.version, author, message))
        self._set_flow_local(tenant, trigger, rec)
        return rec

    async def rollback_flow(self, tenant: str, trigger: str, *, to: str | None = None,
                            author: str = "") -> FlowRecord:
        if tenant not in self._tenants:
            raise UnknownTenant(tenant)
        stack = self._flow_stacks.get((tenant, trigger), [])
        old = stack[-1].version if stack else None
        rec = stack_rollback(stack, to, self.versions_kept, f"flow {trigger}")
        if rec.version != old:
            self._audit_add(tenant, audit_entry("rollback", "flow", trigger, old, rec.version, author))
        self._set_flow_local(tenant, trigger, rec)
        return rec

    async def flow_versions(self, tenant: str, trigger: str) -> list[dict[str, Any]]:
        stack = self._flow_stacks.get((tenant, trigger), [])
        return _versions_listing(stack)

    async def put_secret(self, tenant: str, name: str, value: str, *, author: str) -> None:
        self._check_secret(tenant, name, value)
        if tenant not in self._tenants:
            raise UnknownTenant(tenant)
        have = self._secret_meta.get(tenant, {})
        if name not in have and len(have) >= self.bounds.secrets_max:
            raise self._full_count(tenant, "secrets", "secrets_max")
        self._audit_add(tenant, audit_entry("update" if name in have else "create", "secret", name, None, None,
                                            author))
        self._set_secret_local(tenant, name, value, time.time())

    async def delete_secret(self, tenant: str, name: str, *, author: str) -> bool:
        if name not in self._secret_meta.get(tenant, {}):
            return False
        self._audit_add(tenant, audit_entry("delete", "secret", name, None, None, author))
        self._set_secret_local(tenant, name, None)
        return True

    async def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._audit.get(tenant, ()))[:max(0, min(limit, self.bounds.audit_max))]

    async def rekey_secrets(self) -> int:
        return 0  # memory:// keeps values in memory only; nothing is encrypted


def rollback_refused(res: str, tenant: str, what: str, to: str | None) -> None:
    """A rollback script's refusal ('notenant' | 'none' | 'unknown', see STACK_ROLLBACK_LUA) as the store's error."""
    if res == "notenant":
        raise UnknownTenant(tenant)
    if res == "none":
        raise NothingToRollBack(f"{what} has no earlier version to roll back to")
    if res == "unknown":
        raise UnknownVersion(f"{what} keeps no version {to}")


def stack_rollback(stack: list[Any], to: str | None, kept: int, what: str) -> Any:
    """Roll a kept-versions list (oldest first) back in place; the new top. The twin of STACK_ROLLBACK_LUA.

    ``to`` None pops the top (NothingToRollBack when nothing is below it); else the kept entry whose
    ``version`` is ``to`` is pushed again (history stays linear), the list trimmed to ``kept``
    (UnknownVersion when not kept; already the top: nothing changes).
    """
    if to is None:
        if len(stack) < 2:
            rollback_refused("none", "", what, to)
        stack.pop()
    else:
        found = [x for x in stack if x.version == to]
        if not found:
            rollback_refused("unknown", "", what, to)
        if stack[-1].version != to:
            stack.append(found[-1])
            del stack[:-kept]
    return stack[-1]


def _versions_listing(stack: list[FlowRecord]) -> list[dict[str, Any]]:
    """Newest first; the top is current (a version pushed again by a rollback appears once, at its newest)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, r in enumerate(reversed(stack)):
        if r.version in seen:
            continue
        seen.add(r.version)
        out.append({"version": r.version, "at": iso(r.updated_at), "author": r.author, "message": r.message,
                    "current": i == 0})
    return out

