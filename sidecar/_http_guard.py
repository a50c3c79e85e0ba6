"""Bounds on what a connection may do before the token is read (docs/security.md, "Strangers").

uvicorn's httptools protocol leaves four holes a peer without a token can use:
a connection that never sends a byte stays open for ever (no first-byte
timer), a head that never ends is buffered whole (httptools has no head cap,
and ``on_url``/``on_header`` accumulate), a head may carry any number of
headers, and uvicorn's own ``limit_concurrency`` answers 503 to *every* new
request once idle strangers fill it, which locks the gateway out. This module
puts a small gate in front of the protocol and subclasses it, and closes them
per connection:

* a **gate** (:class:`Gate`) holds each new connection until its first head is
  complete: a few slots and a bytearray, no parser, no uvicorn state. Idle and
  slowloris strangers never get more (measured: 7.0 kB of RSS per connection
  with uvicorn's protocol from the accept, 3.4 kB with the gate), and their
  accept costs less CPU. At the end of the head the connection is handed to the
  guarded uvicorn protocol below, which re-reads the head under the same caps;

* a **head timer** (``header_timeout_s``) armed when the connection opens and
  when the first byte of a later head arrives; it is cancelled when the head
  is complete. It covers the first byte, slowloris and partial heads. Between
  requests uvicorn's keep-alive timer (``keepalive_timeout_s``) runs.
* **head bytes** are counted in ``data_received`` *before* the parser sees
  them: the parser is fed at most the room left under ``max_head_bytes``, so
  it never buffers more; past it the answer is 431 and the connection closes.
  Header lines are counted in ``on_header`` (431 past ``max_headers``).
* a **connection table** (:class:`Guard`): at ``max_connections`` a new
  connection evicts the oldest one that has never completed a head, else the
  one idle longest between requests; connections with a request in progress
  are never evicted (a new connection is refused when all are). Both lookups
  are O(1) (insertion-ordered dicts), so a flood costs constant work per accept.
* bytes of a request body that arrive after the answer (a 401 sent before the
  body was read) are discarded for at most ``header_timeout_s``, then the
  connection closes; meanwhile it is evicted first, like a head-less stranger,
  and once that body ends the keep-alive timer runs again.
* chunk-size lines, chunk extensions and trailers (neither head nor body) are
  counted like a head: past ``max_head_bytes`` between two body bytes or chunk
  headers the connection closes (httptools buffers a trailer whole).
* at most ``PIPELINE_MAX`` requests are parsed and queued behind the one being
  answered; past it the connection closes (``pipeline_too_deep``).
* while the write side is paused (the peer reads none of its answers) the
  connection is evictable, and after ``header_timeout_s`` of it, closed
  (``write_stalled``): uvicorn awaits the drain with no deadline.
* warnings a stranger can cause (malformed heads, upgrades) are logged at most
  once a second.

After a 431 or 408 the answer is written, the write side shut and the reader
discards what is still in flight for a short linger before closing, so the
peer reads the status rather than a reset.

Pipelining: a head that starts inside the same read as the previous body is
counted from the next read on, so a pipelined head may reach about twice
``max_head_bytes`` before the cap: still a bound per connection.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import random
import resource
import struct
import termios
import time
from typing import Any, Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..runner.hosting import FD_RESERVE, FDS_PER_WORKER

DEFAULT_CONNECTION_CAP = 10_000   # with max_head_bytes = 16 KiB, at most ~160 MB of heads buffered at once
LINGER_S = 2.0                    # after a 431/408: how long unread input is drained before the close
LINGER_BYTES = 1 << 20            # ... and how much of it, at most
PEEK_CANDIDATES = 8               # at the cap: head-less connections with unread input skipped, at most
JITTER = 0.25                     # head timers fire in [1 - JITTER, 1] x header_timeout_s (see _g_arm)
PIPELINE_MAX = 8                  # requests parsed and queued behind the one being answered; more: close
REASONS = ("header_timeout", "idle_timeout", "head_too_large", "too_many_headers", "evicted", "refused",
           "unread_body", "pipeline_too_deep", "write_stalled")


def raise_fd_limit() -> int | None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the soft limit now (None: unlimited)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        elif hard == resource.RLIM_INFINITY and soft == resource.RLIM_INFINITY:
            return None
        return soft
    except (ValueError, OSError):
        return None


def connection_budget(fd_limit: int | None, workers: int) -> int:
    """Connections the fd budget allows: the limit less the pool's pipes and the runner's reserve."""
    if fd_limit is None:
        return DEFAULT_CONNECTION_CAP
    return max(16, min(DEFAULT_CONNECTION_CAP, fd_limit - FD_RESERVE - FDS_PER_WORKER * workers - 16))


class Guard:
    """The per-process connection table and the bounds every connection is held to."""

    def __init__(self, *, max_connections: int | Callable[[], int], header_timeout_s: float, max_head_bytes: int,
                 max_headers: int, on_close: Callable[[str], None] | None = None) -> None:
        self._cap = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.on_close = on_close
        self.open = 0
        self.fresh: dict[Any, None] = {}   # connections that never completed a head, oldest first
        self.idle: dict[Any, None] = {}    # connections between requests, idle longest first
        self.closed: dict[str, int] = dict.fromkeys(REASONS, 0)

    @property
    def max_connections(self) -> int:
        if callable(self._cap):   # derived from the pool's size, known once the runner has started
            self._cap = self._cap()
        return self._cap

    def count(self, reason: str) -> None:
        self.closed[reason] += 1
        if self.on_close is not None:
            self.on_close(reason)

    def admit(self, conn: Any) -> bool:
        """Make room for ``conn`` (evicting an idle or head-less connection); False when there is none."""
        if self.open >= self.max_connections:
            victim = next(iter(self.fresh), None)
            for _ in range(PEEK_CANDIDATES):
                # A connection whose bytes wait in the kernel was accepted in the same burst and not read yet
                # (a gateway sends its head at once; an idle stranger has nothing there): it gets another round.
                if victim is None or not victim._g_pending():
                    break
                del self.fresh[victim]
                self.fresh[victim] = None
                victim = next(iter(self.fresh))
            if victim is None:
                victim = next(iter(self.idle), None)
            if victim is None:
                self.count("refused")
                return False
            victim._guard_drop("evicted")
        self.open += 1
        self.fresh[conn] = None
        return True

    def close_gates(self) -> None:
        """Close every connection still at its :class:`Gate` (a shutdown: they hold no request)."""
        for conn in [c for c in self.fresh if isinstance(c, Gate)]:
            conn.admitted = False
            self.forget(conn)
            conn._cancel()
            conn.transport.abort()

    def adopt(self, gate: Any, conn: Any) -> None:
        """``conn`` takes ``gate``'s place (same count; head-less until its head is parsed)."""
        self.fresh.pop(gate, None)
        self.fresh[conn] = None

    def forget(self, conn: Any) -> None:
        self.open -= 1
        self.fresh.pop(conn, None)
        self.idle.pop(conn, None)


def _pending(transport: asyncio.BaseTransport) -> bool:
    """Whether input waits in the kernel, unread (FIONREAD: one ioctl, nothing consumed)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except OSError:
        return False


def _write_refusal(transport: asyncio.Transport, status: int, message: str) -> bool:
    """Write ``status`` with a JSON error and shut the write side; False when the peer is already gone."""
    body = b'{"error":"' + message.encode() + b'"}'
    transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (status, _PHRASES[status], len(body), body))
    try:
        if transport.can_write_eof():
            transport.write_eof()
    except OSError:   # ENOTCONN: nothing to linger for
        transport.abort()
        return False
    return True


def _break_transport_cycle(transport: asyncio.BaseTransport | None) -> None:
    """Let a closed connection be freed by reference counting, not by the cyclic GC.

    asyncio's socket transport keeps a bound method of itself (``_read_ready_cb``), so every closed
    connection is a cycle of about seven objects that only a GC pass frees. A flood of short connections
    made full passes of 110-190 ms on the loop that runs every flow (benchmarks/sidecar_attack.py with a
    ``gc.callbacks`` probe). Called from ``connection_lost``, after which asyncio never reads again; where the
    attribute does not exist this does nothing.
    """
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[union-attr]


def _jittered(seconds: float) -> float:
    # A flood opened within a few seconds would otherwise expire, and reconnect, in one wave of thousands of
    # closes per loop turn (measured: the slowest gateway flows sat inside those waves).
    return seconds * (1.0 - JITTER * random.random())


class Gate(asyncio.Protocol):
    """A connection until its first request head is complete (see the module docstring).

    Holds the connection's place in the :class:`Guard`, the head timer and the head's bytes; at the end of
    the head, ``make()`` builds the guarded uvicorn protocol, which takes over the transport and the place.
    """

    __slots__ = ("guard", "make", "loop", "transport", "buf", "lines", "drained", "timer", "admitted", "lingering")

    def __init__(self, guard: Guard, make: Callable[[], "GuardedHttpToolsProtocol"],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.guard, self.make, self.loop = guard, make, loop
        self.buf = bytearray()
        self.lines = 0
        self.drained = 0   # bytes discarded while lingering after a refusal
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = self.lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.guard.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.admitted = True
        self.timer = self.loop.call_later(_jittered(self.guard.header_timeout_s), self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self.admitted:
            self.admitted = False
            self.guard.forget(self)
        _break_transport_cycle(self.transport)

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _g_pending(self) -> bool:
        return _pending(self.transport)

    def _guard_drop(self, reason: str) -> None:
        self.guard.count(reason)
        self._cancel()
        if self.admitted:
            self.admitted = False
            self.guard.forget(self)
        self.transport.abort()

    def _expired(self) -> None:
        self.timer = None
        if self.lingering or self.transport.is_closing():
            return
        if not self.buf:   # not a byte: an idle stranger, closed without a word
            self._guard_drop("idle_timeout")
        else:
            self._refuse(408, "header_timeout", f"request head not complete within {self.guard.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self.guard.count(reason)
        self._cancel()
        self.buf = bytearray()
        if _write_refusal(self.transport, status, message):
            self.lingering = True
            self.timer = self.loop.call_later(LINGER_S, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.lingering:   # discarded; past LINGER_BYTES the connection closes at once
            self.drained += len(data)
            if self.drained > LINGER_BYTES:
                self.transport.abort()
            return
        g, start = self.guard, max(0, len(self.buf) - 2)
        self.buf += data   # one read at most (asyncio reads 256 KiB): a head that stays open is cut below
        if self.buf.find(b"\n\r\n", start) < 0 and self.buf.find(b"\n\n", start) < 0:
            if len(self.buf) >= g.max_head_bytes:
                self._refuse(431, "head_too_large", f"request head larger than {g.max_head_bytes} bytes")
                return
            self.lines += data.count(b"\n")
            if self.lines > g.max_headers + 1:   # the request line and max_headers header lines, unfinished
                self._refuse(431, "too_many_headers", f"more than {g.max_headers} request headers")
            return
        # The head is complete: the guarded protocol takes the transport and this connection's place, and
        # re-reads the head (and whatever followed it) under the same caps.
        self._cancel()
        buffered, self.buf = bytes(self.buf), bytearray()
        proto = self.make()
        proto._g_adopted = True
        self.admitted = False
        self.guard.adopt(self, proto)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if not proto.transport.is_closing():
            proto.data_received(buffered)


class _QuietLog:
    """Warnings a stranger can cause (a malformed head, an upgrade): at most one per ``every_s`` seconds.

    uvicorn logs one line per malformed request, so a reconnect flood of garbage wrote a line per connection
    (thousands a second) to the operator's log pipeline. The lines left out are counted in the next one.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s, self.next_at, self.dropped = every_s, 0.0, 0

    def warning(self, logger: Any, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.dropped += 1
            return
        if self.dropped:
            message = f"{message} ({self.dropped} more such warnings since the last one, not logged)"
        logger.warning(message)
        self.next_at, self.dropped = now + self.every_s, 0


_QUIET = _QuietLog()


class _Reject(Exception):
    """Raised from a parser callback to stop parsing a head that broke a bound."""


_PHRASES = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol held to a :class:`Guard` (set on a subclass by :func:`protocol_class`)."""

    guard: Guard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._g_in_head = True        # waiting for (the rest of) a request head
        self._g_head = 0              # bytes of the current head fed to the parser
        self._g_headers = 0           # header lines of the current head
        self._g_reject: str | None = None
        self._g_timer: asyncio.TimerHandle | None = None
        self._g_lingering = False
        self._g_drained = 0           # bytes discarded while lingering
        self._g_framing = 0           # bytes fed since the body's last byte or chunk header (see data_received)
        self._g_wtimer: asyncio.TimerHandle | None = None   # armed while the peer reads none of its answers
        self._g_write_paused = False
        self._g_admitted = getattr(self, "_g_adopted", False) or self.guard.admit(self)
        if not self._g_admitted:
            transport.abort()
            return
        self._g_arm("header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._g_cancel()
        if self._g_wtimer is not None:
            self._g_wtimer.cancel()
            self._g_wtimer = None
        if self._g_admitted:
            self._g_admitted = False
            self.guard.forget(self)
        super().connection_lost(exc)
        _break_transport_cycle(self.transport)

    def _g_pending(self) -> bool:
        return _pending(self.transport)

    def _unsupported_upgrade_warning(self) -> None:
        _QUIET.warning(self.logger, "Unsupported upgrade request (no WebSocket support in the sidecar).")

    # -- timers ------------------------------------------------------------------------------------
    def _g_arm(self, reason: str) -> None:
        # Jittered: a flood opened within a few seconds would otherwise expire, and reconnect, in one wave
        # of thousands of closes per loop turn (measured: the slowest gateway flows sat inside those waves).
        self._g_cancel()
        self._g_timer = self.loop.call_later(_jittered(self.guard.header_timeout_s), self._g_expired, reason)

    def _g_cancel(self) -> None:
        if self._g_timer is not None:
            self._g_timer.cancel()
            self._g_timer = None

    def _g_expired(self, reason: str) -> None:
        self._g_timer = None
        if self.transport.is_closing() or self._g_lingering:
            return
        if reason == "header_timeout" and self._g_head == 0:
            reason = "idle_timeout"   # not a byte of a head: an idle stranger, closed without a word
            self._guard_drop(reason)
        elif reason == "header_timeout":
            self._g_refuse(408, reason, f"request head not complete within {self.guard.header_timeout_s:g} s")
        else:
            self._guard_drop(reason)

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.guard.count("idle_timeout")
        super().timeout_keep_alive_handler()

    # -- a peer that does not read its answers ------------------------------------------------------
    # uvicorn awaits the drain of a paused transport with no deadline, so a stranger that pipelines requests
    # and reads none of the answers held its connection (and every queued answer) for ever, and, being "a
    # request in progress", it was never evicted: enough of them refused the gateway's connections. While
    # the write side is paused the connection may be evicted (as one idle between requests), and if the peer
    # reads nothing for header_timeout_s it is closed ("write_stalled").
    def pause_writing(self) -> None:
        super().pause_writing()
        self._g_write_paused = True
        if self._g_admitted:
            self.guard.idle[self] = None
        if self._g_wtimer is None:
            self._g_wtimer = self.loop.call_later(self.guard.header_timeout_s, self._g_write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._g_write_paused = False
        if self._g_wtimer is not None:
            self._g_wtimer.cancel()
            self._g_wtimer = None
        if not self._g_between_requests():
            self.guard.idle.pop(self, None)

    def _g_write_stalled(self) -> None:
        self._g_wtimer = None
        if self._g_write_paused and not self.transport.is_closing():
            self._guard_drop("write_stalled")

    def _g_between_requests(self) -> bool:
        """Answered, and waiting for nothing but the next head (uvicorn's keep-alive wait)."""
        return self._g_in_head and self._g_head == 0 and (self.cycle is None or self.cycle.response_complete)

    # -- closing -----------------------------------------------------------------------------------
    def _guard_drop(self, reason: str) -> None:
        """Close at once (eviction, idle); the table forgets the connection now, not a loop turn later."""
        self.guard.count(reason)
        self._g_cancel()
        if self._g_admitted:
            self._g_admitted = False
            self.guard.forget(self)
        self.transport.abort()

    def _g_refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` and close; unread input is drained for a moment so the peer reads the answer."""
        self.guard.count(reason)
        self._g_cancel()
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():   # a pipelined head behind a running request: no room to answer
            self.transport.abort()
            return
        if not _write_refusal(self.transport, status, message):
            return
        self._g_lingering = True
        self._g_timer = self.loop.call_later(LINGER_S, self.transport.abort)

    # -- input -------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._g_lingering:   # discarded; the linger timer closes, or this does past LINGER_BYTES
            self._g_drained += len(data)
            if self._g_drained > LINGER_BYTES:
                self.transport.abort()
            return
        self._unset_keepalive_if_required()
        g = self.guard
        if self._g_in_head and self._g_timer is None:
            self._g_arm("header_timeout")   # first byte of a head after a keep-alive wait
        while data:
            # Never more than the head's room while a head is open (the parser buffers it); body bytes go
            # in pieces of the same size, so a head that begins inside a piece is counted from the next.
            room = g.max_head_bytes - self._g_head if self._g_in_head else g.max_head_bytes
            if room <= 0:
                self._g_refuse(431, "head_too_large", f"request head larger than {g.max_head_bytes} bytes")
                return
            piece, data = (data[:room], data[room:]) if len(data) > room else (data, b"")
            if self._g_in_head:
                self._g_head += len(piece)
            else:
                # Chunk-size lines, chunk extensions and trailers are neither head nor body: httptools buffers
                # a trailer's value whole (by repeated concatenation: quadratic), so a chunked body ending in a
                # trailer without end grew the process and stalled the loop for as long as the body deadline.
                # Every body byte and chunk header resets this count (on_body, on_chunk_header); past
                # max_head_bytes of neither, the connection closes.
                self._g_framing += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                if self._g_reject == "pipeline_too_deep":   # answers are still owed: no room for a refusal
                    self._guard_drop(self._g_reject)
                    return
                if self._g_reject is not None:
                    self._g_refuse(431, self._g_reject, f"more than {g.max_headers} request headers")
                    return
                _QUIET.warning(self.logger, "Invalid HTTP request received.")
                self._g_cancel()
                self.send_400_response("Invalid HTTP request received.")
                return
            if self.transport.is_closing():
                return
            if not self._g_in_head and self._g_framing > g.max_head_bytes:
                self._guard_drop("head_too_large")   # chunk framing or trailers past the head's cap
                return
        if self._g_in_head and self._g_head >= g.max_head_bytes:
            self._g_refuse(431, "head_too_large", f"request head larger than {g.max_head_bytes} bytes")

    # -- parser callbacks --------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._g_headers += 1
        if self._g_headers > self.guard.max_headers:
            self._g_reject = "too_many_headers"
            raise _Reject()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._g_in_head = False
        self._g_framing = 0
        self._g_cancel()
        # A keep-alive timer armed in on_message_complete (a body that ended after its answer) may still run
        # when the next head came in the same read: the request now in progress must not be closed by it.
        self._unset_keepalive_if_required()
        self.guard.fresh.pop(self, None)
        if not self._g_write_paused:   # a peer that reads none of its answers stays evictable
            self.guard.idle.pop(self, None)
        super().on_headers_complete()
        # uvicorn pauses reading behind a pipelined request, but the rest of the read already in hand (up to
        # 256 KiB) was still parsed into queued requests: 10 MB of "GET / HTTP/1.1" sent without reading the
        # answers grew the process by 730 MB. A client may pipeline a few; past PIPELINE_MAX it is closed.
        if len(self.pipeline) > PIPELINE_MAX:
            self._g_reject = "pipeline_too_deep"
            raise _Reject()

    def on_body(self, body: bytes) -> None:
        self._g_framing = 0
        super().on_body(body)

    def on_chunk_header(self) -> None:
        """httptools calls this after each chunk-size line: the framing before it was bounded by the line."""
        self._g_framing = 0

    def on_message_complete(self) -> None:
        # The next head starts here: its count begins at zero, its timer at its first byte.
        self._g_in_head, self._g_head, self._g_headers, self._g_framing = True, 0, 0, 0
        if self._g_timer is not None:   # the unread-body timer: the body did end
            self._g_cancel()
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing() \
                and not self._g_lingering and self._g_admitted:
            # The body ended after the answer (a 401 sent before it was read): the connection is now between
            # requests. The keep-alive timer uvicorn armed at the answer was cancelled by the body's bytes,
            # so without this a stranger that sent a short body after its 401 held the connection with no
            # timer and out of the eviction lists, for ever (20 of them locked out max_connections = 20).
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
            self.guard.fresh.pop(self, None)
            self.guard.idle[self] = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._g_lingering:
            return
        if not self._g_in_head and self.cycle is not None and self.cycle.response_complete:
            # Answered before the body was read (401, 413, 405): drain it, bounded. (``self.cycle`` is the
            # request whose body is arriving: when that is a pipelined one not yet answered, no timer.)
            self._g_arm("unread_body")
            # ... and evictable first, with the head-less strangers: it holds nothing but a body nobody reads
            # (strangers holding max_connections of these after their 401s refused the gateway's connections).
            if self._g_admitted:
                self.guard.fresh[self] = None
        elif self.cycle is not None and self.cycle.response_complete and self._g_admitted:
            self.guard.idle[self] = None   # between requests: may be evicted, after head-less strangers


def protocol_class(guard: Guard) -> type[GuardedHttpToolsProtocol]:
    """The guarded uvicorn protocol class whose connections share ``guard`` (without the gate)."""
    return type("SidecarHttpProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})


def gated_protocol(guard: Guard) -> Callable[..., Gate]:
    """For ``uvicorn.Config(http=...)``: each connection starts as a :class:`Gate` in front of the guarded protocol.

    uvicorn calls it as it would call a protocol class (``config=``, ``server_state=``, ``app_state=``, ``_loop=``).
    """
    cls = protocol_class(guard)

    def factory(**kw: Any) -> Gate:
        loop = kw.get("_loop") or asyncio.get_event_loop()
        return Gate(guard, functools.partial(cls, **kw), loop)

    return factory


__all__ = ["Guard", "Gate", "GuardedHttpToolsProtocol", "protocol_class", "gated_protocol", "raise_fd_limit", "connection_budget", "REASONS"]
