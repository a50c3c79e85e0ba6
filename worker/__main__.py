"""Worker process entry point.

Started by the supervisor as ``python -I -S -c BOOTSTRAP`` (see
``runner/_spawn.py``) with two pipe descriptors. The life of a worker:

    read "configure"  ->  apply the sandbox  ->  send hello (with the sandbox report)
    loop: read "execute" request -> run the action -> send the response
          (an async action that awaits its replies may have others beside it: Runtime.serve)
    exit on EOF, on "shutdown", or when the supervisor kills the process group

Nothing here decides policy: limits, offered methods and sandbox settings all
arrive from the supervisor.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from typing import Any

from ..protocol import DEFAULT_MAX_FRAME, Notification, hello

from ._channel import Channel, PipeClosed
from ._runtime import EXIT_PROTOCOL, Runtime

EXIT_SANDBOX = 78


def _configure(ch: Channel) -> dict[str, Any]:
    msg = ch.recv()
    if type(msg) is not Notification or msg.method != "configure" or len(msg.params) != 1 or type(msg.params[0]) is not dict:
        os._exit(EXIT_PROTOCOL)
    return msg.params[0]


def serve(rfd: int, wfd: int) -> None:
    # SIGINT belongs to the supervisor's terminal, not to us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ch = Channel(rfd, wfd, DEFAULT_MAX_FRAME)
    spec = _configure(ch)
    ch.max_frame = int(spec.get("max_frame", DEFAULT_MAX_FRAME))
    ch.decoder = type(ch.decoder)(ch.max_frame)
    ch.coalesce = bool(spec.get("coalesce", True))
    loop = asyncio.new_event_loop()  # before the sandbox: it needs a socketpair
    info: dict[str, Any] = {}
    sandbox_spec = dict(spec.get("sandbox") or {})
    sandbox_spec.setdefault("keep_fds", [rfd, wfd])
    try:
        from . import _sandbox

        sandbox_spec["keep_fds"] = [*sandbox_spec["keep_fds"], *_sandbox.loop_fds(loop)]
        sandbox_spec["scan_loops"] = False

        info["sandbox"] = _sandbox.apply(sandbox_spec)
    except Exception as exc:  # SandboxError in strict mode, or anything unexpected
        ch.send(hello(os.getpid(), {"sandbox_error": f"{type(exc).__name__}: {exc}"}).wire())
        os._exit(EXIT_SANDBOX)
    runtime = Runtime(ch, loop)
    gc.freeze()  # what exists now is shared with nothing, but keeps GC passes short
    ch.send(hello(os.getpid(), info).wire())
    try:
        runtime.prime()   # while the supervisor reads the hello: the first real execution finds its pages ready
    except Exception:     # an optimisation only; the real executions are unaffected
        pass
    runtime.serve()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rfd, wfd = int(argv[0]), int(argv[1])
    try:
        serve(rfd, wfd)
    except PipeClosed:
        pass
    except SystemExit:
        raise
    except BaseException:
        os._exit(EXIT_PROTOCOL)
    os._exit(0)


if __name__ == "__main__":
    main()
