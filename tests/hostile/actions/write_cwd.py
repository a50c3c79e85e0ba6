"""Drops a file in the worker's working directory."""
import os


def on_execute(event, api):
    api.state.set("cwd", os.getcwd())
    try:
        with open(event.attack.name, "w") as f:
            f.write("pwned")
        api.state.set("written", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
