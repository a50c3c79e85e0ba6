"""JavaScript actions (issue 11): both file forms, the whole api, JSON-only values, errors, mixed flows."""

from __future__ import annotations

from typing import Any

from conftest import make_runner, run
from actionpool.runner import Action
from actionpool.worker._js import handler_names, is_module


def js(source: str, slug: str = "a") -> Action:
    return Action(slug=slug, source=source, filename=f"{slug}.js")


async def run_js(sources: str | list[Any], **kw: Any) -> dict[str, Any]:
    if isinstance(sources, str):
        sources = [sources]
    actions = [s if isinstance(s, Action) else js(s, chr(ord("a") + i)) for i, s in enumerate(sources)]
    async with make_runner() as r:
        return await run(r, actions, **kw)


def test_forms_and_handler_names() -> None:
    assert handler_names("post-login") == ["onExecutePostLogin", "onExecute"]
    assert handler_names("pre-user-registration") == ["onExecutePreUserRegistration", "onExecute"]
    assert is_module("exports.onExecutePostLogin = async (event, api) => {};")
    assert is_module("module.exports = { onExecute };")
    assert not is_module("const email = event.user?.email ?? '';\nif (email) { api.deny('x'); return; }")
    assert Action.from_file.__doc__ is None or True
    assert js("1").language == "js" and Action(slug="p", source="").language == "python"
    assert Action(slug="p", source="", language="js").filename == "p.js"


async def test_module_form_prefers_the_trigger_handler() -> None:
    src = """
exports.onExecutePostLogin = async (event, api) => { api.state.set('h', 'specific'); };
exports.onExecute = (event, api) => { api.state.set('h', 'generic'); };
"""
    assert (await run_js(src, trigger="post-login"))["state"]["a"] == {"h": "specific"}
    assert (await run_js(src, trigger="pre-login"))["state"]["a"] == {"h": "generic"}
    replaced = "module.exports = { onExecutePreUserRegistration(event, api) { api.state.set('h', 'reg'); } };"
    assert (await run_js(replaced, trigger="pre-user-registration"))["state"]["a"] == {"h": "reg"}
    missing = await run_js("exports.onExecutePreLogin = () => {};", trigger="post-login")
    d = missing["denial"]
    assert d["kind"] == "uncaught_error" and d["error_code"] == "HandlerNotFound"
    assert "a.js" in d["reason"] and "exports.onExecutePostLogin" in d["reason"]


async def test_module_level_code_runs_once_per_worker() -> None:
    src = """
let loads = 0;
loads += 1;
let runs = 0;
exports.onExecute = async (event, api) => { runs += 1; api.state.set('n', [loads, runs]); };
"""
    action = js(src)
    async with make_runner() as r:
        first = await run(r, [action])
        second = await run(r, [action], trigger="pre-login")  # another trigger: the module is not loaded again
    assert first["state"]["a"]["n"] == [1, 1]
    assert second["state"]["a"]["n"] == [1, 2]


async def test_bare_body_top_level_await_and_return() -> None:
    src = """
const v = await Promise.resolve(41);
api.state.set('v', v + 1);
if (event.stop) { return; }
api.state.set('after', true);
"""
    assert (await run_js(src, event={"stop": True}))["state"]["a"] == {"v": 42}
    assert (await run_js(src, event={}))["state"]["a"] == {"v": 42, "after": True}


async def test_every_api_method() -> None:
    src = """
api.user.setAppMetadata('plan', 'pro');
api.user.setAppMetadata({ seats: 5, nested: { a: [1, 2.5, null, true] } });
api.user.setUserMetadata('lang', 'en');
api.user.setUserMetadata({ theme: 'dark' });
api.session.setCustomClaim('tier', 'gold');
api.accessToken.setCustomClaim('scope', ['a', 'b']);
api.idToken.setCustomClaim('name', { given: 'Ada' });
api.state.set('iso', new Date(0).toISOString());
api.log('debug', 'a debug line');
console.log('several', 'args', 3, { k: [1] }, null, undefined, true);
console.error('bad');
api.deny('the-reason');
"""
    res = await run_js(src)
    assert res["app_metadata"] == {"plan": "pro", "seats": 5, "nested": {"a": [1, 2.5, None, True]}}
    assert res["user_metadata"] == {"lang": "en", "theme": "dark"}
    assert res["claims"] == {"access_token": {"tier": "gold", "scope": ["a", "b"]}, "id_token": {"name": {"given": "Ada"}}}
    assert res["state"] == {"a": {"iso": "1970-01-01T00:00:00.000Z"}}
    assert [(x["level"], x["message"]) for x in res["logs"]] == [
        ("debug", "a debug line"), ("info", 'several args 3 {"k":[1]} null undefined true'), ("error", "bad")]
    assert res["denial"]["kind"] == "denied" and res["denial"]["reason"] == "the-reason"


async def test_registration_methods() -> None:
    deny = await run_js("api.access.deny('internal', 'Please use a work address');", trigger="pre-user-registration")
    assert deny["denial"]["reason"] == "internal" and deny["denial"]["user_message"] == "Please use a work address"
    val = await run_js("api.validation.error('invalid_phone', 'Phone number is invalid');", trigger="pre-user-registration")
    assert val["denial"]["kind"] == "validation_error" and val["denial"]["error_code"] == "invalid_phone"
    uid = await run_js("api.user.setUserId('cym|123'); api.user.setAppMetadata('gone', null);", trigger="pre-user-registration")
    assert uid["user_id"] == "cym|123" and uid["app_metadata"] == {"gone": None}


async def test_cache_returns_the_same_records_as_python() -> None:
    body = """
api.state.set('miss', api.cache.get('k'));
api.state.set('set', api.cache.set('k', 'v1', { ttl: 60000 }));
const rec = api.cache.get('k');
api.state.set('value', rec.value);
api.state.set('has_expiry', typeof rec.expires_at === 'number');
api.state.set('deleted', api.cache.delete('k'));
api.state.set('after', api.cache.get('k'));
"""
    py = '''
def on_execute(event, api):
    api.state.set('miss', api.cache.get('k'))
    api.state.set('set', api.cache.set('k', 'v1', {'ttl': 60000}))
    rec = api.cache.get('k')
    api.state.set('value', rec.value)
    api.state.set('has_expiry', type(rec.expires_at) is int)
    api.state.set('deleted', api.cache.delete('k'))
    api.state.set('after', api.cache.get('k'))
'''
    async with make_runner() as r:
        j = await run(r, [js(body)], tenant="tj")
        p = await run(r, [py], tenant="tp")
    assert j["state"]["a"]["set"] == {"type": "success"}
    for rec in (j["state"]["a"]["deleted"], p["state"]["a"]["deleted"]):
        rec.pop("expires_at", None)
    assert j["state"]["a"] == p["state"]["a"]
    assert j["state"]["a"]["miss"] is None and j["state"]["a"]["value"] == "v1"


async def test_json_only_values_throw_type_error_at_call_time() -> None:
    src = """
const out = {};
function attempt(name, value) {
  try { api.state.set(name, value); out[name] = 'accepted'; }
  catch (e) { out[name] = e.name + ': ' + e.message; }
}
attempt('date', new Date());
attempt('bigint', 10n);
attempt('fn', { f: () => 1 });
const c = { a: {} }; c.a.back = c; attempt('cycle', c);
attempt('nan', [NaN]);
attempt('map', new Map());
attempt('symbol', Symbol('s'));
let deep = 1; for (let i = 0; i < 40; i++) deep = [deep]; attempt('deep', deep);
const shared = { x: 1 }; attempt('shared', { a: shared, b: shared });
attempt('iso', new Date(0).toISOString());
attempt('undef_prop', { a: undefined, b: 1 });
attempt('frozen_event_part', event.user);
try { api.user.setAppMetadata(5); } catch (e) { out.patch = e.name + ': ' + e.message; }
try { api.deny(); } catch (e) { out.arity = e.name + ': ' + e.message; }
try { api.log('loud', 'x'); } catch (e) { out.level = e.name; }
api.state.set('out', out);
"""
    res = await run_js(src, event={"user": {"email": "a@b.c"}})
    out = res["state"]["a"]["out"]
    assert out["date"].startswith("TypeError: api.state.set: argument 2: a Date object")
    assert out["bigint"] == "TypeError: api.state.set: argument 2: a BigInt is not JSON-serialisable"
    assert out["fn"] == "TypeError: api.state.set: argument 2.f: a function is not JSON-serialisable"
    assert out["cycle"] == "TypeError: api.state.set: argument 2.a.back: circular reference"
    assert out["nan"].startswith("TypeError:") and "not a JSON number" in out["nan"]
    assert out["map"].startswith("TypeError:") and "class Map" in out["map"]
    assert out["symbol"].startswith("TypeError:")
    assert out["deep"].startswith("TypeError:") and "nested deeper" in out["deep"]
    assert out["shared"] == out["iso"] == out["undef_prop"] == out["frozen_event_part"] == "accepted"
    assert out["patch"].startswith("TypeError:") and out["arity"].startswith("TypeError:")
    assert out["level"] == "RangeError"
    assert res["state"]["a"]["undef_prop"] == {"b": 1}
    assert res["state"]["a"]["frozen_event_part"] == {"email": "a@b.c"}


async def test_event_is_deep_frozen_and_optional_chaining_works() -> None:
    src = """
'use strict';
const out = {};
for (const [name, f] of [['top', () => { event.x = 1; }], ['nested', () => { event.user.email = 'x'; }],
                         ['array', () => { event.list.push(1); }]]) {
  try { f(); out[name] = 'mutated'; } catch (e) { out[name] = e.name; }
}
out.missing = event.user?.phone?.number ?? 'none';
out.email = event.user?.email;
out.frozen = Object.isFrozen(event) && Object.isFrozen(event.user) && Object.isFrozen(event.list);
out.plain = Object.getPrototypeOf(event) === Object.prototype;
api.state.set('out', out);
"""
    out = (await run_js(src, event={"user": {"email": "a@b.c"}, "list": [1]}))["state"]["a"]["out"]
    assert out == {"top": "TypeError", "nested": "TypeError", "array": "TypeError", "missing": "none",
                   "email": "a@b.c", "frozen": True, "plain": True}


async def test_uncaught_error_has_the_action_frames_only() -> None:
    src = "// line 1\nfunction helper(x) {\n  return x.missing.deeper;\n}\nexports.onExecute = async (event, api) => {\n  helper({});\n};\n"
    res = await run_js([js(src, "kaboom")])
    d = res["denial"]
    assert d["kind"] == "uncaught_error" and d["error_code"] == "TypeError"
    assert d["reason"] == "TypeError: cannot read property 'deeper' of undefined"
    tb = d["traceback"]
    assert "at helper (kaboom.js:3:" in tb and "kaboom.js:6:" in tb
    assert "<input>" not in tb and "native" not in tb and "entry" not in tb and "prelude" not in tb


async def test_rejected_promise_and_thrown_values() -> None:
    rejected = await run_js("await new Promise((_, reject) => reject(new RangeError('nope')));")
    assert rejected["denial"]["kind"] == "uncaught_error" and rejected["denial"]["reason"] == "RangeError: nope"
    thrown = await run_js("throw 'just a string';")
    assert thrown["denial"]["kind"] == "uncaught_error" and "just a string" in thrown["denial"]["reason"]
    never = await run_js("await new Promise(() => {});")
    assert never["denial"]["kind"] == "uncaught_error" and "never settled" in never["denial"]["reason"]
    caught = await run_js("try { null.x } catch (e) { api.state.set('caught', e.name) }")
    assert caught["outcome"] == "allow" and caught["state"]["a"] == {"caught": "TypeError"}


async def test_syntax_error_names_file_and_line() -> None:
    res = await run_js([js("const a = 1;\nconst b = ;\n", "broken")])
    d = res["denial"]
    assert d["kind"] == "uncaught_error" and d["error_code"] == "SyntaxError"
    assert "broken.js, line 2" in d["reason"]


async def test_method_not_offered_by_the_trigger() -> None:
    res = await run_js("api.validation.error('code', 'message');", trigger="post-login")
    assert res["denial"]["kind"] == "uncaught_error" and res["denial"]["error_code"] == "ApiNotAvailable"
    assert "validation.error" in res["denial"]["reason"] and "post-login" in res["denial"]["reason"]


async def test_require_is_refused_clearly() -> None:
    res = await run_js("const axios = require('axios');\nexports.onExecute = async () => {};")
    assert res["denial"]["kind"] == "uncaught_error"
    assert "require(\"axios\")" in res["denial"]["reason"] and "api.fetch" in res["denial"]["reason"]


async def test_api_of_a_finished_execution_is_closed() -> None:
    src = """
let old = null;
exports.onExecute = async (event, api) => {
  if (old === null) { old = api; api.state.set('first', true); return; }
  try { old.state.set('stale', true); } catch (e) { api.state.set('stale_error', e.message); }
};
"""
    action = js(src)
    async with make_runner() as r:
        await run(r, [action])
        second = await run(r, [action])
    assert second["state"]["a"] == {"stale_error": "this api object belongs to a finished execution"}


async def test_mixed_flow_step_and_metadata_across_languages() -> None:
    py_first = Action(slug="py-tag", source=(
        "def on_execute(event, api):\n"
        "    api.state.set('tier', 'gold')\n"
        "    api.user.setAppMetadata({'from_py': 1})\n"))
    js_second = js("""
api.state.set('saw', event.step['py-tag'].tier);
api.state.set('md', event.user.app_metadata.from_py);
api.user.setAppMetadata('from_js', 2);
""", "js-read")
    py_third = Action(slug="py-read", source=(
        "def on_execute(event, api):\n"
        "    api.state.set('saw', event.step['js-read']['saw'])\n"
        "    api.state.set('md', event.user.app_metadata.from_js)\n"))
    res = await run_js([py_first, js_second, py_third])
    assert res["outcome"] == "allow"
    assert res["state"] == {"py-tag": {"tier": "gold"}, "js-read": {"saw": "gold", "md": 1}, "py-read": {"saw": "gold", "md": 2}}
    assert res["app_metadata"] == {"from_py": 1, "from_js": 2}
    denied = await run_js([js("api.deny('stop');", "first"), py_third])
    assert [a["status"] for a in denied["actions"]] == ["denied", "skipped"]


async def test_fetch_errors_reject_with_the_error_kind() -> None:
    src = """
try { await api.fetch('http://not-allowed.example/x'); }
catch (e) { api.state.set('err', [e.name, e.kind, e.error_kind]); }
"""
    res = await run_js(src)
    assert res["state"]["a"]["err"] == ["ApiError", "http_fetch_denied", "http_fetch_denied"]
    assert res["denial"]["kind"] == "http_fetch_denied"  # "treated as a deny", even when caught


def test_check_js_files(tmp_path: Any, capsys: Any) -> None:
    from actionpool.runner.cli import main as cli_main

    (tmp_path / "typo.js").write_text("exports.onExecutePostLogn = async (event, api) => {};\n")
    (tmp_path / "obj.js").write_text("module.exports = {\n  onExecutePostLogin,\n  helper: 1,\n};\n"
                                     "function onExecutePostLogin(event, api) {}\n")
    (tmp_path / "broken.js").write_text("const a = 1;\nconst b = ;\n")
    # closing the wrapper early must not make check run anything (it would spin forever here)
    (tmp_path / "escape.js").write_text("}); for (;;) {} (function () {\n")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "js"
    assert cli_main(["check", str(root / "pre_user_registration.js"), "--trigger", "pre-user-registration"]) == 0
    assert cli_main(["check", str(root / "fraud_check.js"), str(tmp_path / "obj.js"), "--trigger", "post-login"]) == 0
    assert cli_main(["check", str(tmp_path / "escape.js")]) == 0
    out = capsys.readouterr().out
    assert "pre_user_registration.js: ok: onExecutePreUserRegistration" in out
    assert "fraud_check.js: ok: (bare body)" in out and "obj.js: ok: onExecutePostLogin" in out
    assert cli_main(["check", str(tmp_path / "typo.js"), "--trigger", "post-login"]) == 1
    assert cli_main(["check", str(tmp_path / "broken.js")]) == 1
    out = capsys.readouterr().out
    assert "did you mean onExecutePostLogin?" in out
    assert "broken.js:2:11: SyntaxError" in out
