"""Real network peers for tests: a local HTTP server and a private redis-server.

Imported by ``tests/conftest.py`` with ``from net_fixtures import *``. Both
listen on 127.0.0.1 only. The HTTP server records every request it sees, so
a test can prove that a denied fetch sent no packet (``server.requests == []``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import shutil
import socket
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import ipaddress
import pytest

__all__ = ["SeenRequest", "Resolver", "LocalHTTPServer", "http_server", "redis_server", "redis_server_optional", "redis_url",
           "free_port", "flush_redis", "LoopbackOnlyBackend", "rss_mb", "LoopLag", "p99", "loopback_server"]


@dataclass
class SeenRequest:
    method: str
    path: str                  # with the query string
    headers: dict[str, str]    # lower-cased names
    body: bytes


@dataclass
class LocalHTTPServer:
    url: str                   # "http://127.0.0.1:PORT"
    port: int
    requests: list[SeenRequest] = field(default_factory=list)


@contextlib.asynccontextmanager
async def loopback_server(handle: Any, **kw: Any) -> AsyncIterator[int]:
    """An asyncio server of ``handle(reader, writer)`` on 127.0.0.1; yields its port, closes it after."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0, **kw)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (callers retry on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackOnlyBackend:
    """The connect check of Fetchers in tests (``Fetcher(connect_check=...)``): 127.0.0.0/8 and ::1 only.

    Called with every address right before the socket connects. Any other
    address means the SSRF guard let something through; the test fails right
    there (``pytest.fail`` raises a BaseException no fetch code catches) and
    no packet leaves the machine. ``refused`` keeps the attempts,
    ``connected`` the addresses let through.
    """

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.connected: list[str] = []

    def __call__(self, host: str, port: int) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            self.refused.append(f"{host}:{port}")
            pytest.fail(f"a fetch tried to connect to {host}:{port}, which is not loopback: the guard let it through")
        self.connected.append(f"{host}:{port}")


class Resolver:
    """Injected DNS for a Fetcher: a table of answers, every lookup recorded (to assert none happened)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return self.table[host]


@functools.lru_cache(maxsize=8)
def _cookie_response(n: int) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"Content-Length: 0"] + [b"Set-Cookie: c%d=v%d; Path=/" % (i, i) for i in range(n)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Handler(BaseHTTPRequestHandler):
    """Routes: /json, /status/{code}, /slow?ms=N, /big?bytes=N[&chunked=1][&gzip=1],
    /redirect?to=URL[&status=302] (or ?loop=1: to itself), /echo, /charset?cs=NAME,
    /cookie?name=N&value=V (one Set-Cookie for the whole host), /cookies?n=N (N Set-Cookie headers),
    /text?bytes=N&cs=NAME[&gzip=1][&fill=HEX] (N bytes labelled charset NAME; ASCII letters or the byte HEX)."""

    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _any(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append(SeenRequest(self.command, self.path,
                                                {k.lower(): v for k, v in self.headers.items()}, body))
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        try:
            if path == "/json":
                self._send(200, json.dumps({"ok": True, "n": 1}).encode(), "application/json")
            elif path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                self._send(code, f"status {code}".encode(), "text/plain")
            elif path == "/slow":
                # The stop event lets teardown end the wait at once.
                self.server.stop.wait(int(q.get("ms", "1000")) / 1000)
                self._send(200, b"slow", "text/plain")
            elif path == "/big":
                self._big(int(q.get("bytes", "0")), q.get("chunked") == "1", q.get("gzip") == "1")
            elif path == "/redirect":
                self.send_response(int(q.get("status", "302")))
                self.send_header("Location", self.path if q.get("loop") == "1" else q.get("to", "/json"))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/echo":
                if "ms" in q:   # an upstream that answers later, with what it was asked
                    self.server.stop.wait(int(q["ms"]) / 1000)
                payload = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("utf-8", errors="replace"),
                }
                self._send(200, json.dumps(payload).encode(), "application/json")
            elif path == "/cookie":
                self.send_response(200)
                self.send_header("Set-Cookie", f"{q.get('name', 'sid')}={q.get('value', 'x')}; Path=/; Max-Age=3600")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/cookies":
                # One prebuilt write: server threads share this process's GIL with the loop under test.
                self.wfile.write(_cookie_response(int(q.get("n", "1000"))))
            elif path == "/text":
                n = int(q.get("bytes", "0"))
                fill = q.get("fill")
                data = bytes([int(fill, 16)]) * n if fill else (b"abcdefghij" * (n // 10 + 1))[:n]
                self.send_response(200)
                self.send_header("Content-Type", f"text/plain; charset={q.get('cs', 'utf-8')}")
                if q.get("gzip") == "1":
                    data = gzip.compress(data)
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif path == "/bomb":
                # A gzip bomb streamed in chunks: N MiB of zeros, compressed as it is sent.
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
                block = b"\0" * (1 << 20)
                for _ in range(int(q.get("mb", "100"))):
                    if self.server.stop.is_set():
                        break
                    piece = z.compress(block)
                    if piece:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                tail = z.flush()
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
            elif path == "/charset":
                cs = q.get("cs", "utf-8")
                self._send(200, "café".encode(cs), f"text/plain; charset={cs}")
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. a capped body); expected

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        no_content = code in (204, 304)  # RFC 9110: such a response has no content at all
        if not no_content:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and not no_content:
            self.wfile.write(body)

    def _big(self, n: int, chunked: bool, gz: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if gz:
            data = gzip.compress(b"\0" * n)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"x" * 65536
        left = n
        while left > 0 and not self.server.stop.is_set():
            piece = block[: min(left, len(block))]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            left -= len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops SYNs under concurrent tests

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[SeenRequest] = []
        self.stop = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-response is part of the tests


@pytest.fixture
def http_server() -> Iterator[LocalHTTPServer]:
    """A real HTTP/1.1 server on 127.0.0.1 (fresh per test), served from a background thread."""
    srv = _Server()
    port = srv.server_address[1]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-http-server", daemon=True)
    thread.start()
    info = LocalHTTPServer(url=f"http://127.0.0.1:{port}", port=port, requests=srv.seen)
    try:
        yield info
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server_optional(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """Like ``redis_server`` but yields None instead of skipping when redis-server is missing.

    Request it *statically* (as a parameter) from fixtures that only sometimes
    need redis: a session fixture pulled in later with ``getfixturevalue``
    would start redis-server after the per-test leak check took its snapshot.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    workdir: Path = tmp_path_factory.mktemp("redis")
    last_error = ""
    for _attempt in range(3):  # a port taken between free_port() and bind: try another
        port = free_port()
        log = open(workdir / f"redis-{port}.log", "wb")
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None and not _redis_ping(port):
            time.sleep(0.02)  # polling a condition with a deadline
        if proc.poll() is None and _redis_ping(port):
            try:
                yield f"redis://127.0.0.1:{port}/0"
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
                log.close()
            return
        proc.kill()
        proc.wait(timeout=5)
        log.close()
        last_error = (workdir / f"redis-{port}.log").read_text(errors="replace")[-500:]
    pytest.fail(f"redis-server did not start: {last_error}")


@pytest.fixture(scope="session")
def redis_server(redis_server_optional: str | None) -> str:
    """A private redis-server on a free loopback port (no persistence), for the whole session; its URL."""
    if redis_server_optional is None:
        pytest.skip("redis-server not found on PATH (install it: apt-get install -y redis-server)")
    return redis_server_optional


def flush_redis(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session's redis URL, flushed before each test."""
    flush_redis(redis_server)
    yield redis_server


# ------------------------------------------------------- measuring an attack's reach


def rss_mb() -> float:
    """Resident memory of this (the supervisor's) process, in MiB."""
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / (1 << 20)


class LoopLag:
    """Measures how late the event loop runs a 10 ms ticker: a frozen loop shows as a large ``worst``."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.worst = 0.0
        self._task: "asyncio.Task[None] | None" = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.period_s)
            self.worst = max(self.worst, loop.time() - start - self.period_s)

    async def __aenter__(self) -> "LoopLag":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
