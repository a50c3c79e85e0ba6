"""Starts a shell that would create a marker file."""
import subprocess


def on_execute(event, api):
    marker = event.attack.marker
    try:
        subprocess.Popen(["/bin/sh", "-c", f"echo pwned > {marker}"]).wait()
        api.state.set("started", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
