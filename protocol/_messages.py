"""msgpack-rpc message types, in both directions.

    request       [0, msgid, method, params]           or [0, msgid, method, params, xid]
    response      [1, msgid, error, result]
    notification  [2, method, params]                  or [2, method, params, xid]

``xid`` names the execution a worker's call belongs to: the message id of the
``execute`` request it serves. A worker that runs several executions at once
(the co-running of I/O-bound actions) tags every call with it; one that runs a
single execution may leave it out.

The first frame a worker sends is the notification
``[2, "hello", [version, pid, info]]`` where ``info`` is a map describing the
worker (for example which sandbox protections it applied).
:func:`parse_message` turns a decoded value into one of the three tuples below
or raises :class:`InvalidMessage`; nothing else is ever handed to a dispatcher.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._errors import InvalidMessage, VersionMismatch

PROTOCOL_VERSION = 1

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

MAX_MSGID = 2**32 - 1
MAX_METHOD_LEN = 64
HELLO = "hello"


class Request(NamedTuple):
    msgid: int
    method: str
    params: list[Any]
    xid: int | None = None

    def wire(self) -> list[Any]:
        if self.xid is None:
            return [REQUEST, self.msgid, self.method, self.params]
        return [REQUEST, self.msgid, self.method, self.params, self.xid]


class Response(NamedTuple):
    msgid: int
    error: Any
    result: Any

    def wire(self) -> list[Any]:
        return [RESPONSE, self.msgid, self.error, self.result]


class Notification(NamedTuple):
    method: str
    params: list[Any]
    xid: int | None = None

    def wire(self) -> list[Any]:
        if self.xid is None:
            return [NOTIFICATION, self.method, self.params]
        return [NOTIFICATION, self.method, self.params, self.xid]


Message = Request | Response | Notification


def _describe(value: Any) -> str:
    """Bounded and non-recursive: a 1000-deep list must not become a RecursionError here."""
    if type(value) in (int, float, bool) or value is None:
        return repr(value)[:40]
    if type(value) is str:
        return repr(value[:20])
    return type(value).__name__


def _msgid(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_MSGID:
        raise InvalidMessage(f"message id must be an integer in [0, {MAX_MSGID}], got {_describe(value)}")
    return value


def _method(value: Any) -> str:
    if type(value) is not str or not value or len(value) > MAX_METHOD_LEN:
        raise InvalidMessage(f"method must be a non-empty string of at most {MAX_METHOD_LEN} chars")
    return value


def _params(value: Any) -> list[Any]:
    if type(value) is not list:
        raise InvalidMessage(f"params must be an array, got {type(value).__name__}")
    return value


def parse_message(obj: Any) -> Message:
    """Validate the envelope of one decoded value; the params are the caller's to check."""
    if type(obj) is not list or not obj:
        raise InvalidMessage(f"message must be a non-empty array, got {type(obj).__name__}")
    kind = obj[0]
    if kind == REQUEST and type(kind) is int:
        n = len(obj)
        if n == 4:
            return Request(_msgid(obj[1]), _method(obj[2]), _params(obj[3]))
        if n == 5:
            return Request(_msgid(obj[1]), _method(obj[2]), _params(obj[3]), _msgid(obj[4]))
        raise InvalidMessage("request must have 4 elements (5 with an execution id)")
    if kind == RESPONSE and type(kind) is int:
        if len(obj) != 4:
            raise InvalidMessage("response must have 4 elements")
        return Response(_msgid(obj[1]), obj[2], obj[3])
    if kind == NOTIFICATION and type(kind) is int:
        n = len(obj)
        if n == 3:
            return Notification(_method(obj[1]), _params(obj[2]))
        if n == 4:
            return Notification(_method(obj[1]), _params(obj[2]), _msgid(obj[3]))
        raise InvalidMessage("notification must have 3 elements (4 with an execution id)")
    raise InvalidMessage(f"unknown message type {_describe(kind)}")


def hello(pid: int, info: dict[str, Any] | None = None) -> Notification:
    return Notification(HELLO, [PROTOCOL_VERSION, pid, info or {}])


def check_hello(msg: Message) -> tuple[int, dict[str, Any]]:
    """Return ``(pid, info)`` announced by a hello, or raise."""
    if not isinstance(msg, Notification) or msg.method != HELLO:
        raise InvalidMessage("first message from a worker must be a hello notification")
    params = msg.params
    if (
        len(params) != 3
        or type(params[0]) is not int
        or type(params[1]) is not int
        or type(params[2]) is not dict
    ):
        raise InvalidMessage("hello params must be [version, pid, info]")
    if params[0] != PROTOCOL_VERSION:
        raise VersionMismatch(f"worker speaks protocol version {params[0]}, supervisor speaks {PROTOCOL_VERSION}")
    if params[1] <= 0:
        raise InvalidMessage("hello pid must be positive")
    return params[1], params[2]
