"""Starts a thread meant to outlive the handler (and keep sending after the answer)."""
import os
import threading
import time


def spin():
    while True:
        time.sleep(0.01)


def on_execute(event, api):
    api.state.set("pid", os.getpid())
    try:
        threading.Thread(target=spin, daemon=True).start()
        api.state.set("started", True)
    except BaseException as exc:
        api.state.set("error", type(exc).__name__)
        api.state.set("message", str(exc))
    api.state.set("threads", threading.active_count())
