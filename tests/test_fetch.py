"""api.fetch against a real HTTP server on 127.0.0.1.

Names like ``api.test`` are mapped to 127.0.0.1 by an injected resolver; since
the connection is pinned to the vetted address, the request really reaches
the local server with ``Host: api.test:PORT``.

Every Fetcher here connects under :class:`LoopbackOnlyBackend`: tests that
feed the SSRF guard private or public addresses never send a packet off the
machine even if the guard regresses; the test fails instead.
"""


import asyncio
import functools
import json
from typing import Any, Awaitable, Callable

import httpx
import pytest

from actionpool.runner._config import FetchConfig
from actionpool.runner._fetch import FetchDenied, FetchError, Fetcher, FetchTimeout, check_allow_hosts, host_allowed
from actionpool.runner._errors import ConfigError
from net_fixtures import *  # noqa: F401,F403  (fixtures and helper classes)


def async_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))
    return wrapper




LOCAL = {"api.test": ["127.0.0.1"], "a.svc.test": ["127.0.0.1"], "deep.a.svc.test": ["127.0.0.1"],
         "svc.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"], "internal.test": ["127.0.0.1"]}
ALLOW = ("api.test", "127.0.0.1")


def make(resolver: Resolver | None = None, backend: LoopbackOnlyBackend | None = None, **cfg: Any) -> Fetcher:
    return Fetcher(FetchConfig(**cfg), resolver=resolver or Resolver(LOCAL),
                   connect_check=backend or LoopbackOnlyBackend())


async def fetch(url: str, init: dict | None = None, *, allow: tuple[str, ...] = ALLOW, timeout_s: float = 5.0,
                resolver: Resolver | None = None, backend: LoopbackOnlyBackend | None = None, **cfg: Any) -> dict:
    f = make(resolver, backend, **cfg)
    try:
        return await f.fetch(url, init, allow_hosts=allow, timeout_s=timeout_s)
    finally:
        await f.aclose()


# ------------------------------------------------------------------ allowlist


@pytest.mark.parametrize("host,allow,expected", [
    ("api.example.com", ("api.example.com",), True),
    ("API.Example.COM", ("api.example.com",), True),
    ("api.example.com.", ("api.example.com",), True),
    ("api.example.com", ("API.EXAMPLE.COM",), True),
    ("x.api.example.com", ("api.example.com",), False),
    ("a.example.com", ("*.example.com",), True),
    ("a.b.c.example.com", ("*.example.com",), True),
    ("example.com", ("*.example.com",), False),
    ("badexample.com", ("*.example.com",), False),
    ("example.com.evil.net", ("*.example.com",), False),
    ("bücher.example", ("xn--bcher-kva.example",), True),
    ("xn--bcher-kva.example", ("BÜCHER.example",), True),
    ("a.bücher.example", ("*.bücher.example",), True),
    ("127.0.0.1", ("127.0.0.1",), True),
    ("127.0.0.1", ("*.0.0.1",), False),
    ("::1", ("[::1]",), True),
    ("::1", ("0:0:0:0:0:0:0:1",), True),
    ("", ("*.example.com",), False),
    ("anything.com", (), False),
])
def test_host_allowed(host: str, allow: tuple[str, ...], expected: bool) -> None:
    assert host_allowed(host, allow) is expected


def test_check_allow_hosts() -> None:
    check_allow_hosts(["api.example.com", "*.example.com", "127.0.0.1", "::1", "bücher.example"])
    for bad in ["", "a..b", "*.127.0.0.1", "http://x.com", "a.*.com", "x.com:80"]:
        with pytest.raises(ConfigError):
            check_allow_hosts([bad])


@async_test
async def test_allowed_call_returns_status_headers_and_string_body(http_server: LocalHTTPServer) -> None:
    res = await fetch(f"{http_server.url}/json")
    assert res["status"] == 200
    assert res["headers"]["content-type"] == "application/json"
    assert json.loads(res["body"]) == {"ok": True, "n": 1}
    assert all(k == k.lower() and isinstance(v, str) for k, v in res["headers"].items())
    assert len(http_server.requests) == 1


@async_test
async def test_named_host_is_pinned_to_the_vetted_address(http_server: LocalHTTPServer) -> None:
    # api.test does not exist in real DNS: reaching the server proves the connect used the vetted IP.
    resolver = Resolver(LOCAL)
    res = await fetch(f"http://api.test:{http_server.port}/echo", resolver=resolver)
    assert res["status"] == 200
    assert json.loads(res["body"])["headers"]["host"] == f"api.test:{http_server.port}"
    assert resolver.calls == ["api.test"]  # resolved once, by the policy check only


@async_test
async def test_backend_refuses_to_connect_without_a_pin(http_server: LocalHTTPServer) -> None:
    from actionpool.runner._fetch_client import PinnedResolver

    with pytest.raises(OSError, match="no vetted address"):
        await PinnedResolver().resolve("127.0.0.1", http_server.port)
    assert http_server.requests == []


@async_test
async def test_denied_host_sends_nothing_and_resolves_nothing(http_server: LocalHTTPServer) -> None:
    resolver = Resolver(LOCAL)
    with pytest.raises(FetchDenied) as err:
        await fetch(f"http://evil.test:{http_server.port}/json", resolver=resolver)
    assert err.value.error_kind == "http_fetch_denied"
    assert "not on the fetch allowlist" in str(err.value)
    assert resolver.calls == []
    assert http_server.requests == []


@async_test
async def test_wildcard_matches_subdomains_not_the_apex(http_server: LocalHTTPServer) -> None:
    allow = ("*.svc.test", "127.0.0.1")
    for host in ("a.svc.test", "deep.a.svc.test"):
        res = await fetch(f"http://{host}:{http_server.port}/json", allow=allow)
        assert res["status"] == 200
    with pytest.raises(FetchDenied):
        await fetch(f"http://svc.test:{http_server.port}/json", allow=allow)
    assert len(http_server.requests) == 2


@pytest.mark.parametrize("url", [
    "ftp://api.test/x", "file:///etc/passwd", "http://user:pw@api.test/", "http://user@api.test/",
    "http:///json", "http://api.test:99999/", "http://api.test:abc/", "not a url", "//api.test/x",
])
@async_test
async def test_bad_urls_are_denied(url: str, http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchDenied):
        await fetch(url)
    assert http_server.requests == []


@async_test
async def test_redirect_to_non_allowlisted_host_is_not_followed(http_server: LocalHTTPServer) -> None:
    resolver = Resolver(LOCAL)
    target = f"http://evil.test:{http_server.port}/json"
    with pytest.raises(FetchDenied):
        await fetch(f"http://api.test:{http_server.port}/redirect?to={target}", resolver=resolver)
    assert [r.path.split("?")[0] for r in http_server.requests] == ["/redirect"]
    assert "evil.test" not in resolver.calls


@async_test
async def test_redirects_are_followed_and_rechecked(http_server: LocalHTTPServer) -> None:
    base = f"http://api.test:{http_server.port}"
    res = await fetch(f"{base}/redirect?to=/json")
    assert res["status"] == 200 and json.loads(res["body"])["ok"] is True
    # 303 turns a POST into a GET without body; 307 keeps both.
    res = await fetch(f"{base}/redirect?status=303&to=/echo", {"method": "POST", "body": "x",
                                                               "headers": {"Content-Type": "text/plain"}})
    echo = json.loads(res["body"])
    assert echo["method"] == "GET" and echo["body"] == "" and "content-type" not in echo["headers"]
    res = await fetch(f"{base}/redirect?status=307&to=/echo", {"method": "POST", "body": "keep"})
    echo = json.loads(res["body"])
    assert echo["method"] == "POST" and echo["body"] == "keep"
    # Credentials do not follow a redirect to another origin.
    res = await fetch(f"{base}/redirect?to=http://127.0.0.1:{http_server.port}/echo",
                      {"headers": {"Authorization": "Bearer s3cret", "X-Keep": "1"}})
    echo = json.loads(res["body"])
    assert "authorization" not in echo["headers"] and echo["headers"]["x-keep"] == "1"


@async_test
async def test_redirect_loop_is_cut_at_max_redirects(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError, match="more than 2 redirects") as err:
        await fetch(f"{http_server.url}/redirect?loop=1", max_redirects=2)
    assert type(err.value) is FetchError
    assert len(http_server.requests) == 3


@async_test
async def test_allowlisted_name_resolving_to_loopback_is_denied(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchDenied, match="non-public address 127.0.0.1"):
        await fetch(f"http://internal.test:{http_server.port}/json", allow=("internal.test",))
    assert http_server.requests == []
    # A wildcard does not vouch for private addresses either; listing the IP does.
    with pytest.raises(FetchDenied):
        await fetch(f"http://a.svc.test:{http_server.port}/json", allow=("*.svc.test",))
    res = await fetch(f"http://internal.test:{http_server.port}/json", allow=("internal.test", "127.0.0.1"))
    assert res["status"] == 200


@pytest.mark.parametrize("ip", [
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1", "0.0.0.0", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::1",
])
@async_test
async def test_non_public_addresses_are_refused(ip: str) -> None:
    resolver = Resolver({"host.test": [ip]})
    trap = LoopbackOnlyBackend()
    with pytest.raises(FetchDenied):
        await fetch("http://host.test/", allow=("host.test",), resolver=resolver, backend=trap)
    assert trap.refused == []


@async_test
async def test_one_bad_address_among_good_ones_is_enough_to_refuse() -> None:
    # 127.0.0.1 is allowed (listed), 10.0.0.1 is not: one bad address refuses the whole name.
    resolver = Resolver({"host.test": ["127.0.0.1", "10.0.0.1"]})
    trap = LoopbackOnlyBackend()
    with pytest.raises(FetchDenied, match="10.0.0.1"):
        await fetch("http://host.test/", allow=("host.test", "127.0.0.1"), resolver=resolver, backend=trap)
    assert trap.refused == []


@pytest.mark.parametrize("ip", ["169.254.169.254", "fd00:ec2::254"])
@async_test
async def test_metadata_address_is_refused_even_when_listed(ip: str) -> None:
    resolver = Resolver({"meta.test": [ip]})
    trap = LoopbackOnlyBackend()
    with pytest.raises(FetchDenied, match="metadata"):
        await fetch("http://meta.test/", allow=("meta.test", ip), resolver=resolver, backend=trap)
    assert trap.refused == []


@async_test
async def test_the_trap_fails_the_test_instead_of_connecting_off_the_machine() -> None:
    trap = LoopbackOnlyBackend()
    with pytest.raises(pytest.fail.Exception, match="not loopback"):
        trap("10.0.0.1", 80)
    assert trap.refused == ["10.0.0.1:80"]


@async_test
async def test_resolution_failure_is_a_fetch_error(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError, match="could not resolve") as err:
        await fetch("http://nxdomain.test/", allow=("nxdomain.test",))
    assert type(err.value) is FetchError


@async_test
async def test_timeout(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchTimeout) as err:
        await fetch(f"{http_server.url}/slow?ms=10000", timeout_s=0.2)
    assert err.value.error_kind == "http_fetch_timeout"
    with pytest.raises(FetchTimeout):
        await fetch(f"{http_server.url}/json", timeout_s=0)
    f = Fetcher(FetchConfig(timeout_s=0.2), resolver=Resolver(LOCAL))
    try:
        with pytest.raises(FetchTimeout):  # the config's timeout caps what the runner passes
            await f.fetch(f"{http_server.url}/slow?ms=10000", None, allow_hosts=ALLOW, timeout_s=30)
    finally:
        await f.aclose()


@pytest.mark.parametrize("query", ["bytes=2000000", "bytes=2000000&chunked=1", "bytes=20000000&gzip=1"])
@async_test
async def test_oversized_body_is_refused(query: str, http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError, match="exceeds 100000 bytes") as err:
        await fetch(f"{http_server.url}/big?{query}", max_response_bytes=100_000)
    assert err.value.error_kind == "http_fetch_error"


@async_test
async def test_body_at_the_cap_is_fine(http_server: LocalHTTPServer) -> None:
    res = await fetch(f"{http_server.url}/big?bytes=100000&chunked=1", max_response_bytes=100_000)
    assert len(res["body"]) == 100_000
    res = await fetch(f"{http_server.url}/big?bytes=100000&gzip=1", max_response_bytes=100_000)
    assert res["body"] == "\0" * 100_000


@pytest.mark.parametrize("code", [204, 302, 404, 418, 500, 503])
@async_test
async def test_non_2xx_is_returned(code: int, http_server: LocalHTTPServer) -> None:
    res = await fetch(f"{http_server.url}/status/{code}")
    assert res["status"] == code
    assert res["body"] == ("" if code == 204 else f"status {code}")


@async_test
async def test_post_echo_with_headers_and_body(http_server: LocalHTTPServer) -> None:
    body = json.dumps({"email": "a@b.c", "ip": "1.2.3.4", "name": "Zoë"})
    res = await fetch(f"http://api.test:{http_server.port}/echo", {
        "method": "post",
        "headers": {"Content-Type": "application/json", "X-Trace": "abc", "X-Latin": "café",
                    "Host": "evil.test", "Connection": "upgrade", "Transfer-Encoding": "chunked"},
        "body": body,
    })
    echo = json.loads(res["body"])
    assert echo["method"] == "POST"
    assert echo["body"] == body
    h = echo["headers"]
    assert h["content-type"] == "application/json" and h["x-trace"] == "abc"
    # aiohttp writes header values as UTF-8 (docs/design.md, "The fetch client"); the server decodes Latin-1.
    assert h["x-latin"].encode("latin-1") == "café".encode("utf-8")
    assert h["host"] == f"api.test:{http_server.port}"
    assert h["content-length"] == str(len(body.encode()))
    assert "transfer-encoding" not in h and h.get("connection") != "upgrade"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
@async_test
async def test_other_methods(method: str, http_server: LocalHTTPServer) -> None:
    res = await fetch(f"{http_server.url}/echo", {"method": method, "body": "b"})
    assert json.loads(res["body"])["method"] == method


@async_test
async def test_head_has_empty_body(http_server: LocalHTTPServer) -> None:
    res = await fetch(f"{http_server.url}/json", {"method": "HEAD"})
    assert res["status"] == 200 and res["body"] == ""


@async_test
async def test_charset_from_content_type(http_server: LocalHTTPServer) -> None:
    assert (await fetch(f"{http_server.url}/charset?cs=latin-1"))["body"] == "café"
    assert (await fetch(f"{http_server.url}/charset?cs=utf-8"))["body"] == "café"


@pytest.mark.parametrize("init,match", [
    ({"method": "TRACE"}, "not allowed"),
    ({"method": "CONNECT"}, "not allowed"),
    ({"method": 5}, "not allowed"),
    ({"body": "x"}, "GET request cannot have a body"),
    ({"method": "POST", "body": {"a": 1}}, "must be a string"),
    ({"headers": {"X-A": 1}}, "must be a string"),
    ({"headers": {"Bad Name": "x"}}, "invalid header name"),
    ({"headers": {"X-A": "a\r\nInjected: 1"}}, "invalid value"),
    ({"headers": {"X-A": "emoji ✓"}}, "invalid value"),
    ({"headers": ["X-A", "b"]}, "must be an object"),
    ({"redirect": "manual"}, "unsupported init option"),
])
@async_test
async def test_bad_init_is_an_error_before_any_request(init: dict, match: str, http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError, match=match) as err:
        await fetch(f"{http_server.url}/echo", init)
    assert type(err.value) is FetchError
    assert http_server.requests == []


@async_test
async def test_request_body_limit(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError, match="request body exceeds 1000 bytes"):
        await fetch(f"{http_server.url}/echo", {"method": "POST", "body": "é" * 501}, max_request_bytes=1000)
    assert http_server.requests == []
    res = await fetch(f"{http_server.url}/echo", {"method": "POST", "body": "é" * 500}, max_request_bytes=1000)
    assert res["status"] == 200


@async_test
async def test_connection_refused_is_a_clear_fetch_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(FetchError, match="could not connect") as err:
        await fetch(f"http://127.0.0.1:{port}/", allow=("127.0.0.1",))
    assert type(err.value) is FetchError


@async_test
async def test_https_to_a_plain_http_server_fails_cleanly(http_server: LocalHTTPServer) -> None:
    with pytest.raises(FetchError) as err:
        await fetch(f"https://127.0.0.1:{http_server.port}/json")
    assert type(err.value) is FetchError


@async_test
async def test_https_to_http_redirect_is_refused(http_server: LocalHTTPServer) -> None:
    f = make()
    try:
        with pytest.raises(FetchDenied, match="https to plain http"):
            f._redirect_target(httpx.URL("https://api.test/a"), "http://api.test/b")
    finally:
        await f.aclose()


@async_test
async def test_concurrent_fetches_of_one_tenant(http_server: LocalHTTPServer) -> None:
    f = make()
    try:
        results = await asyncio.gather(*(
            f.fetch(f"http://api.test:{http_server.port}/echo?i={i}", None, allow_hosts=ALLOW, timeout_s=10)
            for i in range(30)))
    finally:
        await f.aclose()
    assert sorted(json.loads(r["body"])["path"] for r in results) == sorted(f"/echo?i={i}" for i in range(30))
    assert len(http_server.requests) == 30
