"""Announces a 4 GiB frame on the reply pipe, hoping the supervisor buffers it."""
import os
import time


def on_execute(event, api):
    os.write(4, b"\xff\xff\xff\xff")
    while True:
        time.sleep(1)
