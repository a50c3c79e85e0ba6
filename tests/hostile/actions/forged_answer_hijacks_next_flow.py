"""Forges its own answer, stays alive, and acts inside the next flow the supervisor gives this worker."""
import fcntl
import os
import struct
import sys
import time

from actionpool.protocol import Request, encode_frame

FIONREAD = 0x541B


def current_msgid():
    f = sys._getframe()
    while f is not None:
        msg = f.f_locals.get("msg")
        if type(msg) is Request and msg.method == "execute":
            return msg.msgid
        f = f.f_back
    raise LookupError("execute request not found on the stack")


def unread(fd):
    return struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0"))[0]


def on_execute(event, api):
    os.write(4, encode_frame([1, current_msgid(), None, {"ok": True}]))
    deadline = time.monotonic() + 3.0
    while unread(4) and time.monotonic() < deadline:  # the supervisor took the forgery
        time.sleep(0.001)
    while not unread(3) and time.monotonic() < deadline:  # ... and sent this worker the next flow's request
        time.sleep(0.001)
    api.deny("denied by the previous flow's action")
