"""The api as the wire sees it: keyword forms, catchable errors, stale replies, back-pressure, budgets.

Real runners and real workers. Each test states the attack or the mistake, and
what must come out of it: a precise ``denial.kind``, an error the action can
catch, and no effect on anyone else (the next user of the same worker, the
supervisor's memory).
"""

from __future__ import annotations

import asyncio
from typing import Any


from conftest import make_runner, run, wait_for_condition
from actionpool.protocol import API_ERROR_CODES
from actionpool.runner import Action, FetchConfig, Limits, RunnerConfig

ONE_WORKER = RunnerConfig(pool_size=1, max_workers=1)


# ------------------------------------------------------------------ keyword forms (issue 9)

KEYWORDS_PRE_REGISTRATION = '''
def on_execute(event, api):
    api.state.set(key="k1", value=1)
    api.state.set("k2", value=2)
    api.log(level="info", message="by keyword")
    api.user.setAppMetadata(key="a", value=1)
    api.user.set_app_metadata(patch={"b": 2})
    api.user.setUserMetadata("c", value=3)
    api.user.setUserId(user_id="u-1")
    api.user.set_user_id(userId="u-2")
    r = api.cache.set("k", "v", options={"ttl": 60000})
    api.state.set("set", r.type)
    api.state.set("get", api.cache.get(key="k").value)
    api.cache.delete(key="k")
    api.session.setCustomClaim(name="n", value=1)
    api.validation.error(errorCode="E1", errorMessage="shown")
'''


async def test_keyword_forms_snake_and_camel_case() -> None:
    async with make_runner() as r:
        res = await run(r, KEYWORDS_PRE_REGISTRATION, trigger="pre-user-registration")
        assert res["denial"]["kind"] == "validation_error", res["denial"]
        assert res["denial"]["error_code"] == "E1" and res["denial"]["user_message"] == "shown"
        assert res["state"]["a"] == {"k1": 1, "k2": 2, "set": "success", "get": "v"}
        assert res["app_metadata"] == {"a": 1, "b": 2} and res["user_metadata"] == {"c": 3}
        assert res["user_id"] == "u-2" and res["logs"][0]["message"] == "by keyword"
        for form in ('api.access.deny("r", user_message="m")', 'api.access.deny("r", userMessage="m")',
                     'api.access.deny(reason="r", userMessage="m")', 'api.access.deny("r", "m")'):
            res = await run(r, f"def on_execute(event, api):\n    {form}\n", trigger="pre-user-registration")
            assert res["denial"]["kind"] == "denied" and res["denial"]["user_message"] == "m", (form, res["denial"])
        res = await run(r, "def on_execute(event, api):\n    api.idToken.setCustomClaim(name='x', value=[1])\n"
                           "    api.access_token.set_custom_claim('y', value=2)\n")
        assert res["claims"] == {"access_token": {"y": 2}, "id_token": {"x": [1]}}


BAD_ARGUMENTS = '''
def on_execute(event, api):
    caught = []
    for name, call in [
        ("empty_user_id", lambda: api.user.setUserId("")),
        ("unknown_keyword", lambda: api.access.deny("r", user_msg="m")),
        ("twice", lambda: api.access.deny("r", reason="r2")),
        ("missing", lambda: api.validation.error(errorCode="E")),
        ("level", lambda: api.log("loud", "x")),
        ("meta_mixed", lambda: api.user.setAppMetadata({"a": 1}, patch={"b": 2})),
        ("too_large", lambda: api.state.set("big", "x" * (2 << 20))),
        ("cache_key_type", lambda: api.cache.get(key=1)),
    ]:
        try:
            call()
            caught.append([name, None])
        except (TypeError, ValueError) as exc:
            caught.append([name, type(exc).__name__])
    api.state.set("caught", caught)
'''


async def test_every_bad_argument_is_catchable_inside_the_action() -> None:
    """Never a worker kill (``protocol_error``): the action gets TypeError or ValueError and goes on."""
    async with make_runner() as r:
        res = await run(r, BAD_ARGUMENTS, trigger="pre-user-registration")
    assert res["outcome"] == "allow", res["denial"]
    assert dict(res["state"]["a"]["caught"]) == {
        "empty_user_id": "ValueError", "unknown_keyword": "TypeError", "twice": "TypeError", "missing": "TypeError",
        "level": "ValueError", "meta_mixed": "TypeError", "too_large": "ValueError", "cache_key_type": "TypeError",
    }
    assert res["user_id"] is None and res["state"]["a"].keys() == {"caught"}


UNAWAITED = '''
import asyncio

async def on_execute(event, api):
    res = api.fetch("http://127.0.0.1:9/never")
    api.state.set("type", type(res).__name__ != "coroutine")
'''


async def test_unawaited_fetch_warns_with_the_actions_own_line_and_sends_nothing() -> None:
    async with make_runner() as r:
        res = await run(r, UNAWAITED)
    assert res["outcome"] == "allow", res["denial"]
    text = "\n".join(e["message"] for e in res["logs"])
    assert "a.py:5: RuntimeWarning: api.fetch(...) was never awaited" in text, text
    for internal in ("actionpool", "worker/", "_proxy", "_runtime", ".venv", "site-packages"):
        assert internal not in text, text


async def test_fetch_works_with_gather_ensure_future_and_create_task(http_server: Any) -> None:
    src = f'''
import asyncio

async def on_execute(event, api):
    url = "{http_server.url}/json"
    a = asyncio.create_task(api.fetch(url))
    b = asyncio.ensure_future(api.fetch(url))
    c, d = await asyncio.gather(api.fetch(url), api.fetch(url=url, init={{"method": "GET"}}))
    api.state.set("status", [(await a).status, (await b).status, c.status, d.status])
'''
    cfg = RunnerConfig(pool_size=1, max_workers=2, fetch=FetchConfig(allow_hosts=("127.0.0.1",)))
    async with make_runner(cfg) as r:
        res = await run(r, src)
    assert res["outcome"] == "allow", res["denial"]
    assert res["state"]["a"]["status"] == [200, 200, 200, 200]


# ------------------------------------------------------------------ catchable ApiError with a documented code


async def test_api_errors_carry_a_documented_code(http_server: Any) -> None:
    src = f'''
async def on_execute(event, api):
    out = []
    for url in ["http://127.0.0.1:1/refused", "{http_server.url}/text?bytes=10&cs=punycode",
                "{http_server.url}/big?bytes=2000000"]:
        try:
            await api.fetch(url)
            out.append(None)
        except api.ApiError as exc:
            out.append([exc.code, exc.error_kind == exc.code, type(exc).__name__])
    api.state.set("errors", out)
'''
    cfg = RunnerConfig(pool_size=1, max_workers=2, fetch=FetchConfig(allow_hosts=("127.0.0.1",)))
    async with make_runner(cfg) as r:
        res = await run(r, src)
    assert res["outcome"] == "allow", res["denial"]
    errors = res["state"]["a"]["errors"]
    for e in errors:
        if e is not None:
            assert e[0] in API_ERROR_CODES and e[1] is True and e[2] == "ApiError", errors
    assert errors[0][0] == "http_fetch_error"       # connection refused: the action may handle it
    assert errors[2] is not None                     # a body over the limits is an error, never silence


# ------------------------------------------------------------------ execution generations


ABANDONS = '''
import asyncio, os, struct, time

def frame(value):
    import msgpack
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body

async def on_execute(event, api):
    if event.user.mode == "abandon":
        # A refused fetch started and abandoned: its reply (or its cancellation) must stay here.
        asyncio.ensure_future(api.fetch("http://127.0.0.1:9/off-the-allowlist"))
        await asyncio.sleep(0)
        # A request whose reply nobody will ever wait for (an id the worker never issued), answered
        # by the supervisor before this execution ends: the reply waits in the pipe for the next one.
        os.write(4, frame([0, 4000000000, "cache.get", ["k"]]))
        time.sleep(0.2)
        return
    api.cache.get("k")                        # a synchronous call: reads the pipe first
    api.state.set("user", event.user.id)
'''


async def test_stale_replies_never_reach_the_next_users_execution() -> None:
    """The next user's execution on the same worker is unaffected by what the previous one abandoned."""
    action = Action(slug="gen", source=ABANDONS)
    async with make_runner(ONE_WORKER) as r:
        pids = set()
        for i in range(6):
            bad = await r.run_flow(trigger="post-login", actions=[action], tenant="t",
                                   event={"user": {"mode": "abandon", "id": f"attacker{i}"}})
            assert bad.denial is None or bad.denial["kind"] == "http_fetch_denied", bad.denial
            good = await r.run_flow(trigger="post-login", actions=[action], tenant="t",
                                    event={"user": {"mode": "plain", "id": f"user{i}"}})
            assert good.allowed, good.denial
            assert good.state == {"gen": {"user": f"user{i}"}}
            pids.update(r.worker_pids)
        assert len(pids) == 1, "the worker was never replaced: nothing stale killed it"


OVERSIZED_STATE = '''
def on_execute(event, api):
    for i in range(5):
        api.state.set(f"k{i}", "x" * 250_000)   # 1.25 MB: the next action's event cannot be encoded
'''


async def test_oversized_state_denies_the_action_that_produced_it() -> None:
    """A's state would make B's execute request unencodable: A is denied (output_limit), B never blamed."""
    async with make_runner() as r:
        res = await run(r, [OVERSIZED_STATE, "def on_execute(event, api):\n    api.state.set('b', 1)\n"])
    assert res["denial"]["action"] == "a" and res["denial"]["kind"] == "output_limit", res["denial"]
    assert "state and metadata set by this action" in res["denial"]["reason"]
    assert [a["status"] for a in res["actions"]] == ["failed", "skipped"]
    async with make_runner() as r:   # the same data in bounds passes through
        res = await run(r, [OVERSIZED_STATE.replace("range(5)", "range(2)"),
                            "def on_execute(event, api):\n    api.state.set('b', len(event.step['a']))\n"])
    assert res["outcome"] == "allow" and res["state"]["b"] == {"b": 2}, res["denial"]


# ------------------------------------------------------------------ back-pressure and CPU budget


def flood_source(url: str, calls: int) -> str:
    return f'''
import asyncio, time

async def on_execute(event, api):
    for _ in range({calls}):
        asyncio.ensure_future(api.fetch("{url}"))
    await asyncio.sleep(0)     # the requests go out
    time.sleep(8)              # and the replies are never read
'''


async def test_replies_to_a_worker_that_does_not_read_are_capped(http_server: Any) -> None:
    """400 value-returning calls, never read: output_limit, and the supervisor does not hold the replies."""
    from net_fixtures import rss_mb

    cfg = RunnerConfig(pool_size=1, max_workers=2, fetch=FetchConfig(allow_hosts=("127.0.0.1",)),
                       limits=Limits(action_timeout_s=15.0))
    src = flood_source(f"{http_server.url}/big?bytes=900000", 400)
    async with make_runner(cfg) as r:
        await run(r, "def on_execute(event, api):\n    pass\n")
        before = rss_mb()
        res = await run(r, src)
        grown = rss_mb() - before
        assert res["denial"]["kind"] == "output_limit", res["denial"]
        assert "queued" in res["denial"]["reason"]
        assert grown < 50, f"supervisor RSS grew by {grown:.0f} MB"
        after = await run(r, "def on_execute(event, api):\n    api.state.set('ok', 1)\n")
        assert after["outcome"] == "allow"


NESTED_FLOOD = '''
def on_execute(event, api):
    v = 0
    for _ in range(30):
        v = [v]
    chains = [v] * 2900           # 90 000 values, under the 100 000 of one argument
    for i in range(2):
        api.state.set(f"k{i}", chains)
'''


async def test_supervisor_cpu_budget_per_execution() -> None:
    """Messages that are cheap to send and costly to check end in output_limit once over the budget."""
    async with make_runner(limits=Limits(supervisor_cpu_ms=5)) as r:
        res = await run(r, NESTED_FLOOD)
        assert res["denial"]["kind"] == "output_limit", res["denial"]
        assert "supervisor CPU" in res["denial"]["reason"]
        ok = await run(r, "def on_execute(event, api):\n    api.state.set('x', [1, 2, 3])\n")
        assert ok["outcome"] == "allow"


async def test_loop_lag_is_reported_in_stats() -> None:
    async with make_runner() as r:
        import time as _t
        _t.sleep(0.25)                  # freeze the loop, as a bad handler would
        # Blocked 250 ms; the watcher's tick was due at most 50 ms into it, and reports on its next run.
        await wait_for_condition(lambda: r.stats()["loop_lag_max_ms"] >= 180, timeout=10)
        s = r.stats()
    assert 0 <= s["loop_lag_ms"] and s["loop_lag_p99_ms"] <= s["loop_lag_max_ms"]


RAW_FLOOD = '''
import os, struct
import msgpack

def on_execute(event, api):
    v = 0
    for _ in range(30):
        v = [v]
    value = [v] * event.chains    # the proxy would refuse this; the attacker writes the frames itself
    body = msgpack.packb([2, "state.set", ["k", value]])
    for _ in range(event.frames):
        os.write(4, struct.pack(">I", len(body)) + body)
    import time
    time.sleep(10)
'''


async def test_values_per_argument_and_per_execution_are_capped() -> None:
    """What a frame decodes to is bounded too: 100 000 values per argument, 200 000 per execution."""
    async with make_runner(limits=Limits(action_timeout_s=15.0)) as r:
        one = await run(r, RAW_FLOOD, event={"chains": 30000, "frames": 1})       # 930 000 values in one frame
        assert one["denial"]["kind"] == "protocol_error" and "more than 100000 values" in one["denial"]["reason"]
        many = await run(r, RAW_FLOOD, event={"chains": 3000, "frames": 4})       # 93 000 each, 4 frames
        assert many["denial"]["kind"] == "output_limit", many["denial"]
        assert "values in one execution" in many["denial"]["reason"]
        honest = await run(r, "def on_execute(event, api):\n    api.state.set('x', [[0]] * 40_000)\n"
                              "    api.state.set('y', {'a': list(range(90_000))})\n")
        assert honest["outcome"] == "allow", honest["denial"]
        assert len(honest["state"]["a"]["x"]) == 40_000 and len(honest["state"]["a"]["y"]["a"]) == 90_000
        caught = await run(r, "def on_execute(event, api):\n    try:\n        api.state.set('x', [0] * 100_001)\n"
                              "    except ValueError as exc:\n        api.state.set('e', str(exc))\n")
        assert "more than 100000 values" in caught["state"]["a"]["e"], caught


async def test_other_tenants_are_unaffected_by_message_attacks(http_server: Any) -> None:
    """Frames of nested containers and a reply flood from one tenant; another tenant's flows go on.

    Before: one such frame held the loop ~3 s (a path string per element) and its values stayed
    alive for the GC to scan. The bound separates "frozen" from "fine" on a loaded machine: the
    loop is never late by more than 1 s, and the victim's flows all succeed.
    """
    from net_fixtures import LoopLag, rss_mb

    cfg = RunnerConfig(pool_size=2, max_workers=6, fetch=FetchConfig(allow_hosts=("127.0.0.1",)),
                       limits=Limits(action_timeout_s=15.0))
    victim = "def on_execute(event, api):\n    api.state.set('n', event.n)\n"
    async with make_runner(cfg) as r:
        await run(r, victim, event={"n": 0}, tenant="victim")
        before = rss_mb()

        async def victims() -> list[float]:
            times = []
            for i in range(30):
                t = asyncio.get_running_loop().time()
                res = await run(r, victim, event={"n": i}, tenant="victim")
                assert res["outcome"] == "allow" and res["state"] == {"a": {"n": i}}, res["denial"]
                times.append(asyncio.get_running_loop().time() - t)
                await asyncio.sleep(0.02)
            return times

        async with LoopLag() as lag:
            attacks = asyncio.gather(run(r, RAW_FLOOD, event={"chains": 30000, "frames": 4}, tenant="evil"),
                                     run(r, RAW_FLOOD, event={"chains": 3000, "frames": 4}, tenant="evil"),
                                     run(r, flood_source(f"{http_server.url}/big?bytes=900000", 400), tenant="evil2"))
            times = await victims()
            results = await attacks
        assert [res["denial"]["kind"] for res in results] == ["protocol_error", "output_limit", "output_limit"], \
            [x["denial"] for x in results]
        assert lag.worst < 1.0, f"the loop was late by {lag.worst:.2f} s"
        assert max(times) < 5.0, times
        assert rss_mb() - before < 50
        assert r.stats()["loop_lag_max_ms"] < 1000
