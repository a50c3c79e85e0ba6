"""Replaces the worker with a shell that would create a marker file."""
import os


def on_execute(event, api):
    try:
        os.execv("/bin/sh", ["sh", "-c", f"echo pwned > {event.attack.marker}"])
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
