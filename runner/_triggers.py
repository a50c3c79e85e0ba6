"""Trigger profiles: which api methods each trigger offers, and whether claims take effect.

The custom-actions reference places claim-setting actions "in Post-Auth or
Post-Login": ``post-auth`` (after the credentials are verified, before the
session is issued), ``post-login`` and ``issue-tokens`` issue tokens, so their
claims take effect. Claims set in a trigger that does not issue tokens are accepted but discarded
with a warning log ("writes to the claim buffer but the buffer is discarded
before the token is issued"). A method a trigger does not offer raises
inside the action.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import METHODS

from ._errors import ConfigError

_COMMON = frozenset({"log", "state.set", "cache.get", "cache.set", "cache.delete", "fetch",
                     "user.setAppMetadata", "user.setUserMetadata"})
_TOKENS = frozenset({"session.setCustomClaim", "idToken.setCustomClaim", "accessToken.setCustomClaim"})


@dataclass(frozen=True)
class TriggerProfile:
    name: str
    methods: frozenset[str]
    issues_tokens: bool   # claims take effect (post-auth, post-login, issue-tokens)
    can_deny: bool


TRIGGERS: dict[str, TriggerProfile] = {
    p.name: p
    for p in (
        TriggerProfile("pre-user-registration",
                       _COMMON | {"deny", "access.deny", "validation.error", "user.setUserId", "session.setCustomClaim"},
                       issues_tokens=False, can_deny=True),
        TriggerProfile("post-user-registration", _COMMON | {"session.setCustomClaim"}, issues_tokens=False, can_deny=False),
        TriggerProfile("pre-login", _COMMON | {"deny", "access.deny", "session.setCustomClaim"},
                       issues_tokens=False, can_deny=True),
        TriggerProfile("post-auth", _COMMON | {"deny", "access.deny"} | _TOKENS, issues_tokens=True, can_deny=True),
        TriggerProfile("post-login", _COMMON | {"deny", "access.deny"} | _TOKENS, issues_tokens=True, can_deny=True),
        TriggerProfile("issue-tokens", _COMMON | {"deny", "access.deny"} | _TOKENS, issues_tokens=True, can_deny=True),
    )
}

assert all(m in METHODS for p in TRIGGERS.values() for m in p.methods)


def profile(trigger: str) -> TriggerProfile:
    try:
        return TRIGGERS[trigger]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}") from None
