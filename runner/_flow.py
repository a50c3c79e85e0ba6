"""Actions, the state of one flow run, and the ``FlowResult`` contract.

A flow runs its actions in their bound order. A deny (or validation error,
or any failure) stops it: later actions are ``skipped``. Decision blocks route
it: ``allow`` ends it allowed and ``skip_to`` jumps forward, the entries passed
over are ``skipped`` too. Metadata patches are
aggregated across the flow and later actions see them in ``event.user``;
state is scoped to this run under the writing action's slug and later actions
read it as ``event.step[slug][key]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._config import Limits
from ._rand import random_hex
from ._errors import DENIAL_KINDS, ActionError, ConfigError, DenialKind  # noqa: F401  (re-exported)

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")



def action_identity(slug: str, digest: str, secrets: dict[str, str]) -> str:
    """A digest of everything that makes an action *this* action to a warm worker.

    Module globals live on in a warm worker, so a worker may only ever run
    executions that are allowed to see each other's state: the same slug, the
    same source and the same secrets. The encoding is unambiguous (JSON of a
    list), so no two different actions can collide by shifting bytes between fields.
    """
    blob = json.dumps([slug, digest, sorted(secrets.items())], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


LANGUAGES = ("python", "js")


def language_of(filename: str) -> str:
    """``.js`` files are JavaScript actions; everything else is Python."""
    return "js" if filename.lower().endswith(".js") else "python"


def js_heap_bytes(limits: Limits) -> int:
    """The JavaScript engine's memory limit: half the worker's cap, so it trips before the OS limit does."""
    return (limits.memory_mb << 20) // 2


@dataclass(frozen=True)
class Action:
    """One customer action: a slug, its source (Python or JavaScript), its secrets and optional limit overrides.

    ``language`` is ``"python"`` or ``"js"``; left empty it follows the file name (``.js`` is JavaScript).
    """

    slug: str
    source: str
    secrets: dict[str, str] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    filename: str = ""
    language: str = ""

    def __post_init__(self) -> None:
        if type(self.slug) is not str or not SLUG_RE.match(self.slug):
            raise ActionError(f"action slug {self.slug!r} must match {SLUG_RE.pattern}")
        if type(self.source) is not str:
            raise ActionError(f"action {self.slug}: source must be a string")
        if type(self.secrets) is not dict or not all(type(k) is str and type(v) is str for k, v in self.secrets.items()):
            raise ActionError(f"action {self.slug}: secrets must be a dict of strings")
        if type(self.limits) is not dict:
            raise ActionError(f"action {self.slug}: limits must be a dict")
        if not self.language:
            object.__setattr__(self, "language", language_of(self.filename))
        if self.language not in LANGUAGES:
            raise ActionError(f"action {self.slug}: language must be one of {', '.join(LANGUAGES)}, got {self.language!r}")
        if not self.filename:
            object.__setattr__(self, "filename", f"{self.slug}.{'js' if self.language == 'js' else 'py'}")
        # Own copies: a caller mutating its dicts later must not change an action (or its identity) in use.
        object.__setattr__(self, "secrets", dict(self.secrets))
        object.__setattr__(self, "limits", dict(self.limits))
        # A JavaScript action's hash is salted so it never names a Python source in a worker's caches.
        salt = b"js\x00" if self.language == "js" else b""
        digest = hashlib.sha256(salt + self.source.encode("utf-8", "surrogatepass")).hexdigest()
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "identity", action_identity(self.slug, digest, self.secrets))

    digest: str = field(init=False, default="", compare=False, repr=False)
    # Which worker may run this action (with worker_binding="action"): slug, source and secrets.
    # Computed once here; the engine adds the tenant.
    identity: str = field(init=False, default="", compare=False, repr=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, slug: str | None = None,
                  secrets: dict[str, str] | None = None, limits: dict[str, Any] | None = None) -> "Action":
        p = Path(path)
        try:
            source = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ActionError(f"action file not found: {p}") from None
        except UnicodeDecodeError as exc:
            raise ActionError(f"action file {p} is not UTF-8: {exc}") from None
        except OSError as exc:
            raise ActionError(f"cannot read action file {p}: {exc.strerror}") from None
        return cls(slug=slug or p.stem.replace("_", "-").lower(), source=source, secrets=dict(secrets or {}),
                   limits=dict(limits or {}), filename=p.name)


@dataclass
class ActionRecord:
    slug: str
    status: str = "skipped"   # ok | denied | failed | failed_open | skipped
    duration_ms: float = 0.0
    started_ms: float | None = None   # from the flow's start to the execution's (tracing); not in to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"slug": self.slug, "status": self.status, "duration_ms": round(self.duration_ms, 3)}


@dataclass
class FlowResult:
    """What one flow run decided. ``to_dict()`` is the stable JSON contract."""

    flow_id: str
    tenant: str
    trigger: str
    outcome: str
    denial: dict[str, Any] | None
    app_metadata: dict[str, Any]
    user_metadata: dict[str, Any]
    user_id: str | None
    claims: dict[str, dict[str, Any]]
    state: dict[str, dict[str, Any]]
    logs: list[dict[str, Any]]
    actions: list[ActionRecord]
    duration_ms: float
    # The fetches the flow made (request, capped response or error), kept only when the caller asked
    # (``run_flow(record_fetches=True)``: run history); not part of ``to_dict()``.
    fetches: list[dict[str, Any]] | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "denial": self.denial,
            "app_metadata": self.app_metadata,
            "user_metadata": self.user_metadata,
            "user_id": self.user_id,
            "claims": self.claims,
            "state": self.state,
            "logs": self.logs,
            "actions": [a.to_dict() for a in self.actions],
            "flow_id": self.flow_id,
            "tenant": self.tenant,
            "trigger": self.trigger,
            "duration_ms": round(self.duration_ms, 3),
        }


class FlowState:
    """The mutable record of one flow run, written by ExecutionContexts."""

    def __init__(self, *, tenant: str, trigger: str, event: dict[str, Any], actions: list[Action], limits: Limits,
                 flow_timeout_s: float, denial_message: str, flow_id: str | None = None) -> None:
        self.flow_id = flow_id or random_hex(16)
        self.tenant = tenant
        self.trigger = trigger
        self.event = event
        self.denial_message = denial_message
        self.started = time.monotonic()
        self.deadline = self.started + flow_timeout_s
        self.denial: dict[str, Any] | None = None
        self.state: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, dict[str, Any]] = {"app_metadata": {}, "user_metadata": {}}
        self.user_id: str | None = None
        self.claims: dict[str, dict[str, Any]] = {"access_token": {}, "id_token": {}}
        self.logs: list[dict[str, Any]] = []
        self.fetches: list[dict[str, Any]] | None = None  # a list when run history asked for them
        # Set by a true allow or skip_to decision block (runner/_decisions.py), read and cleared by the engine.
        self.goto: str | None = None
        self.records = [ActionRecord(a.slug) for a in actions]
        self._limits: dict[str, Limits] = {}
        for a in actions:
            try:
                self._limits[a.slug] = limits.merged(a.limits)
            except ConfigError as exc:
                raise ConfigError(f"action {a.slug}: {exc}") from None

    def limits_for(self, slug: str) -> Limits:
        return self._limits[slug]

    # -- written by the api ------------------------------------------------------------
    def deny(self, slug: str | None, kind: str, reason: str, user_message: str | None, error_code: str | None = None,
             **extra: Any) -> None:
        if self.denial is None:
            self.denial = {"action": slug, "kind": kind, "reason": reason,
                           "user_message": user_message or self.denial_message, "error_code": error_code, **extra}

    def set_state(self, slug: str, key: str, value: Any) -> None:
        self.state.setdefault(slug, {})[key] = value

    def log(self, slug: str, level: str, message: str) -> None:
        self.logs.append({"action": slug, "level": level, "message": message})

    def patch_metadata(self, which: str, patch: dict[str, Any]) -> None:
        self.metadata[which].update(patch)

    def set_user_id(self, user_id: str) -> None:
        self.user_id = user_id

    def set_claim(self, token: str, name: str, value: Any) -> None:
        self.claims[token][name] = value

    # -- read by the engine --------------------------------------------------------------
    def event_for(self, action: Action) -> dict[str, Any]:
        """The event an action sees: the flow's event plus what earlier actions changed."""
        ev = dict(self.event)
        user = ev.get("user")
        if type(user) is dict and (self.metadata["app_metadata"] or self.metadata["user_metadata"] or self.user_id):
            user = dict(user)
            for which, patch in self.metadata.items():
                if patch:
                    merged = dict(user.get(which) or {}) if type(user.get(which)) is dict else {}
                    merged.update(patch)
                    user[which] = {k: v for k, v in merged.items() if v is not None}
            if self.user_id is not None:
                user["user_id"] = self.user_id
            ev["user"] = user
        ev["secrets"] = action.secrets
        ev["step"] = self.state
        return ev

    def result(self) -> FlowResult:
        return FlowResult(
            flow_id=self.flow_id,
            tenant=self.tenant,
            trigger=self.trigger,
            outcome="deny" if self.denial else "allow",
            denial=self.denial,
            app_metadata=self.metadata["app_metadata"],
            user_metadata=self.metadata["user_metadata"],
            user_id=self.user_id,
            claims=self.claims,
            state=self.state,
            logs=self.logs,
            actions=self.records,
            duration_ms=(time.monotonic() - self.started) * 1000.0,
            fetches=self.fetches,
        )
