"""The Fetcher as one tenant's attack surface on a shared supervisor (issue 13).

Each attack is played against a real HTTP server on 127.0.0.1 with a
loopback-only socket layer. Each test states what the attacker gets (an exact
error kind, or a documented result), that another tenant's fetches on the
same Fetcher stay prompt (a bound an order of magnitude above normal, well
below what the attack used to cost), and that the supervisor's RSS grows by
less than 50 MB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest

from actionpool.runner._config import FetchConfig
from actionpool.runner._fetch import CHARSETS, Fetcher, _charset
from actionpool.runner._errors import FetchError
from actionpool.runner._redact import redact_query
from net_fixtures import LocalHTTPServer, LoopbackOnlyBackend, LoopLag, free_port, p99, rss_mb

ALLOW = ("127.0.0.1",)
PROMPT_S = 2.0      # a victim fetch on loopback takes ~5 ms; a frozen or starved one takes seconds
RSS_BOUND_MB = 50


def make(**cfg: Any) -> Fetcher:
    blocking = cfg.pop("blocking_resolver", None)
    resolver = cfg.pop("resolver", None)
    return Fetcher(FetchConfig(**cfg), resolver=resolver, blocking_resolver=blocking,
                   connect_check=LoopbackOnlyBackend())


async def victim(f: Fetcher, url: str, n: int = 10, tenant: str = "victim") -> list[float]:
    """``n`` sequential fetches by another tenant; their durations (each must succeed)."""
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        res = await f.fetch(url, None, allow_hosts=ALLOW, timeout_s=10, tenant=tenant)
        times.append(time.monotonic() - t0)
        assert res["status"] == 200
    return times


# ------------------------------------------------------------------ cookies


async def test_no_cookie_survives_a_fetch_or_crosses_tenants(http_server: LocalHTTPServer) -> None:
    f = make()
    try:
        res = await f.fetch(f"{http_server.url}/cookie?name=sid&value=A-session", None, allow_hosts=ALLOW,
                            timeout_s=5, tenant="A")
        assert "sid=A-session" in res["headers"]["set-cookie"]  # the action sees it, once
        for tenant in ("B", "A"):
            echo = await f.fetch(f"{http_server.url}/echo", None, allow_hosts=ALLOW, timeout_s=5, tenant=tenant)
            assert "cookie" not in json.loads(echo["body"])["headers"], tenant
        # An action may still send a cookie it chose itself.
        echo = await f.fetch(f"{http_server.url}/echo", {"headers": {"Cookie": "mine=1"}}, allow_hosts=ALLOW,
                             timeout_s=5, tenant="A")
        assert json.loads(echo["body"])["headers"]["cookie"] == "mine=1"
    finally:
        await f.aclose()


async def test_thousands_of_set_cookie_headers_cost_nothing_lasting(http_server: LocalHTTPServer) -> None:
    """Each header line costs parse time on the loop: a head over 256 lines is refused as the parser reads it."""
    f = make()
    try:
        ok = await f.fetch(f"{http_server.url}/cookies?n=200", None, allow_hosts=ALLOW, timeout_s=5, tenant="A")
        assert ok["headers"]["set-cookie"].count("; Path=/") == 200
        before = rss_mb()

        async def flood() -> list[Any]:
            return await asyncio.gather(*(f.fetch(f"{http_server.url}/cookies?n=2000", None, allow_hosts=ALLOW,
                                                  timeout_s=20, tenant="A") for _ in range(200)),
                                        return_exceptions=True)

        async with LoopLag() as lag:
            attack = asyncio.ensure_future(flood())
            times = await victim(f, f"{http_server.url}/echo", 20)
            results = await attack
        grown = rss_mb() - before
        assert all(type(r) is FetchError and r.error_kind == "http_fetch_error" for r in results), results[:3]
        assert "exceeds 256 header lines" in str(results[0])
        echo = await f.fetch(f"{http_server.url}/echo", None, allow_hosts=ALLOW, timeout_s=5, tenant="A")
        assert "cookie" not in json.loads(echo["body"])["headers"]
        assert p99(times) < PROMPT_S, times
        assert lag.worst < PROMPT_S, lag.worst
        assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB"
    finally:
        await f.aclose()


async def test_each_response_head_gets_its_own_line_budget(http_server: LocalHTTPServer) -> None:
    f = make(max_response_header_lines=200)
    try:
        res = await f.fetch(f"{http_server.url}/cookies?n=150", None, allow_hosts=ALLOW, timeout_s=5)
        assert res["headers"]["set-cookie"].count("; Path=/") == 150
        with pytest.raises(FetchError, match="exceeds 200 header lines"):
            await f.fetch(f"{http_server.url}/cookies?n=250", None, allow_hosts=ALLOW, timeout_s=5)
        # Keep-alive: the next response on the same connection gets a fresh budget.
        for _ in range(3):
            res = await f.fetch(f"{http_server.url}/cookies?n=150", None, allow_hosts=ALLOW, timeout_s=5)
            assert res["status"] == 200
    finally:
        await f.aclose()


# ------------------------------------------------------------- capacity per tenant


async def test_one_tenants_slow_host_never_blocks_another(http_server: LocalHTTPServer) -> None:
    f = make(max_concurrent_per_tenant=8, max_queued_per_tenant=16)
    try:
        before = rss_mb()
        slow = [asyncio.ensure_future(f.fetch(f"{http_server.url}/slow?ms=4000", None, allow_hosts=ALLOW,
                                              timeout_s=2.5, tenant="A")) for _ in range(40)]
        await asyncio.sleep(0.3)  # A now holds all of its 8 connections, 16 more wait, 16 were refused
        times = await victim(f, f"{http_server.url}/json", 20)
        outcomes = await asyncio.gather(*slow, return_exceptions=True)
        kinds = sorted(type(o).__name__ for o in outcomes)
        assert kinds.count("FetchTimeout") == 24, kinds           # its share, waiting out its own budget
        refused = [o for o in outcomes if type(o) is FetchError]
        assert len(refused) == 16 and all("too many fetches in flight" in str(o) for o in refused)
        assert all(o.error_kind == "http_fetch_error" for o in refused)
        assert p99(times) < PROMPT_S, times
        assert rss_mb() - before < RSS_BOUND_MB
    finally:
        await f.aclose()


async def test_tenant_pools_are_bounded_and_idle_ones_closed(http_server: LocalHTTPServer) -> None:
    f = make(max_tenant_pools=10, pool_idle_s=0.2)
    try:
        for i in range(200):
            res = await f.fetch(f"{http_server.url}/json", None, allow_hosts=ALLOW, timeout_s=5, tenant=f"t{i}")
            assert res["status"] == 200
            assert f.tenant_pools <= 10
        await asyncio.sleep(0.3)
        await f.fetch(f"{http_server.url}/json", None, allow_hosts=ALLOW, timeout_s=5, tenant="late")
        assert f.tenant_pools == 1  # every other pool sat idle past pool_idle_s and was closed
        await asyncio.sleep(0.3)  # "late" itself is idle now, and is the table's only entry: kept for its fetch
        for _ in range(3):
            res = await f.fetch(f"{http_server.url}/json", None, allow_hosts=ALLOW, timeout_s=5, tenant="late")
            assert res["status"] == 200
        assert f.tenant_pools == 1
    finally:
        await f.aclose()


async def test_the_pool_about_to_be_used_is_never_closed() -> None:
    from actionpool.runner._fetch_capacity import CapacityTable

    class Pool:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    table = CapacityTable(FetchConfig(max_tenant_pools=1, pool_idle_s=0.05), Pool)
    async with table.use("a") as cap:
        first = cap.pool
    await asyncio.sleep(0.1)  # "a" is idle past pool_idle_s and the only entry
    async with table.use("a") as cap:
        assert cap.pool is first and not first.closed
    async with table.use("b"), table.use("c"):  # over the cap while both are busy: neither closed
        assert len(table) == 2
    await asyncio.sleep(0)
    assert first.closed  # "a" was idle and least recently used
    await table.aclose()


async def test_a_full_table_of_busy_tenants_still_serves_a_new_one(http_server: LocalHTTPServer) -> None:
    f = make(max_tenant_pools=2)
    try:
        busy = [asyncio.ensure_future(f.fetch(f"{http_server.url}/slow?ms=500", None, allow_hosts=ALLOW,
                                              timeout_s=5, tenant=f"busy{i}")) for i in range(3)]
        await asyncio.sleep(0.1)
        res = await f.fetch(f"{http_server.url}/json", None, allow_hosts=ALLOW, timeout_s=5, tenant="new")
        assert res["status"] == 200
        assert [r["status"] for r in await asyncio.gather(*busy)] == [200] * 3
        await f.fetch(f"{http_server.url}/json", None, allow_hosts=ALLOW, timeout_s=5, tenant="other")
        assert f.tenant_pools <= 2  # back under the cap once the busy ones are idle
    finally:
        await f.aclose()


async def test_dns_lookups_are_capped_per_tenant(http_server: LocalHTTPServer) -> None:
    """Tenant A's names never resolve (its lookups block their threads); B's still resolve at once."""
    release = threading.Event()
    blocked = []

    def resolver(host: str) -> list[str]:
        if host.endswith(".a.test"):
            blocked.append(host)
            release.wait(30)
        return ["127.0.0.1"]

    f = make(blocking_resolver=resolver, max_dns_per_tenant=2, max_queued_per_tenant=4, dns_threads=4)
    allow = ("*.a.test", "b.test", "127.0.0.1")
    try:
        before = rss_mb()
        attack = [asyncio.ensure_future(f.fetch(f"http://h{i}.a.test:{http_server.port}/json", None,
                                                allow_hosts=allow, timeout_s=1.0, tenant="A")) for i in range(20)]
        await asyncio.sleep(0.2)
        times = []
        for _ in range(10):
            t0 = time.monotonic()
            res = await f.fetch(f"http://b.test:{http_server.port}/json", None, allow_hosts=allow, timeout_s=5,
                                tenant="B")
            times.append(time.monotonic() - t0)
            assert res["status"] == 200
        outcomes = await asyncio.gather(*attack, return_exceptions=True)
        assert len(blocked) == 2  # A never held more than its 2 resolver threads
        assert all(isinstance(o, FetchError) for o in outcomes)
        assert {o.error_kind for o in outcomes} == {"http_fetch_error", "http_fetch_timeout"}
        assert sum("too many DNS lookups" in str(o) for o in outcomes) == 20 - 2 - 4
        # A's abandoned lookups still hold their threads and its queue: A is refused, B is not.
        with pytest.raises(FetchError, match="too many DNS lookups"):
            await f.fetch(f"http://again.a.test:{http_server.port}/json", None, allow_hosts=allow,
                          timeout_s=0.3, tenant="A")
        await f.fetch(f"http://b.test:{http_server.port}/json", None, allow_hosts=allow, timeout_s=5, tenant="B")
        assert p99(times) < PROMPT_S, times
        assert rss_mb() - before < RSS_BOUND_MB
    finally:
        release.set()
        await f.aclose()


# ------------------------------------------------------------------ bodies


@pytest.mark.parametrize("label,codec", [
    ("utf-8", "utf-8"), ("UTF8", "utf-8"), ('"utf-8"', "utf-8"), ("us-ascii", "ascii"), ("ISO-8859-1", "latin-1"),
    ("latin1", "latin-1"), ("windows-1252", "cp1252"), ("punycode", "utf-8"), ("utf-7", "utf-8"),
    ("idna", "utf-8"), ("rot13", "utf-8"), ("utf-16", "utf-8"), ("unicode_escape", "utf-8"), ("zlib", "utf-8"),
    ("no-such-charset-" + "x" * 5000, "utf-8"), ("", "utf-8"),
])
def test_charset_table(label: str, codec: str) -> None:
    assert _charset(f"text/plain; charset={label}") == codec
    assert set(CHARSETS.values()) == {"utf-8", "ascii", "latin-1", "cp1252"}


@pytest.mark.parametrize("cs,body", [
    ("latin-1", "café"), ("iso-8859-1", "café"), ("windows-1252", "café"), ("utf-8", "café"),
    ("punycode", "caf-dma"),     # not decoded as punycode: the bytes as UTF-8
    ("utf-7", "caf+AOk-"),
    ("idna", "xn--caf-dma"),
])
async def test_bodies_decode_only_in_the_short_list(cs: str, body: str, http_server: LocalHTTPServer) -> None:
    f = make()
    try:
        res = await f.fetch(f"{http_server.url}/charset?cs={cs}", None, allow_hosts=ALLOW, timeout_s=5)
        assert res["body"] == body
    finally:
        await f.aclose()


async def test_undecodable_bytes_become_replacement_characters(http_server: LocalHTTPServer) -> None:
    f = make()
    try:
        res = await f.fetch(f"{http_server.url}/text?bytes=5&fill=ff&cs=us-ascii", None, allow_hosts=ALLOW, timeout_s=5)
        assert res["body"] == "\ufffd" * 5
    finally:
        await f.aclose()


async def test_punycode_megabyte_gzip_does_not_freeze_the_loop(http_server: LocalHTTPServer) -> None:
    """Issue 13: 1 MB gzip with charset=punycode froze the supervisor for 15 s (quadratic decoder)."""
    f = make()
    url = f"{http_server.url}/text?bytes=1000000&cs=punycode&gzip=1"
    try:
        before = rss_mb()
        async with LoopLag() as lag:
            attack = asyncio.gather(*(f.fetch(url, None, allow_hosts=ALLOW, timeout_s=20, tenant="A")
                                      for _ in range(3)))
            times = await victim(f, f"{http_server.url}/json", 20)
            results = await attack
        assert all(r["body"] == ("abcdefghij" * 100_000) for r in results)  # decoded as UTF-8, as documented
        assert p99(times) < PROMPT_S, times
        assert lag.worst < PROMPT_S, lag.worst
        assert rss_mb() - before < RSS_BOUND_MB
    finally:
        await f.aclose()


async def test_gzip_bomb_never_inflates_past_the_cap(http_server: LocalHTTPServer) -> None:
    f = make(max_response_bytes=1 << 20)
    try:
        before = rss_mb()
        async with LoopLag() as lag:
            with pytest.raises(FetchError, match="exceeds 1048576 bytes") as err:
                await f.fetch(f"{http_server.url}/bomb?mb=200", None, allow_hosts=ALLOW, timeout_s=20, tenant="A")
            times = await victim(f, f"{http_server.url}/json", 10)
        assert err.value.error_kind == "http_fetch_error"
        assert p99(times) < PROMPT_S and lag.worst < PROMPT_S
        assert rss_mb() - before < RSS_BOUND_MB
    finally:
        await f.aclose()


async def test_a_reply_over_the_frame_limit_is_a_fetch_error(http_server: LocalHTTPServer) -> None:
    # 400 KB of 0xff decoded as UTF-8 is 1.2 MB of U+FFFD: over a 1 MiB frame although under the body cap.
    f = make()
    try:
        with pytest.raises(FetchError, match="does not fit in one reply") as err:
            await f.fetch(f"{http_server.url}/text?bytes=400000&fill=ff", None, allow_hosts=ALLOW, timeout_s=5,
                          max_reply_bytes=1 << 20)
        assert type(err.value) is FetchError
        res = await f.fetch(f"{http_server.url}/text?bytes=300000", None, allow_hosts=ALLOW, timeout_s=5,
                            max_reply_bytes=1 << 20)
        assert len(res["body"]) == 300_000
    finally:
        await f.aclose()


# ------------------------------------------------------------------ logs


def test_redact_query() -> None:
    assert redact_query("GET http://h/p?api_key=SECRET&x=1 200") == "GET http://h/p?[redacted] 200"
    assert redact_query("target=b'/p?api_key=SECRET'") == "target=b'/p?[redacted]'"
    assert redact_query("what? nothing") == "what? nothing"
    t0 = time.monotonic()
    redact_query("/?" * 200_000 + "/a" * 200_000)  # linear: no backtracking blow-up
    assert time.monotonic() - t0 < 2


async def test_query_strings_never_reach_the_logs(http_server: LocalHTTPServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from actionpool.runner._services import Services
    from actionpool.runner._config import RunnerConfig
    from actionpool.runner._worker import ApiFailure

    caplog.set_level(logging.DEBUG)
    services = Services(RunnerConfig(fetch=FetchConfig(allow_hosts=ALLOW)))
    dead = free_port()
    try:
        res = await services.fetch("t", f"{http_server.url}/redirect?to=/echo%3Fapi_key%3DSECRET&api_key=SECRET",
                                   None, 5)
        assert res["status"] == 200
        for url in (f"http://127.0.0.1:{dead}/x?api_key=SECRET",
                    f"{http_server.url}/slow?ms=3000&api_key=SECRET",
                    "http://not-listed.test/?api_key=SECRET"):
            with pytest.raises(ApiFailure) as err:
                await services.fetch("t", url, None, 0.5)
            assert "SECRET" not in str(err.value)
        logging.getLogger("httpx").info("HTTP Request: GET %s \"HTTP/1.1 200 OK\"", "http://h/?api_key=SECRET")
    finally:
        await services.aclose()
    assert any(r.name == "actionpool.fetch" for r in caplog.records)
    assert caplog.records and all("SECRET" not in r.getMessage() for r in caplog.records)
    assert "SECRET" not in caplog.text


# ------------------------------------------------------------------ stub


async def test_a_stub_answers_without_dns_or_network(http_server: LocalHTTPServer) -> None:
    base = f"http://api.test:{http_server.port}"
    stub = {
        f"POST {base}/v1/score": {"status": 201, "headers": {"Content-Type": "application/json"},
                                  "body": '{"score": 12}'},
        f"GET {base}/old": {"status": 302, "headers": {"location": "/v1/new?x=1"}},
        f"GET {base.upper().replace('HTTP:', 'http:')}/v1/new?x=1": {"body": "café"},
    }
    looked_up: list[str] = []

    async def resolver(host: str) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"]

    f = make(stub=stub, resolver=resolver)
    allow = ("api.test",)
    try:
        res = await f.fetch(f"{base}/v1/score", {"method": "POST", "body": "{}"}, allow_hosts=allow, timeout_s=5)
        assert res == {"status": 201, "headers": {"content-type": "application/json"}, "body": '{"score": 12}'}
        res = await f.fetch(f"{base}/old", None, allow_hosts=allow, timeout_s=5)
        assert res["status"] == 200 and res["body"] == "café"
        with pytest.raises(FetchError, match="no entry for 'GET http://api.test") as err:
            await f.fetch(f"{base}/v1/score", None, allow_hosts=allow, timeout_s=5)
        assert err.value.error_kind == "http_fetch_error"
        from actionpool.runner._errors import FetchDenied

        with pytest.raises(FetchDenied):  # the allowlist still applies
            await f.fetch(f"{base}/v1/score", {"method": "POST"}, allow_hosts=("other.test",), timeout_s=5)
    finally:
        await f.aclose()
    assert looked_up == [] and http_server.requests == []
