"""api.fetch and api.cache end to end: real workers, a real local HTTP server, a real redis-server."""

from __future__ import annotations

from typing import Any

from conftest import make_runner, run
from actionpool.runner import FetchConfig, Limits, RunnerConfig

FETCH = '''
import json
async def on_execute(event, api):
    try:
        res = await api.fetch(event.url, {"method": "GET"})
    except api.ApiError as exc:
        api.state.set("error", exc.error_kind)
        return
    api.state.set("status", res.status)
'''


def _cfg(**kw: Any) -> RunnerConfig:
    return RunnerConfig(pool_size=1, max_workers=4, fetch=FetchConfig(allow_hosts=("127.0.0.1",)), **kw)


async def test_fetch_after_the_action_budget_is_nearly_spent(http_server: Any) -> None:
    src = '''
import time
async def on_execute(event, api):
    time.sleep(0.7)
    try:
        await api.fetch(event.url)
    except api.ApiError as exc:
        api.state.set("error", exc.error_kind)
'''
    cfg = _cfg(limits=Limits(action_timeout_s=1.0))
    async with make_runner(cfg) as r:
        res = await run(r, src, event={"url": f"{http_server.url}/slow?ms=2000"})
    # The fetch gets only what is left of the 1 s budget, so it times out before the action does.
    assert res["denial"]["kind"] == "http_fetch_timeout", res["denial"]
    assert res["state"]["a"]["error"] == "http_fetch_timeout"


async def test_fetch_timeout_and_denial_deny_the_flow_even_when_caught(http_server: Any) -> None:
    async with make_runner(_cfg()) as r:
        denied = await run(r, FETCH, event={"url": "http://example.invalid/"})
        ok = await run(r, FETCH, event={"url": f"{http_server.url}/status/503"})
    assert denied["denial"]["kind"] == "http_fetch_denied" and denied["state"]["a"]["error"] == "http_fetch_denied"
    assert ok["outcome"] == "allow" and ok["state"]["a"]["status"] == 503  # non-2xx is returned, not raised


async def test_concurrent_fetches_from_one_action(http_server: Any) -> None:
    src = '''
import asyncio
async def on_execute(event, api):
    results = await asyncio.gather(*(api.fetch(event.url) for _ in range(5)))
    api.state.set("statuses", [r.status for r in results])
'''
    async with make_runner(_cfg()) as r:
        res = await run(r, src, event={"url": f"{http_server.url}/slow?ms=200"})
    assert res["state"]["a"]["statuses"] == [200] * 5
    assert len(http_server.requests) == 5


async def test_two_runners_share_one_redis_cache(redis_url: str) -> None:
    put = "def on_execute(event, api):\n    api.state.set('r', api.cache.set('k', 'from-one').to_dict())\n"
    get = "def on_execute(event, api):\n    rec = api.cache.get('k')\n    api.state.set('v', rec.value if rec else None)\n"
    async with make_runner(_cfg(cache_url=redis_url)) as one, make_runner(_cfg(cache_url=redis_url)) as two:
        wrote = await run(one, put, tenant="acme")
        read = await run(two, get, tenant="acme")
        other = await run(two, get, tenant="globex")
        other_trigger = await run(two, get, tenant="acme", trigger="pre-login")
    assert wrote["state"]["a"]["r"] == {"type": "success"}
    assert read["state"]["a"]["v"] == "from-one"
    assert other["state"]["a"]["v"] is None and other_trigger["state"]["a"]["v"] is None


async def test_cache_limits_through_a_flow() -> None:
    src = '''
def on_execute(event, api):
    out = []
    for i in range(21):
        out.append(api.cache.set(f"k{i}", "v").to_dict())
    out.append(api.cache.set("x" * 65, "v").to_dict())
    api.state.set("results", out)
'''
    async with make_runner(_cfg()) as r:
        res = await run(r, src, trigger="pre-user-registration")
    results = res["state"]["a"]["results"]
    assert results[:20] == [{"type": "success"}] * 20
    assert results[20]["code"] == "CacheSizeExceeded"
    assert results[21]["code"] == "CacheKeySizeExceeded"
