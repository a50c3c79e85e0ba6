"""The fetch client (runner/_fetch_client.py, aiohttp) keeps every guarantee of api.fetch (issue 18).

Against a recording HTTP/1.1 server on 127.0.0.1 in the test's own loop: it
sees each request's client port, so a test can tell a pooled connection
from a new one and one tenant's connection from another's. Every Fetcher
connects under :class:`LoopbackOnlyBackend`, which fails the test instead of
leaving the machine.

127.0.0.1 is a non-public address: fetches to it are sent ``Connection:
close`` and never pooled. The tests of the pooled path stand the loopback
address in for a public upstream by treating it as public in the policy
(``as_public``); the pin, the socket check and every other gate still run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

import actionpool.runner._fetch as fetch_module
from actionpool.runner._config import FetchConfig
from actionpool.runner._errors import FetchDenied, FetchError
from actionpool.runner._fetch import Fetcher
from actionpool.runner._fetch_client import PINS, PinnedResolver, TenantClient
from net_fixtures import LoopbackOnlyBackend, Resolver, loopback_server

LOOPBACK = "127.0.0.1"


@dataclass
class Seen:
    port: int                 # the client's port: one per connection
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Upstream:
    """Routes: /ok, /cookie (sets one), /slow (300 ms), /bomb?mb=N (gzip, chunked), /big?bytes=N (chunked),
    /head?n=N (N extra header lines), /redirect?to=URL."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    open: int = 0             # connections open right now
    peak: int = 0             # most connections open at once

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if int(headers.get("content-length", "0") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                self.seen.append(Seen(port, method, path, headers))
                close = headers.get("connection", "").lower() == "close"
                await self._answer(writer, path, close)
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, path: str, close: bool) -> None:
        tail = b"Connection: close\r\n" if close else b""
        route, _, query = path.partition("?")
        arg = query.partition("=")[2]
        if route == "/slow":
            await asyncio.sleep(0.3)
        if route in ("/bomb", "/big"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + tail +
                         (b"Content-Encoding: gzip\r\n" if route == "/bomb" else b"") + b"\r\n")
            if route == "/bomb":  # N MiB of zeros as one gzip member, compressed as it is sent
                comp = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
                pieces = [comp.compress(b"\0" * (1 << 20)) for _ in range(int(arg or 64))] + [comp.flush()]
            else:
                pieces = [b"x" * 65536 for _ in range(int(arg or 0) // 65536)]
            for piece in pieces:
                if piece:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            extra = b""
            if route == "/cookie":
                extra = b"Set-Cookie: sid=tenant-secret; Path=/\r\n"
            elif route == "/head":
                extra = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 20) for i in range(int(arg)))
            elif route == "/redirect":
                extra = b"Location: " + arg.encode() + b"\r\n"
            status = b"302 Found" if route == "/redirect" else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n" + extra + tail + b"\r\nok")
        await writer.drain()


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    async with loopback_server(up.handle, limit=1 << 20) as up.port:
        yield up




@pytest.fixture
def as_public(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """127.0.0.1 stands in for a public upstream: the policy treats it as public (so its connections pool)."""
    real = fetch_module._is_internal
    monkeypatch.setattr(fetch_module, "_is_internal", lambda a: False if a == ipaddress.ip_address(LOOPBACK) else real(a))
    yield


def make(trap: LoopbackOnlyBackend | None = None, resolver: Resolver | None = None, **cfg: Any) -> Fetcher:
    return Fetcher(FetchConfig(**cfg), resolver=resolver, connect_check=trap or LoopbackOnlyBackend())


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ the pin


async def test_a_host_whose_answer_is_not_allowed_is_never_connected() -> None:
    trap = LoopbackOnlyBackend()
    async with upstream() as up:
        resolver = Resolver({"evil.test": ["10.0.0.7"], "sneaky.test": [LOOPBACK]})
        f = make(trap, resolver)
        try:
            with pytest.raises(FetchDenied, match="non-public address 10.0.0.7"):
                await f.fetch(f"http://evil.test:{up.port}/ok", None, allow_hosts=("evil.test",), timeout_s=5)
            # 127.0.0.1 is not listed: a name that resolves to it is refused too.
            with pytest.raises(FetchDenied, match="non-public address 127.0.0.1"):
                await f.fetch(f"http://sneaky.test:{up.port}/ok", None, allow_hosts=("sneaky.test",), timeout_s=5)
        finally:
            await f.aclose()
        assert trap.refused == [] and trap.connected == [] and up.seen == []


async def test_the_connection_goes_to_the_vetted_address_and_dns_is_asked_once() -> None:
    trap = LoopbackOnlyBackend()
    async with upstream() as up:
        # api.test is not in real DNS: reaching the server proves the connect used the vetted address.
        resolver = Resolver({"api.test": [LOOPBACK]})
        f = make(trap, resolver)
        try:
            res = await f.fetch(f"http://api.test:{up.port}/ok", None, allow_hosts=("api.test", LOOPBACK),
                                timeout_s=5)
        finally:
            await f.aclose()
    assert res["status"] == 200 and res["body"] == "ok"
    assert resolver.calls == ["api.test"] and trap.connected == [f"{LOOPBACK}:{up.port}"]
    assert up.seen[0].headers["host"] == f"api.test:{up.port}"


async def test_rebinding_after_the_check_changes_nothing() -> None:
    """The answer changes to a forbidden address after the check: the connect still uses the vetted one."""
    trap = LoopbackOnlyBackend()
    async with upstream() as up:
        resolver = Resolver({"flip.test": [LOOPBACK]})
        f = make(trap, resolver, dns_cache_s=0.0)
        try:
            first = await f.fetch(f"http://flip.test:{up.port}/ok", None, allow_hosts=("flip.test", LOOPBACK),
                                  timeout_s=5)
            resolver.table["flip.test"] = ["10.9.9.9"]  # the "rebinding"
            with pytest.raises(FetchDenied, match="10.9.9.9"):
                await f.fetch(f"http://flip.test:{up.port}/ok", None, allow_hosts=("flip.test", LOOPBACK),
                              timeout_s=5)
        finally:
            await f.aclose()
    assert first["status"] == 200 and trap.refused == [] and len(up.seen) == 1


async def test_without_a_pin_nothing_resolves_and_no_socket_is_made() -> None:
    with pytest.raises(OSError, match="no vetted address"):
        await PinnedResolver().resolve("api.test", 80)
    client = TenantClient(FetchConfig(), ssl.create_default_context())
    try:
        info = (socket.AF_INET, socket.SOCK_STREAM, 0, "", (LOOPBACK, 80))
        with pytest.raises(OSError, match="not a vetted address"):
            client._socket(info)
        token = PINS.set({("api.test", 80): ("127.0.0.2",)})
        try:
            with pytest.raises(OSError, match="not a vetted address"):  # pinned, but to another address
                client._socket(info)
            assert await PinnedResolver().resolve("api.test", 80) == [{
                "hostname": "api.test", "host": "127.0.0.2", "port": 80, "family": socket.AF_INET,
                "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}]
        finally:
            PINS.reset(token)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ caps while streaming


async def test_a_gzip_bomb_stops_at_the_cap_while_it_streams() -> None:
    async with upstream() as up:
        f = make(max_response_bytes=1 << 20)
        try:
            t0 = time.monotonic()
            with pytest.raises(FetchError, match="exceeds 1048576 bytes"):
                await f.fetch(f"{up.base}/bomb?mb=64", None, allow_hosts=(LOOPBACK,), timeout_s=20)
            with pytest.raises(FetchError, match="exceeds 1048576 bytes"):  # chunked, no Content-Length
                await f.fetch(f"{up.base}/big?bytes={4 << 20}", None, allow_hosts=(LOOPBACK,), timeout_s=20)
            assert time.monotonic() - t0 < 20
            ok = await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5)
            assert ok["body"] == "ok"
        finally:
            await f.aclose()


async def test_the_response_head_is_capped_in_lines_and_bytes() -> None:
    async with upstream() as up:
        f = make(max_response_header_lines=50, max_response_head_bytes=4096)
        try:
            ok = await f.fetch(f"{up.base}/head?n=40", None, allow_hosts=(LOOPBACK,), timeout_s=5)
            assert ok["headers"]["x-filler-39"] == "v" * 20
            with pytest.raises(FetchError, match="exceeds 50 header lines or 4096 bytes"):
                await f.fetch(f"{up.base}/head?n=60", None, allow_hosts=(LOOPBACK,), timeout_s=5)
        finally:
            await f.aclose()
        f = make(max_response_header_lines=500, max_response_head_bytes=2048)
        try:
            with pytest.raises(FetchError, match="exceeds 500 header lines or 2048 bytes"):
                await f.fetch(f"{up.base}/head?n=100", None, allow_hosts=(LOOPBACK,), timeout_s=5)
        finally:
            await f.aclose()


# ------------------------------------------------------------------ redirects


async def test_every_redirect_hop_passes_the_same_gates() -> None:
    trap = LoopbackOnlyBackend()
    async with upstream() as up:
        resolver = Resolver({"api.test": [LOOPBACK], "inside.test": ["10.1.1.1"]})
        f = make(trap, resolver)
        allow = ("api.test", "inside.test", LOOPBACK)
        try:
            res = await f.fetch(f"http://api.test:{up.port}/redirect?to=/ok", None, allow_hosts=allow, timeout_s=5)
            assert res["status"] == 200 and [s.path for s in up.seen] == ["/redirect?to=/ok", "/ok"]
            with pytest.raises(FetchDenied, match="10.1.1.1"):  # the next hop's address is refused
                await f.fetch(f"http://api.test:{up.port}/redirect?to=http://inside.test:{up.port}/ok", None,
                              allow_hosts=allow, timeout_s=5)
            with pytest.raises(FetchDenied, match="not on the fetch allowlist"):
                await f.fetch(f"http://api.test:{up.port}/redirect?to=http://other.test/ok", None,
                              allow_hosts=allow, timeout_s=5)
        finally:
            await f.aclose()
    assert "other.test" not in resolver.calls and trap.refused == []
    assert len(up.seen) == 4  # the two refused hops were never sent


# ------------------------------------------------------------------ Connection: close to non-public addresses


async def test_a_listed_non_public_address_gets_connection_close_and_no_pooling() -> None:
    async with upstream() as up:
        f = make()
        try:
            for _ in range(3):
                res = await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant="A")
                assert res["status"] == 200
            await wait_for(lambda: up.open == 0)  # nothing kept open to it
        finally:
            await f.aclose()
    assert [s.headers.get("connection") for s in up.seen] == ["close"] * 3
    assert len({s.port for s in up.seen}) == 3  # a connection of its own each time


# ------------------------------------------------------------------ the pooled path, per tenant


async def test_pooled_connections_are_reused_within_a_tenant_only(as_public: None) -> None:
    async with upstream() as up:
        f = make()
        try:
            for tenant in ("A", "A", "B", "B", "A"):
                res = await f.fetch(f"{up.base}/cookie", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant=tenant)
                assert "sid=tenant-secret" in res["headers"]["set-cookie"]
        finally:
            await f.aclose()
    ports = [s.port for s in up.seen]
    assert "connection" not in up.seen[0].headers           # public: keep-alive
    assert ports[0] == ports[1] == ports[4]                 # tenant A reuses its connection
    assert ports[2] == ports[3] and ports[2] != ports[0]    # tenant B has its own
    assert all("cookie" not in s.headers for s in up.seen)  # no cookie jar, in any tenant


async def test_a_tenants_pool_is_bounded_in_connections_and_idle_ones(as_public: None) -> None:
    async with upstream() as up:
        f = make(max_concurrent_per_tenant=4, max_queued_per_tenant=64, max_keepalive_per_tenant=2)
        try:
            results = await asyncio.gather(*(f.fetch(f"{up.base}/slow", None, allow_hosts=(LOOPBACK,), timeout_s=10,
                                                     tenant="A") for _ in range(12)))
            assert all(r["status"] == 200 for r in results)
            assert up.peak <= 4                       # never more connections than the tenant's slots
            await wait_for(lambda: up.open <= 2)      # at most max_keepalive_per_tenant stay open idle
            other = await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant="B")
            assert other["status"] == 200
            assert f.tenant_pools == 2
        finally:
            await f.aclose()
        await wait_for(lambda: up.open == 0)          # closing the Fetcher closes every connection


async def test_forgetting_a_tenant_closes_its_connections(as_public: None) -> None:
    async with upstream() as up:
        f = make()
        try:
            await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant="A")
            await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant="B")
            await wait_for(lambda: up.open == 2)
            f.forget_tenant("A")
            await wait_for(lambda: up.open == 1)      # B's connection stays
            await f.fetch(f"{up.base}/ok", None, allow_hosts=(LOOPBACK,), timeout_s=5, tenant="A")
            assert up.seen[2].port not in (up.seen[0].port, up.seen[1].port)  # A starts afresh
        finally:
            await f.aclose()


# ------------------------------------------------------------------ TLS through the pin


def _self_signed(tmp: Any, name: str) -> tuple[str, str]:
    """A certificate for ``name`` (and its key), PEM files under ``tmp``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_tls_checks_the_certificate_against_the_url_host_not_the_pinned_address(tmp_path: Any) -> None:
    cert, key = _self_signed(tmp_path, "api.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    up = Upstream()
    server = await asyncio.start_server(up.handle, LOOPBACK, 0, ssl=server_ctx)
    up.port = server.sockets[0].getsockname()[1]
    resolver = Resolver({"api.test": [LOOPBACK], "other.test": [LOOPBACK]})
    f = Fetcher(FetchConfig(), resolver=resolver, ssl_context=client_ctx, connect_check=LoopbackOnlyBackend())
    allow = ("api.test", "other.test", LOOPBACK)
    try:
        res = await f.fetch(f"https://api.test:{up.port}/ok", None, allow_hosts=allow, timeout_s=5)
        assert res["status"] == 200 and res["body"] == "ok"
        # Same pinned address, another name: the certificate (for api.test) does not match it.
        with pytest.raises(FetchError, match="other.test"):
            await f.fetch(f"https://other.test:{up.port}/ok", None, allow_hosts=allow, timeout_s=5)
    finally:
        await f.aclose()
        server.close()
        await server.wait_closed()
    assert [s.headers["host"] for s in up.seen] == [f"api.test:{up.port}"]
