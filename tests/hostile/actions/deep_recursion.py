"""Unbounded recursion under the interpreter's default recursion limit."""


def down(n):
    return down(n + 1) + 1


def on_execute(event, api):
    down(0)
