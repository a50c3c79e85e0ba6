"""What a message costs the supervisor, per byte of input, for the shapes an attacker would pick.

The supervisor decodes and checks every frame a worker sends on the one event
loop all tenants share. Both steps must be linear with a small constant in
the frame's size, whatever its shape: a path string per element (the old
``check_json``) made a 1 MiB frame of nested containers cost ~3 s and 1.4 GB.

Time is never compared with a wall-clock constant. It is the thread's CPU
time, compared with the cost of decoding the same bytes (msgpack, C) in the
same run, and with the same work on a quarter of the input (linear, not
quadratic). Memory is the ``tracemalloc`` peak of the check, per byte of input.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any, Callable

import orjson
import pytest

from actionpool.protocol import METHODS, FrameDecoder, check_json, check_params, encode_frame, parse_message
from actionpool.protocol._schema import MAX_JSON_DEPTH
from actionpool.runner import RunnerConfig
from actionpool.runner._engine import MAX_EVENT_DEPTH, FlowEngine

FRAME = 1 << 20
BUDGET = 256 << 10            # frames of 256 KiB (and 64 KiB): the ratios are what is measured


def chains(n: int) -> Any:
    """Many chains nested to the depth limit: every level of the walk is wide."""
    def chain() -> Any:
        v: Any = 0
        for _ in range(MAX_JSON_DEPTH - 2):
            v = [v]
        return v
    return [chain() for _ in range(n)]


def deep_dicts(n: int) -> Any:
    def chain(i: int) -> Any:
        v: Any = i
        for d in range(MAX_JSON_DEPTH - 2):
            v = {f"k{d}": v}
        return v
    return [chain(i) for i in range(n)]


def wide_at_depth(n: int) -> Any:
    """n small values at the bottom of a chain of long keys: the old check built a 1.3 KB path per value."""
    v: Any = {f"{i:x}": i % 100 for i in range(n)}
    for d in range(MAX_JSON_DEPTH - 2):
        v = {("k%02d" % d) * 14: v}
    return v


# Each shape grows with n; the test picks n so the frame is just under 1 MiB.
SHAPES: dict[str, Callable[[int], Any]] = {
    "empty_lists": lambda n: [[] for _ in range(n)],
    "empty_dicts": lambda n: [{} for _ in range(n)],
    "one_element_lists": lambda n: [[0] for _ in range(n)],
    "small_dicts": lambda n: [{"a": i} for i in range(n)],
    "flat_ints": lambda n: list(range(n)),
    "flat_mixed": lambda n: [x for i in range(n // 5) for x in (i, "s", 1.5, None, True)],
    "tiny_strings": lambda n: ["a"] * n,
    "long_keys": lambda n: {("k" * 1000) + str(i): i for i in range(n)},
    "chains_to_depth_limit": chains,
    "dict_chains_to_depth_limit": deep_dicts,
    "wide_dict_of_lists": lambda n: {str(i): [i, [i]] for i in range(n)},
    "wide_at_depth": wide_at_depth,
}


def sized(shape: Callable[[int], Any], budget: int) -> tuple[Any, bytes]:
    """A large instance of ``shape`` whose state.set notification frame fits in ``budget`` bytes."""
    def frame_of(n: int) -> bytes:
        return encode_frame([2, "state.set", ["k", shape(n)]], 1 << 30)
    probe = 2000
    n = max(1, int(probe * budget / len(frame_of(probe)) * 0.99))
    while len(f := frame_of(n)) > budget:
        n = int(n * 0.97)
    return shape(n), f


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check(params: list[Any]) -> int:
    """The supervisor's check of a state.set value, without the cap on values (the walk itself is measured)."""
    return check_json(params[1], "api.state.set: value", tree=True, max_values=None)


def supervisor_check(frame: bytes) -> Callable[[], Any]:
    """What the supervisor does with one frame: decode, envelope, the parameter check (uncapped)."""
    def run() -> Any:
        (value,) = FrameDecoder(FRAME).feed(frame)
        return check(parse_message(value).params)
    return run


@pytest.mark.parametrize("name", SHAPES)
def test_frame_check_is_linear_in_time_and_memory(name: str) -> None:
    shape = SHAPES[name]
    _, frame = sized(shape, BUDGET)
    _, quarter = sized(shape, BUDGET // 4)
    assert len(frame) > BUDGET * 0.9
    decoded = FrameDecoder(FRAME).feed(frame)[0]
    params = parse_message(decoded).params

    decode = timed(lambda: FrameDecoder(FRAME).feed(frame))
    checked = timed(lambda: check(params))
    whole = timed(supervisor_check(frame))
    part = timed(supervisor_check(quarter))
    # The check costs about what decoding costs (C speed), never orders of magnitude more.
    assert checked <= 8 * decode + 0.05, (name, checked, decode)
    # Linear: four times the input costs about four times as much, not sixteen.
    assert whole <= 8 * part + 0.05, (name, whole, part)

    # Memory of the check itself: a few pointers per container at most, never a string per element.
    # It stays within twice the memory of the decoded value it checks (a pointer and a type per
    # element of one level, where one-character strings cost the value nothing), and 40 bytes per input byte.
    value_bytes = peak_bytes(lambda: FrameDecoder(FRAME).feed(frame))
    peak = peak_bytes(lambda: check(params))
    assert peak <= 2 * value_bytes and peak <= 40 * len(frame), (name, peak, value_bytes, len(frame))
    print(f"\n{name}: {len(frame)} B frame, decode {decode * 1e3:.1f} ms, check {checked * 1e3:.1f} ms "
          f"({checked * 1e9 / len(frame):.0f} ns/B), check peak {peak / len(frame):.1f} B/B")


def test_worker_side_check_is_linear_too() -> None:
    """The worker's own check (tree=False: shared objects and cycles are possible) stays linear."""
    value, frame = sized(SHAPES["chains_to_depth_limit"], BUDGET)
    small, _ = sized(SHAPES["chains_to_depth_limit"], BUDGET // 4)
    from actionpool.protocol import check_json
    whole = timed(lambda: check_json(value, "v", max_values=None))
    part = timed(lambda: check_json(small, "v", max_values=None))
    assert whole <= 8 * part + 0.02, (whole, part)


def test_shared_subobjects_cost_once_per_level() -> None:
    """A DAG that expands to 2**30 paths is checked in a blink on the worker side."""
    from actionpool.protocol import check_json
    v: Any = [1]
    for _ in range(30):
        v = [v, v]
    assert timed(lambda: check_json(v, "v", max_values=None), repeat=1) < 1.0


def engine() -> FlowEngine:
    return FlowEngine(RunnerConfig(), pool=None, services=None)  # type: ignore[arg-type]


def nested_event(target: int) -> dict[str, Any]:
    """A ~target-byte event of containers nested to near the event depth limit (within the documented limits)."""
    def chain(i: int) -> Any:
        v: Any = {"i": i}
        for d in range(MAX_EVENT_DEPTH - 4):
            v = {"n": v} if d % 2 else [v]
        return v
    one = len(orjson.dumps(chain(0))) + 1
    return {"user": {"user_id": "u"}, "data": [chain(i) for i in range(target // one)]}


def test_event_within_limits_is_cheap() -> None:
    """A 470 KB event within the limits (it used to cost 0.6 GB per flow)."""
    event = nested_event(470_000)
    size = len(orjson.dumps(event))
    assert 400_000 < size <= RunnerConfig().limits.max_frame_bytes // 2
    eng = engine()
    assert eng.check_event(event) is None
    peak = peak_bytes(lambda: eng.check_event(event))
    assert peak <= 8 * size, (peak, size)
    encode = timed(lambda: orjson.dumps(event))
    assert timed(lambda: eng.check_event(event)) <= 30 * encode + 0.05


def test_oversized_event_is_refused_before_its_structure_is_walked() -> None:
    """Size before structure: an event far over the limit costs one C encode, not a walk."""
    event = {"data": [[i] for i in range(400_000)]}     # ~3.5 MB serialised
    eng = engine()
    problem = eng.check_event(event)
    assert problem is not None and "exceeds" in problem
    peak = peak_bytes(lambda: eng.check_event(event))
    # What the one encode costs is orjson's (its buffer strategy differs between releases): the check
    # may cost that encode and nothing proportional on top of it.
    encode_peak = peak_bytes(lambda: orjson.dumps(event))
    assert peak <= encode_peak + (64 << 10), (peak, encode_peak)


def test_event_errors_still_name_the_path() -> None:
    eng = engine()
    assert eng.check_event({"user": {"when": {1, 2}}}) == "event['user']['when']: set is not JSON-serialisable"
    assert "nested deeper than 64" in (eng.check_event({"d": _nest(70)}) or "")
    assert "not a JSON number" in (eng.check_event({"d": [float("nan")]}) or "")
    cyc: dict[str, Any] = {}
    cyc["self"] = cyc
    assert "circular" in (eng.check_event(cyc) or "")


def _nest(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


def test_the_value_cap_stops_the_walk_early() -> None:
    """With the cap (the supervisor's setting), a frame of a million values costs what 100 000 cost."""
    _, frame = sized(SHAPES["empty_lists"], FRAME - 256)
    params = parse_message(FrameDecoder(FRAME).feed(frame)[0]).params
    def capped() -> None:
        with pytest.raises(ValueError, match="more than 100000 values"):
            check_params(METHODS["state.set"], params, tree=True)
    assert timed(capped) <= timed(lambda: check(params)) / 3 + 0.01
