"""The worker runtime: handler lookup, event views, errors, output capture, execution isolation."""

from __future__ import annotations

import pytest

from conftest import make_runner, run
from actionpool.runner import Action


async def test_trigger_handler_preferred_then_generic() -> None:
    both = '''
def on_execute_post_login(event, api):
    api.state.set("h", "specific")
def on_execute(event, api):
    api.state.set("h", "generic")
'''
    async with make_runner() as r:
        specific = await run(r, both, trigger="post-login")
        generic = await run(r, both, trigger="pre-login")
        reg = await run(r, "def on_execute_pre_user_registration(event, api):\n    api.state.set('h', 'reg')\n",
                        trigger="pre-user-registration")
    assert specific["state"]["a"]["h"] == "specific"
    assert generic["state"]["a"]["h"] == "generic"
    assert reg["state"]["a"]["h"] == "reg"


async def test_async_handler_and_awaiting() -> None:
    src = '''
import asyncio
async def on_execute(event, api):
    await asyncio.sleep(0)
    api.state.set("v", api.cache.get("nothing"))
    api.state.set("done", True)
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert res["state"]["a"] == {"v": None, "done": True}


async def test_missing_handler_is_a_clear_error() -> None:
    async with make_runner() as r:
        res = await run(r, "def handler(event, api):\n    pass\n", trigger="post-login")
    d = res["denial"]
    assert d["kind"] == "uncaught_error" and d["error_code"] == "HandlerNotFound"
    assert "a.py" in d["reason"] and "on_execute_post_login" in d["reason"] and "on_execute" in d["reason"]


async def test_syntax_error_names_file_and_line() -> None:
    src = "def on_execute(event, api):\n    x = 1\n    if x = 2:\n        pass\n"
    async with make_runner() as r:
        res = await run(r, [Action(slug="broken", source=src, filename="broken.py")])
    d = res["denial"]
    assert d["kind"] == "uncaught_error" and d["error_code"] == "SyntaxError"
    assert "broken.py, line 3" in d["reason"]


async def test_traceback_points_into_action_source_only() -> None:
    src = "\n\ndef helper(x):\n    return {}[x]\n\ndef on_execute(event, api):\n    helper('missing')\n"
    async with make_runner() as r:
        res = await run(r, [Action(slug="kaboom", source=src, filename="kaboom.py")])
    d = res["denial"]
    assert d["kind"] == "uncaught_error"
    assert d["reason"] == "KeyError: 'missing'" and d["error_code"] == "KeyError"
    tb = d["traceback"]
    assert 'File "kaboom.py", line 7, in on_execute' in tb
    assert 'File "kaboom.py", line 4, in helper' in tb
    assert "worker" not in tb and "_runtime" not in tb and "site-packages" not in tb


async def test_event_is_read_only_and_missing_fields_are_none() -> None:
    src = '''
import operator
def on_execute(event, api):
    out = {}
    out["attr"] = event.user.email
    out["item"] = event["user"]["email"]
    out["missing"] = event.user.phone
    out["missing_top"] = event.nothing
    out["missing_item"] = event["nothing"]
    out["list"] = event.user.identities[0].provider
    out["len"] = len(event.user.identities)
    out["in"] = "email" in event.user
    out["get"] = event.user.get("phone", "n/a")
    errors = []
    for attempt in (lambda: setattr(event.user, "email", "x"), lambda: event.user.__setitem__("email", "x"),
                    lambda: event.user.identities.append(1), lambda: event.__setitem__("k", 1),
                    lambda: event.user.pop("email"), lambda: operator.setitem(event.user.identities, 0, 1)):
        try:
            attempt()
            errors.append("mutated")
        except TypeError:
            errors.append("TypeError")
    out["errors"] = errors
    out["still"] = event.user.email
    api.state.set("out", out)
'''
    event = {"user": {"email": "a@b.c", "identities": [{"provider": "google"}]}}
    async with make_runner() as r:
        res = await run(r, src, event=event)
    out = res["state"]["a"]["out"]
    assert out == {"attr": "a@b.c", "item": "a@b.c", "missing": None, "missing_top": None, "missing_item": None,
                   "list": "google", "len": 1, "in": True, "get": "n/a", "errors": ["TypeError"] * 6,
                   "still": "a@b.c"}


async def test_secrets_reach_only_their_action() -> None:
    a = Action(slug="with-secret", source="def on_execute(event, api):\n    api.state.set('k', event.secrets.API_KEY)\n",
               secrets={"API_KEY": "s3cr3t"})
    b = Action(slug="without", source="def on_execute(event, api):\n    api.state.set('k', event.secrets.API_KEY)\n")
    async with make_runner() as r:
        res = await run(r, [a, b])
    assert res["state"] == {"with-secret": {"k": "s3cr3t"}, "without": {"k": None}}


async def test_uncaught_error_replaces_worker_and_next_flow_is_fine() -> None:
    async with make_runner() as r:
        first = await run(r, "def on_execute(event, api):\n    raise RuntimeError('boom')\n")
        pids_after_error = set(r.worker_pids)
        ok = await run(r, "def on_execute(event, api):\n    api.state.set('ok', 1)\n")
        stats = r.stats()
    assert first["denial"]["kind"] == "uncaught_error" and first["denial"]["reason"] == "RuntimeError: boom"
    assert ok["outcome"] == "allow" and ok["state"]["a"]["ok"] == 1
    assert stats["discarded"] >= 1
    del pids_after_error


async def test_module_globals_persist_for_same_source_in_a_reused_worker() -> None:
    # Documented behaviour (like the anchors): module globals live as long as the worker.
    src = '''
COUNT = [0]
def on_execute(event, api):
    COUNT[0] += 1
    api.state.set("count", COUNT[0])
'''
    async with make_runner(pool_size=1, max_workers=1) as r:
        counts = [(await run(r, src))["state"]["a"]["count"] for _ in range(3)]
    assert counts == [1, 2, 3]


async def test_api_object_of_finished_execution_cannot_be_used() -> None:
    src = '''
SAVED = []
def on_execute(event, api):
    if SAVED:
        try:
            SAVED[0].state.set("leak", True)
            api.state.set("old_api", "worked")
        except Exception as exc:
            api.state.set("old_api", type(exc).__name__)
    SAVED[:] = [api]
'''
    async with make_runner(pool_size=1, max_workers=1) as r:
        await run(r, src)
        res = await run(r, src)
    assert res["state"]["a"] == {"old_api": "ApiClosed"}


async def test_unawaited_tasks_do_not_outlive_their_execution() -> None:
    src = '''
import asyncio
async def later(api):
    await asyncio.sleep(0.05)
    api.state.set("late", True)
async def on_execute(event, api):
    asyncio.get_running_loop().create_task(later(api))
    api.state.set("returned", True)
'''
    async with make_runner(pool_size=1, max_workers=1) as r:
        res = await run(r, src)
        nxt = await run(r, "def on_execute(event, api):\n    api.state.set('next', True)\n")
    assert res["state"]["a"] == {"returned": True}
    assert nxt["outcome"] == "allow" and nxt["state"] == {"a": {"next": True}}


@pytest.mark.parametrize("event", [[], "text", 5, None])
async def test_event_that_is_not_an_object_is_denied(event: object) -> None:
    async with make_runner() as r:
        res = (await r.run_flow(trigger="post-login", actions=[Action(slug="a", source="def on_execute(e, api): pass")],
                                event=event, tenant="t")).to_dict()
    assert res["outcome"] == "deny" and res["denial"]["kind"] == "invalid_event"


async def test_event_with_non_json_values_is_denied() -> None:
    async with make_runner() as r:
        bad = await r.run_flow(trigger="post-login", actions=[Action(slug="a", source="def on_execute(e, api): pass")],
                               event={"user": {"when": object()}}, tenant="t")
        lone_surrogate = await r.run_flow(trigger="post-login",
                                          actions=[Action(slug="a", source="def on_execute(e, api): pass")],
                                          event={"name": "\ud800"}, tenant="t")
    assert bad.denial is not None and bad.denial["kind"] == "invalid_event" and "event['user']['when']" in bad.denial["reason"]
    assert lone_surrogate.denial is not None and lone_surrogate.denial["kind"] == "invalid_event"


def test_the_warm_up_execution_talks_to_nobody_and_leaves_nothing() -> None:
    """``Runtime.prime`` runs the whole execution path against a NullChannel: no byte reaches the pipe."""
    import asyncio
    import linecache
    import os
    import sys

    from actionpool.worker._channel import Channel
    from actionpool.worker._runtime import PRIME_FILENAME, PRIME_HASH, Runtime

    r_fd, w_fd = os.pipe()
    saved = sys.stdout, sys.stderr
    loop = asyncio.new_event_loop()
    try:
        rt = Runtime(Channel(r_fd, w_fd, 1 << 20), loop)
        error, result = rt.prime()
        assert (error, result) == (None, {"ok": True})   # every call of it succeeded
        assert PRIME_HASH not in rt.modules and PRIME_FILENAME not in linecache.cache and rt.current is None
        os.set_blocking(r_fd, False)
        with pytest.raises(BlockingIOError):
            os.read(r_fd, 1)                                # nothing was written to the supervisor's pipe
    finally:
        sys.stdout, sys.stderr = saved
        loop.close()
        os.close(r_fd)
        os.close(w_fd)


async def test_a_fresh_workers_first_flow_sees_nothing_of_the_warm_up() -> None:
    """The warm-up's cache write, log line, state and claim never reach a flow, the cache or the audit."""
    src = '''
import linecache, sys
def on_execute(event, api):
    api.state.set("tier", api.cache.get("tier"))
    api.state.set("modules", [k for k in sys.modules if "warm" in k])
    api.state.set("lines", [k for k in linecache.cache if "warm-up" in k])
'''
    async with make_runner() as r:
        res = await run(r, src)
    assert res["outcome"] == "allow"
    assert res["state"]["a"] == {"tier": None, "modules": [], "lines": []}
    assert res["claims"]["access_token"] == {} and not any("warm-up" in e["message"] for e in res["logs"])
