"""SIGKILLs the supervisor (the worker's parent)."""
import os
import signal


def on_execute(event, api):
    try:
        os.kill(os.getppid(), signal.SIGKILL)
        api.state.set("killed", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
