"""What the connection guard (sidecar/_http_guard.py) costs, and what it saves, against plain uvicorn.

    python -m actionpool.benchmarks.http_guard [--requests 5000] [--rounds 3] [--stream-mb 64]

Three servers, each a uvicorn subprocess on 127.0.0.1 around the same trivial ASGI app:
``httptools`` (uvicorn's default parser, no head cap), ``guard`` (the sidecar's guarded httptools
protocol, default ``[server]`` bounds) and ``h11-capped`` (uvicorn's h11 with
``h11_max_incomplete_event_size`` = 16 KiB). For each: the median and p99 time of one GET on a
keep-alive connection (raw socket client, so the client's cost is small and equal; the best of
interleaved rounds), and the server's
RSS growth (psutil) while one connection streams an endless header value. Prints numbers, asserts none.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import psutil

SERVER = r"""
import sys, uvicorn
kind, port = sys.argv[1], int(sys.argv[2])

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})

kw = {}
if kind == "guard":
    from actionpool.sidecar._http_guard import Guard, protocol_class
    kw["http"] = protocol_class(Guard(max_connections=10_000, header_timeout_s=10.0, max_head_bytes=16384,
                                      max_headers=100))
elif kind == "h11-capped":
    kw["http"], kw["h11_max_incomplete_event_size"] = "h11", 16384
else:
    kw["http"] = "httptools"
uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False, loop="asyncio", ws="none",
            lifespan="off", server_header=False, date_header=False, **kw)
"""

REQUEST = b"GET /x HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer abc\r\nContent-Length: 0\r\n\r\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, str(port)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def _latency(port: int, n: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        sock.sendall(REQUEST)
        got = b""
        while not got.endswith(b"{}"):
            got += sock.recv(4096)
        if i >= 200:   # warm-up excluded
            out.append((time.perf_counter() - t0) * 1e6)
    sock.close()
    return out


def _header_stream(pid: int, port: int, mb: int) -> tuple[int, int, str]:
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Stream: ")
    sent, chunk, peak = 0, b"a" * 65536, before
    try:
        while sent < mb << 20:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent % (1 << 20) == 0:
                peak = max(peak, proc.memory_info().rss)
    except OSError:
        pass
    sock.settimeout(3)
    try:
        answer = sock.recv(200).split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    except OSError as exc:
        answer = type(exc).__name__
    sock.close()
    return sent, max(peak, proc.memory_info().rss) - before, answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds, the servers taken in turn; best kept")
    ap.add_argument("--stream-mb", type=int, default=64)
    args = ap.parse_args()
    kinds = ("httptools", "guard", "h11-capped")
    servers = {kind: _start(kind) for kind in kinds}
    try:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):   # interleaved, so a noisy neighbour hits every server alike
            for kind in kinds:
                lat = sorted(_latency(servers[kind][1], args.requests))
                p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99)]
                best[kind] = min(best.get(kind, (p50, p99)), (p50, p99))
        print(f"{'server':<12} {'p50 us':>8} {'p99 us':>8}   header stream: sent / RSS growth / answer")
        for kind in kinds:
            proc, port = servers[kind]
            sent, grown, answer = _header_stream(proc.pid, port, args.stream_mb)
            print(f"{kind:<12} {best[kind][0]:8.1f} {best[kind][1]:8.1f}   "
                  f"{sent >> 20} MB / {grown / (1 << 20):.1f} MB / {answer}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
