"""Fault injection at the protocol level: fake workers that break the contract at every stage.

Each case is a small script that speaks (or fails to speak) the protocol on fds 3/4
exactly where a real worker would. The supervisor's WorkerHandle must end every
case in a bounded time with the right verdict, kill the process, and keep serving:
a real Runner flow runs after every case.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from typing import Any

import psutil
import pytest

from conftest import make_runner, run
from actionpool.runner._spawn import Spawned, _site_paths, _spawn, register_code, worker_pipes
from actionpool.runner._worker import State, Violation, WorkerHandle

PRELUDE = f"""
import os, sys, time, struct
sys.path[:] = {_site_paths()!r}
{register_code()}
from actionpool.protocol import encode_frame, FrameDecoder, parse_message, PROTOCOL_VERSION
def send(obj): os.write(4, encode_frame(obj))
def send_raw(b): os.write(4, b)
def recv():
    d = FrameDecoder()
    while True:
        data = os.read(3, 65536)
        if not data: sys.exit(0)
        for v in d.feed(data): return parse_message(v)
def hello(version=PROTOCOL_VERSION, pid=None): send([2, "hello", [version, pid or os.getpid(), {{}}]])
"""

# (name, script body, stage, expected): stage "start" means start() must fail; "execute" means
# start succeeds and the execution ends with the expected denial kind.
CASES: list[tuple[str, str, str, str]] = [
    ("wrong_version", "recv(); hello(version=99); time.sleep(30)", "start", "speaks protocol version 99"),
    ("wrong_pid", "recv(); hello(pid=1); time.sleep(30)", "start", "hello announced pid"),
    ("garbage_before_hello", "recv(); send_raw(b'\\x00\\x00\\x00\\x03abc'); time.sleep(30)", "start", "MalformedFrame"),
    ("request_instead_of_hello", "recv(); send([0, 1, 'x', []]); time.sleep(30)", "start", "bad hello"),
    ("exit_before_hello", "recv(); os._exit(3)", "start", "died before its hello"),
    ("silent_before_hello", "recv(); time.sleep(30)", "start", "did not start"),
    ("unknown_message_type", "recv(); hello(); recv(); send([3, 1, 2]); time.sleep(30)", "execute", "protocol_error"),
    ("reply_to_unknown_id", "recv(); hello(); m = recv(); send([1, m.msgid ^ 1, None, {}]); time.sleep(30)",
     "execute", "protocol_error"),
    ("second_answer", "recv(); hello(); m = recv(); send_raw(encode_frame([1, m.msgid, None, {}]) * 2); time.sleep(30)",
     "execute", "protocol_error"),
    ("oversized_length_prefix", "recv(); hello(); recv(); send_raw(struct.pack('>I', 1 << 30)); time.sleep(30)",
     "execute", "protocol_error"),
    ("truncated_frame_then_exit", "recv(); hello(); recv(); send_raw(struct.pack('>I', 100) + b'\\x92'); os._exit(0)",
     "execute", "worker_crash"),
    ("closed_pipe_mid_call", "recv(); hello(); recv(); os.close(4); time.sleep(30)", "execute", "protocol_error"),
    ("crash_mid_call", "recv(); hello(); recv(); os.kill(os.getpid(), 11)", "execute", "worker_crash"),
    ("hang_mid_call", "recv(); hello(); recv(); time.sleep(30)", "execute", "timeout"),
    ("stops_reading", "recv(); hello(); time.sleep(30)", "execute", "timeout"),
    ("bad_error_map", "recv(); hello(); m = recv(); send([1, m.msgid, {'kind': 'allow'}, None]); time.sleep(30)",
     "execute", "protocol_error"),
    ("unoffered_method", "recv(); hello(); recv(); send([2, 'validation.error', ['c', 'm']]); time.sleep(30)",
     "execute", "protocol_error"),
    ("unknown_method", "recv(); hello(); recv(); send([2, '__class__', []]); time.sleep(30)", "execute", "protocol_error"),
    ("message_while_idle", "recv(); hello(); send([2, 'log', ['info', 'x']]); time.sleep(30)", "start_then_idle",
     "protocol_error"),
]


class _NullHandler:
    """A flow that offers nothing: every api call from a fake worker is a violation."""

    def notify(self, method: str, params: list[Any]) -> None:
        raise Violation("protocol_error", f"fake worker called {method}")

    async def request(self, method: str, params: list[Any]) -> Any:
        self.notify(method, params)


def spawn_fake(body: str) -> Spawned:
    (wr, ww), (sr, sw) = worker_pipes()
    code = PRELUDE + "\n" + textwrap.dedent(body)
    pid = _spawn(None, code, [], {3: wr, 4: ww})
    os.close(wr)
    os.close(ww)
    return Spawned(pid, sr, sw)


@pytest.mark.parametrize("name,body,stage,expected", CASES, ids=[c[0] for c in CASES])
async def test_fault(name: str, body: str, stage: str, expected: str) -> None:
    w = WorkerHandle(spawn_fake(body), max_frame=1 << 20)
    if stage == "start":
        with pytest.raises(RuntimeError, match=expected):
            await w.start({}, timeout=2.0)
    else:
        await w.start({}, timeout=5.0)
        if stage == "start_then_idle":
            code = await w.wait_exit(5.0)
            assert w.state is State.DEAD and expected in (w.death_reason or "")
        else:
            big = {"trigger": "post-login", "event": {"pad": "x" * (300 << 10)}} if name == "stops_reading" else {}
            limit = 0.5 if expected == "timeout" else 3.0  # a verdict other than timeout must come first
            outcome = await asyncio.wait_for(w.execute(big, _NullHandler(), limit, "timeout", 1 << 20), 10)
            assert outcome.error is not None and outcome.error["kind"] == expected, outcome.error
            assert not outcome.reusable
    code = await w.wait_exit(5.0)
    assert code is not None, "the fake worker must be dead"
    assert not psutil.pid_exists(w.pid) or psutil.Process(w.pid).status() == psutil.STATUS_ZOMBIE
    # And the supervisor machinery still serves a real flow.
    async with make_runner() as r:
        res = await run(r, "def on_execute(event, api):\n    api.state.set('ok', True)\n")
    assert res["outcome"] == "allow"


class _ReplyHandler:
    """Value-returning calls whose results or failures the supervisor must still turn into a reply."""

    def notify(self, method: str, params: list[Any]) -> None:
        raise Violation("protocol_error", f"fake worker called {method}")

    async def request(self, method: str, params: list[Any]) -> Any:
        from actionpool.runner._errors import CacheUnavailable, FetchError

        if method == "too_large":
            return "x" * (2 << 20)            # over the 1 MiB frame
        if method == "not_utf8":
            return "\ud800"                   # cannot be encoded
        if method == "bug":
            raise RuntimeError("a bug in a handler")
        if method == "fetch_error":
            raise FetchError("raised without being mapped")
        if method == "cache_down":
            raise CacheUnavailable("redis at 127.0.0.1:1 is down")
        return "fine"


REPLY_CASES = [("too_large", "reply_too_large"), ("not_utf8", "internal_error"), ("bug", "internal_error"),
               ("fetch_error", "http_fetch_error"), ("cache_down", "cache_unavailable"), ("ok", None)]


@pytest.mark.parametrize("method,code", REPLY_CASES, ids=[c[0] for c in REPLY_CASES])
async def test_every_request_is_answered(method: str, code: str | None) -> None:
    """A reply over the frame limit, unencodable, or a handler that fails: an error reply, never silence."""
    body = f"""
recv(); hello(); m = recv()
send([0, 5, {method!r}, []])
r = recv()
ok = r.msgid == 5 and ((r.error or {{}}).get('kind') == {code!r} if {code!r} else r.error is None)
send([1, m.msgid, None if ok else {{'kind': 'uncaught_error', 'message': repr(r)[:300]}}, {{}}])
time.sleep(30)
"""
    w = WorkerHandle(spawn_fake(body), max_frame=1 << 20)
    await w.start({}, timeout=5.0)
    outcome = await asyncio.wait_for(w.execute({}, _ReplyHandler(), 5.0, "timeout", 1 << 20), 10)
    assert outcome.error is None, outcome.error
    w.kill("done")
    assert await w.wait_exit(5.0) is not None
