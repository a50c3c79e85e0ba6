"""Trigger profiles, end to end through real workers: which methods each trigger offers, where claims land.

The reference places claim-setting actions "in Post-Auth or Post-Login": in
``post-auth`` the claims reach the tokens; in a trigger that issues no tokens
they are discarded with a ``warn`` log.
"""

from __future__ import annotations

import pytest

from actionpool import TRIGGERS, ConfigError
from actionpool.runner._triggers import profile

from conftest import make_runner, run

CLAIMS = """
def on_execute_post_auth(event, api):
    api.session.setCustomClaim("tier", "gold")
    api.accessToken.setCustomClaim("scope_hint", ["read"])
    api.idToken.setCustomClaim("given_name", "Ada")
    api.user.setAppMetadata({"last_auth": "pw"})
"""


def test_post_auth_profile() -> None:
    p = profile("post-auth")
    assert p.issues_tokens and p.can_deny
    assert {"session.setCustomClaim", "accessToken.setCustomClaim", "idToken.setCustomClaim", "deny",
            "access.deny"} <= p.methods
    assert "validation.error" not in p.methods and "user.setUserId" not in p.methods
    assert p.methods == TRIGGERS["post-login"].methods


def test_every_claim_trigger_issues_tokens() -> None:
    """Where claims take effect, the README's table and the reference agree."""
    assert {name for name, p in TRIGGERS.items() if p.issues_tokens} == {"post-auth", "post-login", "issue-tokens"}


def test_unknown_trigger_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="post-auth"):
        profile("post-authentication")


async def test_post_auth_claims_take_effect() -> None:
    async with make_runner() as r:
        res = await run(r, CLAIMS, trigger="post-auth")
    assert res["outcome"] == "allow", res["denial"]
    assert res["trigger"] == "post-auth"
    assert res["claims"] == {"access_token": {"tier": "gold", "scope_hint": ["read"]}, "id_token": {"given_name": "Ada"}}
    assert res["app_metadata"] == {"last_auth": "pw"}
    assert res["logs"] == []


async def test_post_auth_can_deny_with_a_user_message() -> None:
    src = ("def on_execute_post_auth(event, api):\n"
           "    api.access.deny('mfa-required', 'Finish the second factor first.')\n")
    async with make_runner() as r:
        res = await run(r, src, trigger="post-auth")
    assert res["outcome"] == "deny"
    assert res["denial"]["kind"] == "denied"
    assert res["denial"]["reason"] == "mfa-required"
    assert res["denial"]["user_message"] == "Finish the second factor first."


async def test_post_auth_offers_no_registration_methods() -> None:
    src = ("def on_execute(event, api):\n"
           "    try:\n"
           "        api.validation.error('code', 'msg')\n"
           "    except Exception as exc:\n"
           "        api.state.set('error', f'{type(exc).__name__}: {exc}')\n")
    async with make_runner() as r:
        res = await run(r, src, trigger="post-auth")
    assert res["outcome"] == "allow"
    assert res["state"]["a"]["error"] == "ApiNotAvailable: api.validation.error is not available in the post-auth trigger"


async def test_claims_before_authentication_are_discarded_with_a_warning() -> None:
    src = "def on_execute(event, api):\n    api.session.setCustomClaim('tier', 'gold')\n"
    async with make_runner() as r:
        res = await run(r, src, trigger="pre-login")
    assert res["claims"] == {"access_token": {}, "id_token": {}}
    assert res["logs"] == [{"action": "a", "level": "warn",
                            "message": "claim 'tier' discarded: the pre-login trigger does not issue tokens"}]
