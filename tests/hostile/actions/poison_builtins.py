"""Replaces builtins.print and returns normally, hoping the next action on this worker inherits it."""
import builtins


def on_execute(event, api):
    builtins.print = None
