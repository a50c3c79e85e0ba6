"""Connects to a TCP listener the test runs on 127.0.0.1 and sends a payload."""
import socket


def on_execute(event, api):
    try:
        s = socket.create_connection(("127.0.0.1", event.attack.port), timeout=0.5)
        s.sendall(b"exfiltrated")
        s.close()
        api.state.set("connected", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
