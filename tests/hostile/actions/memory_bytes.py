"""One allocation far beyond the worker's memory cap."""


def on_execute(event, api):
    blob = b"x" * (8 << 30)
    api.state.set("len", len(blob))
