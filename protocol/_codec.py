"""msgpack encoding with the input caps a hostile peer requires.

Only plain data crosses the wire: nil, bool, int, float, str, bin, array and
map. Extension types are refused (``ext_hook`` raises) and nothing is ever
unpickled. Map keys must be strings or bytes (msgpack's ``strict_map_key``);
the supervisor's parameter checks (``check_json``) refuse bytes keys.
"""

from __future__ import annotations

import gc
from typing import Any

import msgpack

from ._errors import MalformedFrame

DEFAULT_MAX_FRAME = 1 << 20


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension type {code} is not accepted")


_packer = msgpack.Packer(use_bin_type=True, datetime=False, strict_types=False)


def pack(obj: Any) -> bytes:
    """Encode one value. Raises ``TypeError``/``ValueError`` for non-wire data."""
    return _packer.pack(obj)


def unpack(data: bytes, max_size: int = DEFAULT_MAX_FRAME) -> Any:
    """Decode exactly one value from ``data`` or raise :class:`MalformedFrame`.

    The ``max_*_len`` caps bound what a single frame may make us allocate, so a
    short frame announcing a 2**32-element array cannot exhaust memory.
    """
    # No container or string can announce more elements than the frame has bytes:
    # capping by len(data) refuses a 5-byte "array of a million" before allocating it.
    n = max(1, min(max_size, len(data)))
    # Decoding allocates up to one container per byte and creates no cycles: with the
    # collector running, a 1 MiB frame of empty arrays triggers dozens of full passes
    # over every young object (0.4 s instead of 0.06 s).
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=max(1, n // 2),
            max_ext_len=0,
        )
    except MalformedFrame:
        raise
    except RecursionError as exc:
        raise MalformedFrame("msgpack value nested too deeply") from exc
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedFrame(f"invalid msgpack: {type(exc).__name__}: {exc}") from exc
    finally:
        if collecting:
            gc.enable()
