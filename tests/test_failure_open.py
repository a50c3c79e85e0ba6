"""``failure = "open"`` covers exactly the environmental failures it names, with real workers.

Each kind is produced for real: a cache_url pointing at a closed loopback port (the backend is
down), a local HTTP server that answers too slowly or a port nobody listens on (fetch timeout and
transport error), an action over its time, memory or CPU limit, a worker that dies. Each is run in
a flow ``[failing action, next action]`` twice: with ``failure = "open"`` the flow goes on
(``failed_open``, then ``ok``) and with the default it is denied with that kind. Everything else
(a refused fetch, a deny, a validation error, the action's own exception, a forged ApiError,
hostile behaviour) stays closed even when the action fails open.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from conftest import TEST_CONFIG, make_runner
from net_fixtures import free_port
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig
from actionpool.runner._failure import FAIL_OPEN_KINDS, environment_kind, set_failure_policy

NEXT = Action(slug="next", source="def on_execute(event, api):\n    api.state.set('ran', True)\n")

CACHE_GET = "def on_execute(event, api):\n    api.cache.get('k')\n"
FETCH = "async def on_execute(event, api):\n    await api.fetch(event.url)\n"
FETCH_CAUGHT = '''
async def on_execute(event, api):
    try:
        await api.fetch(event.url)
    except api.ApiError as exc:
        api.log("info", "caught " + exc.code)
'''
SLEEP = "import time\n\ndef on_execute(event, api):\n    time.sleep(30)\n"
HOG = "def on_execute(event, api):\n    blocks = [bytearray(16 << 20) for _ in range(64)]\n"
SPIN = "def on_execute(event, api):\n    while True:\n        pass\n"
CRASH = "import os\n\ndef on_execute(event, api):\n    os._exit(3)\n"


def closed_cache_url() -> str:
    """A redis URL on a loopback port nobody listens on: every cache call finds the backend down."""
    return f"redis://127.0.0.1:{free_port()}/0"


def config(**kw: Any) -> RunnerConfig:
    base = dataclasses.replace(TEST_CONFIG, fetch=FetchConfig(allow_hosts=("127.0.0.1",), timeout_s=0.5),
                               limits=Limits(action_timeout_s=4.0, flow_timeout_s=50.0, memory_mb=128))
    return dataclasses.replace(base, **kw)


async def run_both(cfg: RunnerConfig, source: str, event: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The same failing action in a flow before NEXT: once failing open, once closed (the default)."""
    out = []
    async with make_runner(cfg) as r:
        for failure in ("open", "closed"):
            a = Action(slug="failing", source=source, limits=limits or {})
            set_failure_policy(a, failure)
            out.append(await r.run_flow(trigger="post-login", actions=[a, NEXT], event=event or {"user": {}},
                                        tenant="t"))
    return out[0], out[1]


def assert_opens_and_closes(opened: Any, closed: Any, kind: str) -> None:
    assert opened.outcome == "allow", opened.denial
    assert [a["status"] for a in opened.to_dict()["actions"]] == ["failed_open", "ok"]
    assert opened.state["next"] == {"ran": True}
    assert any(e["level"] == "warn" and e["message"].startswith(f"failed open: {kind}: ") for e in opened.logs), \
        opened.logs
    assert closed.outcome == "deny" and closed.denial["kind"] == kind, closed.denial
    assert closed.denial["action"] == "failing"
    assert [a["status"] for a in closed.to_dict()["actions"]] == ["failed", "skipped"]


# ------------------------------------------------------------------ the kinds that open


async def test_cache_backend_down_opens_and_closes() -> None:
    opened, closed = await run_both(config(cache_url=closed_cache_url()), CACHE_GET)
    assert_opens_and_closes(opened, closed, "cache_unavailable")
    assert closed.denial["error_code"] == "ApiError"
    assert closed.denial["reason"].startswith("ApiError: cache_unavailable: ")


async def test_fetch_transport_error_opens_and_closes(http_server: Any) -> None:
    # Connection refused (a loopback port nobody listens on), and a body over the response cap.
    for url in (f"http://127.0.0.1:{free_port()}/refused", f"{http_server.url}/big?bytes=3000000"):
        opened, closed = await run_both(config(), FETCH, {"url": url})
        assert_opens_and_closes(opened, closed, "http_fetch_error")


async def test_fetch_timeout_opens_and_closes_caught_or_not(http_server: Any) -> None:
    url = f"{http_server.url}/slow?ms=3000"
    for source in (FETCH, FETCH_CAUGHT):   # a fetch timeout denies even when the action catches it
        opened, closed = await run_both(config(), source, {"url": url})
        assert_opens_and_closes(opened, closed, "http_fetch_timeout")


@pytest.mark.parametrize("source,limits,kind", [
    (SLEEP, {"action_timeout_s": 0.5}, "timeout"),
    (HOG, {"memory_mb": 64}, "memory_limit"),
    # demoted to SCHED_IDLE, a spinner may get little CPU on a busy machine: a wall limit far away
    (SPIN, {"cpu_limit_ms": 100, "action_timeout_s": 45.0}, "cpu_limit"),
    (CRASH, {}, "worker_crash"),
])
async def test_limits_and_crashes_open_and_close(source: str, limits: dict[str, Any], kind: str) -> None:
    opened, closed = await run_both(config(), source, limits=limits)
    assert_opens_and_closes(opened, closed, kind)


# ------------------------------------------------------------------ what never opens


FORGED = '''
def on_execute(event, api):
    raise api.ApiError("cache_unavailable", "the backend is fine; this action only says so")
'''
DENY_THEN_OUTAGE = '''
def on_execute(event, api):
    api.access.deny("risk", "Not now.")
    api.cache.get("k")
'''
HOSTILE = '''
import os

def on_execute(event, api):
    os.write(4, b"\\x00\\x00\\x00\\x05junk!")
'''


@pytest.mark.parametrize("source,event,kind", [
    (FETCH, {"url": "http://localhost:9/off-the-allowlist"}, "http_fetch_denied"),
    (FETCH_CAUGHT, {"url": "http://localhost:9/off-the-allowlist"}, "http_fetch_denied"),
    ("def on_execute(event, api):\n    api.deny('no')\n", None, "denied"),
    ("def on_execute(event, api):\n    api.validation.error('bad', 'Bad.')\n", None, "validation_error"),
    ("def on_execute(event, api):\n    raise ValueError('mine')\n", None, "uncaught_error"),
    (FORGED, None, "uncaught_error"),
    # a request the action built wrong: http_fetch_error to the action, but its own mistake
    ("async def on_execute(event, api):\n    await api.fetch('http://127.0.0.1:9/', {'method': 'BREW'})\n",
     None, "uncaught_error"),
    (DENY_THEN_OUTAGE, None, "denied"),
    (HOSTILE, None, "protocol_error"),
])
async def test_other_failures_stay_closed_when_failing_open(source: str, event: dict[str, Any] | None,
                                                            kind: str) -> None:
    trigger_event = {"user": {}, **(event or {})}
    # The cache is down for every case: a forged "cache_unavailable" must not borrow a real outage.
    cfg = config(cache_url=closed_cache_url())
    async with make_runner(cfg) as r:
        a = Action(slug="failing", source=source)
        set_failure_policy(a, "open")
        trigger = "pre-user-registration" if "validation" in source else "post-login"
        res = await r.run_flow(trigger=trigger, actions=[a, NEXT], event=trigger_event, tenant="t")
    assert res.outcome == "deny" and res.denial["kind"] == kind, res.denial
    assert [x["status"] for x in res.to_dict()["actions"]][1] == "skipped"
    assert not any(e["message"].startswith("failed open") for e in res.logs), res.logs


async def test_a_forged_api_error_without_an_outage_stays_uncaught_error() -> None:
    """The worker's report alone never opens: the supervisor must have seen the call fail so."""
    async with make_runner(config()) as r:   # memory:// cache: up
        a = Action(slug="failing", source=FORGED)
        set_failure_policy(a, "open")
        res = await r.run_flow(trigger="post-login", actions=[a, NEXT], event={"user": {}}, tenant="t")
    assert res.denial["kind"] == "uncaught_error" and res.denial["error_code"] == "ApiError", res.denial


def test_the_documented_table() -> None:
    assert FAIL_OPEN_KINDS == {"timeout", "memory_limit", "cpu_limit", "worker_crash", "worker_lost", "cache_unavailable",
                               "http_fetch_timeout", "http_fetch_error"}
    err = {"kind": "uncaught_error", "type": "ApiError", "message": "cache_unavailable: down"}
    assert environment_kind(err, {"cache_unavailable"}) == "cache_unavailable"
    assert environment_kind(err, set()) is None                                   # not seen by the supervisor
    assert environment_kind({**err, "type": "ValueError"}, {"cache_unavailable"}) is None
    assert environment_kind({**err, "message": "http_fetch_denied: x"}, {"http_fetch_denied"}) is None
    assert environment_kind({**err, "kind": "memory_limit"}, {"cache_unavailable"}) is None


# ------------------------------------------------------------------ JavaScript actions behave the same


JS_CACHE_GET = "exports.onExecutePostLogin = async (event, api) => { api.cache.get('k'); };\n"
JS_FETCH = "exports.onExecutePostLogin = async (event, api) => { await api.fetch(event.url); };\n"


async def test_js_actions_fail_open_on_the_same_kinds(http_server: Any) -> None:
    cfg = config(cache_url=closed_cache_url())
    for source, event, kind in ((JS_CACHE_GET, None, "cache_unavailable"),
                                (JS_FETCH, {"url": f"http://127.0.0.1:{free_port()}/refused"}, "http_fetch_error"),
                                (JS_FETCH, {"url": f"{http_server.url}/slow?ms=3000"}, "http_fetch_timeout")):
        out = []
        async with make_runner(cfg) as r:
            for failure in ("open", "closed"):
                a = Action(slug="failing", source=source, language="js")
                set_failure_policy(a, failure)
                out.append(await r.run_flow(trigger="post-login", actions=[a, NEXT],
                                            event={"user": {}, **(event or {})}, tenant="t"))
        assert_opens_and_closes(out[0], out[1], kind)
    async with make_runner(config()) as r:   # a denied fetch stays closed in JS too
        a = Action(slug="failing", source=JS_FETCH, language="js")
        set_failure_policy(a, "open")
        res = await r.run_flow(trigger="post-login", actions=[a, NEXT],
                               event={"user": {}, "url": "http://localhost:9/x"}, tenant="t")
    assert res.denial["kind"] == "http_fetch_denied", res.denial


# ------------------------------------------------------------------ cache.set / delete with the backend down


PY_CACHE_RESULTS = '''
def on_execute(event, api):
    api.state.set("set", api.cache.set("k", "v", {"ttl": 1000}))
    api.state.set("delete", api.cache.delete("k"))
    try:
        api.cache.get("k")
    except api.ApiError as exc:
        api.state.set("get", exc.code)
'''
JS_CACHE_RESULTS = '''
exports.onExecutePostLogin = async (event, api) => {
  api.state.set("set", api.cache.set("k", "v", {ttl: 1000}));
  api.state.set("delete", api.cache.delete("k"));
  try { api.cache.get("k"); } catch (e) { api.state.set("get", e.kind); }
};
'''


async def test_cache_set_and_delete_return_the_result_object_when_the_backend_is_down() -> None:
    """As the reference's result object, in Python and JS alike; ``get`` has none and raises."""
    async with make_runner(config(cache_url=closed_cache_url())) as r:
        for source, language in ((PY_CACHE_RESULTS, "python"), (JS_CACHE_RESULTS, "js")):
            res = await r.run_flow(trigger="post-login", actions=[Action(slug="c", source=source, language=language)],
                                   event={"user": {}}, tenant="t")
            assert res.outcome == "allow", (language, res.denial)
            assert res.state["c"] == {"set": {"type": "error", "code": "CacheUnavailable"},
                                      "delete": {"type": "error", "code": "CacheUnavailable"},
                                      "get": "cache_unavailable"}, language
