"""Example-based tests of the pure wire protocol: framing, codec, messages, hello.

Everything here runs in-process on bytes; the protocol package has no I/O.
"""

from __future__ import annotations

import datetime
import struct
import tracemalloc

import msgpack
import msgpack.fallback
import pytest

from actionpool import protocol
from actionpool.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    HELLO,
    NOTIFICATION,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    FrameDecoder,
    FrameTooLarge,
    InvalidMessage,
    MalformedFrame,
    Notification,
    ProtocolError,
    Request,
    Response,
    VersionMismatch,
    check_hello,
    encode_frame,
    hello,
    pack,
    parse_message,
    unpack,
)
from actionpool.protocol import _codec

MAX_MSGID = 2**32 - 1


def header(n: int) -> bytes:
    return struct.pack(">I", n)


def raw_frame(body: bytes) -> bytes:
    """A frame around an arbitrary (possibly invalid) body, bypassing pack()."""
    return header(len(body)) + body


SAMPLE_MESSAGES = [
    Request(0, "cache.get", ["k"]),
    Request(MAX_MSGID, "fetch", ["http://127.0.0.1:1/x", {"method": "POST", "body": "é" * 10}]),
    Response(7, None, {"ok": True, "n": [1, 2.5, None, b"\x00\xff"]}),
    Response(8, "TimeoutError: upstream", None),
    Notification("log", ["info", "hello ünïcode"]),
    Notification("state.set", ["k", {"nested": [[], {}, -(2**63), 2**64 - 1]}]),
    hello(4242, {"seccomp": True, "landlock": 7}),
]


# --------------------------------------------------------------------------- error tree


def test_error_tree() -> None:
    for cls in (FrameTooLarge, MalformedFrame, InvalidMessage, VersionMismatch):
        assert issubclass(cls, ProtocolError)
    assert not issubclass(VersionMismatch, InvalidMessage)
    assert not issubclass(FrameTooLarge, MalformedFrame)
    assert issubclass(ProtocolError, Exception)


def test_public_names_exist() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name


# --------------------------------------------------------------------------- framing


def test_frame_layout_is_big_endian_length_then_msgpack() -> None:
    frame = encode_frame([1, "a"])
    assert HEADER_SIZE == 4
    body = pack([1, "a"])
    assert frame == struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("msg", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip_through_frames(msg) -> None:
    dec = FrameDecoder()
    values = dec.feed(encode_frame(msg.wire()))
    assert len(values) == 1
    assert parse_message(values[0]) == msg
    assert dec.at_boundary() and dec.pending == 0


def test_several_frames_in_one_chunk() -> None:
    stream = b"".join(encode_frame(m.wire()) for m in SAMPLE_MESSAGES)
    dec = FrameDecoder()
    values = dec.feed(stream)
    assert [parse_message(v) for v in values] == SAMPLE_MESSAGES
    assert dec.at_boundary() and dec.pending == 0
    assert dec.bytes_in == len(stream)


def test_frame_split_at_every_byte_offset() -> None:
    msgs = SAMPLE_MESSAGES[:4]
    stream = b"".join(encode_frame(m.wire()) for m in msgs)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        first = dec.feed(stream[:cut])
        second = dec.feed(stream[cut:])
        assert [parse_message(v) for v in first + second] == msgs, cut
        assert dec.at_boundary()


def test_frame_fed_one_byte_at_a_time() -> None:
    stream = b"".join(encode_frame(m.wire()) for m in SAMPLE_MESSAGES)
    dec = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert [parse_message(v) for v in out] == SAMPLE_MESSAGES
    assert dec.bytes_in == len(stream)


def test_tuples_come_back_as_lists_and_bin_as_bytes() -> None:
    dec = FrameDecoder()
    [value] = dec.feed(encode_frame((1, ("a", b"b"), {"k": (None,)})))
    assert value == [1, ["a", b"b"], {"k": [None]}]
    assert type(value[1]) is list and type(value[1][1]) is bytes and type(value[1][0]) is str


def test_empty_feed_is_a_no_op() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.at_boundary() and dec.pending == 0 and dec.bytes_in == 0


def test_frame_of_exactly_max_size_is_accepted() -> None:
    value = b"x" * 48  # bin8: 2 bytes of header + 48 = 50
    frame = encode_frame(value, max_frame=50)
    assert len(frame) == HEADER_SIZE + 50
    assert FrameDecoder(50).feed(frame) == [value]


def test_encode_frame_refuses_oversized_frame() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 49, max_frame=50)
    with pytest.raises(FrameTooLarge):
        encode_frame("y" * (DEFAULT_MAX_FRAME + 1))


@pytest.mark.parametrize(
    "value", [{1, 2}, object(), datetime.datetime(2024, 1, 1), lambda: 0], ids=["set", "object", "datetime", "lambda"]
)
def test_encode_frame_refuses_non_wire_data(value) -> None:
    with pytest.raises(TypeError):
        encode_frame(value)


def test_max_frame_checked_from_header_alone() -> None:
    dec = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        dec.feed(header(101))
    assert dec.pending == 0  # nothing kept, and certainly no body awaited


def test_max_frame_checked_when_header_arrives_byte_by_byte() -> None:
    dec = FrameDecoder(100)
    hdr = header(101)
    for b in hdr[:-1]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(FrameTooLarge):
        dec.feed(hdr[-1:])
    assert dec.pending == 0


def test_huge_length_prefix_with_default_limit() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\xff\xff\xff\xff")
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(header(DEFAULT_MAX_FRAME + 1))


def test_oversized_frame_after_a_good_one_in_the_same_chunk() -> None:
    dec = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_frame([1]) + header(101) + b"\x00" * 101)
    assert dec.pending == 0


def test_header_announcing_exactly_max_waits_for_the_body() -> None:
    dec = FrameDecoder(100)
    assert dec.feed(header(100)) == []
    assert not dec.at_boundary()
    assert dec.feed(b"\xc0" * 50) == []
    assert not dec.at_boundary()


def test_zero_length_frame_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(header(0))
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(header(0) + encode_frame(1))


@pytest.mark.parametrize(
    "first_error",
    [header(0), header(DEFAULT_MAX_FRAME + 1), raw_frame(b"\xc1"), raw_frame(b"\x01\x02")],
    ids=["empty", "too-large", "bad-byte", "trailing"],
)
def test_decoder_stays_poisoned(first_error: bytes) -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as first:
        dec.feed(first_error)
    for follow_up in (encode_frame([1, 2]), b"", b"\x00"):
        with pytest.raises(type(first.value)) as again:
            dec.feed(follow_up)
        assert again.value is first.value
    assert dec.pending == 0


def test_pending_and_at_boundary_track_partial_frames() -> None:
    frame = encode_frame(["abc", 1, 2, 3])
    dec = FrameDecoder()
    assert dec.at_boundary() and dec.pending == 0

    assert dec.feed(frame[:2]) == []
    assert not dec.at_boundary() and dec.pending == 2  # half a header

    assert dec.feed(frame[2:HEADER_SIZE]) == []
    assert not dec.at_boundary()  # whole header, no body yet: still mid-frame

    assert dec.feed(frame[HEADER_SIZE : HEADER_SIZE + 3]) == []
    assert not dec.at_boundary() and dec.pending >= 3

    assert dec.feed(frame[HEADER_SIZE + 3 :]) == [["abc", 1, 2, 3]]
    assert dec.at_boundary() and dec.pending == 0

    # A whole frame followed by part of the next one.
    assert dec.feed(frame + frame[:5]) == [["abc", 1, 2, 3]]
    assert not dec.at_boundary() and dec.pending >= 1
    assert dec.feed(frame[5:]) == [["abc", 1, 2, 3]]
    assert dec.at_boundary() and dec.pending == 0


@pytest.mark.parametrize("bad", [0, -1])
def test_decoder_rejects_non_positive_limit(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(bad)


def test_bad_body_inside_valid_frame_is_malformed() -> None:
    for body in (b"\xc1", b"\x92\x01", b"\xc0\xc0", b"\xd4\x05\x00"):
        with pytest.raises(MalformedFrame):
            FrameDecoder().feed(raw_frame(body))


def test_small_decoder_limit_also_caps_inner_lengths() -> None:
    # With max_frame=16 a 10-byte body announcing a 100-element array is refused.
    dec = FrameDecoder(16)
    with pytest.raises(MalformedFrame):
        dec.feed(raw_frame(b"\xdc\x00\x64" + b"\xc0" * 7))


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, -0.0, "", "ü", b"", b"\x00", [], {}, {"a": [1, {"b": None}]}],
)
def test_pack_unpack_round_trip(value) -> None:
    out = unpack(pack(value))
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize(
    "data",
    [
        b"\xd4\x05\x00",  # fixext1, type 5
        b"\xd6\xff\x00\x00\x00\x01",  # fixext4, type -1 (timestamp)
        b"\xd7\xff" + b"\x00" * 8,  # fixext8 timestamp
        b"\xc7\x00\x05",  # ext8, zero length: reaches ext_hook
        b"\xc7\x00\xff",  # ext8, zero length, timestamp type
        b"\xc7\x03\x01abc",  # ext8
        b"\xc9\x00\x00\x00\x01\x01a",  # ext32
        b"\x92\x01\xd4\x05\x00",  # ext nested in an array
        b"\x81\xa1k\xd4\x05\x00",  # ext as a map value
    ],
)
def test_ext_types_refused(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        unpack(data)


def test_packed_ext_type_refused() -> None:
    with pytest.raises(MalformedFrame):
        unpack(pack(msgpack.ExtType(1, b"abc")))


def test_zero_length_ext_is_refused_by_the_hook() -> None:
    with pytest.raises(MalformedFrame, match="extension type 5"):
        unpack(b"\xc7\x00\x05")


def test_packer_does_not_emit_timestamps() -> None:
    with pytest.raises(TypeError):
        pack(datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))


@pytest.mark.parametrize("data", [pack(1) + pack(2), b"\xc0\xc0", pack([1]) + b"\x00", pack("a") + b"\xff"])
def test_trailing_bytes_refused(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        unpack(data)


def test_every_truncation_refused() -> None:
    data = pack({"a": [1, 2**40, "xyz", b"\x00\x01", 1.25, {"b": None}], "c": "é" * 20})
    for i in range(len(data)):
        with pytest.raises(MalformedFrame):
            unpack(data[:i])


@pytest.mark.parametrize(
    "data",
    [
        b"\x81\x01\x02",  # {1: 2}
        b"\x81\xc0\x01",  # {nil: 1}
        b"\x81\xc3\x01",  # {true: 1}
        b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x01",  # {1.5: 1}
        b"\x81\x91\x01\x01",  # {[1]: 1}
        b"\x81\x80\x01",  # {{}: 1}
        b"\x82\xa1a\x01\x02\x03",  # second key not a string
        b"\x91\x81\x01\x02",  # nested in an array
    ],
)
def test_non_string_map_keys_refused(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        unpack(data)


def test_packed_non_string_keys_refused() -> None:
    for value in ({1: "a"}, {None: 1}, {(1, 2): 3}, {"ok": {2: 3}}):
        with pytest.raises(MalformedFrame):
            unpack(pack(value))


HUGE_ANNOUNCEMENTS = {
    "array32": b"\xdd\xff\xff\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "str32": b"\xdb\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "array32-max+1": b"\xdd" + struct.pack(">I", DEFAULT_MAX_FRAME + 1),
    "map32-max/2+1": b"\xdf" + struct.pack(">I", DEFAULT_MAX_FRAME // 2 + 1),
    "str32-max+1": b"\xdb" + struct.pack(">I", DEFAULT_MAX_FRAME + 1),
    "bin32-max+1": b"\xc6" + struct.pack(">I", DEFAULT_MAX_FRAME + 1),
    "nested": b"\xdd\xff\xff\xff\xff" * 200,
}


@pytest.mark.parametrize("data", HUGE_ANNOUNCEMENTS.values(), ids=HUGE_ANNOUNCEMENTS.keys())
def test_short_frame_announcing_huge_container_refused_without_allocating(data: bytes) -> None:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(MalformedFrame):
            unpack(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Allocating the announced array would be 8 * 2**32 bytes; a refusal costs a few KiB at most.
    assert peak < 256 * 1024, peak


def test_huge_announcement_through_the_decoder() -> None:
    for data in HUGE_ANNOUNCEMENTS.values():
        with pytest.raises(MalformedFrame):
            FrameDecoder().feed(raw_frame(data))


def test_caps_follow_the_configured_max_size() -> None:
    assert unpack(pack([0] * 10), max_size=10) == [0] * 10
    with pytest.raises(MalformedFrame):
        unpack(pack([0] * 11), max_size=10)
    assert unpack(pack("s" * 10), max_size=10) == "s" * 10
    with pytest.raises(MalformedFrame):
        unpack(pack("s" * 11), max_size=10)
    with pytest.raises(MalformedFrame):
        unpack(pack(b"b" * 11), max_size=10)
    assert unpack(pack({str(i): 0 for i in range(5)}), max_size=10) == {str(i): 0 for i in range(5)}
    with pytest.raises(MalformedFrame):
        unpack(pack({str(i): 0 for i in range(6)}), max_size=10)


DEEP = {
    "arrays": b"\x91" * 100_000 + b"\xc0",
    "maps": b"\x81\xa1k" * 50_000 + b"\xc0",
    "mixed": b"\x91\x81\xa1k" * 30_000 + b"\xc0",
    "just-over-stack": b"\x91" * 1025 + b"\xc0",
}


@pytest.mark.parametrize("data", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_malformed_not_recursion_error(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        unpack(data)
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(raw_frame(data))


@pytest.mark.parametrize("data", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_with_pure_python_msgpack(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    # msgpack falls back to msgpack.fallback when its C extension is unavailable
    # (or MSGPACK_PUREPYTHON is set); the same caps must hold there.
    monkeypatch.setattr(_codec.msgpack, "unpackb", msgpack.fallback.unpackb)
    with pytest.raises(MalformedFrame):
        unpack(data)


def test_pure_python_msgpack_keeps_the_other_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_codec.msgpack, "unpackb", msgpack.fallback.unpackb)
    for data in (*HUGE_ANNOUNCEMENTS.values(), b"\xd4\x05\x00", b"\x81\x01\x02", b"\xc0\xc0", b"\x92\x01"):
        with pytest.raises(MalformedFrame):
            unpack(data)


# --------------------------------------------------------------------------- messages


def test_valid_envelopes_parse_to_named_tuples() -> None:
    r = parse_message([REQUEST, 5, "cache.get", ["k"]])
    assert type(r) is Request and r == Request(5, "cache.get", ["k"])
    s = parse_message([RESPONSE, 5, None, {"v": 1}])
    assert type(s) is Response and s == Response(5, None, {"v": 1})
    n = parse_message([NOTIFICATION, "log", ["info", "x"]])
    assert type(n) is Notification and n == Notification("log", ["info", "x"])
    assert (REQUEST, RESPONSE, NOTIFICATION) == (0, 1, 2)


@pytest.mark.parametrize("msg", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_round_trip(msg) -> None:
    assert parse_message(msg.wire()) == msg
    assert parse_message(unpack(pack(msg.wire()))) == msg


def test_response_error_and_result_are_free_form() -> None:
    for err, res in [(None, None), ("boom", None), ({"code": 1}, [1]), (b"\x00", 1.5), (True, False)]:
        assert parse_message([RESPONSE, 1, err, res]) == Response(1, err, res)


@pytest.mark.parametrize("obj", [None, 0, "x", b"x", {}, {"0": 0}, (0, 1, "m", []), [], 1.0, True])
def test_non_list_or_empty_message_refused(obj) -> None:
    with pytest.raises(InvalidMessage):
        parse_message(obj)


@pytest.mark.parametrize("kind", [3, -1, 255, 2**32, True, False, 0.0, 1.0, 2.0, "0", b"\x00", None, [0], {"0": 0}])
def test_unknown_message_type_refused(kind) -> None:
    for tail in ([1, "m", []], ["m", []], [1, None, None]):
        with pytest.raises(InvalidMessage):
            parse_message([kind, *tail])


@pytest.mark.parametrize(
    "obj",
    [
        [REQUEST],
        [REQUEST, 1, "m"],
        [REQUEST, 1, "m", [], None],
        [RESPONSE, 1, None],
        [RESPONSE, 1, None, None, None],
        [RESPONSE],
        [NOTIFICATION, "m"],
        [NOTIFICATION, "m", [], None],
        [NOTIFICATION],
    ],
)
def test_wrong_element_count_refused(obj) -> None:
    with pytest.raises(InvalidMessage):
        parse_message(obj)


@pytest.mark.parametrize("msgid", [0, 1, 2**31, MAX_MSGID])
def test_msgid_range_accepted(msgid: int) -> None:
    assert parse_message([REQUEST, msgid, "m", []]).msgid == msgid
    assert parse_message([RESPONSE, msgid, None, None]).msgid == msgid


@pytest.mark.parametrize("msgid", [-1, MAX_MSGID + 1, 2**63, -(2**63), True, False, 1.0, 0.0, "1", b"1", None, [1], {}])
def test_msgid_out_of_range_or_wrong_type_refused(msgid) -> None:
    with pytest.raises(InvalidMessage):
        parse_message([REQUEST, msgid, "m", []])
    with pytest.raises(InvalidMessage):
        parse_message([RESPONSE, msgid, None, None])


@pytest.mark.parametrize("method", ["m", "a" * 64, "user.setAppMetadata", "ü" * 64])
def test_method_accepted(method: str) -> None:
    assert parse_message([REQUEST, 1, method, []]).method == method
    assert parse_message([NOTIFICATION, method, []]).method == method


@pytest.mark.parametrize("method", ["", "a" * 65, b"m", 1, None, True, ["m"], {"m": 1}])
def test_method_refused(method) -> None:
    with pytest.raises(InvalidMessage):
        parse_message([REQUEST, 1, method, []])
    with pytest.raises(InvalidMessage):
        parse_message([NOTIFICATION, method, []])


@pytest.mark.parametrize("params", [None, (), {}, {"a": 1}, "abc", b"", 0, True])
def test_params_must_be_a_list(params) -> None:
    with pytest.raises(InvalidMessage):
        parse_message([REQUEST, 1, "m", params])
    with pytest.raises(InvalidMessage):
        parse_message([NOTIFICATION, "m", params])


def test_params_content_is_the_callers_business() -> None:
    params = [None, b"\x00", {"k": [1]}, 1.5]
    assert parse_message([REQUEST, 1, "m", params]).params is params


def test_refusal_messages_are_bounded() -> None:
    # A hostile value must not produce an unbounded error message.
    with pytest.raises(InvalidMessage) as exc:
        parse_message([REQUEST, "x" * 100_000, "m", []])
    assert len(str(exc.value)) < 200
    with pytest.raises(InvalidMessage) as exc:
        parse_message(["k" * 100_000])
    assert len(str(exc.value)) < 200


# --------------------------------------------------------------------------- hello


def test_hello_builds_the_documented_notification() -> None:
    h = hello(123, {"seccomp": True})
    assert h == Notification(HELLO, [PROTOCOL_VERSION, 123, {"seccomp": True}])
    assert h.wire() == [NOTIFICATION, "hello", [PROTOCOL_VERSION, 123, {"seccomp": True}]]
    assert hello(5).params == [PROTOCOL_VERSION, 5, {}]


def test_hello_round_trip_through_the_wire() -> None:
    [value] = FrameDecoder().feed(encode_frame(hello(999, {"landlock": 7}).wire()))
    assert check_hello(parse_message(value)) == (999, {"landlock": 7})


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, -1, 2**32])
def test_hello_version_mismatch(version: int) -> None:
    with pytest.raises(VersionMismatch):
        check_hello(Notification(HELLO, [version, 10, {}]))


@pytest.mark.parametrize(
    "msg",
    [
        Notification(HELLO, []),
        Notification(HELLO, [PROTOCOL_VERSION, 10]),
        Notification(HELLO, [PROTOCOL_VERSION, 10, {}, None]),
        Notification(HELLO, [str(PROTOCOL_VERSION), 10, {}]),
        Notification(HELLO, [float(PROTOCOL_VERSION), 10, {}]),
        Notification(HELLO, [True, 10, {}]),
        Notification(HELLO, [PROTOCOL_VERSION, "10", {}]),
        Notification(HELLO, [PROTOCOL_VERSION, 10.0, {}]),
        Notification(HELLO, [PROTOCOL_VERSION, True, {}]),
        Notification(HELLO, [PROTOCOL_VERSION, 0, {}]),
        Notification(HELLO, [PROTOCOL_VERSION, -5, {}]),
        Notification(HELLO, [PROTOCOL_VERSION, 10, None]),
        Notification(HELLO, [PROTOCOL_VERSION, 10, []]),
        Notification(HELLO, [PROTOCOL_VERSION, 10, "info"]),
        Notification("helo", [PROTOCOL_VERSION, 10, {}]),
        Notification("log", ["info", "x"]),
        Request(1, HELLO, [PROTOCOL_VERSION, 10, {}]),
        Response(1, None, [PROTOCOL_VERSION, 10, {}]),
    ],
)
def test_hello_malformed(msg) -> None:
    with pytest.raises(InvalidMessage):
        check_hello(msg)


def test_malformed_hello_with_wrong_version_is_still_invalid_not_mismatch() -> None:
    # Shape is checked before the version: a garbage hello is not a "version" problem.
    with pytest.raises(InvalidMessage):
        check_hello(Notification(HELLO, [PROTOCOL_VERSION + 1, "pid", {}]))


# -- execution ids: several executions in one worker (co-running) ----------------------------------


def test_calls_may_name_their_execution() -> None:
    req = parse_message([0, 5, "fetch", ["u"], 77])
    note = parse_message([2, "log", ["info", "x"], 77])
    assert req == Request(5, "fetch", ["u"], 77) and req.xid == 77
    assert note == Notification("log", ["info", "x"], 77) and note.xid == 77
    assert parse_message([0, 5, "fetch", ["u"]]).xid is None      # untagged: one execution in the worker
    assert Request(5, "fetch", ["u"], 77).wire() == [0, 5, "fetch", ["u"], 77]
    assert Notification("log", [], None).wire() == [2, "log", []]


@pytest.mark.parametrize("obj, why", [
    ([0, 5, "fetch", [], -1], "message id"),
    ([0, 5, "fetch", [], "77"], "message id"),
    ([0, 5, "fetch", [], 2**32], "message id"),
    ([0, 5, "fetch", [], 1, 2], "4 elements"),
    ([2, "log", [], True], "message id"),
    ([2, "log", [], 1, 2], "3 elements"),
])
def test_a_bad_execution_id_is_refused(obj: list, why: str) -> None:
    with pytest.raises(InvalidMessage, match=why):
        parse_message(obj)


def test_decoder_reports_each_frame_size_when_asked() -> None:
    frames = [encode_frame([2, "log", ["info", "x" * n], 9]) for n in (1, 300, 70_000)]
    dec = FrameDecoder()
    sizes: list[int] = []
    data = b"".join(frames)
    got = dec.feed(data[:100], sizes) + dec.feed(data[100:], sizes)
    assert len(got) == 3 and sizes == [len(f) for f in frames]
