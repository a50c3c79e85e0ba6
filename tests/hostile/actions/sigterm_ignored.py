"""Ignores SIGTERM (and SIGINT, SIGHUP) and spins: only SIGKILL can stop it."""
import signal


def on_execute(event, api):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        pass
