"""actionpool's wire protocol: framing, msgpack codec, msgpack-rpc messages, API schema.

Pure code: no processes, no I/O, no policy. Both the untrusted worker and the
trusted supervisor import it; neither trusts what the other sends.
"""

from ._schema import API_ERROR_CODES, LOG_LEVELS, METHODS, ApiMethod, Kind, Param, check_json, check_params, snake_case, truncate_utf8
from ._codec import DEFAULT_MAX_FRAME, pack, unpack
from ._errors import FrameTooLarge, InvalidMessage, MalformedFrame, ProtocolError, VersionMismatch
from ._framing import HEADER_SIZE, FrameDecoder, encode_frame
from ._messages import (
    HELLO,
    NOTIFICATION,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    Message,
    Notification,
    Request,
    Response,
    check_hello,
    hello,
    parse_message,
)

__all__ = [
    "API_ERROR_CODES", "ApiMethod", "DEFAULT_MAX_FRAME", "FrameDecoder", "FrameTooLarge", "HEADER_SIZE", "HELLO",
    "InvalidMessage", "Kind", "LOG_LEVELS", "METHODS", "MalformedFrame", "Message", "NOTIFICATION",
    "Notification", "PROTOCOL_VERSION", "Param", "ProtocolError", "REQUEST", "RESPONSE", "Request",
    "Response", "VersionMismatch", "check_hello", "check_json", "check_params", "encode_frame", "hello",
    "pack", "parse_message", "snake_case", "truncate_utf8", "unpack",
]
