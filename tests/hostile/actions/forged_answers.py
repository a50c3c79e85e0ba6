"""Blindly forges "ok" answers for msgids 1..5 on the reply pipe, then denies: a forgery must never allow the flow."""
import os

from actionpool.protocol import encode_frame


def on_execute(event, api):
    os.write(4, b"".join(encode_frame([1, msgid, None, {"ok": True}]) for msgid in range(1, 6)))
    api.deny("the real verdict")
