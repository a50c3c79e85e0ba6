"""Supervisor side of the fork template: cheap, clean workers on request.

A fresh interpreter costs ~45 ms; a fork of the template, which has already
imported everything a worker needs, costs a few. The template is spawned
clean (it never sees configuration, events, secrets or action code) and is
itself a child of the supervisor; the workers it forks are the supervisor's
children too (``CLONE_PARENT``), so they are waited for, killed and reported
exactly like spawned ones. See ``worker/_template.py`` for the other side.

If the template dies, the next request respawns it and retries once, so no
flow is lost to a template crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import msgpack

from ._spawn import Spawned, spawn_template, worker_pipes
from ._errors import TemplateError


class Template:
    def __init__(self, python: str | None = None, start_timeout: float = 10.0,
                 opts: dict[str, Any] | None = None) -> None:
        self.python = python
        self.opts = dict(opts or {})       # sandbox settings the template prepares once (no tenant data)
        self.prepared: dict[str, Any] = {}  # what it prepared, from its "ready" message
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self.forks = 0
        self.respawns = 0
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._ready: asyncio.Future[int] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        if self._sock is not None:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        if self.pid is not None:
            self.respawns += 1  # counted once per actual start, however many forks were waiting on it
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = spawn_template(self.python, theirs.fileno(), self.opts)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.pid = pid
        self._ready = loop.create_future()
        self._sock = ours
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            self._pidfd = os.pidfd_open(pid)
            loop.add_reader(self._pidfd, self._on_exit)
        except OSError:
            self._pidfd = None
        try:
            await asyncio.wait_for(self._ready, self.start_timeout)
        except TemplateError:
            raise
        except BaseException:
            self._dead("did not start")
            raise TemplateError("fork template did not start") from None

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._dead("closed its socket")
            return
        try:
            msg = msgpack.unpackb(data)
        except Exception:
            self._dead("sent garbage")
            return
        if msg and msg[0] == "ready" and self._ready is not None and not self._ready.done():
            self.prepared = msg[2] if len(msg) > 2 and isinstance(msg[2], dict) else {}
            self._ready.set_result(msg[1])
            return
        seq, pid, error = msg
        fut = self._pending.pop(seq, None)
        if fut is None or fut.done():
            return
        if error is not None or type(pid) is not int or pid <= 0:
            fut.set_exception(TemplateError(f"template could not fork: {error}"))
        else:
            fut.set_result(pid)

    def _on_exit(self) -> None:
        if self.pid is not None:
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self._dead("exited")

    def _dead(self, why: str) -> None:
        loop = asyncio.get_event_loop()
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, os.WNOHANG)
            except (ProcessLookupError, ChildProcessError):
                pass
        # A template that dies while starting fails its start now, not after start_timeout.
        waiting = [*self._pending.values(), *([self._ready] if self._ready is not None else [])]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(TemplateError(f"fork template {why}"))
        self._pending.clear()

    async def fork(self) -> Spawned:
        """A new worker process, forked from the template (respawned once if it died)."""
        for attempt in (0, 1):
            if self._closed:
                raise TemplateError("template closed")
            if self._sock is None:
                await self.start()
            try:
                return await self._fork_once()
            except TemplateError:
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _fork_once(self) -> Spawned:
        sock = self._sock
        if sock is None:
            raise TemplateError("fork template is not running")
        (wr, ww), (sr, sw) = worker_pipes()
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            socket.send_fds(sock, [msgpack.packb([seq])], [wr, ww])
        except OSError as exc:
            self._pending.pop(seq, None)
            for fd in (sr, sw):
                os.close(fd)
            self._dead(f"refused a request: {exc}")
            raise TemplateError(f"fork template unreachable: {exc}") from None
        finally:
            os.close(wr)
            os.close(ww)
        try:
            pid = await asyncio.wait_for(fut, self.start_timeout)
        except BaseException:
            for fd in (sr, sw):
                os.close(fd)
            if not fut.done():
                self._pending.pop(seq, None)
            raise
        self.forks += 1
        return Spawned(pid, sr, sw)

    async def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._dead("closed")
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()

    def stats(self) -> dict[str, Any]:
        return {"template_pid": self.pid, "template_forks": self.forks, "template_respawns": self.respawns}
