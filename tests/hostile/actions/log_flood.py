"""Floods api.log."""


def on_execute(event, api):
    while True:
        api.log("info", "x" * 100)
