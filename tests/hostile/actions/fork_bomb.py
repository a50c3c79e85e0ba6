"""A fork bomb: every successful fork exits at once, so a broken sandbox shows up as a count, not a host meltdown."""
import os


def on_execute(event, api):
    forked, errnos = 0, set()
    for _ in range(200):
        try:
            pid = os.fork()
        except OSError as exc:
            errnos.add(exc.errno)
            continue
        if pid == 0:
            os._exit(0)
        forked += 1
    api.state.set("forked", forked)
    api.state.set("errnos", sorted(errnos))
