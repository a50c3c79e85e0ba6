"""Every api method of both references, on real worker processes."""

from __future__ import annotations

import pytest

from conftest import make_runner, run


async def test_deny_halts_flow_and_keeps_metadata() -> None:
    a = '''
def on_execute_post_login(event, api):
    api.user.setAppMetadata("seen", True)
    email = event.user.email or ""
    if email.endswith("@disposable.example"):
        api.deny("disposable-email-blocked")
        return
    api.state.set("reached", True)
'''
    b = "def on_execute(event, api):\n    api.state.set('ran', True)\n"
    async with make_runner() as r:
        res = await run(r, [a, b], event={"user": {"email": "x@disposable.example"}})
    assert res["outcome"] == "deny"
    assert res["denial"] == {"action": "a", "kind": "denied", "reason": "disposable-email-blocked",
                             "user_message": "Access denied.", "error_code": None}
    assert res["app_metadata"] == {"seen": True}
    assert res["state"] == {}
    assert [x["status"] for x in res["actions"]] == ["denied", "skipped"]


async def test_access_deny_user_message_and_tenant_default() -> None:
    src = "def on_execute(event, api):\n    api.access.deny('internal', event.msg)\n"
    async with make_runner(denial_message="Sign-up is closed.") as r:
        with_msg = await run(r, src, trigger="pre-user-registration", event={"msg": "Please use a work address"})
        without = await run(r, src, trigger="pre-user-registration", event={})
    assert with_msg["denial"]["user_message"] == "Please use a work address"
    assert with_msg["denial"]["reason"] == "internal"
    assert without["denial"]["user_message"] == "Sign-up is closed."
    async with make_runner() as r:
        per_call = await run(r, "def on_execute(event, api):\n    api.deny('x')\n", denial_message="Custom")
    assert per_call["denial"]["user_message"] == "Custom"


async def test_validation_error() -> None:
    src = "def on_execute_pre_user_registration(event, api):\n    api.validation.error('invalid_phone', 'Phone number is invalid')\n"
    async with make_runner() as r:
        res = await run(r, src, trigger="pre-user-registration")
    assert res["denial"]["kind"] == "validation_error"
    assert res["denial"]["error_code"] == "invalid_phone"
    assert res["denial"]["user_message"] == "Phone number is invalid"
    assert res["actions"][0]["status"] == "denied"


async def test_state_set_scoped_by_slug_and_visible_downstream() -> None:
    a = "def on_execute(event, api):\n    api.state.set('tier', 'enterprise')\n    api.state.set('n', {'a': [1, 2.5, None, True]})\n"
    b = "def on_execute(event, api):\n    api.state.set('saw', event.step['a']['tier'])\n    api.state.set('attr', event.step.a.n.a[1])\n"
    async with make_runner() as r:
        res = await run(r, [a, b])
        again = await run(r, [b])
    assert res["state"] == {"a": {"tier": "enterprise", "n": {"a": [1, 2.5, None, True]}},
                            "b": {"saw": "enterprise", "attr": 2.5}}
    # State does not persist across runs: the second run's action sees no step.a.
    assert again["outcome"] == "deny" and again["denial"]["error_code"] == "TypeError"


@pytest.mark.parametrize("expr,fragment", [
    ("lambda: 1", "function"),
    ("__import__('datetime').datetime.now()", "datetime"),
    ("{1, 2}", "set"),
    ("b'raw'", "bytes"),
    ("{1: 'a'}", "not a string"),
    ("2**70", "64 bits"),
    ("float('nan')", "not a JSON number"),
    ("_circ()", "circular"),
])
async def test_non_json_values_raise_type_error_at_call_time(expr: str, fragment: str) -> None:
    src = f'''
def _circ():
    d = {{}}
    d["self"] = d
    return d

def on_execute(event, api):
    try:
        api.state.set("k", {expr})
    except TypeError as exc:
        api.state.set("error", str(exc))
        return
    api.state.set("error", None)
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert res["outcome"] == "allow"
    assert fragment in res["state"]["a"]["error"]
    assert "k" not in res["state"]["a"]


async def test_type_errors_for_wrong_argument_types_and_arity() -> None:
    src = '''
def on_execute(event, api):
    errors = []
    for call in (lambda: api.state.set(1, "v"), lambda: api.deny(), lambda: api.deny(42),
                 lambda: api.log("info"), lambda: api.user.setUserId(None), lambda: api.user.setAppMetadata(5),
                 lambda: api.session.setCustomClaim("c", object())):
        try:
            call()
            errors.append("no error")
        except TypeError:
            errors.append("TypeError")
    try:
        api.log("fatal", "x")
    except ValueError:
        errors.append("ValueError")
    api.state.set("errors", errors)
'''
    async with make_runner() as r:
        res = await run(r, src, trigger="pre-user-registration")
    assert res["state"]["a"]["errors"] == ["TypeError"] * 7 + ["ValueError"]
    assert res["outcome"] == "allow"


async def test_log_levels_and_truncation_at_4096_bytes() -> None:
    src = '''
def on_execute(event, api):
    api.log("debug", "d")
    api.log("info", "i")
    api.log("warn", "w")
    api.log("error", "e")
    api.log("info", "x" * 5000)
    api.log("info", "é" * 3000)   # 2 bytes each: 4096 bytes is 2048 characters, never half of one
    api.log("info", "a" + "😀" * 1100)  # 1 + 4 bytes each: cut to 1 + 4*1023 = 4093 bytes
'''
    async with make_runner() as r:
        res = await run(r, src)
    logs = res["logs"]
    assert [(l["level"], l["message"]) for l in logs[:4]] == [("debug", "d"), ("info", "i"), ("warn", "w"), ("error", "e")]
    assert logs[4]["message"] == "x" * 4096
    assert logs[5]["message"] == "é" * 2048
    assert logs[6]["message"] == "a" + "😀" * 1023
    assert all(l["action"] == "a" for l in logs)


async def test_console_print_and_logging_become_logs() -> None:
    src = '''
import logging
def on_execute(event, api):
    console.log("Risk score:", 42)
    console.debug("d")
    console.info("i", {"k": [1]})
    console.warn("Unrecognised country:", "XX")
    console.error("bad", None, True)
    print("printed", "line")
    print("two\\nlines")
    logging.getLogger("mine").warning("careful %s", 1)
    logging.info("root info")
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert [(l["level"], l["message"]) for l in res["logs"]] == [
        ("info", "Risk score: 42"), ("debug", "d"), ("info", 'i {"k":[1]}'), ("warn", "Unrecognised country: XX"),
        ("error", "bad null true"), ("info", "printed line"), ("info", "two"), ("info", "lines"),
        ("warn", "careful 1"), ("info", "root info"),
    ]


async def test_metadata_key_value_and_patch_forms() -> None:
    a = '''
def on_execute(event, api):
    api.user.setAppMetadata("tier", "enterprise")
    api.user.set_app_metadata({"address": {"city": "Pune"}, "old": None})
    api.user.setUserMetadata("lang", "en")
    api.user.setUserMetadata("nick", None)
'''
    b = '''
def on_execute(event, api):
    api.state.set("app", event.user.app_metadata.to_dict())
    api.state.set("user", event.user.user_metadata.to_dict())
    existing = event.user.app_metadata.address.to_dict()
    api.user.setAppMetadata({"address": {**existing, "country": "IN"}})
'''
    event = {"user": {"app_metadata": {"old": 1, "keep": 2, "address": {"zip": "1"}}, "user_metadata": {"nick": "n"}}}
    async with make_runner() as r:
        res = await run(r, [a, b], event=event)
    assert res["outcome"] == "allow", res["denial"]
    # Shallow merge: the nested object is replaced, not merged; None removes a key.
    assert res["state"]["b"]["app"] == {"keep": 2, "address": {"city": "Pune"}, "tier": "enterprise"}
    assert res["state"]["b"]["user"] == {"lang": "en"}
    assert res["app_metadata"] == {"tier": "enterprise", "address": {"city": "Pune", "country": "IN"}, "old": None}
    assert res["user_metadata"] == {"lang": "en", "nick": None}


async def test_set_user_id_pre_registration() -> None:
    a = "def on_execute(event, api):\n    api.user.setUserId('auth0|custom-1')\n"
    b = "def on_execute(event, api):\n    api.state.set('id', event.user.user_id)\n"
    async with make_runner() as r:
        res = await run(r, [a, b], trigger="pre-user-registration", event={"user": {"email": "a@b.c"}})
    assert res["user_id"] == "auth0|custom-1"
    assert res["state"]["b"]["id"] == "auth0|custom-1"


async def test_claims_take_effect_only_in_token_triggers() -> None:
    post = '''
def on_execute(event, api):
    api.session.setCustomClaim("tier", "gold")
    api.accessToken.setCustomClaim("scope_hint", ["a", "b"])
    api.idToken.set_custom_claim("name", "Ada")
'''
    async with make_runner() as r:
        ok = await run(r, post, trigger="post-login")
        pre = await run(r, "def on_execute(event, api):\n    api.session.setCustomClaim('tier', 'gold')\n",
                        trigger="pre-user-registration")
        pre_login = await run(r, "def on_execute(event, api):\n    api.session.setCustomClaim('tier', 'gold')\n",
                              trigger="pre-login")
    assert ok["claims"] == {"access_token": {"tier": "gold", "scope_hint": ["a", "b"]}, "id_token": {"name": "Ada"}}
    for res, trig in ((pre, "pre-user-registration"), (pre_login, "pre-login")):
        assert res["outcome"] == "allow"
        assert res["claims"] == {"access_token": {}, "id_token": {}}
        assert res["logs"] == [{"action": "a", "level": "warn",
                                "message": f"claim 'tier' discarded: the {trig} trigger does not issue tokens"}]


async def test_method_not_offered_by_trigger_raises_inside_action() -> None:
    src = '''
def on_execute(event, api):
    try:
        api.validation.error("code", "msg")
    except Exception as exc:
        api.state.set("error", f"{type(exc).__name__}: {exc}")
'''
    async with make_runner() as r:
        res = await run(r, src, trigger="post-login")
        uncaught = await run(r, "def on_execute(event, api):\n    api.idToken.setCustomClaim('a', 1)\n",
                             trigger="pre-user-registration")
    assert res["state"]["a"]["error"] == "ApiNotAvailable: api.validation.error is not available in the post-login trigger"
    assert uncaught["denial"]["kind"] == "uncaught_error"
    assert uncaught["denial"]["error_code"] == "ApiNotAvailable"


async def test_camel_and_snake_case_names_are_the_same_methods() -> None:
    src = '''
def on_execute(event, api):
    pairs = [(api.user.setAppMetadata, api.user.set_app_metadata), (api.user.setUserMetadata, api.user.set_user_metadata),
             (api.user.setUserId, api.user.set_user_id), (api.session.setCustomClaim, api.session.set_custom_claim),
             (api.idToken.setCustomClaim, api.id_token.set_custom_claim),
             (api.accessToken.setCustomClaim, api.access_token.set_custom_claim), (api.state.set, api.state.set),
             (api.cache.get, api.cache.get)]
    api.state.set("same", all(a == b and a.__func__ is b.__func__ for a, b in pairs))
    api.access_token.set_custom_claim("snake", True)
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert res["state"]["a"]["same"] is True
    assert res["claims"]["access_token"] == {"snake": True}


async def test_cache_round_trip_through_the_supervisor() -> None:
    a = '''
def on_execute(event, api):
    api.state.set("missing", api.cache.get("k"))
    api.state.set("set", api.cache.set("k", "v1").to_dict())
    rec = api.cache.get("k")
    api.state.set("value", rec.value)
    api.state.set("has_expiry", rec["expires_at"] > 0)
'''
    b = "def on_execute(event, api):\n    api.state.set('other_tenant', api.cache.get('k'))\n"
    async with make_runner() as r:
        res = await run(r, a, tenant="t1")
        other = await run(r, b, tenant="t2")
        same = await run(r, "def on_execute(event, api):\n    api.state.set('v', api.cache.get('k').value)\n", tenant="t1")
    assert res["state"]["a"] == {"missing": None, "set": {"type": "success"}, "value": "v1", "has_expiry": True}
    assert other["state"]["a"]["other_tenant"] is None
    assert same["state"]["a"]["v"] == "v1"


async def test_event_views_can_be_passed_back_and_bad_strings_raise_type_error() -> None:
    src = '''
def on_execute(event, api):
    api.state.set("user", event.user)
    api.user.setAppMetadata({"address": {**event.user.app_metadata.address, "country": "IN"}})
    api.session.setCustomClaim("ids", event.user.identities)
    try:
        api.state.set("bad", "x" + chr(0xD800))
    except TypeError as exc:
        api.state.set("error", str(exc))
'''
    event = {"user": {"app_metadata": {"address": {"zip": "1"}}, "identities": [{"p": "g"}]}}
    async with make_runner() as r:
        res = await run(r, src, event=event)
    assert res["outcome"] == "allow", res["denial"]
    assert res["state"]["a"]["user"] == event["user"]
    assert res["app_metadata"] == {"address": {"zip": "1", "country": "IN"}}
    assert res["claims"]["access_token"] == {"ids": [{"p": "g"}]}
    assert "lone surrogate" in res["state"]["a"]["error"]
