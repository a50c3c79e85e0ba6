"""Ends the worker's interpreter through SystemExit."""
import sys


def on_execute(event, api):
    sys.exit(0)
