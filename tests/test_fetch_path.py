"""The fetch hot path (issue 18: supervisor CPU per fetch) keeps every guarantee it was made cheaper around.

What changed for speed, and what each test pins down:

* aiohttp is given no session-wide ``skip_auto_headers``: the request on the wire must still carry
  exactly our headers (no aiohttp User-Agent, Accept or Accept-Encoding, no invented Content-Type);
* a body that arrived with its head is taken in one piece instead of iterated: the cap, the bounded
  inflate and the decode errors must hold on that path as on the streaming one;
* the tenant's memo keeps the parsed target and the verdict on an IP literal: a hit must never
  outlive the allowlist it was made under, nor cross tenants;
* the socket check compares the vetted strings first and only then by value;
* the capacity slot is taken and given back without a generator context manager: a fetch cancelled
  while it queues leaves nothing held.

Against a raw recording server on 127.0.0.1 (it keeps every header line as sent, duplicates included),
under :class:`LoopbackOnlyBackend`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from actionpool.runner._config import FetchConfig
from actionpool.runner._errors import FetchDenied, FetchError
from actionpool.runner._fetch import Fetcher
from actionpool.runner._fetch_capacity import CapacityTable
from actionpool.runner._fetch_client import PINS, TenantClient
from net_fixtures import LoopbackOnlyBackend, Resolver, loopback_server

LOOPBACK = "127.0.0.1"
ALLOW = (LOOPBACK,)
CAP = 64 << 10


def _gzip(data: bytes) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return comp.compress(data) + comp.flush()


@dataclass
class Raw:
    """Answers by path, each answer written with one ``write`` (head and body together); keeps request heads."""

    port: int = 0
    heads: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            path = lines[0].split(" ")[1]
            pairs = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
            length = int(dict(pairs).get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            self.heads.append(pairs)
            writer.write(self._answer(path))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _answer(path: str) -> bytes:
        ok = b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
        if path == "/gzip":          # 1 KiB of text, gzipped, with its length
            body = _gzip(b"hello " * 170)
            return ok + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        if path == "/gzip-bomb":     # a few KiB that inflate far past the cap, all in one write
            body = _gzip(b"\0" * (CAP * 64))
            return ok + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        if path == "/bad-gzip":
            return ok + b"Content-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"
        if path == "/chunked-over":  # over the cap, no Content-Length, the whole chunked body in one write
            piece = b"x" * (CAP // 4)
            return ok + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
                b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(5)) + b"0\r\n\r\n"
        if path == "/exactly-cap":
            return ok + b"Content-Length: %d\r\n\r\n" % CAP + b"y" * CAP
        return ok + b"Content-Length: 2\r\n\r\nok"


@asynccontextmanager
async def raw_server() -> AsyncIterator[Raw]:
    up = Raw()
    async with loopback_server(up.handle) as up.port:
        yield up


def make(resolver: Resolver | None = None, **cfg: Any) -> Fetcher:
    return Fetcher(FetchConfig(**{"max_response_bytes": CAP, **cfg}), resolver=resolver,
                   connect_check=LoopbackOnlyBackend())


def names(head: list[tuple[str, str]]) -> list[str]:
    return sorted(k for k, _ in head)


# ------------------------------------------------------------------ headers on the wire


async def test_the_request_carries_exactly_our_headers_and_none_of_aiohttps() -> None:
    async with raw_server() as up:
        f = make()
        try:
            await f.fetch(f"{up.base}/", None, allow_hosts=ALLOW, timeout_s=5)
            await f.fetch(f"{up.base}/", {"method": "POST", "body": "{}"}, allow_hosts=ALLOW, timeout_s=5)
            await f.fetch(f"{up.base}/", {"method": "POST", "body": "{}", "headers": {
                "Content-Type": "application/json", "User-Agent": "mine/2", "Accept": "text/plain",
                "Accept-Encoding": "br"}}, allow_hosts=ALLOW, timeout_s=5)
        finally:
            await f.aclose()
    get, post, own = up.heads
    assert dict(get) == {"host": f"{LOOPBACK}:{up.port}", "user-agent": "actionpool-fetch/1", "accept": "*/*",
                         "accept-encoding": "gzip, deflate", "connection": "close"}
    assert names(get) == sorted(dict(get))  # no header twice
    # a body without a type gets none (aiohttp alone would say application/octet-stream)
    assert "content-type" not in dict(post) and dict(post)["content-length"] == "2"
    assert names(post) == sorted(dict(post))
    # the action's own User-Agent and Accept replace ours (once each); Accept-Encoding stays ours
    assert dict(own)["content-type"] == "application/json" and dict(own)["user-agent"] == "mine/2"
    assert dict(own)["accept"] == "text/plain" and dict(own)["accept-encoding"] == "gzip, deflate"
    assert names(own) == sorted(dict(own))


# ------------------------------------------------------------------ a body that came with its head


async def test_a_body_that_came_with_its_head_is_inflated_and_capped_like_a_streamed_one() -> None:
    async with raw_server() as up:
        f = make()
        try:
            res = await f.fetch(f"{up.base}/gzip", None, allow_hosts=ALLOW, timeout_s=5)
            assert res["body"] == "hello " * 170 and res["headers"]["content-encoding"] == "gzip"
            with pytest.raises(FetchError, match=f"exceeds {CAP} bytes"):
                await f.fetch(f"{up.base}/gzip-bomb", None, allow_hosts=ALLOW, timeout_s=5)
            with pytest.raises(FetchError, match=f"exceeds {CAP} bytes"):
                await f.fetch(f"{up.base}/chunked-over", None, allow_hosts=ALLOW, timeout_s=5)
            with pytest.raises(FetchError, match="could not decode the gzip response body"):
                await f.fetch(f"{up.base}/bad-gzip", None, allow_hosts=ALLOW, timeout_s=5)
            exact = await f.fetch(f"{up.base}/exactly-cap", None, allow_hosts=ALLOW, timeout_s=5)
            assert exact["body"] == "y" * CAP  # the cap itself is allowed
        finally:
            await f.aclose()


async def test_a_reply_is_measured_exactly_when_the_quick_bound_does_not_fit() -> None:
    async with raw_server() as up:
        f = make()
        try:
            # CAP characters could be 4 bytes each: the quick bound (4 * CAP + overhead) does not fit
            # 2 * CAP, so the body is encoded and measured (CAP bytes of ASCII): it fits.
            res = await f.fetch(f"{up.base}/exactly-cap", None, allow_hosts=ALLOW, timeout_s=5,
                                max_reply_bytes=2 * CAP)
            assert len(res["body"]) == CAP
            with pytest.raises(FetchError, match="does not fit in one reply"):
                await f.fetch(f"{up.base}/exactly-cap", None, allow_hosts=ALLOW, timeout_s=5, max_reply_bytes=CAP)
        finally:
            await f.aclose()


# ------------------------------------------------------------------ the memo


async def test_a_remembered_verdict_never_outlives_its_allowlist_nor_crosses_tenants() -> None:
    async with raw_server() as up:
        f = make(resolver=Resolver({"api.test": [LOOPBACK]}))
        try:
            url = f"{up.base}/"
            for _ in range(2):  # the second one is answered from tenant a's memo
                assert (await f.fetch(url, None, allow_hosts=ALLOW, timeout_s=5, tenant="a"))["status"] == 200
            with pytest.raises(FetchDenied, match="not on the fetch allowlist"):  # same URL, allowlist changed
                await f.fetch(url, None, allow_hosts=("api.test",), timeout_s=5, tenant="a")
            with pytest.raises(FetchDenied, match="not on the fetch allowlist"):  # another tenant's allowlist
                await f.fetch(url, None, allow_hosts=("other.test",), timeout_s=5, tenant="b")
            # a name is never taken for a literal: api.test resolves to 127.0.0.1, which this allowlist lacks
            named = f"http://api.test:{up.port}/"
            with pytest.raises(FetchDenied, match="non-public address 127.0.0.1"):
                await f.fetch(named, None, allow_hosts=("api.test",), timeout_s=5, tenant="a")
            assert (await f.fetch(named, None, allow_hosts=("api.test", LOOPBACK), timeout_s=5,
                                  tenant="a"))["status"] == 200
        finally:
            await f.aclose()
    assert len(up.heads) == 3


# ------------------------------------------------------------------ the socket check


async def test_the_socket_check_compares_by_value_when_the_spelling_differs() -> None:
    client = TenantClient(FetchConfig(), ssl.create_default_context())
    info = (socket.AF_INET, socket.SOCK_STREAM, 0, "", (LOOPBACK, 80))
    try:
        token = PINS.set({("api.test", 80): ("::ffff:127.0.0.1",)})  # the same address, IPv4-mapped
        try:
            client._socket(info).close()
        finally:
            PINS.reset(token)
        token = PINS.set({})
        try:
            with pytest.raises(OSError, match="not a vetted address"):
                client._socket(info)
        finally:
            PINS.reset(token)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ capacity slots


async def test_a_fetch_cancelled_while_it_queues_holds_nothing() -> None:
    cfg = FetchConfig(max_concurrent_per_tenant=1, max_queued_per_tenant=1)
    closed: list[str] = []

    class Pool:
        async def aclose(self) -> None:
            closed.append("pool")

    table = CapacityTable(cfg, Pool)
    first = await table.acquire("a")
    waiter = asyncio.ensure_future(table.acquire("a"))
    for _ in range(1000):  # let it reach the queue (a bounded poll, no timing)
        if first.fetches._waiting:
            break
        await asyncio.sleep(0)
    assert first.active == 2 and first.fetches._waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert first.active == 1
    table.forget("a")          # in use: closed by the last release
    assert closed == []
    table.release(first)
    assert first.active == 0 and not first.fetches.busy
    await table.aclose()
    assert closed == ["pool"]
