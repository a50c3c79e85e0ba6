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
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runner import TRIGGERS, ConfigError, FetchConfig, Limits, RunnerConfig, SandboxConfig
from ..runner.hosting import MIN_SECRET_CHARS, SLUG_RE

FAILURE_POLICIES = ("closed", "open")
LANGUAGES = ("python", "javascript")
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MIN_ADMIN_TOKEN_CHARS = 16  # the admin token manages every tenant: long enough not to be guessed
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
    failure: str | None = None   # None: the tenant's default
    limits: dict[str, Any] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()  # the tenant secrets this action declares (it receives only these)
    language: str = "python"       # "python" | "javascript"; default from the file's suffix


@dataclass(frozen=True)
class TenantSpec:
    name: str
    denial_message: str | None
    allow_hosts: tuple[str, ...]
    secrets: dict[str, str]
    actions: dict[str, ActionSpec]
    flows: dict[str, tuple[str | dict[str, Any], ...]]
    redact: tuple[str, ...]      # event paths ("user.email") replaced in run history
    failure: str = "closed"      # the default failure policy of its actions (an action's own overrides it)
    limits: dict[str, Any] = field(default_factory=dict)  # tenant limits, within [runner.limits]


@dataclass(frozen=True)
class ServerSpec:
    token: str | None = None             # read from token_env; None: no auth, loopback only
    token_env: str | None = None
    admin_token: str | None = None       # read from admin_token_env; None: single-token mode (the flow token manages)
    admin_token_env: str | None = None
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
    prewarm_timeout_s: float = 30.0      # start-up: warm deployed actions' workers this long before ready; 0: off
    max_inflight_per_tenant: int | None = None  # one tenant's flows in flight; None: the runner's per-tenant
                                                # capacity (busy + queue), at most 3/4 of max_inflight
    # The control-plane catalog (sidecar/_catalog.py): secrets at rest and per-tenant bounds (StoreFull over them).
    secrets_key_env: str = "ACTIONPOOL_SECRETS_KEY"  # 32 bytes base64; <name>_PREVIOUS: older keys (comma list)
    tenants_max: int = 10000             # tenants in the store
    tenant_settings_max_bytes: int = 64 << 10  # one tenant's settings (canonical JSON)
    actions_max: int = 256               # action slugs per tenant
    flows_max: int = 32                  # flows (triggers) per tenant
    flow_entries_max: int = 64           # entries in one flow
    flow_max_bytes: int = 64 << 10       # one flow version (canonical JSON)
    secrets_max: int = 128               # secrets per tenant
    secret_max_bytes: int = 8 << 10      # one secret value
    audit_max: int = 1000                # audit entries kept per tenant (oldest dropped)
    metrics_top_tenants: int = 20        # tenants with labels of their own on /metrics (the busiest); rest "other"


@dataclass(frozen=True)
class TracingSpec:
    """``[tracing]``: OpenTelemetry spans of flows and actions (sidecar/_tracing.py, the ``otel`` extra)."""

    exporter: str = ""                   # "otlp" | "none"; "" (unset): OTEL_TRACES_EXPORTER=otlp turns it on
    endpoint: str | None = None          # OTLP/HTTP traces URL; None: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT
    service_name: str = "actionpool"     # OTEL_SERVICE_NAME wins when set
    sample_ratio: float = 1.0            # of the traces the gateway did not decide (parent-based otherwise)


@dataclass(frozen=True)
class ServeConfig:
    path: Path
    runner: RunnerConfig
    server: ServerSpec
    store_url: str | None
    tenants: dict[str, TenantSpec]
    tracing: TracingSpec = field(default_factory=TracingSpec)


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


def _flow_entry(err: _Errors, key: str, entry: Any) -> str | dict[str, Any]:
    """A slug, or a decision block ``{ if, deny [, message] }``, ``{ if, allow = true }`` or ``{ if, skip_to }``.

    Blocks are kept as the JSON the management API takes (``PUT .../flows/{trigger}``), so the config and
    the store compare entry for entry (drift, ``--sync-config``).
    """
    if isinstance(entry, str):
        if not SLUG_RE.match(entry):
            raise err(key, f"{entry!r} is not a valid action slug ({SLUG_RE.pattern})")
        return entry
    if isinstance(entry, dict):
        _only(err, entry, key, {"if", "deny", "allow", "skip_to", "message"})
        from ..runner.hosting import BlockError, parse_block  # the API's own check; compiled now, fails at start

        try:
            parse_block(entry)
        except BlockError as exc:
            raise err(f"{key}.{exc.field}" if exc.field else key, str(exc)) from None
        return dict(entry)
    raise err(key, f"must be an action slug or {{ if = ..., deny = ... }}, got {type(entry).__name__}")


def _tenant(err: _Errors, base: Path, name: str, table: dict[str, Any], env: dict[str, str]) -> TenantSpec:
    pre = f"tenants.{name}"
    if not SLUG_RE.match(name):
        raise err(pre, f"tenant names must match {SLUG_RE.pattern}")
    _only(err, table, pre, {"denial_message", "allow_hosts", "secrets", "actions", "flows", "redact", "failure",
                            "limits"})
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
        _only(err, spec, akey, {"file", "failure", "limits", "secrets", "language"})
        file = spec.get("file")
        path = None
        if file is not None:
            if not isinstance(file, str) or not file:
                raise err(f"{akey}.file", "must be a path (relative to the config file)")
            path = (base / file)
            if not path.is_file():
                raise err(f"{akey}.file", f"no such file: {path}")
        failure = spec.get("failure")
        if failure is not None and failure not in FAILURE_POLICIES:
            raise err(f"{akey}.failure", f"must be \"open\" or \"closed\", got {failure!r}")
        limits = _table(err, spec.get("limits", {}), f"{akey}.limits")
        try:
            Limits().merged(limits)
        except (ConfigError, TypeError) as exc:
            raise err(f"{akey}.limits", str(exc)) from None
        declared = spec.get("secrets", [])
        if not isinstance(declared, list) or not all(isinstance(n, str) and SECRET_NAME_RE.match(n) for n in declared):
            raise err(f"{akey}.secrets", f"must be a list of secret names ({SECRET_NAME_RE.pattern})")
        language = spec.get("language", "javascript" if path is not None and path.suffix == ".js" else "python")
        if language not in LANGUAGES:
            raise err(f"{akey}.language", f"must be \"python\" or \"javascript\", got {language!r}")
        actions[slug] = ActionSpec(slug, path, failure, dict(limits), tuple(sorted(set(declared))), language)
    flows: dict[str, tuple[str | dict[str, Any], ...]] = {}
    for trigger, entries in _table(err, table.get("flows", {}), f"{pre}.flows").items():
        fkey = f"{pre}.flows.{trigger}"
        if trigger not in TRIGGERS:
            raise err(fkey, f"unknown trigger (expected one of: {', '.join(TRIGGERS)})")
        if not isinstance(entries, list):
            raise err(fkey, "must be a list of action slugs and decision blocks")
        flows[trigger] = tuple(_flow_entry(err, f"{fkey}[{i}]", e) for i, e in enumerate(entries))
        from ..runner.hosting import flow_problem  # the whole list as the API checks it (skip_to, repeats, size)

        problem = flow_problem(list(flows[trigger]), None, trigger)
        if problem is not None:
            where = fkey + ("" if problem.index is None else f"[{problem.index}]") + \
                (f".{problem.field}" if problem.field else "")
            raise err(where, problem.message)
    tfailure = table.get("failure", "closed")
    if tfailure not in FAILURE_POLICIES:
        raise err(f"{pre}.failure", f"must be \"open\" or \"closed\", got {tfailure!r}")
    tlimits = _table(err, table.get("limits", {}), f"{pre}.limits")
    try:
        Limits().merged(tlimits)
    except (ConfigError, TypeError) as exc:
        raise err(f"{pre}.limits", str(exc)) from None
    return TenantSpec(name, dm, tuple(hosts), secrets, actions, flows, tuple(redact), tfailure, dict(tlimits))


def _check_bounds(err: _Errors, server: ServerSpec) -> None:
    """The connection and per-tenant bounds: each a positive, finite number of a sensible size."""
    for name in ("header_timeout_s", "keepalive_timeout_s", "body_timeout_s"):
        v = getattr(server, name)
        if not math.isfinite(v) or v <= 0:
            raise err(f"server.{name}", f"must be a positive number of seconds, got {v}")
    for name, low in (("max_connections", 2), ("max_head_bytes", 1024), ("max_headers", 8),
                      ("max_inflight_per_tenant", 1), ("metrics_top_tenants", 1)):
        v = getattr(server, name)
        if v is not None and v < low:
            raise err(f"server.{name}", f"must be at least {low}, got {v}")
    if server.max_inflight_per_tenant is not None and server.max_inflight_per_tenant > server.max_inflight:
        raise err("server.max_inflight_per_tenant", f"cannot exceed server.max_inflight ({server.max_inflight}), "
                                                    f"got {server.max_inflight_per_tenant}")


def _admin_token(err: _Errors, server: ServerSpec, env: dict[str, str]) -> str:
    """The admin token: set, long enough to resist guessing, and not the flow token (which must exist too)."""
    name = server.admin_token_env
    token = env.get(name or "", "")
    if not token:
        raise err("server.admin_token_env", f"environment variable {name} is not set or empty")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise err("server.admin_token_env", f"the admin token in {name} is {len(token)} characters long; it must "
                                            f"have at least {MIN_ADMIN_TOKEN_CHARS}")
    if server.token is None:
        raise err("server.admin_token_env", "needs server.token_env too (the flow token of the gateway's login "
                                            "path); without it only loopback peers are served, unauthenticated")
    if token == server.token:
        raise err("server.admin_token_env", f"the admin token in {name} equals the flow token "
                                            f"({server.token_env}): the roles would be one")
    return token


def _check_catalog(err: _Errors, server: ServerSpec, env: dict[str, str]) -> None:
    """The catalog bounds (each at least 1) and the secrets keys in the environment (32 bytes base64 each)."""
    for name in ("tenants_max", "tenant_settings_max_bytes", "actions_max", "flows_max", "flow_entries_max",
                 "flow_max_bytes", "secrets_max", "secret_max_bytes", "audit_max"):
        if getattr(server, name) < 1:
            raise err(f"server.{name}", f"must be positive, got {getattr(server, name)}")
    if server.secret_max_bytes < MIN_SECRET_CHARS:
        raise err("server.secret_max_bytes", f"must be at least {MIN_SECRET_CHARS}, got {server.secret_max_bytes}")
    if not server.secrets_key_env:
        raise err("server.secrets_key_env", "must name an environment variable")
    from ._secrets import Keyring, SecretKeyError

    try:
        Keyring.from_env(env, server.secrets_key_env)
    except SecretKeyError as exc:
        raise err("server.secrets_key_env", str(exc)) from None


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
    _only(err, raw, "", {"runner", "server", "store", "tenants", "tracing"})
    base = p.parent

    store = _table(err, raw.get("store", {}), "store")
    _only(err, store, "store", {"url"})
    store_url = store.get("url")
    if store_url is not None:
        if not isinstance(store_url, str) or not store_url.startswith("redis://"):
            raise err("store.url", f"must be redis://host:port/db (or absent: in memory), got {store_url!r}")

    server_t = _table(err, raw.get("server", {}), "server")
    _only(err, server_t, "server", {f.name for f in dataclasses.fields(ServerSpec)} - {"token", "admin_token"})
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
    if not math.isfinite(server.prewarm_timeout_s) or not 0 <= server.prewarm_timeout_s <= 3600:
        raise err("server.prewarm_timeout_s",
                  f"must be between 0 (off) and 3600 seconds, got {server.prewarm_timeout_s}")
    _check_bounds(err, server)
    _check_catalog(err, server, env)
    if server.token_env is not None:
        token = env.get(server.token_env, "")
        if not token:
            raise err("server.token_env", f"environment variable {server.token_env} is not set or empty")
        server = dataclasses.replace(server, token=token)
    if server.admin_token_env is not None:
        server = dataclasses.replace(server, admin_token=_admin_token(err, server, env))

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
    return ServeConfig(path=p, runner=runner, server=server, store_url=store_url, tenants=tenants,
                       tracing=_tracing(err, raw.get("tracing", {})))


def _tracing(err: _Errors, value: Any) -> TracingSpec:
    spec: TracingSpec = _dataclass_from(err, TracingSpec, _table(err, value, "tracing"), "tracing", {})
    if spec.exporter not in ("", "none", "otlp"):
        raise err("tracing.exporter", f'must be "otlp" or "none", got {spec.exporter!r}')
    if spec.endpoint is not None and not spec.endpoint.startswith(("http://", "https://")):
        raise err("tracing.endpoint", f"must be an http:// or https:// URL (OTLP/HTTP), got {spec.endpoint!r}")
    if not math.isfinite(spec.sample_ratio) or not 0.0 <= spec.sample_ratio <= 1.0:
        raise err("tracing.sample_ratio", f"must be between 0 and 1, got {spec.sample_ratio}")
    if not spec.service_name:
        raise err("tracing.service_name", "must not be empty")
    return spec


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
