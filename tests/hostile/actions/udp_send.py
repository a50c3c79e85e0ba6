"""Sends a datagram to a UDP socket the test binds on 127.0.0.1."""
import socket


def on_execute(event, api):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"exfiltrated", ("127.0.0.1", event.attack.udp_port))
        s.close()
        api.state.set("sent", True)
    except OSError as exc:
        api.state.set("errno", exc.errno)
        api.state.set("error", type(exc).__name__)
