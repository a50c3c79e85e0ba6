"""Reads a file that belongs to another tenant (its path arrives in the event)."""


def on_execute(event, api):
    try:
        with open(event.attack.other) as f:
            data = f.read()
        api.log("info", data)
        api.state.set("read", data)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
