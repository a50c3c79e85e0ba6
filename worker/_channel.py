"""The worker's end of the pipe: blocking reads, coalesced writes.

Calls that return nothing (notifications) are buffered and written together
with the next request or with the execution's answer, so a typical action
costs the supervisor one wake-up. Value-returning calls flush and wait.
While an ``async def`` handler runs, the pipe is also watched by the event
loop so several ``await api.fetch(...)`` can be in flight at once.

Request ids are unique for the worker's life, so every reply names the one
request, and with it the one execution, it answers. While several executions
run at once (an ``execute`` request that arrives while others await their
replies starts another), each one's calls go through its own
:class:`TaggedChannel`, which adds the execution id to every call it sends. A reply nobody waits for
any more (its request was abandoned: a task cancelled when its execution
ended, or the supervisor answered just as the execution did) is dropped and
counted in ``stale``; it can never reach a later execution.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

from ..protocol import (FrameDecoder, FrameTooLarge, InvalidMessage, Notification, Request, Response, encode_frame,
                        parse_message)
from ..protocol._framing import HEADER

FLUSH_AT = 64 * 1024


class PipeClosed(Exception):
    """The supervisor closed its end: the worker has nothing left to do."""


class Channel:
    def __init__(self, rfd: int, wfd: int, max_frame: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.max_frame = max_frame
        self.decoder = FrameDecoder(max_frame)
        self.inbox: deque[Any] = deque()
        self.out = bytearray()
        self.coalesce = True
        self._next_id = 1
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.stale = 0   # replies to requests nobody waits for any more, dropped
        # Set by the runtime while executions run on the event loop: what to do with a request or
        # notification from the supervisor (a new ``execute``, ``shutdown``); None: none may come.
        self.on_message: Any = None
        self.deferred: deque[Any] = deque()   # such messages read during a blocking call, for after it
        self.on_deferred: Any = None          # called once a blocking call returns with messages deferred

    # -- writing -------------------------------------------------------------
    def queue(self, wire: list[Any]) -> None:
        """Buffer one message; it is written at the next flush."""
        try:
            frame = encode_frame(wire, self.max_frame)
        except UnicodeEncodeError:
            # Raised inside the action at call time, like any other value that cannot be serialised.
            raise TypeError("a string argument is not valid UTF-8 (it contains a lone surrogate)") from None
        except FrameTooLarge as exc:
            name = wire[1] if wire[0] == 2 else wire[2]
            raise ValueError(f"api.{name}: the arguments are too large to send ({exc})") from None
        self.out += frame
        if not self.coalesce or len(self.out) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        view = memoryview(out)
        try:
            while view:
                n = os.write(self.wfd, view)
                view = view[n:]
        finally:
            view.release()
            out.clear()

    def send(self, wire: list[Any]) -> None:
        self.queue(wire)
        self.flush()

    def new_id(self) -> int:
        i = self._next_id
        self._next_id = i + 1 if i < 2**32 - 1 else 1
        return i

    # -- reading -------------------------------------------------------------
    def _read_some(self) -> None:
        data = os.read(self.rfd, 1 << 16)
        if not data:
            raise PipeClosed()
        for value in self.decoder.feed(data):
            self.inbox.append(parse_message(value))

    def recv(self) -> Any:
        """Block until one whole message has arrived."""
        while not self.inbox:
            self._read_some()
        return self.inbox.popleft()

    def call(self, method: str, params: list[Any], xid: int | None = None) -> Any:
        """A synchronous request: send, then block for its response.

        While executions share the loop, a new ``execute`` arriving meanwhile is kept in
        ``deferred`` and started once this call has returned (``on_message`` schedules that).
        """
        msgid = self.new_id()
        self.send(Request(msgid, method, params, xid).wire())
        while True:
            msg = self.recv()
            if type(msg) is Response:
                if msg.msgid == msgid:
                    if self.deferred and self.on_deferred is not None:
                        self.on_deferred()
                    return msg
                self._resolve(msg)
                continue
            if self.on_message is not None:
                self.deferred.append(msg)
                continue
            raise InvalidMessage(f"unexpected {type(msg).__name__} while waiting for a reply")

    async def call_async(self, method: str, params: list[Any], xid: int | None = None,
                         mine: "dict[int, asyncio.Future[Any]] | None" = None) -> Any:
        """An awaited request; ``mine`` is the execution's own table of requests in flight."""
        loop = asyncio.get_running_loop()
        msgid = self.new_id()
        fut: asyncio.Future[Any] = loop.create_future()
        self.waiting[msgid] = fut
        if mine is not None:
            mine[msgid] = fut
        try:
            self.send(Request(msgid, method, params, xid).wire())
            return await fut
        finally:
            self.waiting.pop(msgid, None)
            if mine is not None:
                mine.pop(msgid, None)

    def _resolve(self, msg: Response) -> None:
        fut = self.waiting.get(msg.msgid)
        if fut is None:  # its request was abandoned (see the module docstring)
            self.stale += 1
            return
        if not fut.done():
            fut.set_result(msg)

    def on_readable(self) -> None:
        """Event-loop callback while async handlers run: deliver replies (and new executions)."""
        self._read_some()
        while self.inbox:
            msg = self.inbox.popleft()
            if type(msg) is Response:
                self._resolve(msg)
            elif self.on_message is not None:
                self.on_message(msg)
            else:
                raise InvalidMessage(f"unexpected {type(msg).__name__} during an execution")


class TaggedChannel:
    """One execution's view of the channel: every call it sends names the execution (``xid``).

    It also keeps the execution's own requests in flight (``waiting``), so the end of one
    execution waits for its calls only, never for those of another running beside it.
    """

    __slots__ = ("channel", "xid", "waiting", "max_frame")

    def __init__(self, channel: Channel, xid: int) -> None:
        self.channel = channel
        self.xid = xid
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.max_frame = channel.max_frame

    def queue(self, wire: list[Any]) -> None:
        wire.append(self.xid)
        self.channel.queue(wire)

    def flush(self) -> None:
        self.channel.flush()

    def send(self, wire: list[Any]) -> None:
        self.queue(wire)
        self.channel.flush()

    def call(self, method: str, params: list[Any]) -> Any:
        return self.channel.call(method, params, self.xid)

    async def call_async(self, method: str, params: list[Any]) -> Any:
        return await self.channel.call_async(method, params, self.xid, self.waiting)


class NullChannel(Channel):
    """A channel to nobody, for the warm-up execution (``Runtime.prime``).

    Every message is framed as for the pipe and then dropped; a request is answered with an empty
    result that went through the same decoder a real reply goes through. Nothing reaches the
    supervisor, so the warm-up can neither change a flow nor be seen by one.
    """

    def __init__(self, max_frame: int) -> None:
        super().__init__(-1, -1, max_frame)

    def flush(self) -> None:
        self.out.clear()

    def call(self, method: str, params: list[Any], xid: int | None = None) -> Any:
        msgid = self.new_id()
        self.send(Request(msgid, method, params, xid).wire())
        for value in self.decoder.feed(encode_frame(Response(msgid, None, None).wire(), self.max_frame)):
            return parse_message(value)
        raise InvalidMessage("no reply decoded")


def notification(method: str, params: list[Any]) -> list[Any]:
    return Notification(method, params).wire()


__all__ = ["Channel", "NullChannel", "PipeClosed", "TaggedChannel", "notification", "HEADER"]
