"""Replaces builtins the worker's own runtime relies on; the runtime restores them after the execution."""
import builtins


def on_execute(event, api):
    builtins.print = None
    builtins.len = lambda obj: 0
