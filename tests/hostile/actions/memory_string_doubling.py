"""Doubles a string until the allocation fails."""


def on_execute(event, api):
    s = "x"
    while True:
        s += s
