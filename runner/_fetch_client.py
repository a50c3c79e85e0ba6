"""The HTTP client under ``api.fetch``: one aiohttp session per tenant, connecting to pinned addresses only.

Why aiohttp and not httpx (the design card's first choice): with 500
concurrent GETs to a local 50 ms server, httpcore's connection pool spends
its time re-scanning every connection for every request (``is_idle`` and a
``getpeername`` per connection per assignment): 40 req/s and 12 s of CPU,
against aiohttp's ~5,000 req/s and 0.08 s (docs/design.md, "The fetch
client"). aiohttp parses responses in C (llhttp), keeps its pool in dicts
and deques, and gives the two seams the SSRF pin needs:

* a resolver (:class:`PinnedResolver`) that never asks DNS: it returns the
  addresses the policy already vetted for this request, read from a context
  variable, and fails closed when there are none;
* a socket factory that checks, right before ``connect``, that the address
  is one of the vetted ones (a second lock on the same door: an address that
  did not come from the policy is never connected to).

The URL keeps its host name, so Host, SNI, certificate checks and the pool's
key stay the normal ones; only the address lookup is replaced.

Per tenant, nothing shared: its own connector (pool, at most
``max_concurrent_per_tenant`` connections, at most
``max_keepalive_per_tenant`` of them idle), no cookie jar (``DummyCookieJar``),
no automatic decompression (the caller inflates with a cap), response heads
capped by aiohttp's parser (``max_headers``, line and field sizes). aiohttp adds
no request header of its own: the Fetcher always sends User-Agent, Accept and
Accept-Encoding, and asks per request to leave out Content-Type (no session-wide
``skip_auto_headers``, which aiohttp would rebuild as a sorted multidict on
every request).
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from ._config import FetchConfig

__all__ = ["PINS", "PinnedResolver", "TenantClient", "ConnectCheck"]

# (host as in the URL, port) -> vetted addresses, for the request in flight (set by the Fetcher).
PINS: contextvars.ContextVar[dict[tuple[str, int], tuple[str, ...]]] = contextvars.ContextVar("actionpool_fetch_pins")

# Called with (address, port) right before every connect (tests: fail instead of leaving loopback).
ConnectCheck = Callable[[str, int], None]

KEEPALIVE_S = 30.0
# aiohttp's per-line limit for the status line and each header; the head as a whole is capped by the caller.
MAX_LINE_BYTES = 8190


def _same(ip: str) -> str:
    """One spelling per address, so a socket address compares equal to the vetted string."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


def _vetted(ip: str) -> bool:
    """Is ``ip`` one of the addresses vetted for the request in flight?

    The resolver hands aiohttp the vetted strings themselves, so the socket address is almost always
    one of them verbatim: that is checked first (no parsing); any other spelling is compared by value.
    """
    pins = PINS.get(None)
    if not pins:
        return False
    if any(ip in ips for ips in pins.values()):
        return True
    want = _same(ip)
    return any(want in {_same(v) for v in ips} for ips in pins.values())


class PinnedResolver(AbstractResolver):
    """Answers with the vetted addresses of the current request; never performs a lookup."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        ips = PINS.get({}).get((host, port))
        if not ips:
            raise OSError(f"no vetted address for {host}:{port}; refusing to connect")
        return [{"hostname": host, "host": ip, "port": port,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV} for ip in ips]

    async def close(self) -> None:
        return None


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector that keeps at most ``max_idle`` idle (keep-alive) connections in all."""

    def __init__(self, *, max_idle: int, **kw: Any) -> None:
        super().__init__(**kw)
        self._max_idle = max_idle

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        conns = getattr(self, "_conns", None)  # aiohttp's idle connections: key -> deque of (protocol, since)
        if not conns:
            return
        idle = sum(len(q) for q in conns.values())
        while idle > self._max_idle:
            q = conns.get(key)
            if not q:
                break
            proto, _ = q.popleft()  # the oldest idle one of this origin
            if not q:
                del conns[key]
            proto.close()
            idle -= 1


class TenantClient:
    """One tenant's connection pool: aiohttp sessions over pinned, bounded connectors.

    ``session(close=True)`` is for non-public destinations (reachable only
    because the operator listed the literal IP): its connector sends
    ``Connection: close`` and never keeps a connection, so nothing to such a
    host is ever pooled. aiohttp decides pooling on the response alone, so a
    ``Connection: close`` request header is not enough by itself. ``aclose``
    closes every connection; the capacity table calls it when the tenant's
    entry is evicted or forgotten.
    """

    def __init__(self, config: FetchConfig, ssl_context: ssl.SSLContext,
                 connect_check: ConnectCheck | None = None) -> None:
        self._config = config
        self._ssl = ssl_context
        self._check = connect_check
        self._pooled = self._new_session(force_close=False)
        self._closing: aiohttp.ClientSession | None = None  # made on first use: most tenants never need it

    def session(self, *, close: bool) -> aiohttp.ClientSession:
        if not close:
            return self._pooled
        if self._closing is None:
            self._closing = self._new_session(force_close=True)
        return self._closing

    def _new_session(self, *, force_close: bool) -> aiohttp.ClientSession:
        n = self._config.max_concurrent_per_tenant
        connector = _Connector(
            max_idle=min(n, self._config.max_keepalive_per_tenant),
            limit=n, limit_per_host=0, use_dns_cache=False, resolver=PinnedResolver(), ssl=self._ssl,
            keepalive_timeout=None if force_close else KEEPALIVE_S, force_close=force_close,
            socket_factory=self._socket, happy_eyeballs_delay=0.25,
        )
        line = min(MAX_LINE_BYTES, self._config.max_response_head_bytes)
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None),
            max_headers=self._config.max_response_header_lines, max_line_size=line, max_field_size=line,
            requote_redirect_url=False, raise_for_status=False,
        )

    def _socket(self, addr_info: Any) -> socket.socket:
        """Creates the socket for ``connect``; an address that was not vetted for this request is refused."""
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        if not _vetted(host):
            raise OSError(f"{host} is not a vetted address for this fetch; refusing to connect")
        if self._check is not None:
            self._check(host, port)
        return socket.socket(family, type_, proto)

    async def aclose(self) -> None:
        await self._pooled.close()
        if self._closing is not None:
            await self._closing.close()
