"""Ends the worker process at once with a success status."""
import os


def on_execute(event, api):
    os._exit(0)
