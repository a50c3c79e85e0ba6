"""What ``actionpool serve`` checks before it starts anything: the port it will listen on, and the store.

Both fail the start with one line that names the port or the store URL and
what to do, instead of uvicorn's bind error or redis-py's connection text
after the runner and its workers have already started: exit 2 for a
``--host``/``--port`` that can never work, 3 for a port in use or a store that
cannot be reached now. The checks are
cheap (one bind, one PING with a short timeout) and bounded. A port taken
between the check and uvicorn's own bind still fails the start (uvicorn's
message, the same exit status).
"""

from __future__ import annotations

import errno
import socket
import urllib.parse

STORE_TIMEOUT_S = 2.0
EXIT_USAGE, EXIT_START_FAILED = 2, 3  # 3 is also uvicorn's own status for a start that failed


def start_problem(host: str, port: int, store_url: str | None, config_path: str) -> tuple[int, str] | None:
    """The exit status and the one line to print when the sidecar cannot start, or None."""
    if not 0 <= port <= 65535:
        return EXIT_USAGE, f"--port {port} is not a TCP port (0..65535)"
    problem = listen_problem(host, port)
    if problem is not None:
        return (EXIT_USAGE if problem.startswith("--host") else EXIT_START_FAILED), problem
    problem = store_problem(store_url, config_path)
    return None if problem is None else (EXIT_START_FAILED, problem)


def listen_problem(host: str, port: int) -> str | None:
    """Why the sidecar could not listen on ``host:port``, or None (bound and released at once)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"--host {host}: not an address of this machine ({exc}); use 127.0.0.1 or an interface's address"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            # As asyncio's create_server does: a port left in TIME_WAIT is free, a listening one is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                return _bind_problem(host, port, exc)
    return None


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host}: address already in use (another actionpool serve?); stop that process "
                f"or choose another port with --port")
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port}; choose a port above 1023 with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; use 127.0.0.1 or an interface's address"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or --port"


def shown_url(url: str) -> str:
    """The URL with its password masked: it goes to a terminal and to logs."""
    u = urllib.parse.urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))


def store_problem(url: str | None, config_path: str) -> str | None:
    """Why the store at ``url`` cannot be used right now (one PING), or None; None for the in-memory store."""
    if not url:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=STORE_TIMEOUT_S, socket_timeout=STORE_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        why = str(exc).split(". ")[0] or type(exc).__name__
        return (f"the store at {shown_url(url)} ([store] url in {config_path}) cannot be reached: {why}; "
                f"start Redis there, or fix the URL")
    finally:
        client.close()
    return None
