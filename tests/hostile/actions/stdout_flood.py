"""Floods stdout with print()."""


def on_execute(event, api):
    while True:
        print("x" * 100)
