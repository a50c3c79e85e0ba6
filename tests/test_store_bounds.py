"""What a tenant can make the sidecar store stays within bytes (issue 16, class 4).

The stores are exercised directly (memory and a real redis-server) with budgets
small enough to overflow many times over; then a real ``actionpool serve``
shows the draft cache and the run history within budget from outside
(its metrics, its Redis, its RSS).
"""

from __future__ import annotations

from pathlib import Path
import time
from typing import Callable

import psutil
import pytest
import redis

from actionpool.sidecar._action_cache import ActionCache
from actionpool.runner._flow import Action
from actionpool.sidecar._store import MemoryStore, NothingToRollBack, RedisStore, Store, StoreFull, version_of
from serve_fixtures import start_serve, write_config

pytestmark = pytest.mark.timeout(120)

P = "actionpool:serve:"
KB = 1024


def _factory(kind: str, redis_url: str | None) -> Callable[..., Store]:
    def make(**bounds: int) -> Store:
        history_size = bounds.pop("history_size", 1000)
        if kind == "memory":
            return MemoryStore(history_size, **bounds)
        assert redis_url is not None
        return RedisStore(redis_url, history_size, **bounds)
    return make


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_kind(request: pytest.FixtureRequest, redis_server_optional: str | None) -> tuple[str, str | None]:
    if request.param == "redis":
        if redis_server_optional is None:
            pytest.skip("redis-server not found on PATH")
        redis.Redis.from_url(redis_server_optional).flushall()
        return "redis", redis_server_optional
    return "memory", None


def _redis_bytes(url: str, pattern: str) -> tuple[int, int]:
    """(keys, bytes of their string values) matching ``pattern`` in the real Redis."""
    with redis.Redis.from_url(url) as r:
        keys = list(r.scan_iter(match=pattern, count=1000))
        return len(keys), sum(r.strlen(k) for k in keys)


async def test_run_history_stays_within_each_tenants_byte_budget(store_kind: tuple[str, str | None]) -> None:
    kind, url = store_kind
    store = _factory(kind, url)(history_max_bytes=64 * KB)
    await store.start()
    try:
        await store.record_run("other", "o-1", {"tenant": "other", "keep": "me"})
        for i in range(100):  # 100 runs of about 3 KB: 300 KB offered to a 64 KB budget
            await store.record_run("acme", f"f{i}", {"tenant": "acme", "i": i, "pad": "x" * 3000})
        usage = await store.usage("acme")
        assert 0 < usage["history_bytes"] <= 64 * KB and usage["runs"] < 25
        assert await store.get_run("f0") is None and (await store.get_run("f99"))["i"] == 99  # oldest went first
        assert (await store.get_run("o-1"))["keep"] == "me"  # another tenant's history is untouched
        # a record larger than the whole budget is never stored whole: a marked stub stands in for it
        await store.record_run("acme", "huge", {"tenant": "acme", "flow_id": "huge", "pad": "y" * (200 * KB)})
        stub = await store.get_run("huge")
        assert stub is not None and "pad" not in stub and stub["tenant"] == "acme"
        assert stub["truncated"]["original_bytes"] > 200 * KB and "history_max_bytes" in stub["truncated"]["reason"]
        assert (await store.usage("acme"))["history_bytes"] <= 64 * KB
        assert store.stats()["history_truncated"] == 1
        if url is not None:  # what Redis really holds, not only the store's own count
            n, size = _redis_bytes(url, P + "run:f*")
            assert n < 25 and size <= 64 * KB
    finally:
        await store.close()


async def test_sources_are_kept_only_while_reachable_and_within_budget(store_kind: tuple[str, str | None]) -> None:
    kind, url = store_kind
    store = _factory(kind, url)(sources_max_bytes=100 * KB, versions_kept=10)
    await store.start()
    try:
        await store.put_tenant("acme", {}, author="admin")
        sources = [f"# v{i}\n" + "x = 1\n" * (30 * KB // 6) for i in range(20)]  # 20 x 30 KB into 100 KB
        for s in sources:
            await store.deploy("acme", "tag", s)
        usage = await store.usage("acme")
        assert usage["source_bytes"] <= 100 * KB and usage["versions"] == 3  # the oldest rollback targets went
        assert store.current("acme", "tag").source == sources[19]
        assert (await store.rollback("acme", "tag")).version == version_of(sources[18])  # rollback still works
        assert store.current("acme", "tag").source == sources[18]
        assert (await store.rollback("acme", "tag")).version == version_of(sources[17])
        with pytest.raises(NothingToRollBack):
            await store.rollback("acme", "tag")
        assert (await store.usage("acme"))["source_bytes"] < 40 * KB  # rolled-back-over versions are gone
        if url is not None:  # src: keys of unreachable versions are deleted from Redis
            n, size = _redis_bytes(url, P + "src:acme:*")
            assert n == 1 and size < 40 * KB
        # a shadow is reachable: its source stays while it is the shadow
        await store.deploy("acme", "tag", sources[0], shadow=True)
        assert store.shadow("acme", "tag").source == sources[0]
        # live and shadow sources that cannot fit are refused, and nothing changes
        big = "# big\n" + "y = 2\n" * (90 * KB // 6)
        with pytest.raises(StoreFull, match="sources_max_bytes"):
            await store.deploy("acme", "tag", big)
        assert store.current("acme", "tag").source == sources[17] and store.shadow("acme", "tag") is not None
        d = await store.describe("acme", "tag")
        assert d["current"] == version_of(sources[17])
    finally:
        await store.close()


async def test_versions_kept_bounds_each_actions_stack(store_kind: tuple[str, str | None]) -> None:
    kind, url = store_kind
    store = _factory(kind, url)(versions_kept=3)
    await store.start()
    try:
        await store.put_tenant("acme", {}, author="admin")
        for i in range(12):
            await store.deploy("acme", "tag", f"x = {i}\n")
        assert (await store.usage("acme"))["versions"] == 3
        await store.rollback("acme", "tag")
        await store.rollback("acme", "tag")
        assert store.current("acme", "tag").source == "x = 9\n"
        with pytest.raises(NothingToRollBack):
            await store.rollback("acme", "tag")
        if url is not None:
            assert _redis_bytes(url, P + "src:acme:*")[0] == 1
    finally:
        await store.close()


def test_action_cache_is_an_lru_bounded_in_bytes_per_tenant() -> None:
    cache = ActionCache(max_bytes_per_tenant=100 * KB)
    built: list[str] = []

    def build(slug: str, source: str) -> Callable[[], Action]:
        def make() -> Action:
            built.append(source[:8])
            return Action(slug=slug, source=source)
        return make

    keep = cache.get_or_build("b", "tag", "v", build("tag", "x = 1\n"))
    for i in range(50):  # 50 drafts of 20 KB into a 100 KB budget
        src = f"# {i:04d}\n" + "z" * (20 * KB)
        cache.get_or_build("a", "tag", str(i), build("tag", src))
    assert cache.bytes("a") <= 100 * KB and cache.bytes("b") > 0
    assert cache.get_or_build("b", "tag", "v", build("tag", "never")) is keep  # another tenant kept its entry
    n = len(built)
    cache.get_or_build("a", "tag", "49", build("tag", "never"))  # the newest is still cached
    assert len(built) == n
    cache.get_or_build("a", "tag", "0", build("tag", "# 0000\n"))  # the oldest was evicted: built again
    assert len(built) == n + 1
    cache.get_or_build("a", "tag", "huge", build("tag", "h" * (200 * KB)))  # larger than the budget: not kept
    assert cache.bytes("a") <= 100 * KB


ACTION = """
    def on_execute_post_login(event, api):
        api.session.setCustomClaim("v", "1")
"""

SERVE = """
    [runner]
    pool_size = 1
    max_workers = 4
    [server]
    token_env = "AP_TOKEN"
    max_body_bytes = 2097152
    history_size = 1000
    history_max_bytes = {history}
    history_record_max_bytes = 65536
    action_cache_max_bytes = {cache}
    {store}
    [tenants.acme]
    [tenants.acme.actions.tag]
    file = "actions/tag.py"
    [tenants.acme.flows]
    post-login = ["tag"]
"""


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_drafts_stay_within_the_action_cache_budget_in_a_real_sidecar(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, SERVE.format(history=1 << 20, cache=1 << 20, store=""), {"tag.py": ACTION})
    s = start_serve(cfg)
    try:
        proc = psutil.Process(s.proc.pid)
        with s.client() as c:
            def draft(i: int) -> None:
                body = "# " + ("%06d" % i) * (900 * KB // 6) + "\n" + ACTION.replace("\n    ", "\n").strip() + "\n"
                r = c.post("/v1/tenants/acme/actions/tag/test", json={"trigger": "post-login", "event": {},
                                                                      "source": body})
                assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text[:300]
            for i in range(4):  # warm: the pool, the parser, the allocator's arenas
                draft(i)
            before = proc.memory_info().rss
            for i in range(4, 44):  # 40 drafts of 900 KB each: 36 MB if every one were kept
                draft(i)
            grown = (proc.memory_info().rss - before) / (1 << 20)
            cached = _metric(c.get("/metrics").text, 'actionpool_action_cache_bytes{tenant="acme"}')
        assert cached <= 1 << 20
        assert grown < 24, f"the sidecar grew {grown:.1f} MB for 36 MB of drafts"
    finally:
        assert s.stop() == 0


@pytest.mark.redis
def test_run_history_in_redis_stays_within_budget_from_a_real_sidecar(tmp_path: Path, redis_url: str) -> None:
    cfg = write_config(tmp_path, SERVE.format(history=256 * KB, cache=1 << 20,
                                              store=f'[store]\n    url = "{redis_url}"'), {"tag.py": ACTION})
    s = start_serve(cfg)
    try:
        with s.client() as c:
            for _ in range(40):  # 40 flows with a 60 KB event into a 256 KB history
                r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"bio": "b" * (60 * KB)}})
                assert r.status_code == 200
        with redis.Redis.from_url(redis_url) as r:
            deadline = time.monotonic() + 20  # the records are written in the background after each answer
            while r.llen(P + "runs:acme") == 0:
                assert time.monotonic() < deadline, "no run recorded"
                time.sleep(0.05)  # polling a condition with a deadline
            total = int(r.get(P + "runbytes:acme") or 0)
            keys = list(r.scan_iter(match=P + "run:*", count=1000))
            real = sum(r.strlen(k) for k in keys)
        assert 0 < total <= 256 * KB and real <= 256 * KB and len(keys) < 40
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("key", ["history_max_bytes", "sources_max_bytes", "versions_kept", "action_cache_max_bytes"])
def test_store_budgets_are_validated_naming_the_key(tmp_path: Path, key: str) -> None:
    from actionpool.runner._errors import ConfigError
    from actionpool.sidecar._config import load_config

    cfg = write_config(tmp_path, f"[server]\n{key} = 0\n")
    with pytest.raises(ConfigError, match=f"server.{key}: must be positive"):
        load_config(cfg)
    cfg = write_config(tmp_path, f"[server]\n{key} = \"big\"\n")
    with pytest.raises(ConfigError, match=f"server.{key}: has the wrong type"):
        load_config(cfg)


def test_run_history_in_memory_stays_within_budget_and_rss_from_a_real_sidecar(tmp_path: Path) -> None:
    body = SERVE.format(history=512 * KB, cache=1 << 20, store="").replace(
        "history_record_max_bytes = 65536", "history_record_max_bytes = 4194304")  # the byte budget binds here
    s = start_serve(write_config(tmp_path, body, {"tag.py": ACTION}))
    try:
        proc = psutil.Process(s.proc.pid)
        with s.client() as c:
            def flow(i: int) -> str:
                r = c.post("/v1/tenants/acme/flows/post-login", json={"user": {"bio": ("%06d" % i) * (400 * KB // 6)}})
                assert r.status_code == 200, r.text[:300]
                return r.json()["flow_id"]
            first = [flow(i) for i in range(4)]  # warm
            before = proc.memory_info().rss
            last = [flow(i) for i in range(4, 64)]  # 60 runs of 400 KB: 24 MB kept if unbounded
            deadline = time.monotonic() + 20  # written in the background after each answer
            while c.get(f"/v1/tenants/acme/runs/{last[-1]}").status_code != 200:
                assert time.monotonic() < deadline, "the last run was never recorded"
                time.sleep(0.05)  # polling a condition with a deadline
            grown = (proc.memory_info().rss - before) / (1 << 20)
            assert c.get(f"/v1/tenants/acme/runs/{first[0]}").status_code == 404  # the oldest went first
            assert c.get(f"/v1/tenants/acme/runs/{last[-1]}").json()["event"]["user"]["bio"].startswith("000063")
        assert grown < 12, f"the sidecar grew {grown:.1f} MB for 24 MB of run history"
    finally:
        assert s.stop() == 0


def test_deployed_sources_in_memory_stay_within_budget_and_rss_from_a_real_sidecar(tmp_path: Path) -> None:
    body = SERVE.format(history=1 << 20, cache=1 << 20, store="").replace(
        "history_size = 1000", "history_size = 1000\n    sources_max_bytes = 2097152")
    s = start_serve(write_config(tmp_path, body, {"tag.py": ACTION}))
    try:
        proc = psutil.Process(s.proc.pid)
        with s.client() as c:
            def deploy(i: int) -> str:
                src = "# " + ("%06d" % i) * (900 * KB // 6) + "\n" + ACTION.replace("\n    ", "\n").strip() + "\n"
                r = c.put("/v1/tenants/acme/actions/tag", content=src)
                assert r.status_code == 201, r.text[:300]
                return r.json()["version"]
            for i in range(4):  # warm
                deploy(i)
            before = proc.memory_info().rss
            versions = [deploy(i) for i in range(4, 64)]  # 60 deploys of 900 KB: 54 MB kept if unbounded
            grown = (proc.memory_info().rss - before) / (1 << 20)
            assert c.post("/v1/tenants/acme/actions/tag/rollback").json()["version"] == versions[-2]  # still works
            assert c.post("/v1/tenants/acme/actions/tag/rollback").status_code == 409  # only 2 MB were kept
            r = c.post("/v1/tenants/acme/flows/post-login", json={})
            assert r.json()["versions"] == {"tag": versions[-2]}
        assert grown < 16, f"the sidecar grew {grown:.1f} MB for 54 MB of deployed sources"
    finally:
        assert s.stop() == 0


def test_a_flows_recorded_fetch_bodies_stay_within_their_byte_budget(tmp_path: Path, http_server: object) -> None:
    """Probe: an action making 64 fetches of 64 KiB each had 4 MiB of response bodies kept per flow in flight
    (times every flow in flight) for a record later cut to history_record_max_bytes anyway. Now a flow keeps
    FETCH_BODIES_BYTES of bodies in all; the later ones are cut and marked (replay lists them)."""
    from actionpool.runner._history import FETCH_BODIES_BYTES, FETCH_BODY_BYTES

    url = http_server.url  # type: ignore[attr-defined]
    action = f"""
        async def on_execute_post_login(event, api):
            for i in range(12):
                await api.fetch("{url}/big?bytes={FETCH_BODY_BYTES}&n=" + str(i))
    """
    cfg = write_config(tmp_path, """
        [runner]
        pool_size = 1
        max_workers = 2
        [server]
        token_env = "AP_TOKEN"
        history_record_max_bytes = 8388608
        history_max_bytes = 16777216
        [tenants.acme]
        allow_hosts = ["127.0.0.1"]
        [tenants.acme.actions.many]
        file = "actions/many.py"
        [tenants.acme.flows]
        post-login = ["many"]
    """, {"many.py": action})
    s = start_serve(cfg)
    try:
        with s.client() as c:
            r = c.post("/v1/tenants/acme/flows/post-login", json={})
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
            deadline = time.monotonic() + 15
            while (run := c.get(f"/v1/tenants/acme/runs/{r.json()['flow_id']}")).status_code == 404:
                assert time.monotonic() < deadline, "the run was never recorded"
                time.sleep(0.02)  # polling the background history write, with a deadline
            fetches = run.json()["fetches"]
            assert len(fetches) == 12 and run.json().get("truncated") is None
            assert sum(len(f["body"].encode()) for f in fetches) <= FETCH_BODIES_BYTES
            assert len(fetches[0]["body"]) == FETCH_BODY_BYTES and "body_truncated" not in fetches[0]
            assert fetches[-1]["body"] == "" and fetches[-1]["body_truncated"] == FETCH_BODY_BYTES
    finally:
        assert s.stop() == 0, s.output()[-2000:]
