"""A tenant's settings as the management API takes them, validated, and the view flows are served from.

The settings object is exactly ``{denial_message, allow_hosts, limits, redact, failure}`` (the JSON keys of
``PUT /v1/tenants/{t}``); a key not given keeps its default, since a PUT replaces the whole object. Limits
are a subset of the runner's ``Limits`` fields and each one is within the operator's cap, the value of
``[runner.limits]`` in the TOML: a tenant may tighten its actions' limits, never loosen them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..runner import ConfigError, Limits
from ._config import FAILURE_POLICIES, TenantSpec

MAX_DENIAL_CHARS = 1000
MAX_HOSTS = 256
MAX_REDACT = 64
MAX_PATH_CHARS = 256
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$|^[0-9A-Fa-f:.]{2,45}$")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
SETTINGS_KEYS = ("denial_message", "allow_hosts", "limits", "redact", "failure")


def default_settings() -> dict[str, Any]:
    return {"denial_message": None, "allow_hosts": [], "limits": {}, "redact": [], "failure": "closed"}


class SettingsError(ValueError):
    """A bad settings value; ``field`` names the key (``limits.memory_mb``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def validate_settings(body: Any, caps: Limits) -> dict[str, Any]:
    """The full settings object for ``body`` (defaults filled in), or SettingsError naming the key."""
    if body is None:
        body = {}
    if type(body) is not dict:
        raise SettingsError("the body must be a JSON object of tenant settings", "body")
    for k in body:
        if k not in SETTINGS_KEYS:
            raise SettingsError(f"unknown setting {k!r} (expected one of: {', '.join(SETTINGS_KEYS)})", str(k)[:64])
    out = default_settings()
    dm = body.get("denial_message")
    if dm is not None:
        if type(dm) is not str or not dm.strip() or len(dm) > MAX_DENIAL_CHARS:
            raise SettingsError(f"must be a non-empty string of at most {MAX_DENIAL_CHARS} characters, or null",
                                "denial_message")
        out["denial_message"] = dm
    hosts = body.get("allow_hosts", [])
    if type(hosts) is not list or len(hosts) > MAX_HOSTS:
        raise SettingsError(f"must be a list of at most {MAX_HOSTS} host names", "allow_hosts")
    for i, h in enumerate(hosts):
        if type(h) is not str or len(h) > 253 or not _HOST.match(h.strip()):
            raise SettingsError(f"allow_hosts[{i}]: {str(h)[:80]!r} is not a host name, IP or '*.domain' pattern",
                                "allow_hosts")
    out["allow_hosts"] = [h.strip() for h in hosts]
    out["limits"] = validate_limits(body.get("limits", {}), caps)
    redact = body.get("redact", [])
    if type(redact) is not list or len(redact) > MAX_REDACT:
        raise SettingsError(f"must be a list of at most {MAX_REDACT} event paths such as \"user.email\"", "redact")
    for i, p in enumerate(redact):
        if type(p) is not str or len(p) > MAX_PATH_CHARS or not _PATH.match(p):
            raise SettingsError(f"redact[{i}]: {str(p)[:80]!r} is not an event path such as \"user.email\"", "redact")
    out["redact"] = list(redact)
    failure = body.get("failure", "closed")
    if failure not in FAILURE_POLICIES:
        raise SettingsError(f"must be \"open\" or \"closed\", got {str(failure)[:40]!r}", "failure")
    out["failure"] = failure
    return out


def validate_limits(limits: Any, caps: Limits) -> dict[str, Any]:
    """Tenant limits: known fields, positive numbers, each within the operator's cap (``[runner.limits]``)."""
    if type(limits) is not dict:
        raise SettingsError("must be an object of runner limits", "limits")
    fields = {f.name: f for f in dataclasses.fields(Limits)}
    out: dict[str, Any] = {}
    for name, value in limits.items():
        key = f"limits.{str(name)[:64]}"
        if name not in fields:
            raise SettingsError(f"unknown limit (expected one of: {', '.join(sorted(fields))})", key)
        default = getattr(Limits(), name)
        whole = isinstance(default, int) and not isinstance(default, bool)
        if (type(value) is bool or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
                or (whole and type(value) is not int)):
            raise SettingsError(f"must be a positive {'integer' if whole else 'number'}, got {value!r}", key)
        cap = getattr(caps, name)
        if cap is not None and value > cap:
            raise SettingsError(f"{value} is above the operator's cap ({cap}, runner.limits.{name})", key)
        out[name] = value
    try:
        caps.merged(out)
    except (ConfigError, TypeError, ValueError) as exc:
        raise SettingsError(str(exc), "limits") from None
    return out


def settings_of(spec: TenantSpec) -> dict[str, Any]:
    """A config tenant's settings, in the API's shape (bootstrap and drift compare these)."""
    return {"denial_message": spec.denial_message, "allow_hosts": list(spec.allow_hosts),
            "limits": dict(spec.limits), "redact": list(spec.redact), "failure": spec.failure}


@dataclass(frozen=True)
class Tenant:
    """What the flow path needs of a tenant, built once per settings version (local, no I/O)."""

    name: str
    denial_message: str | None = None
    allow_hosts: tuple[str, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    redact: tuple[str, ...] = ()
    failure: str = "closed"
    version: str = ""

    @classmethod
    def of(cls, name: str, settings: dict[str, Any], version: str = "") -> Tenant:
        s = {**default_settings(), **(settings or {})}
        return cls(name, s["denial_message"], tuple(s["allow_hosts"]), dict(s["limits"]), tuple(s["redact"]),
                   s["failure"] if s["failure"] in FAILURE_POLICIES else "closed", version)
