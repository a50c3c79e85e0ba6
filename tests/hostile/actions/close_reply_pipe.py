"""Closes fd 4, the worker's reply pipe, and returns: the worker cannot deliver its answer."""
import os


def on_execute(event, api):
    os.close(4)
