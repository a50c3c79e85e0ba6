"""Length-prefixed framing: a 4-byte big-endian length, then one msgpack value.

The length is checked against ``max_frame`` *before* any body byte is
buffered, so an oversized prefix costs the reader four bytes, not a gigabyte.
"""

from __future__ import annotations

import struct
from typing import Any

from ._codec import DEFAULT_MAX_FRAME, pack, unpack
from ._errors import FrameTooLarge, MalformedFrame

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


def encode_frame(obj: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode ``obj`` as one frame; refuses to produce one the peer would reject."""
    body = pack(obj)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed it bytes in any chunking, get whole values out.

    Once it raises, the decoder is poisoned and raises the same error again:
    after a framing error the stream position is meaningless.
    """

    __slots__ = ("_buf", "_max", "_need", "_error", "bytes_in")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame <= 0:
            raise ValueError("max_frame must be positive")
        self._buf = bytearray()
        self._max = max_frame
        self._need = -1  # body length of the frame being read, -1 while reading a header
        self._error: Exception | None = None
        self.bytes_in = 0

    def feed(self, data: bytes, sizes: list[int] | None = None) -> list[Any]:
        """Add ``data`` and return every value completed by it (possibly none).

        With ``sizes``, each value's frame size (header included) is appended to it, in order:
        what a reader that charges bytes to the message's sender needs.
        """
        if self._error is not None:
            raise self._error
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        try:
            while True:
                if self._need < 0:
                    if len(buf) - pos < HEADER_SIZE:
                        break
                    (n,) = HEADER.unpack_from(buf, pos)
                    if n > self._max:
                        raise FrameTooLarge(f"frame of {n} bytes exceeds the {self._max}-byte limit")
                    if n == 0:
                        raise MalformedFrame("empty frame")
                    pos += HEADER_SIZE
                    self._need = n
                if len(buf) - pos < self._need:
                    break
                end = pos + self._need
                out.append(unpack(bytes(buf[pos:end]), self._max))
                if sizes is not None:
                    sizes.append(self._need + HEADER_SIZE)
                pos = end
                self._need = -1
        except Exception as exc:
            self._error = exc
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for EOF)."""
        return not self._buf and self._need < 0
