"""A tenant changed or deleted at runtime (issue 17): ``set_tenant_policy``, ``forget_tenant``, ``check_event``.

Real workers, a real HTTP server on 127.0.0.1, no restart anywhere: a control plane changes a
tenant's allowlist for its next fetch, and a deleted tenant stops costing workers, cache
entries and fetch pools while every other tenant keeps its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
import pytest

from conftest import make_runner, wait_for_condition, wait_gone
from actionpool.runner import Action, ConfigError, FetchConfig, Runner, RunnerConfig
from actionpool.runner._services import cache_scope

FETCH = '''
import os
async def on_execute(event, api):
    api.state.set("pid", os.getpid())
    try:
        res = await api.fetch(event.url)
    except api.ApiError as exc:
        api.state.set("error", exc.error_kind)
        return
    api.state.set("status", res.status)
'''
CACHE = '''
import os
def on_execute(event, api):
    api.state.set("pid", os.getpid())
    got = api.cache.get("k")
    api.state.set("got", None if got is None else got["value"])
    api.cache.set("k", event.user["mine"])
'''
WAIT_FOR_GO = '''
import os, time
def on_execute(event, api):
    deadline = time.monotonic() + 30
    while api.cache.get("go") is None:      # the test releases it (a cache write of this tenant)
        if time.monotonic() > deadline:
            api.access.deny("never released")
            return
        time.sleep(0.005)
    api.state.set("pid", os.getpid())
'''
GO = '''
def on_execute(event, api):
    api.cache.set("go", "1")
'''


def cfg(**kw: Any) -> RunnerConfig:
    return RunnerConfig(pool_size=1, max_workers=8, **kw)


async def flow(r: Runner, tenant: str, source: str, event: dict[str, Any] | None = None,
               slug: str = "a") -> dict[str, Any]:
    res = await r.run_flow(trigger="post-login", actions=[Action(slug=slug, source=source)],
                           event=event or {"user": {}}, tenant=tenant)
    return res.to_dict()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------ set_tenant_policy


async def test_set_tenant_policy_changes_one_tenants_allowlist_at_runtime(http_server: Any) -> None:
    event = {"user": {}, "url": f"{http_server.url}/echo"}
    fetch = FetchConfig(tenant_allow_hosts={"b": ("127.0.0.1",)})   # nothing runner-wide
    async with make_runner(cfg(fetch=fetch)) as r:
        first = await flow(r, "a", FETCH, event)
        assert first["state"]["a"]["error"] == "http_fetch_denied"
        r.set_tenant_policy("a", allow_hosts=["127.0.0.1"])
        now = await flow(r, "a", FETCH, event)
        assert now["outcome"] == "allow" and now["state"]["a"]["status"] == 200
        assert now["state"]["a"]["pid"] == first["state"]["a"]["pid"]  # the same warm worker: nothing restarted
        assert (await flow(r, "c", FETCH, event))["state"]["a"]["error"] == "http_fetch_denied"  # others untouched
        assert (await flow(r, "b", FETCH, event))["state"]["a"]["status"] == 200
        # an override replaces the tenant's configured hosts; None goes back to the config
        r.set_tenant_policy("b", allow_hosts=[])
        assert (await flow(r, "b", FETCH, event))["state"]["a"]["error"] == "http_fetch_denied"
        r.set_tenant_policy("b", allow_hosts=None)
        assert (await flow(r, "b", FETCH, event))["state"]["a"]["status"] == 200
        r.set_tenant_policy("a", allow_hosts=None)
        assert (await flow(r, "a", FETCH, event))["state"]["a"]["error"] == "http_fetch_denied"


async def test_runner_wide_hosts_stay_allowed_beside_an_override(http_server: Any) -> None:
    event = {"user": {}, "url": f"{http_server.url}/echo"}
    async with make_runner(cfg(fetch=FetchConfig(allow_hosts=("127.0.0.1",)))) as r:
        r.set_tenant_policy("a", allow_hosts=["api.example.com"])
        assert (await flow(r, "a", FETCH, event))["state"]["a"]["status"] == 200


async def test_set_tenant_policy_before_start_applies_once_started(http_server: Any) -> None:
    r = make_runner(cfg())
    r.set_tenant_policy("a", allow_hosts=("127.0.0.1",))
    async with r:
        res = await flow(r, "a", FETCH, {"user": {}, "url": f"{http_server.url}/echo"})
    assert res["state"]["a"]["status"] == 200


@pytest.mark.parametrize("tenant, hosts, text", [
    ("", ["x.example"], "tenant must be a non-empty string"),
    ("a", "x.example", "not a string"),
    ("a", ["http://x.example/"], "allow_hosts of tenant 'a': 'http://x.example/' is not a host name"),
    ("a", ["*.10.0.0.1"], "a wildcard cannot cover IP addresses"),
    ("a", [""], "is not a host name"),
    ("a", [f"h{i}.example" for i in range(1025)], "at most 1024"),
])
def test_set_tenant_policy_refuses_bad_lists_and_keeps_the_old_one(tenant: str, hosts: Any, text: str) -> None:
    r = Runner(cfg())
    r.set_tenant_policy("a", allow_hosts=["ok.example"])
    with pytest.raises(ConfigError, match=text.replace("*", r"\*").replace("(", r"\(")):
        r.set_tenant_policy(tenant, allow_hosts=hosts)
    assert r._tenant_hosts == {"a": ("ok.example",)}


# ------------------------------------------------------------------ forget_tenant


async def test_forget_tenant_frees_its_workers_cache_and_fetch_pool(http_server: Any) -> None:
    async with make_runner(cfg(fetch=FetchConfig(allow_hosts=("127.0.0.1",)))) as r:
        a1 = await flow(r, "a", CACHE, {"user": {"mine": "a-value"}})
        b1 = await flow(r, "b", CACHE, {"user": {"mine": "b-value"}})
        pa, pb = a1["state"]["a"]["pid"], b1["state"]["a"]["pid"]
        for t in ("a", "b"):
            res = await flow(r, t, FETCH, {"user": {}, "url": f"{http_server.url}/echo"}, slug="f")
            assert res["state"]["f"]["status"] == 200
        fetcher = r._services.fetcher
        assert fetcher.tenant_pools == 2
        a_pids = {w.pid for w, key in r._pool.ws.oldest_idle() if key[0] and key[0].startswith("a\x00")}
        assert pa in a_pids   # (the fetch action has its own worker; a start for a waiter may add one)

        await r.forget_tenant("a")

        assert not any(alive(p) for p in a_pids)       # reaped before forget_tenant returned
        assert alive(pb) and pb in r.worker_pids
        assert fetcher.tenant_pools == 1
        assert await r._services.cache.get(cache_scope("a", "post-login"), "k") is None
        # a later flow of the same name starts clean: a new worker, an empty cache
        a2 = await flow(r, "a", CACHE, {"user": {"mine": "a-again"}})
        assert a2["state"]["a"]["got"] is None and a2["state"]["a"]["pid"] not in a_pids
        # the other tenant kept its warm worker and its cache
        b2 = await flow(r, "b", CACHE, {"user": {"mine": "b-again"}})
        assert b2["state"]["a"] == {"pid": pb, "got": "b-value"}
        await r.forget_tenant("never-seen")             # nothing held: nothing happens
        assert alive(pb)


async def test_a_busy_worker_finishes_its_execution_and_is_then_not_reused() -> None:
    async with make_runner(cfg()) as r:
        waiting = asyncio.ensure_future(flow(r, "a", WAIT_FOR_GO, slug="waiter"))
        await wait_for_condition(lambda: r._pool.ts.busy("a") == 1)
        busy_pid = next(w.pid for w in r._pool.ts.held)

        await r.forget_tenant("a")
        assert alive(busy_pid) and not waiting.done()   # its execution goes on

        released = await flow(r, "a", GO, slug="go")    # a new worker (the busy one is not lent out)
        assert released["outcome"] == "allow"
        done = await waiting
        assert done["outcome"] == "allow" and done["state"]["waiter"]["pid"] == busy_pid
        assert not wait_gone({busy_pid})                # killed on release instead of parked
        assert busy_pid not in r.worker_pids
        # and what it (and the release) wrote after forget_tenant is dropped once it is gone
        deadline = time.monotonic() + 20
        while await r._services.cache.get(cache_scope("a", "post-login"), "go") is not None:
            assert time.monotonic() < deadline, "the second pass never dropped the cache"
            await asyncio.sleep(0.01)


async def test_forget_tenant_with_redis_drops_only_that_tenants_entries(redis_url: str) -> None:
    async with make_runner(cfg(cache_url=redis_url)) as r:
        for t in ("a", "b"):
            await flow(r, t, CACHE, {"user": {"mine": f"{t}-value"}})
        await r.forget_tenant("a")
        cache = r._services.cache
        assert await cache.get(cache_scope("a", "post-login"), "k") is None
        assert (await cache.get(cache_scope("b", "post-login"), "k"))["value"] == "b-value"
        assert (await flow(r, "a", CACHE, {"user": {"mine": "x"}}))["state"]["a"]["got"] is None


async def test_forget_tenant_before_start_and_bad_names() -> None:
    r = make_runner(cfg())
    r.set_tenant_policy("a", allow_hosts=["x.example"])
    await r.forget_tenant("a")                           # not started: only the override to drop
    assert r._tenant_hosts == {}
    with pytest.raises(ConfigError):
        await r.forget_tenant("")


# ------------------------------------------------------------------ check_event


def test_check_event_is_public_and_needs_no_started_runner() -> None:
    r = Runner(cfg())
    assert r.check_event({"user": {"email": "a@b.example"}}) is None
    assert r.check_event([]) == "event must be a JSON object, got list"
    deep: Any = {}
    for _ in range(100):
        deep = {"x": deep}
    assert "deep" in (r.check_event(deep) or "")
    big = {"blob": "x" * (r.config.limits.max_frame_bytes)}
    assert "exceeds" in (r.check_event(big) or "")
