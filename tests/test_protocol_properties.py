"""Property tests of the wire protocol: framing under arbitrary chunking, hostile bytes, envelopes.

Each property is bounded (small examples, a few hundred runs) so the file stays
well under a few seconds; ``database=None`` keeps hypothesis from writing files.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actionpool.protocol import (
    FrameDecoder,
    InvalidMessage,
    Notification,
    ProtocolError,
    Request,
    Response,
    VersionMismatch,
    check_hello,
    encode_frame,
    pack,
    parse_message,
)

MAX_MSGID = 2**32 - 1

FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),  # NaN and infinities included: msgpack carries them bit for bit
    st.text(max_size=20),
    st.binary(max_size=20),
)

wire_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=12,
)


def split(data: st.DataObject, stream: bytes) -> list[bytes]:
    """Cut ``stream`` at arbitrary points (empty chunks included)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_all(dec: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out


def is_wire_value(v: Any) -> bool:
    t = type(v)
    if v is None or t in (bool, int, float, str, bytes):
        return True
    if t is list:
        return all(is_wire_value(x) for x in v)
    if t is dict:
        return all(is_wire_value(k) and is_wire_value(x) for k, x in v.items())
    return False


def feed_hostile(dec: FrameDecoder, chunks: list[bytes]) -> None:
    """Feed bytes that may be garbage: values or a ProtocolError, nothing else; stays poisoned."""
    try:
        for chunk in chunks:
            for value in dec.feed(chunk):
                assert is_wire_value(value)
    except ProtocolError as exc:
        # Poisoned: the same error again, whatever follows.
        try:
            dec.feed(b"\x00\x00\x00\x01\xc0")
        except ProtocolError as again:
            assert again is exc
        else:
            raise AssertionError("decoder accepted input after raising")
        assert dec.pending == 0


# (a) ----------------------------------------------------------------------------


@FAST
@given(values=st.lists(wire_values, min_size=1, max_size=5), data=st.data())
def test_values_round_trip_under_arbitrary_chunking(values: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(v) for v in values)
    dec = FrameDecoder()
    out = feed_all(dec, split(data, stream))
    # Compare encodings: strict about bool vs int, -0.0 vs 0.0, and NaN payloads.
    assert [pack(v) for v in out] == [pack(v) for v in values]
    assert dec.at_boundary() and dec.pending == 0
    assert dec.bytes_in == len(stream)


@FAST
@given(msgs=st.lists(st.one_of(
    # xid: the execution a call belongs to (co-running workers tag every call; others may leave it out)
    st.builds(Request, st.integers(0, MAX_MSGID), st.text(min_size=1, max_size=64), st.lists(wire_values, max_size=3),
              st.none() | st.integers(0, MAX_MSGID)),
    st.builds(Response, st.integers(0, MAX_MSGID), wire_values, wire_values),
    st.builds(Notification, st.text(min_size=1, max_size=64), st.lists(wire_values, max_size=3),
              st.none() | st.integers(0, MAX_MSGID)),
), min_size=1, max_size=4), data=st.data())
def test_messages_round_trip_under_arbitrary_chunking(msgs: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m.wire()) for m in msgs)
    out = [parse_message(v) for v in feed_all(FrameDecoder(), split(data, stream))]
    assert [type(m) for m in out] == [type(m) for m in msgs]
    assert [pack(m.wire()) for m in out] == [pack(m.wire()) for m in msgs]


# (b) ----------------------------------------------------------------------------

limits = st.sampled_from([1, 8, 64, 512, 1 << 20])


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Raw noise, or frames with a plausible header around a noisy body."""
    parts = draw(st.lists(st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=64).map(lambda b: struct.pack(">I", len(b)) + b),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    ), max_size=6))
    return b"".join(parts)


@FAST
@given(stream=garbage(), max_frame=limits, data=st.data())
def test_garbage_yields_values_or_protocol_error(stream: bytes, max_frame: int, data: st.DataObject) -> None:
    feed_hostile(FrameDecoder(max_frame), split(data, stream))


# (c) ----------------------------------------------------------------------------


@FAST
@given(values=st.lists(wire_values, min_size=1, max_size=4), max_frame=limits, data=st.data())
def test_byte_flips_yield_values_or_protocol_error(values: list[Any], max_frame: int, data: st.DataObject) -> None:
    stream = bytearray(b"".join(encode_frame(v) for v in values))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for pos, mask in flips:
        stream[pos] ^= mask
    feed_hostile(FrameDecoder(max_frame), split(data, bytes(stream)))


@FAST
@given(values=st.lists(wire_values, min_size=1, max_size=4), data=st.data())
def test_truncated_or_extended_streams(values: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(v) for v in values)
    cut = data.draw(st.integers(0, len(stream)))
    tail = data.draw(st.binary(max_size=16))
    dec = FrameDecoder()
    feed_hostile(dec, split(data, stream[:cut] + tail))


# (d) ----------------------------------------------------------------------------

field = st.one_of(
    wire_values,
    st.integers(-3, 3),
    st.integers(MAX_MSGID - 1, MAX_MSGID + 1),
    st.text(min_size=60, max_size=70),
    st.just("hello"),
)
envelopes = st.one_of(
    wire_values,
    st.lists(field, max_size=6),
    st.builds(lambda k, rest: [k, *rest], st.sampled_from([0, 1, 2, 3, True, False, 0.0, 1.0, 2.0, None]),
              st.lists(field, max_size=4)),
    st.builds(lambda k, i, m, p: [k, i, m, p], st.sampled_from([0, 1]), field, field, field),
    st.builds(lambda m, p: [2, m, p], field, st.one_of(field, st.lists(field, max_size=4))),
)


@FAST
@given(obj=envelopes)
def test_parse_message_returns_a_message_or_raises_invalid(obj: Any) -> None:
    try:
        msg = parse_message(obj)
    except InvalidMessage:
        return
    assert type(msg) in (Request, Response, Notification)
    assert type(obj) is list and type(obj[0]) is int and obj[0] in (0, 1, 2)
    if type(msg) is not Notification:
        assert type(msg.msgid) is int and 0 <= msg.msgid <= MAX_MSGID
    if type(msg) is not Response:
        assert type(msg.method) is str and 1 <= len(msg.method) <= 64
        assert type(msg.params) is list
    assert msg.wire() == obj
    # Whatever parsed, check_hello accepts it or raises one of the two documented errors.
    try:
        pid, info = check_hello(msg)
    except (InvalidMessage, VersionMismatch):
        return
    assert type(pid) is int and pid > 0 and type(info) is dict
