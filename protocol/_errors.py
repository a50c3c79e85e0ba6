"""Errors raised by the pure protocol layer.

    ProtocolError                 anything the peer sent that we cannot accept
    ├── FrameTooLarge             length prefix above the configured maximum
    ├── MalformedFrame            bytes that are not one valid msgpack value
    ├── InvalidMessage            valid msgpack that is not a msgpack-rpc message
    └── VersionMismatch           hello from a peer speaking another version

Every decoder failure ends in one of these; callers never see a raw
``msgpack`` exception, a ``ValueError`` or an ``IndexError`` from here.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the wire contract; the connection cannot be trusted further."""


class FrameTooLarge(ProtocolError):
    """A length prefix announced more bytes than the connection allows."""


class MalformedFrame(ProtocolError):
    """The frame body is not exactly one well-formed, allowed msgpack value."""


class InvalidMessage(ProtocolError):
    """The value decoded fine but is not a request, response or notification."""


class VersionMismatch(ProtocolError):
    """The worker's hello announced a protocol version we do not speak."""
