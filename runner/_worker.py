"""The supervisor's handle on one worker process.

A ``WorkerHandle`` is an asyncio protocol on the worker's reply pipe plus a
pidfd that becomes readable when the process dies, so death is noticed by
waiting on both, never by polling. State machine::

    STARTING --hello--> IDLE --execute--> BUSY --answer--> IDLE
        |                 |                 |
        +-----------------+--------+--------+--> DEAD (killed, crashed, or retired)

Whatever ends an execution (its answer, a timeout, a protocol violation, the
process dying) resolves its future exactly once; everything after that is
ignored. Any message the worker sends that the state does not expect kills it.

A BUSY worker may run several executions of one action at once (co-running,
``Limits.co_run``): the engine adds one only while every execution in the
worker waits on an ``api.fetch`` (:meth:`WorkerHandle.can_co_run`). Each call
the worker sends then names its execution (``xid``) and is charged to it. A
kill ends them all: the execution that caused it gets its own kind, the others
``worker_lost``; one that fails by itself (an uncaught error) leaves the others
to finish, and the worker is discarded after the last (``draining``).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..protocol import (
    FrameDecoder,
    FrameTooLarge,
    Notification,
    ProtocolError,
    Request,
    Response,
    check_hello,
    encode_frame,
    parse_message,
)

from ._rand import random_u32
from ._spawn import Spawned
from ._errors import Violation


_cpu = time.thread_time   # the loop thread's CPU time: what one execution's messages cost everyone else
log = logging.getLogger("actionpool")


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


class ApiFailure(Exception):
    """A value-returning api call failed; the action sees an exception, the worker lives."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class CallHandler:
    """What a BUSY worker's api calls are dispatched to (``runner._handlers.ExecutionContext``)."""

    def notify(self, method: str, params: list[Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def request(self, method: str, params: list[Any]) -> Awaitable[Any]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Outcome:
    """How one execution ended. ``error`` is ``None`` when the handler returned normally."""

    error: dict[str, Any] | None
    duration_ms: float
    reusable: bool


@dataclass
class _Running:
    msgid: int                    # of the execute request; the worker's xid for this execution's calls
    handler: CallHandler
    future: asyncio.Future[Outcome]
    started: float
    max_output: int
    max_queued: int = 2 << 20     # bytes of replies queued to the worker (it is not reading them)
    cpu_budget: float = 0.5       # seconds of supervisor CPU for this execution's messages and api calls
    bytes_in: int = 0
    cpu: float = 0.0              # supervisor CPU used so far on behalf of this execution
    timer: asyncio.TimerHandle | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    context: contextvars.Context | None = None   # the flow's: its api calls run (and log) in it
    fetching: int = 0             # api.fetch requests of this execution in the supervisor's hands
    heard: bool = False           # the worker sent something for it: it started


def _close_connected(task: "asyncio.Task[Any]") -> None:
    """Close the transport a pipe-connecting task made, if it made one."""
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def describe_exit(returncode: int | None) -> str:
    """``-9`` -> ``SIGKILL(-9)``; ``3`` -> ``exit code 3``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        return f"{name}({returncode})"
    return f"exit code {returncode}"


class WorkerHandle(asyncio.Protocol):
    def __init__(self, spawned: Spawned, *, max_frame: int, on_dead: Callable[["WorkerHandle"], None] | None = None,
                 profile: tuple[Any, ...] = ()) -> None:
        self.pid = spawned.pid
        self.profile = profile          # (memory_mb, cpu_seconds, max_open_files) the worker was started with
        self._spawned = spawned
        self.state = State.STARTING
        self.info: dict[str, Any] = {}
        self.tenant: str | None = None
        self.compiled: set[str] = set()
        self.executions = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.returncode: int | None = None
        self.death_reason: str | None = None
        self.memory_check: Callable[[], bool] | None = None  # True when the worker exceeded its memory cap
        self.co_digest: str | None = None   # the action whose executions may co-run here (set by the engine)
        self.on_park: Callable[["WorkerHandle"], None] | None = None   # every execution here waits on a fetch
        self.co_pending = 0   # flows handed this worker to join whose execute request is not sent yet
        self._max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.on_dead = on_dead
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._runs: dict[int, _Running] = {}   # executions in flight, by execute msgid (several: co-running)
        self.draining = False   # an execution failed beside others: no new ones, discarded after the last
        self._rtransport: asyncio.ReadTransport | None = None
        self._wtransport: asyncio.WriteTransport | None = None
        self._pidfd: int | None = None
        self._pipes: list[Any] = []
        self.on_exit: list[Callable[[], None]] = []   # cleanups once the process is gone (its cgroup)
        self._raw_closed = False
        self._tasks: set[asyncio.Task[Any]] = set()   # crash reports in progress
        self._answered: list[tuple[_Running, dict[str, Any] | None]] = []
        self._sizes: list[int] = []   # frame sizes of the last read (charged to each frame's execution)

    @property
    def _running(self) -> _Running | None:
        """The execution in flight when there is one (the first of several while co-running)."""
        for run in self._runs.values():
            return run
        return None

    @property
    def running(self) -> int:
        """How many executions are in flight on this worker."""
        return len(self._runs)

    def can_co_run(self, digest: str, limit: int) -> bool:
        """True when one more execution of ``digest`` may join: all here wait on api.fetch, room left.

        Waiting on a fetch is known here (the request is in the supervisor's hands), so a worker
        whose executions compute, or wait on anything else, is never given another. An execution
        sent but not yet heard of counts as waiting: it is one the worker has not begun, of an
        action seen to reach its fetch (the engine only asks for those), so joiners queue behind
        it in the worker's pipe instead of one start at a time.
        """
        if self.state is not State.BUSY or self.draining or len(self._runs) + self.co_pending >= limit or \
                self.co_digest != digest:
            return False
        for run in self._runs.values():
            if not run.fetching and run.heard:
                return False
        return True

    def co_room(self, digest: str, limit: int) -> int:
        """Executions of ``digest`` that may still join here once its executions wait (0: none)."""
        if self.state is not State.BUSY or self.draining or self.co_digest != digest:
            return 0
        return max(0, limit - len(self._runs) - self.co_pending)

    # -- life cycle ------------------------------------------------------------
    async def start(self, configure: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Connect the pipes, send the configuration, wait for the hello."""
        loop = self._loop
        # Pipes first, death watch second: a worker that dies at once must not close the pipe
        # ends under a half-connected transport (its death is seen right after, through the pidfd).
        self._pipes = [os.fdopen(self._spawned.rfd, "rb", buffering=0), os.fdopen(self._spawned.wfd, "wb", buffering=0)]
        # The pipe's callbacks run in a context of their own, not in that of the flow whose acquire happened
        # to start this worker: a later flow's log lines must not name that one (sidecar/_logs.py).
        connecting = loop.create_task(loop.connect_read_pipe(lambda: self, self._pipes[0]),
                                      context=contextvars.Context())
        try:
            self._rtransport, _ = await connecting
        except BaseException:  # cancelled as the pipe connected: close the transport nobody will hold
            if connecting.done():
                _close_connected(connecting)
            else:
                connecting.add_done_callback(_close_connected)
            raise
        self._wtransport, _ = await loop.connect_write_pipe(asyncio.Protocol, self._pipes[1])
        try:
            self._pidfd = os.pidfd_open(self.pid)
            contextvars.Context().run(loop.add_reader, self._pidfd, self._on_exit)
        except OSError:  # the process is already gone; waitpid finds its status
            self._pidfd = None
            self._reap()
        self._write(Notification("configure", [configure]).wire())
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            self.kill("did not say hello in time")
            raise RuntimeError(f"worker {self.pid} did not start within {timeout:.1f}s") from None
        return self.info

    def kill(self, reason: str) -> None:
        """SIGKILL the worker's whole process group. Idempotent."""
        if self.state is not State.DEAD:
            self.death_reason = self.death_reason or reason
            self.state = State.DEAD
            if self.on_dead is not None:
                self.on_dead(self)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._close_transports()
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(f"worker {self.pid} died before its hello: {reason}"))
            self._ready.exception()  # mark retrieved

    async def shutdown(self, grace: float) -> None:
        """Ask the worker to exit; kill it if it has not within ``grace`` seconds."""
        if self.state is State.IDLE:
            self._write(Notification("shutdown", []).wire())
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), grace)
            except asyncio.TimeoutError:
                pass
        self.kill("shut down")
        await self.wait_exit(grace)
        if self._tasks:  # a crash report in progress answers its execution first
            await asyncio.wait(list(self._tasks), timeout=max(grace, 1.0))

    async def wait_exit(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            return None

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    # -- execution ---------------------------------------------------------------
    def execute(self, params: dict[str, Any], handler: CallHandler, timeout: float, timeout_kind: str,
                max_output: int, *, max_queued: int = 2 << 20, cpu_budget_s: float = 0.5) -> asyncio.Future[Outcome]:
        """Send one execute request; the future resolves exactly once with its Outcome.

        ``max_output`` bounds the bytes the worker sends, ``max_queued`` the bytes of replies
        waiting for it to read, ``cpu_budget_s`` the supervisor CPU its messages and api calls
        may use; going over any of them kills the worker (``output_limit``).
        """
        if self.state is not State.IDLE and not (self.state is State.BUSY and self._runs and not self.draining):
            # Died between being handed out and being used (an OOM kill, an external SIGKILL).
            fut: asyncio.Future[Outcome] = self._loop.create_future()
            fut.set_result(Outcome({"kind": "worker_crash", "message": f"worker died before the execution started: "
                                    f"{self.death_reason or describe_exit(self.returncode)}"}, 0.0, False))
            return fut
        self.state = State.BUSY
        # An unpredictable id: a blind forgery of the answer from inside the worker names no pending request.
        fut = self._loop.create_future()
        msgid = random_u32()
        while msgid in self._runs:
            msgid = random_u32()
        run = _Running(msgid, handler, fut, time.perf_counter(), max_output, max_queued, cpu_budget_s,
                       context=contextvars.copy_context())
        self._runs[msgid] = run
        self.executions += 1
        run.timer = self._loop.call_later(timeout, self._on_timeout, run, timeout_kind, timeout)
        try:
            self._write(Request(run.msgid, "execute", [params]).wire())
        except (ValueError, TypeError, ProtocolError) as exc:  # an event too large for one frame
            self._violation("protocol_error", f"execute request could not be encoded: {exc}", run)
        return fut

    def _on_timeout(self, run: _Running, kind: str, timeout: float) -> None:
        if self._runs.get(run.msgid) is run:
            self._drain_logs(run)
            if self._oom_killed():
                # The kernel already OOM-killed it; a demoted (SCHED_IDLE) worker on a busy machine can take
                # longer to be scheduled and exit than its time limit: the verdict is still its memory.
                self._end_all("memory_limit", "worker killed for exceeding its memory limit (OOM kill)")
            else:
                what = "flow" if kind == "flow_timeout" else "action"
                self._violation(kind, f"{what} exceeded its {timeout:.3g}s time limit; worker killed", run)

    def _oom_killed(self) -> bool:
        if self.memory_check is None:
            return False
        try:
            return bool(self.memory_check())
        except Exception:
            log.exception("worker %d: could not read its memory cgroup's OOM verdict", self.pid)
            return False

    def _finish(self, run: _Running, error: dict[str, Any] | None, reusable: bool) -> None:
        if self._runs.get(run.msgid) is not run:
            return
        del self._runs[run.msgid]
        if run.timer is not None:
            run.timer.cancel()
        for t in run.tasks:
            t.cancel()
        self.last_used = time.monotonic()
        if not run.future.done():
            run.future.set_result(Outcome(error, (time.perf_counter() - run.started) * 1000.0, reusable))
        if not self._runs and self.state is State.BUSY:
            if reusable and not self.draining:
                self.state = State.IDLE
            elif self.draining:   # the last of several, after one of them failed: nothing more runs here
                self.kill("discarded after an execution beside others failed")

    def fail_execution(self, kind: str, message: str) -> None:
        """End the running executions with ``kind`` and kill the worker (a limit enforced from outside: cpu_limit)."""
        self._end_all(kind, message)

    def _violation(self, kind: str, message: str, culprit: _Running | None = None) -> None:
        """Kill the worker for what ``culprit`` did: it gets ``kind``, executions beside it ``worker_lost``.

        Without a culprit (one execution only, or nothing says whose bytes broke the rules) every
        execution in flight gets ``kind``.
        """
        if culprit is None and len(self._runs) == 1:
            culprit = self._running
        if culprit is None or len(self._runs) <= 1:
            self._end_all(kind, message)
            return
        self._finish(culprit, {"kind": kind, "message": message}, False)
        lost = f"killed with another execution of this action in the same worker ({kind}: {message})"
        for run in list(self._runs.values()):
            self._finish(run, {"kind": "worker_lost", "message": lost}, False)
        self.kill(f"{kind}: {message}")

    def _end_all(self, kind: str, message: str) -> None:
        """Every execution in flight ends with ``kind``, then the worker is killed."""
        for run in list(self._runs.values()):
            self._finish(run, {"kind": kind, "message": message}, False)
        self.kill(f"{kind}: {message}")

    # -- protocol callbacks --------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.state is State.DEAD:
            return
        if len(self._runs) > 1:
            self._data_co(data)
            return
        run = self._running
        if run is not None:
            run.bytes_in += len(data)
            if run.bytes_in > run.max_output:
                self._salvage_logs(run, data[:max(len(data) - (run.bytes_in - run.max_output), 0)])
                self._violation("output_limit", f"worker sent more than {run.max_output} bytes in one execution")
                return
        self._guarded(self._feed_one, data, run)

    def _feed_one(self, data: bytes, run: _Running | None) -> None:
        start = _cpu()
        for value in self._decoder.feed(data):
            self._dispatch(parse_message(value))
            if self.state is State.DEAD:
                return
        if run is not None:
            self._charge(run, _cpu() - start)

    def _guarded(self, feed: Callable[..., None], *args: Any) -> None:
        """Run one read's dispatch; a broken rule kills the worker, else the answers in it count."""
        try:
            feed(*args)
        except ProtocolError as exc:
            self._answered.clear()
            self._violation("protocol_error", f"{type(exc).__name__}: {exc}")
        except Violation as exc:
            self._answered.clear()
            self._violation(exc.kind, str(exc), exc.culprit)
        else:
            if self.state is State.DEAD:
                self._answered.clear()
            else:
                self._complete_answered()

    def _data_co(self, data: bytes) -> None:
        """A read while several executions run: each frame is charged to the execution it names."""
        sizes = self._sizes
        sizes.clear()
        start = _cpu()
        try:
            values = self._decoder.feed(data, sizes)
        except ProtocolError as exc:   # a broken stream names no execution: all of them lose it
            self._violation("protocol_error", f"{type(exc).__name__}: {exc}")
            return
        self._guarded(self._feed_co, values, sizes, (_cpu() - start) / max(len(values), 1))

    def _feed_co(self, values: list[Any], sizes: list[int], cost: float) -> None:
        for value, size in zip(values, sizes):
            start = _cpu()
            msg = parse_message(value)
            run = self._runs.get(msg.msgid) if type(msg) is Response else \
                self._run_named(msg.xid, type(msg).__name__)
            if run is not None:
                run.bytes_in += size
                if run.bytes_in > run.max_output:
                    if type(msg) is Notification and msg.method == "log":
                        run.handler.notify("log", msg.params)  # the line that went over is still shown
                    raise Violation("output_limit", f"worker sent more than {run.max_output} bytes in one execution",
                                    run)
            self._dispatch(msg)
            if self.state is State.DEAD:
                return
            if run is not None:
                self._charge(run, cost + _cpu() - start)
                if self.state is State.DEAD:
                    return

    def _complete_answered(self) -> None:
        # An answer counts only if nothing after it in the same read broke the rules
        # (a forged answer followed by anything else is a protocol violation).
        if self._answered:
            answered = list(self._answered)
            self._answered.clear()
            for run, error in answered:
                self._complete(run, error)

    def _run_named(self, xid: int | None, what: str) -> _Running:
        """The execution a call belongs to: the one its ``xid`` names, or the only one in flight."""
        if xid is None:
            if len(self._runs) != 1:
                raise Violation("protocol_error", f"a {what} without an execution id while "
                                                  f"{len(self._runs)} executions run")
            run = self._running
            assert run is not None
        else:
            got = self._runs.get(xid)
            if got is None:
                raise Violation("protocol_error", f"a {what} for an execution that is not running here")
            run = got
        for done, _ in self._answered:
            if done is run:
                raise Violation("protocol_error", f"{what} after the execution's answer", run)
        return run

    def _dispatch(self, msg: Any) -> None:
        state = self.state
        if state is State.BUSY:
            t = type(msg)
            if t is Notification:
                run = self._run_named(msg.xid, "Notification")
                run.heard = True
                try:
                    run.handler.notify(msg.method, msg.params)
                except Violation as exc:
                    exc.culprit = exc.culprit or run
                    raise
            elif t is Request:
                run = self._run_named(msg.xid, "Request")
                run.heard = True
                task = self._loop.create_task(self._serve_request(run, msg), context=run.context)
                run.tasks.add(task)
                task.add_done_callback(run.tasks.discard)
            else:
                run = self._runs.get(msg.msgid)
                if run is None:
                    raise Violation("protocol_error", f"response to unknown message id {msg.msgid}")
                for done, _ in self._answered:
                    if done is run:
                        raise Violation("protocol_error", "Response after the execution's answer", run)
                self._on_answer(run, msg)
        elif state is State.STARTING:
            try:
                pid, info = check_hello(msg)
            except ProtocolError as exc:
                raise Violation("protocol_error", f"bad hello: {exc}") from None
            if pid != self.pid:
                raise Violation("protocol_error", f"hello announced pid {pid}, process is {self.pid}")
            self.info = info
            if "sandbox_error" in info:
                self._ready.set_exception(RuntimeError(str(info["sandbox_error"])))
                return
            self.state = State.IDLE
            self._ready.set_result(info)
        else:
            raise Violation("protocol_error", f"unexpected {type(msg).__name__} from an idle worker")

    def _on_answer(self, run: _Running, msg: Response) -> None:
        if len(self._runs) > 1 and any(not t.done() for t in run.tasks):
            # Answered while a request of its own is still being served: an execution that gave up on a
            # call (asyncio.wait_for) does that, and so does an answer another execution here forged in
            # its name, after which the named one would run on unseen. The worker is not reused.
            self.draining = True
        error = msg.error
        if error is not None:
            if type(error) is not dict or not all(type(k) is str and type(v) is str for k, v in error.items()):
                raise Violation("protocol_error", "execute error must be a map of strings", run)
            kind = error.get("kind")
            if kind not in ("uncaught_error", "memory_limit"):
                raise Violation("protocol_error", f"worker reported an unknown error kind {kind!r:.40}", run)
        self._answered.append((run, error))

    def _complete(self, run: _Running, error: dict[str, Any] | None) -> None:
        # No cgroup read here: a worker that answered was not OOM-killed (it is the only task in
        # its cgroup); the verdict is read on the crash path, where it matters.
        if error is not None and len(self._runs) > 1:
            # Failed by itself: the others beside it finish first, then the worker is discarded.
            self.draining = True
            self._finish(run, error, False)
            return
        self._finish(run, error, error is None)
        if error is not None:
            self.kill(f"execution failed: {error.get('kind')}")

    async def _serve_request(self, run: _Running, req: Request) -> None:
        """Run one value-returning call and answer it; every failure is an error reply the action can catch."""
        fetch = req.method == "fetch"
        if fetch:
            run.fetching += 1   # while it is in our hands, this execution waits (see can_co_run)
            if self.on_park is not None and self.co_digest is not None:
                self.on_park(self)   # flows waiting to join may now (can_co_run decides)
        try:
            start = _cpu()
            try:
                coro = run.handler.request(req.method, req.params)   # admission: may raise Violation
            finally:
                self._charge(run, _cpu() - start)
            if self._runs.get(run.msgid) is not run:
                coro.close()
                return
            result = await _Metered(coro, self, run)
            reply = Response(req.msgid, None, result)
        except ApiFailure as exc:
            reply = _error_reply(req.msgid, exc.kind, str(exc))
        except Violation as exc:
            if self._runs.get(run.msgid) is run:
                self._violation(exc.kind, str(exc), run)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind = getattr(exc, "error_kind", None)   # FetchError, CacheUnavailable raised unmapped
            if type(kind) is not str:
                log.exception("api.%s failed in the supervisor", req.method)
                kind = "internal_error"
            reply = _error_reply(req.msgid, kind, str(exc) or type(exc).__name__)
        finally:
            if fetch:
                run.fetching -= 1
        if self._runs.get(run.msgid) is run and self.state is State.BUSY:
            self._reply(run, reply)

    def _reply(self, run: _Running, reply: Response) -> None:
        """Write one reply; an unencodable or oversized result becomes an error reply, never silence."""
        try:
            frame = encode_frame(reply.wire(), self._max_frame)
        except FrameTooLarge as exc:
            frame = encode_frame(_error_reply(reply.msgid, "reply_too_large", str(exc)).wire(), self._max_frame)
        except (TypeError, ValueError) as exc:  # e.g. a string that is not valid UTF-8
            frame = encode_frame(_error_reply(reply.msgid, "internal_error",
                                              f"the reply could not be encoded: {type(exc).__name__}").wire(),
                                 self._max_frame)
        t = self._wtransport
        if t is None or t.is_closing():
            return
        t.write(frame)
        # Back-pressure: a worker that does not read its replies may not make us hold them.
        queued = t.get_write_buffer_size()
        if queued > run.max_queued:
            self._violation("output_limit", f"{queued} bytes of replies queued to a worker that does not read "
                                            f"them (limit {run.max_queued})", run)

    def _charge(self, run: _Running, seconds: float) -> None:
        """Count supervisor CPU against ``run``; over its budget the worker is killed."""
        run.cpu += seconds
        if run.cpu > run.cpu_budget and self._runs.get(run.msgid) is run:
            self._violation("output_limit", f"api calls used more than {run.cpu_budget * 1000:.0f} ms of "
                                            "supervisor CPU time in one execution", run)

    def eof_received(self) -> bool:
        self._pipe_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe_closed()

    def _pipe_closed(self) -> None:
        if self._running is not None:
            # The answer waits for the exit status so it can name the signal or code.
            self._background(self._crash_report(self._running))
        elif self.state is not State.DEAD:
            self.kill("closed its pipe")

    async def _crash_report(self, run: _Running) -> None:
        """The verdict of a worker that died mid-execution: every execution in it shares it (none says whose)."""
        code = await self.wait_exit(0.5)
        if self._runs.get(run.msgid) is not run:
            return
        if code is None:
            self._end_all("protocol_error", "worker closed its pipe mid-execution")
            return
        if self.memory_check is not None and self.memory_check():
            self._end_all("memory_limit", f"worker killed for exceeding its memory limit ({describe_exit(code)})")
            return
        self._end_all("worker_crash", f"worker died: {describe_exit(code)}")

    # -- log lines of a killed execution -------------------------------------------------
    def _drain_logs(self, run: _Running) -> None:
        """Before a killed execution's verdict: the log lines still in the pipe (within the output budget)."""
        if not self._pipes or self._rtransport is None or self._rtransport.is_closing():
            return
        fd = self._pipes[0].fileno()
        while run.bytes_in < run.max_output:
            try:
                data = os.read(fd, min(1 << 16, run.max_output - run.bytes_in))  # non-blocking (asyncio's pipe)
            except OSError:  # EAGAIN: nothing more; anything else: nothing to read
                return
            if not data:
                return
            run.bytes_in += len(data)
            if not self._salvage_logs(run, data):
                return

    def _salvage_logs(self, run: _Running, data: bytes) -> bool:
        """Apply only the ``log`` notifications in ``data``; False once the stream or the budget breaks."""
        try:
            for value in self._decoder.feed(data):
                msg = parse_message(value)
                if type(msg) is Notification and msg.method == "log":
                    # Each line to the execution that logged it (several may share the worker).
                    owner = run if msg.xid is None or msg.xid == run.msgid else self._runs.get(msg.xid)
                    if owner is not None:
                        owner.handler.notify("log", msg.params)
        except (ProtocolError, Violation):
            return False
        return True

    # -- plumbing -------------------------------------------------------------------
    def _background(self, coro: Any) -> None:
        """A task this handle owns: kept until done, awaited by ``shutdown``, its failure logged."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %d: background task failed", self.pid, exc_info=task.exception())

    def _write(self, wire: list[Any]) -> None:
        t = self._wtransport
        if t is not None and not t.is_closing():
            t.write(encode_frame(wire, self._max_frame))

    def _close_transports(self) -> None:
        if self._rtransport is not None and not self._rtransport.is_closing():
            self._rtransport.close()
        if self._wtransport is not None and not self._wtransport.is_closing():
            self._wtransport.abort()  # never wait to flush requests to a dead worker
        if not self._raw_closed:
            # Pipe ends no transport owns yet (killed while connecting) are closed here, once.
            self._raw_closed = True
            owners = (self._rtransport, self._wtransport)
            if self._pipes:
                for f, owner in zip(self._pipes, owners):
                    if owner is None:
                        f.close()
            else:
                for fd in (self._spawned.rfd, self._spawned.wfd):
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def _on_exit(self) -> None:
        self._reap()

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.returncode = os.waitstatus_to_exitcode(status)
        try:  # anything it left in its process group goes with it
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.memory_check is not None:
            # Read the OOM verdict now: the cleanups below remove the cgroup that holds it.
            try:
                verdict = self.memory_check()
            except Exception:
                log.exception("worker %d: could not read its memory cgroup's OOM verdict", self.pid)
                verdict = False
            self.memory_check = lambda: verdict
        for fn in self.on_exit:
            try:
                fn()
            except Exception:  # a cleanup failing must not break death handling
                log.exception("worker %d: cleanup after exit failed", self.pid)
        self.on_exit.clear()
        if not self._exited.done():
            self._exited.set_result(self.returncode)
        if self._running is None and self.state is not State.DEAD:
            self.kill(f"exited: {describe_exit(self.returncode)}")
        elif self._running is not None:
            self._drain_logs(self._running)  # the pipe is closed next: read the lines still in it
            self._background(self._crash_report(self._running))
        self._close_transports()


def _error_reply(msgid: int, kind: str, message: str) -> Response:
    """The error reply of a value-returning call: ``api.ApiError`` with ``.code == kind`` in the action."""
    return Response(msgid, {"kind": kind, "message": message[:4096]}, None)


class _Metered:
    """Awaits a handler's coroutine, charging the loop thread's CPU time of each of its steps to one run.

    Only the steps of this coroutine are measured (not the time it waits, nor other tasks), so a
    fetch that waits 4 s on the network costs what its parsing and decoding cost.
    """

    __slots__ = ("_coro", "_handle", "_run")

    def __init__(self, coro: Any, handle: WorkerHandle, run: _Running) -> None:
        self._coro = coro
        self._handle = handle
        self._run = run

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        start = _cpu()
        try:
            return self._coro.send(value)
        finally:
            self._handle._charge(self._run, _cpu() - start)

    def throw(self, *exc: Any) -> Any:
        start = _cpu()
        try:
            return self._coro.throw(*exc)
        finally:
            self._handle._charge(self._run, _cpu() - start)

    def close(self) -> None:
        self._coro.close()
