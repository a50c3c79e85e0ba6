"""The sidecar's TOML config: loaded and validated once, at start.

Every error is a :class:`ConfigError` that names the file, the key and the
reason (``serve.toml: tenants.acme.actions.tag-tier.failure: must be "open"
or "closed", got "maybe"``), so a typo stops the process before it listens.
Secrets come from the environment or from a file, never from the config
text; action files are relative to the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runner import TRIGGERS, ConfigError, FetchConfig, Limits, RunnerConfig, SandboxConfig
from ..runner.hosting import MIN_SECRET_CHARS, SLUG_RE

FAILURE_POLICIES = ("closed", "open")
MIN_RECORD_BYTES = 4096  # room for a truncated record's identity, decision and marks


@dataclass(frozen=True)
class DecisionSpec:
    """A flow entry ``{ if = "...", deny = "reason" }``: deny when the expression is true."""

    expr: str
    deny: str


@dataclass(frozen=True)
class ActionSpec:
    slug: str
    file: Path | None            # seeded into the store at start; None: deployed through the API only
    failure: str = "closed"
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantSpec:
    name: str
    denial_message: str | None
    allow_hosts: tuple[str, ...]
    secrets: dict[str, str]
    actions: dict[str, ActionSpec]
    flows: dict[str, tuple[str | DecisionSpec, ...]]
    redact: tuple[str, ...]      # event paths ("user.email") replaced in run history


@dataclass(frozen=True)
class ServerSpec:
    token: str | None = None             # read from token_env; None: no auth, loopback only
    token_env: str | None = None
    max_body_bytes: int = 1 << 20
    max_inflight: int = 512              # flows in flight before 503
    retry_after_s: int = 1
    drain_grace_s: float = 10.0          # SIGTERM: in-flight flows get this long
    history_size: int = 100              # runs kept per tenant
    shadow_concurrency: int = 4          # shadow runs in flight at once (more are skipped)
    history_max_bytes: int = 4 << 20     # run history bytes per tenant (memory and Redis); oldest runs evicted
    sources_max_bytes: int = 16 << 20    # deployed sources kept per tenant (live, shadow, rollback targets)
    versions_kept: int = 10              # deployments kept per action for rollback
    action_cache_max_bytes: int = 8 << 20  # compiled actions (deployed and /test drafts) cached per tenant, LRU
    history_record_max_bytes: int = 256 << 10  # one recorded run (JSON); larger ones are truncated and marked
    # Bounds before the token is read (sidecar/_http_guard.py, docs/security.md "Strangers").
    max_connections: int | None = None   # open connections; None: from the fd budget (at most 10000)
    header_timeout_s: float = 10.0       # from open (or a head's first byte) to the end of the head
    keepalive_timeout_s: float = 15.0    # an idle keep-alive connection is closed after this
    max_head_bytes: int = 16384          # request line + headers; more: 431 and close
    max_headers: int = 100               # header lines in one head; more: 431 and close
    body_timeout_s: float = 10.0         # the whole body, read before a flow slot is taken; else 408
    max_inflight_per_tenant: int | None = None  # one tenant's flows in flight; None: the runner's per-tenant
                                                # capacity (busy + queue), at most 3/4 of max_inflight


@dataclass(frozen=True)
class ServeConfig:
    path: Path
    runner: RunnerConfig
    server: ServerSpec
    store_url: str | None
    tenants: dict[str, TenantSpec]


class _Errors:
    """Builds ConfigErrors that name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {reason}")


def _table(err: _Errors, value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise err(key, f"must be a table, got {type(value).__name__}")
    return value


def _only(err: _Errors, table: dict[str, Any], prefix: str, allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            raise err(f"{prefix}.{k}" if prefix else k, f"unknown key (expected one of: {', '.join(sorted(allowed))})")


def _dataclass_from(err: _Errors, cls: type, table: dict[str, Any], prefix: str, nested: dict[str, type]) -> Any:
    """Build a frozen config dataclass from a TOML table, checking names and simple types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _only(err, table, prefix, set(fields))
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}.{name}"
        if name in nested:
            kwargs[name] = _dataclass_from(err, nested[name], _table(err, value, key), key, {})
            continue
        hint = hints[name]
        origin = typing.get_origin(hint)
        if hint is bool or hint is typing.Optional[bool]:
            ok = type(value) is bool
        elif hint is int or hint == typing.Optional[int]:  # int | None: unset means derived (pool sizes)
            ok = type(value) is int
        elif hint is float:
            ok = type(value) in (int, float)
        elif origin is tuple:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        elif origin is dict:
            ok = False  # per-tenant maps come from [tenants.*]
        else:  # str, Literal[...] and str | None
            ok = isinstance(value, str)
        if not ok:
            raise err(key, f"has the wrong type ({type(value).__name__}); expected {getattr(hint, '__name__', hint)}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise err(prefix, str(exc)) from None


def _secret(err: _Errors, base: Path, key: str, value: Any, env: dict[str, str]) -> str:
    if not isinstance(value, dict):
        raise err(key, "secrets come from the environment or a file: write { env = \"NAME\" } or "
                       "{ file = \"path\" }, never the value itself")
    _only(err, value, key, {"env", "file"})
    if len(value) != 1:
        raise err(key, "give exactly one of env or file")
    if "env" in value:
        name = value["env"]
        if not isinstance(name, str) or not name:
            raise err(f"{key}.env", "must be the name of an environment variable")
        if name not in env:
            raise err(f"{key}.env", f"environment variable {name} is not set")
        return env[name]
    path = value["file"]
    if not isinstance(path, str) or not path:
        raise err(f"{key}.file", "must be a path")
    p = (base / path)
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise err(f"{key}.file", f"cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise err(f"{key}.file", f"{p} is not UTF-8") from None


def _flow_entry(err: _Errors, key: str, entry: Any) -> str | DecisionSpec:
    if isinstance(entry, str):
        if not SLUG_RE.match(entry):
            raise err(key, f"{entry!r} is not a valid action slug ({SLUG_RE.pattern})")
        return entry
    if isinstance(entry, dict):
        _only(err, entry, key, {"if", "deny"})
        expr, reason = entry.get("if"), entry.get("deny")
        if not isinstance(expr, str) or not expr.strip():
            raise err(f"{key}.if", "a decision block needs an expression string")
        if not isinstance(reason, str) or not reason:
            raise err(f"{key}.deny", "a decision block needs the deny reason (a string)")
        from ..runner.hosting import compile_decision  # compiled now, so a bad expression fails at start

        try:
            compile_decision(expr)
        except ValueError as exc:
            raise err(f"{key}.if", str(exc)) from None
        return DecisionSpec(expr, reason)
    raise err(key, f"must be an action slug or {{ if = ..., deny = ... }}, got {type(entry).__name__}")


def _tenant(err: _Errors, base: Path, name: str, table: dict[str, Any], env: dict[str, str]) -> TenantSpec:
    pre = f"tenants.{name}"
    if not SLUG_RE.match(name):
        raise err(pre, f"tenant names must match {SLUG_RE.pattern}")
    _only(err, table, pre, {"denial_message", "allow_hosts", "secrets", "actions", "flows", "redact"})
    dm = table.get("denial_message")
    if dm is not None and (not isinstance(dm, str) or not dm):
        raise err(f"{pre}.denial_message", "must be a non-empty string")
    hosts = table.get("allow_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise err(f"{pre}.allow_hosts", "must be a list of host names")
    redact = table.get("redact", [])
    if not isinstance(redact, list) or not all(isinstance(r, str) and r for r in redact):
        raise err(f"{pre}.redact", "must be a list of event paths such as \"user.email\"")
    secrets = {k: _secret(err, base, f"{pre}.secrets.{k}", v, env)
               for k, v in _table(err, table.get("secrets", {}), f"{pre}.secrets").items()}
    for k, v in secrets.items():  # a short secret cannot be redacted safely: refuse it rather than leak it
        if len(v) < MIN_SECRET_CHARS:
            raise err(f"{pre}.secrets.{k}", f"is {len(v)} characters long; secrets must have at least "
                                            f"{MIN_SECRET_CHARS} (a shorter one cannot be redacted from run history "
                                            "without redacting ordinary text too)")
    actions: dict[str, ActionSpec] = {}
    for slug, spec in _table(err, table.get("actions", {}), f"{pre}.actions").items():
        akey = f"{pre}.actions.{slug}"
        if not SLUG_RE.match(slug):
            raise err(akey, f"action slugs must match {SLUG_RE.pattern}")
        spec = _table(err, spec, akey)
        _only(err, spec, akey, {"file", "failure", "limits"})
        file = spec.get("file")
        path = None
        if file is not None:
            if not isinstance(file, str) or not file:
                raise err(f"{akey}.file", "must be a path (relative to the config file)")
            path = (base / file)
            if not path.is_file():
                raise err(f"{akey}.file", f"no such file: {path}")
        failure = spec.get("failure", "closed")
        if failure not in FAILURE_POLICIES:
            raise err(f"{akey}.failure", f"must be \"open\" or \"closed\", got {failure!r}")
        limits = _table(err, spec.get("limits", {}), f"{akey}.limits")
        try:
            Limits().merged(limits)
        except (ConfigError, TypeError) as exc:
            raise err(f"{akey}.limits", str(exc)) from None
        actions[slug] = ActionSpec(slug, path, failure, dict(limits))
    flows: dict[str, tuple[str | DecisionSpec, ...]] = {}
    for trigger, entries in _table(err, table.get("flows", {}), f"{pre}.flows").items():
        fkey = f"{pre}.flows.{trigger}"
        if trigger not in TRIGGERS:
            raise err(fkey, f"unknown trigger (expected one of: {', '.join(TRIGGERS)})")
        if not isinstance(entries, list):
            raise err(fkey, "must be a list of action slugs and decision blocks")
        flows[trigger] = tuple(_flow_entry(err, f"{fkey}[{i}]", e) for i, e in enumerate(entries))
    return TenantSpec(name, dm, tuple(hosts), secrets, actions, flows, tuple(redact))


def _check_bounds(err: _Errors, server: ServerSpec) -> None:
    """The connection and per-tenant bounds: each a positive, finite number of a sensible size."""
    for name in ("header_timeout_s", "keepalive_timeout_s", "body_timeout_s"):
        v = getattr(server, name)
        if not math.isfinite(v) or v <= 0:
            raise err(f"server.{name}", f"must be a positive number of seconds, got {v}")
    for name, low in (("max_connections", 2), ("max_head_bytes", 1024), ("max_headers", 8),
                      ("max_inflight_per_tenant", 1)):
        v = getattr(server, name)
        if v is not None and v < low:
            raise err(f"server.{name}", f"must be at least {low}, got {v}")
    if server.max_inflight_per_tenant is not None and server.max_inflight_per_tenant > server.max_inflight:
        raise err("server.max_inflight_per_tenant", f"cannot exceed server.max_inflight ({server.max_inflight}), "
                                                    f"got {server.max_inflight_per_tenant}")


def load_config(path: str | os.PathLike[str], *, env: dict[str, str] | None = None) -> ServeConfig:
    """Read and validate ``path``; raise ConfigError naming the file, the key and the reason."""
    p = Path(path).resolve()
    env = dict(os.environ) if env is None else env
    err = _Errors(Path(path))
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _only(err, raw, "", {"runner", "server", "store", "tenants"})
    base = p.parent

    store = _table(err, raw.get("store", {}), "store")
    _only(err, store, "store", {"url"})
    store_url = store.get("url")
    if store_url is not None:
        if not isinstance(store_url, str) or not store_url.startswith("redis://"):
            raise err("store.url", f"must be redis://host:port/db (or absent: in memory), got {store_url!r}")

    server_t = _table(err, raw.get("server", {}), "server")
    _only(err, server_t, "server", {f.name for f in dataclasses.fields(ServerSpec)} - {"token"})
    server = _dataclass_from(err, ServerSpec, server_t, "server", {})
    for name in ("max_body_bytes", "max_inflight", "retry_after_s", "history_size", "shadow_concurrency"):
        if getattr(server, name) < (0 if name in ("history_size", "shadow_concurrency") else 1):
            raise err(f"server.{name}", f"must be positive, got {getattr(server, name)}")
    if server.history_record_max_bytes < MIN_RECORD_BYTES:
        raise err("server.history_record_max_bytes", f"must be at least {MIN_RECORD_BYTES}, got "
                                                     f"{server.history_record_max_bytes}")
    for name in ("history_max_bytes", "sources_max_bytes", "versions_kept", "action_cache_max_bytes"):
        if getattr(server, name) < 1:
            raise err(f"server.{name}", f"must be positive, got {getattr(server, name)}")
    if server.drain_grace_s < 0:
        raise err("server.drain_grace_s", "must not be negative")
    _check_bounds(err, server)
    if server.token_env is not None:
        token = env.get(server.token_env, "")
        if not token:
            raise err("server.token_env", f"environment variable {server.token_env} is not set or empty")
        server = dataclasses.replace(server, token=token)

    tenants = {name: _tenant(err, base, name, _table(err, t, f"tenants.{name}"), env)
               for name, t in _table(err, raw.get("tenants", {}), "tenants").items()}

    runner_t = dict(_table(err, raw.get("runner", {}), "runner"))
    runner = _dataclass_from(err, RunnerConfig, runner_t, "runner",
                             {"limits": Limits, "fetch": FetchConfig, "sandbox": SandboxConfig})
    extra: dict[str, Any] = {}
    if "cache_url" not in runner_t and store_url:
        extra["cache_url"] = store_url  # one Redis: the action cache is shared by the replicas too
    hosts = {name: t.allow_hosts for name, t in tenants.items() if t.allow_hosts}
    if hosts:
        extra["fetch"] = dataclasses.replace(runner.fetch, tenant_allow_hosts={**runner.fetch.tenant_allow_hosts,
                                                                               **hosts})
    runner = dataclasses.replace(runner, **extra)
    try:
        runner.validate()
    except ConfigError as exc:
        raise err("runner", str(exc)) from None
    return ServeConfig(path=p, runner=runner, server=server, store_url=store_url, tenants=tenants)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
