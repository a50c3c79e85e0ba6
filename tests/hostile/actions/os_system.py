"""os.system: libc forks a shell that would create a marker file."""
import os


def on_execute(event, api):
    api.state.set("rc", os.system(f"echo pwned > {event.attack.marker}"))
