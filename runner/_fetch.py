"""``api.fetch`` on the trusted side: outbound HTTP on behalf of an action.

The worker has no network; every request is made here, after three gates:

1. the URL itself (http/https only, no userinfo, a real host and port);
2. the tenant's allowlist, checked on the *name* before any DNS lookup, so a
   denied host costs no packet at all (the reference promises that);
3. SSRF: the name is resolved once, every address is vetted, and the
   connection is made to a vetted address only (the pin). The URL keeps its
   host name, so the Host header, SNI and certificate checks are the normal
   ones; only the address lookup is replaced, by a resolver that reads the
   pin of the current request from a context variable, and the socket is
   created only for a vetted address (``_fetch_client``). A host without a
   pin cannot be connected to at all (fail closed), so DNS rebinding between
   check and connect is impossible.

Redirects are followed by hand so that every hop passes the same gates.
Destinations that are not public addresses (reachable only because the
operator listed the literal IP) are sent ``Connection: close``: such a
connection is never pooled.

The supervisor serves every tenant, so nothing here is shared between them or
unbounded: no cookie jar at all, a connection pool, fetch slots and DNS slots
per tenant (``_fetch_capacity``), the body capped while it streams (a gzip
bomb never inflates past the cap), and bodies decoded only in a short list of
charsets (:data:`CHARSETS`; anything else is UTF-8 with replacement
characters), so every step is linear in what the server sends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import ssl
import zlib
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import aiohttp
import httpcore
import httpx
import idna
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from ._config import FetchConfig
from ._errors import ConfigError, FetchDenied, FetchError, FetchTimeout
from ._fetch_capacity import BlockingResolver, CapacityTable, Resolver, TenantCapacity
from ._fetch_client import PINS, ConnectCheck, TenantClient
from ._fetch_stub import StubPool, compile_stub
from ._redact import install_log_redaction

__all__ = ["FetchError", "FetchDenied", "FetchTimeout", "Fetcher", "host_allowed", "check_allow_hosts"]

ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Dropped from the action's headers: hop-by-hop ones, and those this module owns
# (Host comes from the URL, Content-Length from the body, Accept-Encoding must
# stay one we can decode with a bound).
DROPPED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "accept-encoding",
})
# Request-body headers removed when a redirect turns the request into a GET (as fetch does).
BODY_HEADERS = ("content-type", "content-encoding", "content-language", "content-location")
# Credentials never follow a redirect to another origin.
CREDENTIAL_HEADERS = ("authorization", "cookie")
METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
})
MAX_URL_CHARS = 16384
MEMO_URL_CHARS = 1024  # longer URLs are checked every time, not remembered (bounds the per-tenant memo)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Control characters a header value may not carry (CR, LF, NUL and the rest; tab is fine), as RFC 9110 says.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# ---------------------------------------------------------------- host policy


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _canonical_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per address (an IPv4-mapped IPv6 address is its IPv4 address)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr.compressed)


def _normalise_host(host: str) -> str | None:
    """Lower-case ASCII (IDNA) form of a host name or canonical IP; None if invalid."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    addr = _ip(h)
    if addr is not None:
        return _canonical_ip(addr)
    h = h.rstrip(".").lower()
    if not h or ".." in h:
        return None
    if not h.isascii():
        try:
            h = idna.encode(h, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return h


_Allowlist = tuple[frozenset[str], tuple[str, ...]]  # (exact names and IPs, wildcard suffixes)


@lru_cache(maxsize=1024)
def _compile_allowlist(allow_hosts: tuple[str, ...]) -> _Allowlist:
    """(exact names and IPs, wildcard suffixes like ".example.com"); invalid entries match nothing."""
    exact: set[str] = set()
    suffixes: list[str] = []
    for entry in allow_hosts:
        if not isinstance(entry, str):
            continue
        e = entry.strip()
        if e.startswith("*."):
            base = _normalise_host(e[2:])
            if base is not None and _ip(base) is None:
                suffixes.append("." + base)
        else:
            n = _normalise_host(e)
            if n is not None:
                exact.add(n)
    return frozenset(exact), tuple(suffixes)


def host_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    """Is ``host`` on the allowlist?

    Exact entries match case-insensitively after IDNA normalisation (and IPs
    by value); ``*.example.com`` matches sub-domains at any depth but not
    ``example.com`` itself, and never an IP literal.
    """
    return _allowed(host, _compile_allowlist(tuple(allow_hosts)))


def _allowed(host: str, allow: _Allowlist) -> bool:
    """:func:`host_allowed` against an allowlist compiled already."""
    h = _normalise_host(host)
    if h is None:
        return False
    exact, suffixes = allow
    if h in exact:
        return True
    if _ip(h) is not None:
        return False
    return any(h.endswith(s) and len(h) > len(s) for s in suffixes)


def check_allow_hosts(entries: Iterable[str], where: str = "fetch.allow_hosts") -> None:
    """Raise ConfigError for an allowlist entry that could never match (for config validation)."""
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{where}: {entry!r} is not a host name")
        e = entry.strip()
        wildcard = e.startswith("*.")
        n = _normalise_host(e[2:] if wildcard else e)
        if n is None or "*" in n or "/" in n or ":" in n and _ip(n) is None:
            raise ConfigError(f"{where}: {entry!r} is not a host name, IP or '*.domain' pattern")
        if wildcard and _ip(n) is not None:
            raise ConfigError(f"{where}: {entry!r}: a wildcard cannot cover IP addresses")


def _is_internal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for anything that is not a plain public unicast address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and _is_internal(embedded):
            return True
    return (
        addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_multicast
        or addr.is_reserved or addr.is_unspecified or not addr.is_global
    )


# ------------------------------------------------------------ body decoding


class _BoundedInflate:
    """gzip/deflate decoding that never produces more than the caller has room for.

    A few KiB of gzip can inflate to gigabytes; ``max_length`` keeps every
    step bounded, so the cap is on decoded bytes held in memory.
    """

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        self._first = True
        self._d = zlib.decompressobj(zlib.MAX_WBITS | (0 if self._deflate else 16))

    def feed(self, data: bytes, room: int) -> bytes:
        try:
            out = self._d.decompress(data, room + 1)
        except zlib.error:
            if not (self._deflate and self._first):
                raise
            # "deflate" in the wild is often raw deflate without the zlib header.
            self._d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._d.decompress(data, room + 1)
        self._first = False
        return out

    def flush(self, room: int) -> bytes:
        return self._d.flush(room + 1)


# Response bodies are decoded only in these charsets (label -> Python codec). Anything else,
# including every other Python codec name (punycode, utf-7, idna, rot13...), is decoded as UTF-8
# with replacement characters: a server must not pick a decoder that is slow (CPython's punycode
# is quadratic), that raises, or that is not a text encoding at all. The table is looked up as
# is: ``codecs.lookup`` is never called with a server's string (its miss cache grows forever).
CHARSETS: dict[str, str] = {
    **dict.fromkeys(("utf-8", "utf8", "unicode-1-1-utf-8"), "utf-8"),
    **dict.fromkeys(("us-ascii", "ascii"), "ascii"),
    **dict.fromkeys(("iso-8859-1", "iso8859-1", "iso_8859-1", "latin-1", "latin1", "l1"), "latin-1"),
    **dict.fromkeys(("windows-1252", "cp1252", "x-cp1252"), "cp1252"),
}
MAX_CONTENT_TYPE_CHARS = 1024


def _charset(content_type: str | None) -> str:
    """The codec for a Content-Type's charset parameter; ``utf-8`` when absent or not in :data:`CHARSETS`."""
    if content_type:
        for part in content_type[:MAX_CONTENT_TYPE_CHARS].split(";")[1:]:
            name, _, value = part.partition("=")
            if name.strip().lower() == "charset":
                return CHARSETS.get(value.strip().strip('"').strip().lower(), "utf-8")
    return "utf-8"


# ------------------------------------------------------------------ fetcher

log = logging.getLogger("actionpool.fetch")

# Sent unless the action gives its own (Accept-Encoding is always ours: only what we can bound).
DEFAULT_HEADERS = (("user-agent", "actionpool-fetch/1"), ("accept", "*/*"))
ACCEPT_ENCODING = ("accept-encoding", "gzip, deflate")
# Sent as they are when the action gives no header (the usual case): built once, read-only.
_PLAIN_HEADERS = CIMultiDictProxy(CIMultiDict([*DEFAULT_HEADERS, ACCEPT_ENCODING]))
_CLOSE_HEADERS = CIMultiDictProxy(CIMultiDict([*DEFAULT_HEADERS, ACCEPT_ENCODING, ("connection", "close")]))
# aiohttp would add "Content-Type: application/octet-stream" to a body the action sent without a type.
SKIP_CONTENT_TYPE = ("Content-Type",)
# Room for the reply's envelope (msgpack map keys, status, message ids) within one frame.
REPLY_OVERHEAD_BYTES = 1024


class Fetcher:
    """One per runner: the policy gates above, over per-tenant capacity (see ``_fetch_capacity``).

    No cookie jar exists anywhere: a ``Set-Cookie`` reaches the action as a
    response header and is then forgotten, so nothing persists across
    executions or crosses tenants. With ``FetchConfig.stub`` set, every
    tenant's "pool" answers from the stub and no socket is ever opened.
    """

    def __init__(self, config: FetchConfig, *, resolver: Resolver | None = None,
                 blocking_resolver: BlockingResolver | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 connect_check: ConnectCheck | None = None) -> None:
        """``resolver``/``blocking_resolver`` replace DNS; ``connect_check(address, port)`` is called
        right before every connect, under the pin (tests: fail the test instead of leaving loopback)."""
        install_log_redaction()
        self._config = config
        self._ssl = ssl_context or httpx.create_ssl_context(trust_env=False)
        self._connect_check = connect_check
        if config.stub is not None:
            stub = StubPool(compile_stub(config.stub), config.stub_redact)
            make_pool: Callable[[], Any] = lambda: stub  # noqa: E731
        else:
            make_pool = self._make_pool
        self._capacity = CapacityTable(config, make_pool, resolver=resolver, blocking_resolver=blocking_resolver)

    def _make_pool(self) -> TenantClient:
        return TenantClient(self._config, self._ssl, self._connect_check)

    @property
    def tenant_pools(self) -> int:
        """How many tenants currently hold a pool (bounded by ``FetchConfig.max_tenant_pools``)."""
        return len(self._capacity)

    def forget_tenant(self, tenant: str) -> None:
        """Close ``tenant``'s connection pool and DNS answers (Runner.forget_tenant); in-flight fetches finish first."""
        self._capacity.forget(tenant)

    async def aclose(self) -> None:
        await self._capacity.aclose()

    async def fetch(self, url: str, init: dict | None, *, allow_hosts: tuple[str, ...], timeout_s: float,
                    tenant: str = "", max_reply_bytes: int | None = None) -> dict:
        """Make the request; ``{"status", "headers", "body"}`` for any HTTP status.

        ``timeout_s`` is the remaining budget (the runner's min of the fetch
        timeout and what remains of the action and flow); it covers waiting
        for the tenant's capacity, DNS, every redirect hop and reading the
        body. ``max_reply_bytes``: the result must fit one reply frame.
        """
        method, headers, body = self._parse_init(init)
        allow = _compile_allowlist(tuple(allow_hosts))  # once per fetch: every gate and memo key below uses it
        target = self._checked_url(tenant, url, allow)  # FetchDenied before anything else happens
        budget = min(float(timeout_s), float(self._config.timeout_s)) if not math.isnan(timeout_s) else 0.0
        if not budget > 0:
            raise FetchTimeout("no time left for api.fetch in this execution")
        try:
            async with asyncio.timeout(budget):
                cap = await self._capacity.acquire(tenant)
                try:
                    result = await self._follow(cap, target, method, headers, body, allow, budget)
                finally:
                    self._capacity.release(cap)
        except TimeoutError:
            raise FetchTimeout(f"api.fetch did not complete within {budget:.3g} s") from None
        if max_reply_bytes is not None:
            _check_reply_size(result, max_reply_bytes)
        return result

    # -- gates

    def _parse_init(self, init: dict | None) -> tuple[str, list[tuple[str, str]], bytes | None]:
        if init is None:
            init = {}
        if not isinstance(init, dict):
            raise FetchError("api.fetch: init must be an object (dict)")
        unknown = set(init) - {"method", "headers", "body"}
        if unknown:
            raise FetchError(f"api.fetch: unsupported init option(s): {', '.join(sorted(map(str, unknown)))} "
                             "(supported: method, headers, body)")
        method = init.get("method")
        method = "GET" if method is None else method
        if not isinstance(method, str) or method.upper() not in ALLOWED_METHODS:
            raise FetchError(f"api.fetch: method {method!r:.40} is not allowed "
                             f"(use one of {', '.join(sorted(ALLOWED_METHODS))})")
        method = method.upper()
        raw_headers = init.get("headers")
        headers: list[tuple[str, str]] = []
        if raw_headers is not None:
            if not isinstance(raw_headers, dict):
                raise FetchError("api.fetch: init.headers must be an object of string values")
            for name, value in raw_headers.items():
                if not isinstance(name, str) or not _TOKEN.match(name):
                    raise FetchError(f"api.fetch: invalid header name {name!r:.60}")
                if not isinstance(value, str):
                    raise FetchError(f"api.fetch: header {name!r:.60} must be a string, got {type(value).__name__}")
                if _CTL.search(value) or not value.isascii() and not _latin1(value):
                    raise FetchError(f"api.fetch: header {name!r:.60} has an invalid value")
                if name.lower() not in DROPPED_HEADERS:
                    headers.append((name, value))
        body = init.get("body")
        data: bytes | None = None
        if body is not None:
            if not isinstance(body, str):
                raise FetchError(f"api.fetch: init.body must be a string (serialise JSON with json.dumps), "
                                 f"got {type(body).__name__}")
            if method in ("GET", "HEAD"):
                raise FetchError(f"api.fetch: a {method} request cannot have a body")
            data = body.encode("utf-8")
            if len(data) > self._config.max_request_bytes:
                raise FetchError(f"api.fetch: request body exceeds {self._config.max_request_bytes} bytes")
        return method, headers, data

    def _checked_url(self, tenant: str, url: Any, allow: _Allowlist) -> _Target:
        """:meth:`_check_url`, answered from the tenant's memo of recent verdicts when it has one.

        What is remembered is the whole :class:`_Target` (the parsed URL, aiohttp's URL, host and
        port), so a hit costs no parsing at all."""
        cap = self._capacity.peek(tenant)
        if cap is None or type(url) is not str or len(url) > MEMO_URL_CHARS:
            return _Target(self._check_url(url, allow))
        key = ("url", url, allow)
        hit = cap.remembered(key)
        if hit is None:
            hit = _Target(self._check_url(url, allow))
            cap.remember(key, hit)
        return hit

    def _check_url(self, url: Any, allow: _Allowlist) -> httpx.URL:
        if not isinstance(url, (str, httpx.URL)):
            raise FetchDenied("api.fetch: url must be a string")
        if isinstance(url, str) and len(url) > MAX_URL_CHARS:
            raise FetchError(f"api.fetch: url longer than {MAX_URL_CHARS} characters")
        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise FetchDenied(f"api.fetch: invalid URL ({exc})") from None
        if u.scheme not in ("http", "https"):
            raise FetchDenied(f"api.fetch: only http and https URLs are allowed, got {u.scheme or 'none'!r}")
        if u.userinfo:
            raise FetchDenied("api.fetch: credentials in the URL (user:password@) are not allowed")
        if not u.raw_host:
            raise FetchDenied("api.fetch: the URL has no host")
        if u.port is not None and not 0 < u.port < 65536:
            raise FetchDenied(f"api.fetch: invalid port {u.port}")
        host = u.raw_host.decode("ascii")
        if not _allowed(host, allow):
            raise FetchDenied(f"api.fetch: host {host!r} is not on the fetch allowlist")
        return u

    async def _vet(self, cap: TenantCapacity, host: str, allow: _Allowlist) -> tuple[tuple[str, ...], bool]:
        """Resolve ``host`` (under the tenant's DNS cap) and vet every address; return (addresses, all public)."""
        # An IP literal's verdict is remembered under (host,) as its own answer; no name ever resolves
        # to itself, so a hit here is a literal, answered without parsing it again.
        hit = cap.remembered(("vet", host, (host,), allow))
        if hit is not None:
            return hit
        literal = _ip(host)
        if literal is not None:
            names = [host]
        else:
            try:
                names = await self._capacity.resolve(cap, host)
            except (OSError, UnicodeError) as exc:
                raise FetchError(f"api.fetch: could not resolve {host!r}: {exc}") from None
            if not names:
                raise FetchError(f"api.fetch: {host!r} has no addresses")
        key = ("vet", host, tuple(map(str, names)), allow)
        hit = cap.remembered(key)
        if hit is None:
            hit = self._vet_addresses(host, names, allow[0])
            cap.remember(key, hit)
        return hit

    @staticmethod
    def _vet_addresses(host: str, names: list[str], exact: frozenset[str]) -> tuple[tuple[str, ...], bool]:
        """Every address of ``host`` must be public, or listed by IP; never a metadata address."""
        out: list[str] = []
        public = True
        for name in names:
            addr = _ip(str(name).split("%", 1)[0])
            if addr is None:
                raise FetchError(f"api.fetch: resolver returned {name!r} for {host!r}, not an IP address")
            if addr in METADATA_ADDRESSES or (
                    isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped in METADATA_ADDRESSES):
                raise FetchDenied(f"api.fetch: {host!r} resolves to a cloud metadata address")
            if _is_internal(addr):
                if _canonical_ip(addr) not in exact:
                    raise FetchDenied(f"api.fetch: {host!r} resolves to the non-public address {addr}, "
                                      "which is not on the allowlist")
                public = False
            out.append(str(addr))
        return tuple(dict.fromkeys(out)), public

    # -- the request loop

    async def _follow(self, cap: TenantCapacity, target: _Target, method: str, headers: list[tuple[str, str]],
                      body: bytes | None, allow: _Allowlist, budget: float) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        stubbed = self._config.stub is not None
        nxt = target.url
        for hop in range(self._config.max_redirects + 1):
            if hop:
                target = _Target(self._check_url(nxt, allow))
            host = target.host
            with _mapped_errors(host, self._config):
                if stubbed:  # a stub never touches the network: nothing to resolve or pin
                    status, head, data = await self._stub_exchange(cap.pool, method, target.url, headers, body,
                                                                   max(deadline - loop.time(), 0.001))
                else:
                    ips, public = await self._vet(cap, host, allow)
                    token = PINS.set({(host, target.port): ips})
                    try:
                        status, head, data = await self._exchange(cap.pool, method, target, headers, body,
                                                                  close=not public)
                    finally:
                        PINS.reset(token)
            if data is None:  # a redirect with a Location: the next hop passes every gate again
                nxt = self._redirect_target(target.url, head.first("location") or "")
                method, body, headers = _redirected(status, method, body, headers,
                                                    same_origin=_origin(nxt) == _origin(target.url))
                continue
            log.debug("fetch %s %s -> %d (%d bytes)", method, target.url, status, len(data))
            return {
                "status": status,
                "headers": head.flat(),
                "body": data.decode(_charset(head.first("content-type")), errors="replace"),
            }
        raise FetchError(f"api.fetch: more than {self._config.max_redirects} redirects")

    async def _exchange(self, client: TenantClient, method: str, target: _Target, headers: list[tuple[str, str]],
                        body: bytes | None, *, close: bool) -> tuple[int, _Head, bytes | None]:
        """One request on the tenant's pool: (status, head, body), body None for a redirect to follow."""
        # aiohttp adds no header of its own: ours are always there (User-Agent, Accept, Accept-Encoding),
        # and Content-Type is left out for a body the action sent without one.
        resp = await client.session(close=close).request(
            method, target.aiohttp_url(), headers=_request_headers(headers, close), data=body,
            allow_redirects=False, skip_auto_headers=SKIP_CONTENT_TYPE if body is not None else None)
        try:
            head = _Head(_decode_headers(resp.raw_headers))
            if head.size > self._config.max_response_head_bytes:
                raise FetchError(_head_too_big(self._config))
            if resp.status in REDIRECT_STATUSES and head.first("location") is not None:
                resp.close()  # its body is not wanted: the connection is not reused
                return resp.status, head, None
            reader = self._body_reader(head, method)
            if reader is not None:
                content = resp.content
                if content.is_eof():  # the whole body came with the head (a small answer): take it as it is
                    reader.feed(content.read_nowait())
                else:
                    async for chunk in content.iter_any():
                        reader.feed(chunk)
                data = reader.finish()
            else:
                data = b""
        except BaseException:
            resp.close()
            raise
        resp.release()
        return resp.status, head, data

    async def _stub_exchange(self, stub: Any, method: str, url: httpx.URL, headers: list[tuple[str, str]],
                             body: bytes | None, timeout: float) -> tuple[int, _Head, bytes | None]:
        """The same exchange answered by ``FetchConfig.stub`` (offline mode)."""
        response = await stub.handle_async_request(_core_request(method, url, headers, body, timeout=timeout))
        try:
            head = _Head(_decode_headers(response.headers))
            if response.status in REDIRECT_STATUSES and head.first("location") is not None:
                return response.status, head, None
            reader = self._body_reader(head, method)
            if reader is None:
                return response.status, head, b""
            async for chunk in response.aiter_stream():
                reader.feed(chunk)
            return response.status, head, reader.finish()
        finally:
            await response.aclose()

    def _redirect_target(self, current: httpx.URL, location: str) -> httpx.URL:
        try:
            nxt = current.join(location)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise FetchError(f"api.fetch: invalid redirect location {location!r:.200} ({exc})") from None
        if current.scheme == "https" and nxt.scheme == "http":
            raise FetchDenied("api.fetch: refusing a redirect from https to plain http")
        return nxt

    def _body_reader(self, head: _Head, method: str) -> _Body | None:
        """What reads this response's body under the cap; None when there is none to read (HEAD)."""
        if method == "HEAD":
            return None
        cap = self._config.max_response_bytes
        encoding = (head.first("content-encoding") or "").strip().lower()
        inflate: _BoundedInflate | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            inflate = _BoundedInflate("deflate" if encoding == "deflate" else "gzip")
        elif encoding not in ("", "identity"):
            raise FetchError(f"api.fetch: unsupported response content-encoding {encoding!r:.60}")
        else:
            length = (head.first("content-length") or "").strip()
            if length.isdigit() and int(length) > cap:
                raise FetchError(_too_big(cap))
        return _Body(cap, inflate, encoding)


class _Target:
    """A URL that passed the gates, with what a request to it needs, worked out once.

    The tenant's memo keeps these, so a URL fetched again costs no parsing: neither httpx's nor
    aiohttp's (yarl) URL, nor the host and port.
    """

    __slots__ = ("_aiohttp_url", "host", "port", "url")

    def __init__(self, url: httpx.URL) -> None:
        self.url = url
        self.host = url.raw_host.decode("ascii")
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._aiohttp_url: yarl.URL | None = None

    def aiohttp_url(self) -> yarl.URL:
        """Exactly the URL the gates saw, not re-encoded (made on first use, inside the error mapping)."""
        if self._aiohttp_url is None:
            self._aiohttp_url = yarl.URL(str(self.url), encoded=True)
        return self._aiohttp_url


class _Head:
    """A response head, indexed once: lower-case name -> its values in order, and its size in bytes."""

    __slots__ = ("parts", "size")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        parts: dict[str, list[str]] = {}
        size = 0
        for k, v in raw:
            parts.setdefault(k.lower(), []).append(v)
            size += len(k) + len(v) + 4
        self.parts = parts
        self.size = size

    def first(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        values = self.parts.get(name)
        return values[0] if values else None

    def flat(self) -> dict[str, str]:
        """Lower-case names; repeated headers joined with ", " (once: linear in the number of repeats)."""
        return {k: v[0] if len(v) == 1 else ", ".join(v) for k, v in self.parts.items()}


def _too_big(cap: int) -> str:
    return f"api.fetch: response body exceeds {cap} bytes"


class _Body:
    """A response body as it streams: inflated with a bound, never more than ``cap`` decoded bytes held."""

    __slots__ = ("_cap", "_encoding", "_inflate", "_parts", "_size")

    def __init__(self, cap: int, inflate: _BoundedInflate | None, encoding: str) -> None:
        self._cap = cap
        self._inflate = inflate
        self._encoding = encoding
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                chunk = self._inflate.feed(chunk, self._cap - self._size)
            except zlib.error as exc:
                raise self._undecodable(exc) from None
        self._add(chunk)

    def finish(self) -> bytes:
        if self._inflate is not None:
            try:
                self._add(self._inflate.flush(self._cap - self._size))
            except zlib.error as exc:
                raise self._undecodable(exc) from None
        return b"".join(self._parts)  # one part (the usual small answer): that very object, no copy

    def _add(self, data: bytes) -> None:
        if self._size + len(data) > self._cap:
            raise FetchError(_too_big(self._cap))
        if data:
            self._parts.append(data)
            self._size += len(data)

    def _undecodable(self, exc: zlib.error) -> FetchError:
        return FetchError(f"api.fetch: could not decode the {self._encoding} response body ({exc})")


def _request_headers(headers: list[tuple[str, str]], close: bool) -> Any:
    """Our defaults unless the action gave its own, the action's headers, our Accept-Encoding, maybe close."""
    if not headers:  # the usual request: one shared, read-only set (aiohttp copies it into the request)
        return _CLOSE_HEADERS if close else _PLAIN_HEADERS
    given = {k.lower() for k, _ in headers}
    out = [(k, v) for k, v in DEFAULT_HEADERS if k not in given] + headers + [ACCEPT_ENCODING]
    if close:
        out.append(("connection", "close"))
    return out


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header bytes as text: ASCII, else UTF-8, else Latin-1, for the whole head (as httpx decodes them)."""
    pairs = list(raw)
    for encoding in ("ascii", "utf-8"):
        try:
            return [(k.decode(encoding), v.decode(encoding)) for k, v in pairs]
        except UnicodeDecodeError:
            continue
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs]


def _head_too_big(config: FetchConfig) -> str:
    return (f"api.fetch: the response head exceeds {config.max_response_header_lines} header lines or "
            f"{config.max_response_head_bytes} bytes")


def _core_request(method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes | None, *,
                  timeout: float) -> httpcore.Request:
    """The request as the fetch stub receives it (the stub keeps httpcore's request shape)."""
    hop = _request_headers(headers, False)
    pairs = hop.items() if isinstance(hop, CIMultiDictProxy) else hop
    raw = [(k.encode("ascii"), v.encode("latin-1", errors="replace")) for k, v in pairs]
    built = httpx.Request(method, url, headers=raw, content=body)  # adds Host and Content-Length
    return httpcore.Request(
        method=method.encode("ascii"),
        url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
        headers=built.headers.raw,
        content=body or b"",
        extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
    )


def _check_reply_size(result: dict, limit: int) -> None:
    """FetchError unless the result, as UTF-8 text, fits one reply frame (decoding can triple a body)."""
    # A character is at most 4 bytes of UTF-8: when even that bound fits (the usual small answer),
    # nothing is encoded just to be measured.
    bound = REPLY_OVERHEAD_BYTES + 4 * len(result["body"])
    bound += sum(4 * (len(k) + len(v)) + 8 for k, v in result["headers"].items())
    if bound <= limit:
        return
    size = len(result["body"].encode("utf-8")) + REPLY_OVERHEAD_BYTES
    size += sum(len(k) + len(v.encode("utf-8")) + 8 for k, v in result["headers"].items())
    if size > limit:
        raise FetchError(f"api.fetch: the response ({size} bytes as text) does not fit in one reply "
                         f"(at most {limit} bytes); ask the server for less")


class _mapped_errors:
    """Turn transport exceptions into FetchError with a message naming the host (timeouts pass: the caller's)."""

    def __init__(self, host: str, config: FetchConfig) -> None:
        self._host = host
        self._config = config

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (FetchError, TimeoutError)):
            return False
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise FetchError(f"api.fetch: could not connect to {self._host}: {exc.os_error or exc}") from None
        if isinstance(exc, aiohttp.ClientResponseError) and _head_error(str(exc.message)):
            raise FetchError(_head_too_big(self._config)) from None
        if isinstance(exc, (aiohttp.ClientError, httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError,
                            OSError, ValueError)):
            raise FetchError(f"api.fetch: request to {self._host} failed: "
                             f"{exc or type(exc).__name__}") from None
        return False


def _head_error(message: str) -> bool:
    """Is this aiohttp parser message one of the response-head caps (too many lines, a line too long)?"""
    m = message.lower()
    return "too many headers" in m or "got more than" in m or "line is too long" in m or "header value is too long" in m


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _origin(u: httpx.URL) -> tuple[str, bytes, int | None]:
    return (u.scheme, u.raw_host.lower(), u.port)


def _redirected(status: int, method: str, body: bytes | None, headers: list[tuple[str, str]],
                *, same_origin: bool) -> tuple[str, bytes | None, list[tuple[str, str]]]:
    """Method, body and headers of the next hop, following the fetch standard."""
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
        headers = [(k, v) for k, v in headers if k.lower() not in BODY_HEADERS]
    if not same_origin:
        headers = [(k, v) for k, v in headers if k.lower() not in CREDENTIAL_HEADERS]
    return method, body, headers
