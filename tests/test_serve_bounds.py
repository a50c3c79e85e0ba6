"""Issue 16, classes 1 and 2: what strangers and noisy tenants can do to a real ``actionpool serve``.

Strangers (no token) get bounded connections: idle and slowloris connections are
closed by the head timer, a flood beyond ``max_connections`` evicts them rather
than locking out the gateway, and heads are capped in bytes and in lines
before the parser buffers them (sidecar/_http_guard.py). Tenants get their own
in-flight caps, and a body is read (within ``body_timeout_s``) before a flow
slot is taken (sidecar/_server.py). Real serve processes, real sockets.
"""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from actionpool.runner._errors import ConfigError
from actionpool.sidecar._http_guard import connection_budget
from actionpool.sidecar._config import load_config
from serve_fixtures import AUTH, TOKEN, Serve, start_serve, write_config

pytestmark = pytest.mark.timeout(120)

SLOW = """
    import time
    def on_execute(event, api):
        time.sleep(float((event.request or {}).get("sleep") or 0))
        api.session.setCustomClaim("done", True)
"""

CONFIG = """
    [runner]
    pool_size = 1
    max_workers = 8
    [runner.limits]
    action_timeout_s = 20.0
    flow_timeout_s = 30.0
    [server]
    token_env = "AP_TOKEN"
    max_body_bytes = 65536
    drain_grace_s = 1
    max_head_bytes = 8192
    max_headers = 20
    {server_extra}
    [tenants.acme.actions.slow]
    file = "actions/slow.py"
    [tenants.acme.flows]
    pre-login = ["slow"]
    [tenants.beta.actions.slow]
    file = "actions/slow.py"
    [tenants.beta.flows]
    pre-login = ["slow"]
"""


def serve_with(tmp_path: Path, server_extra: str) -> Serve:
    return start_serve(write_config(tmp_path, CONFIG.format(server_extra=server_extra), {"slow.py": SLOW}))


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Serve]:
    """Short timers: the head and body timeouts expire within a test."""
    s = serve_with(tmp_path, "header_timeout_s = 1.0\nkeepalive_timeout_s = 1.0\nbody_timeout_s = 1.5\n"
                             "max_inflight_per_tenant = 1")
    try:
        yield s
    finally:
        s.stop()


_OPENED: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Every raw socket a test opened is closed when it ends, also when it fails half way (an unclosed socket
    would otherwise surface as a ResourceWarning, an error, in whichever later test the GC finds it)."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def connect(s: Serve) -> socket.socket:
    host, port = s.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    _OPENED.append(sock)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def metric(c: httpx.Client, name: str) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def flow(c: httpx.Client, tenant: str = "acme", sleep: float = 0, **kw: Any) -> httpx.Response:
    return c.post(f"/v1/tenants/{tenant}/flows/pre-login", json={"user": {}, "request": {"sleep": sleep}}, **kw)


# -- strangers ---------------------------------------------------------------------------------------

def test_idle_connections_are_closed_after_the_head_timeout(quick: Serve) -> None:
    """Connections that never send a byte are closed (no answer); a partial head gets 408 and a close."""
    idle = [connect(quick) for _ in range(5)]
    partial = connect(quick)
    partial.sendall(b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\n")
    for sock in idle:
        assert read_until_closed(sock) == b""
        sock.close()
    answer = read_until_closed(partial)
    partial.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="idle_timeout"}') >= 5
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="header_timeout"}') >= 1


def test_keepalive_connection_idle_past_its_timeout_is_closed(quick: Serve) -> None:
    sock = connect(quick)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"alive"' in answer
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="idle_timeout"}') >= 1


def test_body_left_unread_after_a_401_is_not_a_way_to_hold_the_connection(quick: Serve) -> None:
    """A stranger's flow request gets 401 before its body is read; trickling the body on does not keep the
    connection: it is closed header_timeout_s after the answer."""
    sock = connect(quick)
    sock.sendall(b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    sock.settimeout(10)
    assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            sock.sendall(b" ")   # a byte now and then: each would restart a plain idle timer
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable and sock.recv(4096) == b"":
                break
        else:
            raise AssertionError("the connection was still open 15 s after the 401")
    except OSError:
        pass   # reset: closed
    finally:
        sock.close()
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="unread_body"}') >= 1


def test_idle_flood_beyond_the_cap_does_not_lock_out_the_gateway(tmp_path: Path) -> None:
    """300 stranger connections against max_connections = 64 (timers long): an authenticated flow on a new
    connection is still served, because the strangers are evicted, oldest first."""
    s = serve_with(tmp_path, "max_connections = 64\nheader_timeout_s = 60.0")
    socks: list[socket.socket] = []
    try:
        for i in range(300):
            sock = connect(s)
            if i % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")   # half of them: slowloris heads
            socks.append(sock)
        with s.client() as c:
            r = flow(c)
            assert r.status_code == 200, r.text
            assert r.json()["outcome"] == "allow"
            assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="evicted"}') >= 300 - 64
            assert metric(c, "actionpool_connections_open") <= 64
            assert metric(c, "actionpool_connections_max") == 64
        # The oldest strangers were the ones evicted: the first connection is closed.
        assert read_until_closed(socks[0]) == b""
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def test_strangers_are_evicted_before_an_idle_keepalive_connection(tmp_path: Path) -> None:
    """At the cap, connections that never completed a head go first: the gateway's keep-alive connection,
    idle between two requests, survives 40 strangers against max_connections = 16."""
    s = serve_with(tmp_path, "max_connections = 16\nheader_timeout_s = 60.0\nkeepalive_timeout_s = 60.0")
    request = (b"GET /v1/tenants/acme/runs/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
               + b"\r\n\r\n")
    gateway = connect(s)
    strangers: list[socket.socket] = []
    try:
        gateway.sendall(request)
        assert read_response(gateway).startswith(b"HTTP/1.1 404 ")
        strangers = [connect(s) for _ in range(40)]
        assert read_until_closed(strangers[0]) == b""   # the oldest stranger made room
        gateway.sendall(request)
        assert read_response(gateway).startswith(b"HTTP/1.1 404 ")   # the same connection, still served
    finally:
        gateway.close()
        for sock in strangers:
            sock.close()
        s.stop()


def test_header_stream_is_cut_off_with_431_and_rss_does_not_grow(quick: Serve) -> None:
    """An endless header value: 431 once the head passes max_head_bytes; 32 MB sent, the RSS stays put."""
    rss = psutil.Process(quick.proc.pid)
    with quick.client() as c:
        assert c.get("/healthz").status_code == 200
    before = rss.memory_info().rss
    sock = connect(quick)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Stream: ")
    chunk, sent, answer = b"a" * 65536, 0, b""
    try:
        while sent < 32 << 20:
            sock.sendall(chunk)
            sent += len(chunk)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and not answer:
                answer = sock.recv(65536)
    except OSError:
        pass   # the server closed after its linger: the stream is cut off
    if not answer:
        answer = read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"larger than 8192 bytes" in answer
    grown = rss.memory_info().rss - before
    assert grown < 8 << 20, f"RSS grew by {grown} bytes under a {sent}-byte header stream"
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="head_too_large"}') >= 1


def test_head_just_under_the_cap_is_served_and_over_it_is_431(quick: Serve) -> None:
    with quick.client() as c:
        assert c.get("/healthz", headers={"X-Pad": "a" * 7000}).status_code == 200
        r = c.get("/healthz", headers={"X-Pad": "a" * 9000})
        assert r.status_code == 431 and r.headers["connection"] == "close"


def test_too_many_headers_get_431(quick: Serve) -> None:
    with quick.client() as c:
        assert c.get("/healthz", headers={f"X-H{i}": "v" for i in range(10)}).status_code == 200
        r = c.get("/healthz", headers={f"X-H{i}": "v" for i in range(40)})
        assert r.status_code == 431, r.text
        assert "more than 20 request headers" in r.json()["error"]
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="too_many_headers"}') >= 1


def test_malformed_requests_do_not_write_a_log_line_each(quick: Serve) -> None:
    """200 strangers each send a malformed head (and get 400): the warning is logged at most once a second,
    not once per connection (a reconnect flood of garbage wrote thousands of lines a second)."""
    started = time.monotonic()
    for _ in range(200):
        sock = connect(quick)
        sock.sendall(b"GET /healthz HTTP/9.9\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
        sock.close()
    elapsed = time.monotonic() - started
    with quick.client() as c:
        assert c.get("/healthz").status_code == 200
    lines = quick.output().count("Invalid HTTP request received")
    assert 1 <= lines <= elapsed + 2, (lines, elapsed)


def test_the_gate_hands_over_a_head_with_its_body_and_a_pipelined_request(quick: Serve) -> None:
    """A connection's first bytes (head, body and a second request in one write) reach the app whole."""
    body = b'{"user": {}, "request": {"sleep": 0}}'
    first = (b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
             + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n" + body)
    second = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(quick) as sock:
        sock.sendall(first + second)
        one, two = read_response(sock), read_response(sock)
    assert one.startswith(b"HTTP/1.1 200") and b'"outcome":"allow"' in one, one[:300]
    assert two.startswith(b"HTTP/1.1 200") and b'"alive"' in two, two


def test_a_head_split_across_reads_and_bare_lf_heads_are_served(quick: Serve) -> None:
    with connect(quick) as sock:   # the end of the head straddles three writes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (b"GET /healthz HTTP/1.1\r\nHost: t\r", b"\n\r", b"\n"):
            sock.sendall(piece)
            time.sleep(0.05)   # spaces the writes so the server reads them apart; nothing waits on it
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    with connect(quick) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\nHost: t\n\n")
        sock.settimeout(5)
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 "), reply   # answered (200, or 400 from the parser), never held


def test_closed_connections_leave_no_reference_cycles() -> None:
    """Every connection the guard closes (idle, slowloris, served) is freed by reference counting.

    A cycle per connection made a reconnect flood into full GC passes of 100-200 ms on the loop that runs
    every flow (sidecar/_http_guard.py, ``_break_transport_cycle``). In-process, with blocking client sockets,
    so every transport in the GC's garbage is the server's.
    """
    import asyncio
    import gc

    import uvicorn
    from uvicorn.server import ServerState

    from actionpool.sidecar._http_guard import Guard, gated_protocol

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    def clients(port: int) -> None:
        socks = []
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 3 == 1:
                s.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")   # never finished: the head timer closes it
            elif i % 3 == 2:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            socks.append(s)
        for s in socks:   # wait until the server closed each one
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
            s.close()

    async def main() -> list[str]:
        cfg = uvicorn.Config(app, http="httptools", lifespan="off", log_level="error")
        cfg.load()
        guard = Guard(max_connections=1000, header_timeout_s=0.5, max_head_bytes=8192, max_headers=20)
        factory, state = gated_protocol(guard), ServerState()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: factory(config=cfg, server_state=state, app_state={}, _loop=loop),
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await asyncio.to_thread(clients, port)
            deadline = loop.time() + 10
            while guard.open and loop.time() < deadline:   # each connection_lost forgets its connection
                await asyncio.sleep(0.01)
            gc.collect()
            leaked = [type(o).__name__ for o in gc.garbage if "Transport" in type(o).__name__]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            server.close()
            await server.wait_closed()
        assert guard.open == 0
        return leaked

    assert asyncio.run(main()) == []


def test_body_sent_after_a_401_leaves_the_connection_on_the_keepalive_timer(quick: Serve) -> None:
    """A 401 goes out before the body is read; when the body then ends, the connection waits for its next head
    under the keep-alive timer. (The body's bytes cancelled that timer, so it used to stay open for ever.)"""
    sock = connect(quick)
    sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    assert read_response(sock).startswith(b"HTTP/1.1 401 ")
    sock.sendall(b"12345")
    assert read_until_closed(sock) == b""
    sock.close()
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="idle_timeout"}') >= 1


def test_request_right_behind_a_late_401_body_is_not_cut_by_that_keepalive_timer(quick: Serve) -> None:
    """The same read ends the 401's body and carries a 3 s flow: the keep-alive timer (1 s) armed at the
    body's end is cancelled by the flow's head, so the flow is answered."""
    sock = connect(quick)
    try:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 401 ")
        body = b'{"user": {}, "request": {"sleep": 3}}'
        sock.sendall(b"12345POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"outcome":"allow"' in answer, answer[:300]
    finally:
        sock.close()


def test_strangers_holding_unread_bodies_after_their_401_do_not_lock_out_the_gateway(tmp_path: Path) -> None:
    """max_connections = 16, long timers: 16 strangers each get a 401 and keep a 100 kB body pending (the
    request is answered, the body unread). They are evicted like head-less strangers, so the gateway's new
    connections are served."""
    s = serve_with(tmp_path, "max_connections = 16\nheader_timeout_s = 60.0\nkeepalive_timeout_s = 60.0")
    strangers: list[socket.socket] = []
    try:
        for _ in range(16):
            sock = connect(s)
            sock.sendall(b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000\r\n\r\n{")
            assert read_response(sock).startswith(b"HTTP/1.1 401 ")
            strangers.append(sock)
        for _ in range(3):
            with s.client() as c:
                r = flow(c)
                assert r.status_code == 200, r.text
        assert read_until_closed(strangers[0]) == b""   # the oldest was evicted
        with s.client() as c:
            assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="evicted"}') >= 1
    finally:
        for sock in strangers:
            sock.close()
        s.stop()


def test_pipelined_upload_behind_an_answered_request_is_not_cut_by_the_unread_body_timer(tmp_path: Path) -> None:
    """GET /healthz, then a flow whose body arrives after header_timeout_s (within body_timeout_s) on the same
    connection: once the GET is answered, the body being read is the flow's, not an unread one, so both answer."""
    s = serve_with(tmp_path, "header_timeout_s = 1.0\nbody_timeout_s = 30.0")
    sock = connect(s)
    try:
        body = b'{"user": {}, "request": {}}'
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\n"
                     b"Host: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body[:5]))
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(2.0)   # not a synchronisation: the rest of the body must come after header_timeout_s
        sock.sendall(body[5:])
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"outcome":"allow"' in answer, answer[:300]
    finally:
        sock.close()
        s.stop()


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Serve]:
    """Default timers: for tests whose point is not a timeout (a loaded machine must not turn them into one)."""
    s = serve_with(tmp_path, "")
    yield s
    s.stop()


def test_pipelined_flood_is_closed_before_it_is_parsed_into_requests(patient: Serve) -> None:
    """250 kB of back-to-back "GET / HTTP/1.1" heads on each of 20 connections, no answer read: each used to
    become ~14,000 queued requests (10 MB sent grew the process by 730 MB). Past PIPELINE_MAX queued behind
    the one being answered, the connection is closed; a few pipelined requests are still all answered."""
    rss = psutil.Process(patient.proc.pid)
    with patient.client() as c:
        assert c.get("/healthz").status_code == 200
    before = rss.memory_info().rss
    flood = b"GET / HTTP/1.1\r\n\r\n" * (250_000 // 18)
    socks: list[socket.socket] = []
    try:
        for _ in range(20):
            socks.append(connect(patient))
            socks[-1].sendall(flood)
        for sock in socks:
            read_until_closed(sock)   # closed (a reset counts)
    finally:
        for sock in socks:
            sock.close()
    grown = rss.memory_info().rss - before
    assert grown < 32 << 20, f"RSS grew by {grown} bytes under a pipelined flood of {20 * len(flood)} bytes"
    with connect(patient) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        answers = [read_response(sock) for _ in range(3)]
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    with patient.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="pipeline_too_deep"}') >= 20


@pytest.mark.parametrize("auth", [False, True])
def test_endless_chunked_trailer_is_cut_off_and_rss_does_not_grow(quick: Serve, auth: bool) -> None:
    """A chunked body that ends in a trailer without end (httptools buffers a trailer whole, by repeated
    concatenation): closed once max_head_bytes of it arrive, with or without a token (with one, the app is
    reading the body). 32 MB offered, the RSS stays put."""
    rss = psutil.Process(quick.proc.pid)
    with quick.client() as c:
        assert c.get("/healthz").status_code == 200
    before = rss.memory_info().rss
    sock = connect(quick)
    token = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n" if auth else b""
    sock.sendall(b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\n" + token +
                 b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")
    sent, closed = 0, False
    try:
        while sent < 32 << 20:
            sock.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        closed = True   # reset by the server: the stream was cut off
    if not closed:
        read_until_closed(sock)
    sock.close()
    grown = rss.memory_info().rss - before
    assert grown < 8 << 20, f"RSS grew by {grown} bytes under a {sent}-byte trailer"
    with quick.client() as c:
        assert metric(c, 'actionpool_connections_closed_by_guard_total{reason="head_too_large"}') >= 1
        assert flow(c).status_code == 200   # no flow slot left behind


def test_peer_that_reads_none_of_its_answers_is_closed(tmp_path: Path) -> None:
    """Eight pipelined flows answering ~900 kB each (more than the kernel's buffers hold) to a peer that reads
    nothing: once the write side has been paused for header_timeout_s the connection is closed (uvicorn
    awaited the drain for ever, and the connection, a request in progress, was never evicted)."""
    big = "def on_execute(event, api):\n    api.session.setCustomClaim('big', 'x' * 900_000)\n"
    config = CONFIG.format(server_extra="header_timeout_s = 1.0") + """
    [tenants.gamma.actions.big]
    file = "actions/big.py"
    [tenants.gamma.flows]
    post-login = ["big"]
"""
    s = start_serve(write_config(tmp_path, config, {"slow.py": SLOW, "big.py": big}))
    host, port = s.url.removeprefix("http://").split(":")
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect((host, int(port)))
        body = b'{"user": {}}'
        request = (b"POST /v1/tenants/gamma/flows/post-login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.sendall(request * 8)   # within PIPELINE_MAX
        with s.client() as c:
            deadline = time.monotonic() + 30
            while metric(c, 'actionpool_connections_closed_by_guard_total{reason="write_stalled"}') < 1:
                assert time.monotonic() < deadline, "the connection that reads nothing was not closed"
                time.sleep(0.1)   # polling a condition with a deadline
            assert flow(c, "beta").status_code == 200
    finally:
        sock.close()
        s.stop()


# -- tenants -----------------------------------------------------------------------------------------

def test_stalled_body_gets_408_and_holds_no_flow_slot(quick: Serve) -> None:
    """max_inflight_per_tenant = 1: while one upload of acme stalls inside the app's body read (seen through
    its 100 Continue), another acme flow runs; the stalled one gets 408 and a close."""
    sock = connect(quick)
    sock.sendall(b"POST /v1/tenants/acme/flows/pre-login HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")   # the app is reading the body now
    sock.sendall(b'{"user": ')
    with quick.client() as c:
        r = flow(c)
        assert r.status_code == 200, r.text
    answer = read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"body_timeout_s" in answer and b"connection: close" in answer.lower()
    with quick.client() as c:
        assert flow(c).status_code == 200   # the slot was never taken, so nothing leaked


def test_one_tenant_filling_its_cap_does_not_fail_another_tenants_flows(tmp_path: Path) -> None:
    """max_inflight = 8, per-tenant cap derived (3/4: 6). acme sends 10 slow flows at once: 6 run, 4 get 503
    naming the per-tenant cap, and beta's flows all succeed while acme's 6 are in flight."""
    s = serve_with(tmp_path, "max_inflight = 8")
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def slow_acme() -> None:
        with s.client() as c:
            r = flow(c, "acme", sleep=8)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=slow_acme) for _ in range(10)]
    try:
        for t in threads:
            t.start()
        with s.client() as c:
            deadline = time.monotonic() + 30
            while len(results) < 4:   # the four over the cap are refused at once
                assert time.monotonic() < deadline, "acme's flows over its cap were not refused"
                time.sleep(0.02)   # polling a condition with a deadline
            refused = list(results)
            for r in refused:
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert "server.max_inflight_per_tenant = 6" in r.json()["error"]
            for _ in range(3):
                r = flow(c, "beta")
                assert r.status_code == 200, r.text
                assert r.json()["outcome"] == "allow"
            assert len(results) == 4, "beta's flows finished after acme's slow ones: acme's were not in flight"
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in results) == [200] * 6 + [503] * 4
    finally:
        for t in threads:
            t.join(60)
        s.stop()


def test_drafts_take_the_tenants_flow_slots_too(quick: Serve) -> None:
    """max_inflight_per_tenant = 1: while an acme flow is in flight, an acme draft (/test) is refused with 503
    naming the tenant's cap, and beta's draft runs. (Drafts took no slot: the one way past the HTTP caps.)"""
    done = threading.Event()

    def slow() -> None:
        with quick.client() as c:
            flow(c, "acme", sleep=6)
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    draft = {"trigger": "pre-login", "event": {"user": {}}}
    try:
        with quick.client() as c:
            deadline = time.monotonic() + 20
            while "actionpool_flows_in_flight 1.0" not in c.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.02)   # polling a condition with a deadline
            r = c.post("/v1/tenants/acme/actions/slow/test", json=draft)
            assert r.status_code == 503, r.text
            assert "server.max_inflight_per_tenant = 1" in r.json()["error"]
            r = c.post("/v1/tenants/beta/actions/slow/test", json=draft)
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
            assert not done.is_set()
    finally:
        t.join(60)
    with quick.client() as c:
        assert c.post("/v1/tenants/acme/actions/slow/test", json=draft).status_code == 200   # the slot came back


def test_one_tenants_slow_shadow_versions_leave_shadow_runs_for_others(tmp_path: Path) -> None:
    """shadow_concurrency = 4: acme's shadow version sleeps, and four acme flows would hold every shadow slot
    (beta's shadow comparisons all skipped). acme holds at most its share (3), so beta's shadow still runs."""
    s = serve_with(tmp_path, "shadow_concurrency = 4")
    sleepy = "import time\ndef on_execute(event, api):\n    time.sleep(20)\n"
    fast = "def on_execute(event, api):\n    api.session.setCustomClaim('done', True)\n"
    try:
        with s.client() as c:
            assert c.put("/v1/tenants/acme/actions/slow?shadow=1", content=sleepy).status_code == 201
            assert c.put("/v1/tenants/beta/actions/slow?shadow=1", content=fast).status_code == 201
            for _ in range(4):
                assert flow(c, "acme").status_code == 200
            assert metric(c, 'actionpool_shadow_runs_total{result="skipped",slug="slow",tenant="acme"}') == 1
            assert flow(c, "beta").status_code == 200
            deadline = time.monotonic() + 30
            while metric(c, 'actionpool_shadow_runs_total{result="agree",slug="slow",tenant="beta"}') < 1:
                assert metric(c, 'actionpool_shadow_runs_total{result="skipped",slug="slow",tenant="beta"}') == 0
                assert time.monotonic() < deadline, "beta's shadow run did not finish"
                time.sleep(0.05)   # polling a condition with a deadline
    finally:
        s.stop()


def test_global_cap_names_itself(tmp_path: Path) -> None:
    s = serve_with(tmp_path, "max_inflight = 1")
    try:
        done = threading.Event()

        def slow() -> None:
            with s.client() as c:
                flow(c, "acme", sleep=6)
            done.set()

        t = threading.Thread(target=slow)
        t.start()
        with s.client() as c:
            deadline = time.monotonic() + 20
            while "actionpool_flows_in_flight 1.0" not in c.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.02)   # polling a condition with a deadline
            r = flow(c, "beta")
            assert r.status_code == 503 and "(server.max_inflight)" in r.json()["error"]
            assert not done.is_set()
        t.join(60)
    finally:
        s.stop()


# -- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,key", [
    ("max_connections = 1", "server.max_connections"),
    ("header_timeout_s = 0", "server.header_timeout_s"),
    ("keepalive_timeout_s = -1", "server.keepalive_timeout_s"),
    ("body_timeout_s = nan", "server.body_timeout_s"),
    ("max_head_bytes = 100", "server.max_head_bytes"),
    ("max_headers = 2", "server.max_headers"),
    ("max_inflight_per_tenant = 0", "server.max_inflight_per_tenant"),
    ("max_inflight_per_tenant = 600", "server.max_inflight_per_tenant"),
    ("max_headers = \"many\"", "server.max_headers"),
])
def test_bad_bounds_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    path = write_config(tmp_path, f"[server]\n{line}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, env={})


def test_default_connection_cap_comes_from_the_fd_budget(tmp_path: Path) -> None:
    """No max_connections: started with a soft fd limit of 1024, the sidecar raises it to the hard one and
    derives the cap from it (less the pool's pipes and a reserve)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))   # inherited by the serve process
    try:
        s = serve_with(tmp_path, "")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        got_soft, got_hard = psutil.Process(s.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
        assert got_soft == got_hard == hard
        with s.client() as c:
            assert metric(c, "actionpool_connections_max") == connection_budget(None if hard < 0 else hard, 8)
    finally:
        s.stop()


def test_the_pool_leaves_descriptors_for_connections(tmp_path: Path) -> None:
    """A derived pool no longer takes every descriptor: at a limit of 1024 connections keep 384 slots."""
    import dataclasses

    from actionpool.sidecar._serve import share_fds

    cfg = load_config(write_config(tmp_path, CONFIG.format(server_extra=""), {"slow.py": SLOW}), env={"AP_TOKEN": TOKEN})
    cfg = dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, max_workers=None,
                                                              worker_memory_budget_mb=100_000))
    shared = share_fds(cfg, 1024)
    assert shared.runner.max_workers is not None
    assert connection_budget(1024, shared.runner.max_workers) >= 384 - 16
    assert share_fds(cfg, None) is cfg                       # no limit: nothing to share
    assert share_fds(cfg, 1_000_000) is cfg                  # the memory budget is the bound, not the fds
    fixed = dataclasses.replace(cfg, runner=dataclasses.replace(cfg.runner, max_workers=500))
    assert share_fds(fixed, 1024) is fixed                   # an operator's max_workers is kept


def test_connection_budget_leaves_room_for_the_pool() -> None:
    assert connection_budget(1024, 100) == 1024 - 256 - 400 - 16
    assert connection_budget(None, 8) == 10_000
    assert connection_budget(300, 100) == 16   # a tiny limit still serves a few connections
    assert AUTH["Authorization"].endswith(TOKEN)
