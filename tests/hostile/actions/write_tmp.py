"""Drops a file in /tmp (persistence, or a channel to another tenant)."""


def on_execute(event, api):
    try:
        with open(event.attack.path, "w") as f:
            f.write("pwned")
        api.state.set("written", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
