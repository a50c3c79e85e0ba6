"""Sends two answers to its own execute request in one write: a forged "ok" and a second one."""
import os
import sys

from actionpool.protocol import Request, encode_frame


def current_msgid():
    """The pending execute request's id, read off the worker's own stack (the id is unguessable, not secret)."""
    f = sys._getframe()
    while f is not None:
        msg = f.f_locals.get("msg")
        if type(msg) is Request and msg.method == "execute":
            return msg.msgid
        f = f.f_back
    raise LookupError("execute request not found on the stack")


def on_execute(event, api):
    msgid = current_msgid()
    os.write(4, encode_frame([1, msgid, None, {"ok": True}]) + encode_frame([1, msgid, None, {"ok": True}]))
    api.deny("the real verdict")
