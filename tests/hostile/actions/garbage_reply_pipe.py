"""Writes raw bytes that are no valid frame to fd 4, the worker's reply pipe."""
import os
import time


def on_execute(event, api):
    os.write(4, b"\x00\x00\x00\x08\xc1\xc1garbage")
    while True:
        time.sleep(1)
