"""Fuzzing the trust boundary with hypothesis, against real workers.

Three surfaces: the event a gateway hands to ``run_flow`` (odd types, huge or
deeply nested JSON, lone surrogates, big ints, NaN), the values an action
passes to the api (built inside the worker from a recipe the event carries,
so they can be what JSON cannot: NaN, 2**70, bytes, sets, cycles, views),
and raw bytes an action writes to its reply pipe (fd 4). Each flow must end
in exactly one FlowResult that is either the exact expected answer or a
clear error: ``invalid_event``, a ``TypeError`` the action caught, or (for
the pipe) ``protocol_error``/``worker_crash``/``timeout`` followed by a
healthy next flow. The expected answer comes from a model written here,
independent of ``protocol.check_json``.

One Runner per test serves all its examples: the examples run on one event
loop (``asyncio.Runner``) and each is bounded by ``asyncio.wait_for``.
Examples are derandomized, so every run tries the same inputs.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Iterator

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import make_runner
from actionpool.protocol import METHODS
from actionpool.runner import Action, Limits, Runner, RunnerConfig

FLOW_BOUND_S = 30.0
EVENT_MAX_DEPTH = 64         # runner: containers nested this deep in an event are refused
API_MAX_DEPTH = 32           # protocol: ... in an api argument
MAX_FRAME = 1 << 20
LOG_BYTES = 4096
CACHE_VALUE_BYTES = 4096
U64, I64 = 2**64, 2**63

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])
FUZZ_CHEAP = settings(FUZZ, max_examples=100)   # a few ms per example
CONFIG = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=10.0))


class LoopRunner:
    """A Runner on an ``asyncio.Runner`` loop that outlives single examples; ``flow()`` is a bounded call."""

    def __init__(self, config: RunnerConfig = CONFIG) -> None:
        self.loop = asyncio.Runner()
        self.runner: Runner = make_runner(config)
        self.flows = 0

    def __enter__(self) -> "LoopRunner":
        self.loop.__enter__()
        self.loop.run(self.runner.start())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.loop.run(self.runner.close())
        finally:
            self.loop.__exit__(None, None, None)

    def flow(self, actions: list[Action], event: Any, tenant: str = "fuzz") -> dict[str, Any]:
        res = self.loop.run(asyncio.wait_for(
            self.runner.run_flow(trigger="post-login", actions=actions, event=event, tenant=tenant), FLOW_BOUND_S))
        self.flows += 1
        return res.to_dict()


@pytest.fixture
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing the supervisor's loop logged as an error (an exception in a callback or a task)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert errors == []


# --------------------------------------------------------------------------------------------
# the model: what a value is worth on the wire, written independently of protocol.check_json


class Bad(Exception):
    """The value cannot cross the wire: the api must raise TypeError (the runner: invalid_event)."""


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (True is not 1, 1.0 is not 1) and the sign of zero."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def utf8_ok(s: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def wire(value: Any, depth: int, max_depth: int) -> Any:
    """``value`` as the peer will see it (tuples become lists); raise Bad when it cannot travel."""
    t = type(value)
    if value is None or t is bool:
        return value
    if t is int:
        if not -I64 <= value < U64:
            raise Bad(f"int {value}")
        return value
    if t is float:
        if not math.isfinite(value):
            raise Bad(f"float {value}")
        return value
    if t is str:
        if not utf8_ok(value):
            raise Bad("lone surrogate")
        return value
    if t in (list, tuple, dict):
        if depth >= max_depth:
            raise Bad(f"container at depth {depth}")
        if t is dict:
            out = {}
            for k, v in value.items():
                if type(k) is not str or not utf8_ok(k):
                    raise Bad(f"key {k!r}")
                out[k] = wire(v, depth + 1, max_depth)
            return out
        return [wire(v, depth + 1, max_depth) for v in value]
    raise Bad(t.__name__)


# --------------------------------------------------------------------------------------------
# strategies

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-I64, U64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=4), max_leaves=10)
odd_scalars = st.one_of(
    st.integers(U64, 2**200), st.integers(-(2**200), -I64 - 1), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3).map(lambda s: "a" + s),
    st.binary(max_size=8), st.frozensets(st.integers(), max_size=2), st.just(object()),
)


def nest(depth: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(depth):
        leaf = {"d": leaf} if as_dict else [leaf]
    return leaf


event_data = st.one_of(
    json_values,
    st.recursive(json_scalars | odd_scalars, lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
                 | st.dictionaries(st.text(max_size=5) | st.integers(0, 3), c, max_size=3), max_leaves=6),
    st.builds(nest, st.integers(1, 80), json_scalars, st.booleans()),          # around both depth limits
    st.builds(nest, st.sampled_from([30, 31, 32, 33, 61, 62, 63, 64]), json_scalars, st.booleans()),
    st.integers(0, 700_000).map(lambda n: "x" * n),                            # around the event size limit
    st.lists(st.text(max_size=2000), max_size=400),                            # many medium strings
)
with_data = st.fixed_dictionaries({"user": st.just({"user_id": "auth0|fuzz"}), "data": event_data})
events = st.one_of(
    with_data, with_data, with_data,        # weighted: most events are objects with a payload to echo
    st.dictionaries(st.text(max_size=6) | st.integers(0, 2), json_scalars | odd_scalars, max_size=3),
    st.one_of(st.lists(json_scalars, max_size=3), json_scalars, st.binary(max_size=4)),   # not an object at all
)

ECHO = Action(slug="fz", source=(
    "def on_execute(event, api):\n"
    "    data = event.to_dict().get('data')\n"
    "    try:\n"
    "        api.state.set('echo', data)\n"
    "    except TypeError as exc:\n"
    "        api.state.set('type_error', str(exc)[:300])\n"))


def event_verdict(event: Any) -> tuple[str, Any]:
    """('invalid', reason) | ('echo', wire value of data) | ('type_error', reason)."""
    if type(event) is not dict:
        return "invalid", "not an object"
    try:
        wire(event, 0, EVENT_MAX_DEPTH)
    except Bad as exc:
        return "invalid", str(exc)
    if len(orjson.dumps(event)) > MAX_FRAME // 2:
        return "invalid", "too large"
    try:
        return "echo", wire(event.get("data"), 0, API_MAX_DEPTH)
    except Bad as exc:
        return "type_error", str(exc)


def test_fuzz_events(no_asyncio_errors: None) -> None:
    verdicts: dict[str, int] = {}
    with LoopRunner() as lr:

        @FUZZ_CHEAP
        @given(event=events)
        @example(event={"data": nest(40, 1, False)})                 # travels in an event, not to the api
        @example(event={"data": nest(63, "x", False)})               # the deepest event accepted
        @example(event={"data": nest(64, "x", True)})                # one level too deep for an event
        @example(event={"data": "x" * 500_000})
        @example(event={"data": "x" * 600_000})                      # over half a frame
        @example(event={"data": ["a\ud800"]})
        @example(event={"data": {"n": math.nan}})
        @example(event={"data": [U64 - 1, -I64]})
        @example(event={"data": U64})
        @example(event={"data": (1, [2.5, -0.0])})
        @example(event={"data": b"x"})
        @example(event={1: 2})
        @example(event=[{"data": 1}])
        def one(event: Any) -> None:
            got = lr.flow([ECHO], event)
            verdict, want = event_verdict(event)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            if verdict == "invalid":
                assert got["outcome"] == "deny" and got["denial"]["kind"] == "invalid_event", (want, got["denial"])
                assert got["state"] == {}
            elif verdict == "type_error":
                assert got["outcome"] == "allow", got["denial"]
                assert list(got["state"]["fz"]) == ["type_error"], (want, got["state"])
                assert "nested deeper" in got["state"]["fz"]["type_error"]
            else:
                assert got["outcome"] == "allow", got["denial"]
                assert list(got["state"]["fz"]) == ["echo"], got["state"]
                assert same(got["state"]["fz"]["echo"], want)

        one()
    assert set(verdicts) == {"invalid", "echo", "type_error"}, verdicts


# --------------------------------------------------------------------------------------------
# api arguments: built inside the worker from a recipe, passed to an api method

BUILD = '''
import math


def build(r, event):
    t = r[0]
    if t == "json":
        return r[1]
    if t == "none":
        return None
    if t == "nan":
        return float("nan")
    if t == "inf":
        return math.inf * r[1]
    if t == "big":
        return r[2] * 2 ** r[1] + r[3]
    if t == "bytes":
        return bytes.fromhex(r[1])
    if t == "sur":
        return "x" + chr(r[1])
    if t == "set":
        return {1, 2}
    if t == "func":
        return build
    if t == "obj":
        return object()
    if t == "cycle":
        c = []
        c.append(c)
        return c
    if t == "view":
        return event.user
    if t == "int":
        return r[1]
    if t == "list":
        return [build(x, event) for x in r[1]]
    if t == "tuple":
        return tuple(build(x, event) for x in r[1])
    if t == "dict":
        return {(k if type(k) is str else build(k, event)): build(v, event) for k, v in r[1]}
    if t == "deep":
        v = build(r[2], event)
        for _ in range(r[1]):
            v = [v]
        return v
    raise ValueError(t)
'''

CALL = Action(slug="fz", source=BUILD + '''

def on_execute(event, api):
    spec = event.to_dict()["fuzz"]
    value = build(spec["recipe"], event)
    m = spec["method"]
    try:
        if m == "state":
            api.state.set("k", value)
        elif m == "claim":
            api.session.setCustomClaim("c", value)
        elif m == "meta_patch":
            api.user.setAppMetadata(value)
        elif m == "meta_kv":
            api.user.setAppMetadata("m", value)
        elif m == "log":
            api.log("info", value)
        elif m == "cache":
            api.cache.delete("fz")
            r = api.cache.set("fz", value)
            got = api.cache.get("fz")
            api.state.set("cache", [r.type, r.code, got.value if got else None])
    except TypeError as exc:
        api.state.set("type_error", str(exc)[:300])
''')

OPAQUE = object()   # a value the model knows cannot travel (function, set, view, ...)


USER = {"user_id": "auth0|fuzz", "app_metadata": {"a": 1}}   # event.user of the api fuzz events


def model_value(r: list[Any]) -> Any:
    """The Python value ``build`` makes, with OPAQUE standing in for what only the worker can build.

    An event view (``event.user``) passed to the api travels as a plain copy of what it shows.
    """
    t = r[0]
    if t == "json":
        return r[1]
    if t in ("none",):
        return None
    if t == "nan":
        return math.nan
    if t == "inf":
        return math.inf * r[1]
    if t == "big":
        return r[2] * 2 ** r[1] + r[3]
    if t == "int":
        return r[1]
    if t == "sur":
        return "x" + chr(r[1])
    if t == "view":
        return {k: (dict(v) if type(v) is dict else v) for k, v in USER.items()}
    if t in ("bytes", "set", "func", "obj", "cycle"):
        return OPAQUE
    if t == "list":
        return [model_value(x) for x in r[1]]
    if t == "tuple":
        return tuple(model_value(x) for x in r[1])
    if t == "dict":
        out: dict[Any, Any] = {}
        for k, v in r[1]:
            key = k if type(k) is str else model_value(k)
            if key is OPAQUE:      # a bytes key: hashable but not a string
                key = ("bytes", k[1])
            out[key] = model_value(v)
        return out
    if t == "deep":
        v = model_value(r[2])
        for _ in range(r[1]):
            v = [v]
        return v
    raise ValueError(t)


def truncate(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    return raw[:limit].decode("utf-8", "ignore") if len(raw) > limit else text


def call_expectation(method: str, recipe: list[Any]) -> dict[str, Any]:
    """The fields of the FlowResult the call must produce: either its effect or a caught TypeError."""
    value = model_value(recipe)
    try:
        if method in ("log", "cache"):
            if type(value) is not str:
                raise Bad("not a string")
            wire(value, 0, API_MAX_DEPTH)
            if method == "log":
                return {"logs": [("info", truncate(value, LOG_BYTES))]}
            if len(value.encode()) > CACHE_VALUE_BYTES:
                return {"state": {"fz": {"cache": ["error", "CacheValueSizeExceeded", None]}}}
            return {"state": {"fz": {"cache": ["success", None, value]}}}
        if method == "meta_patch":
            if type(value) is not dict:
                raise Bad("not a dict")
            return {"app_metadata": wire(value, 0, API_MAX_DEPTH)}
        if method == "meta_kv":
            return {"app_metadata": {"m": wire(value, 1, API_MAX_DEPTH)}}   # travels as the patch {"m": value}
        w = wire(value, 0, API_MAX_DEPTH)
        return {"state": {"fz": {"k": w}}} if method == "state" else {"claims": {"access_token": {"c": w}, "id_token": {}}}
    except Bad:
        return {"type_error": True}


keys = st.one_of(st.text(max_size=8), st.integers(-3, 3).map(lambda n: ["int", n]), st.just(["none"]),
                 st.binary(max_size=3).map(lambda b: ["bytes", b.hex()]))
clean_leaves = st.one_of(     # values that travel (unless nested too deep or out of range)
    json_values.map(lambda v: ["json", v]),
    st.text(max_size=6000).map(lambda s: ["json", s]),      # around the log and cache limits
    st.just(["none"]), st.just(["view"]),
    st.tuples(st.sampled_from([62, 63, 64, 65]) | st.integers(0, 130), st.sampled_from([1, -1]),
              st.integers(-2, 2)).map(lambda t: ["big", *t]),
)
odd_leaves = st.one_of(       # values that cannot travel
    st.just(["nan"]), st.sampled_from([["inf", 1], ["inf", -1]]),
    st.binary(max_size=6).map(lambda b: ["bytes", b.hex()]),
    st.sampled_from([["set"], ["func"], ["obj"], ["cycle"]]),
    st.integers(0xD800, 0xDFFF).map(lambda cp: ["sur", cp]),    # a lone surrogate: not UTF-8
)


def containers(children: st.SearchStrategy[Any], key: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3).map(lambda xs: ["list", xs]),
        st.lists(children, max_size=3).map(lambda xs: ["tuple", xs]),
        st.lists(st.tuples(key, children).map(list), max_size=3).map(lambda kv: ["dict", kv]),
        st.tuples(st.integers(0, 40), children).map(lambda t: ["deep", t[0], t[1]]),
    )


recipes = st.one_of(
    st.recursive(clean_leaves, lambda c: containers(c, st.text(max_size=8)), max_leaves=6),
    st.recursive(clean_leaves | odd_leaves, lambda c: containers(c, keys), max_leaves=6),
    st.text(max_size=6000).map(lambda s: ["json", s]),
)
METHOD_NAMES = ("state", "claim", "meta_patch", "meta_kv", "log", "cache")


def check_call(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["outcome"] == "allow", got["denial"]
    state, logs = got["state"], [(e["level"], e["message"]) for e in got["logs"]]
    if want.get("type_error"):
        assert list(state.get("fz", {})) == ["type_error"], state
        assert got["claims"] == {"access_token": {}, "id_token": {}} and got["app_metadata"] == {} and logs == []
        return
    assert same(state, want.get("state", {})), (state, want)
    assert same(got["claims"], want.get("claims", {"access_token": {}, "id_token": {}})), got["claims"]
    assert same(got["app_metadata"], want.get("app_metadata", {})), got["app_metadata"]
    assert logs == want.get("logs", []), logs[:3]


def test_fuzz_api_arguments(no_asyncio_errors: None) -> None:
    outcomes: dict[str, int] = {}
    with LoopRunner() as lr:

        @FUZZ_CHEAP
        @given(method=st.sampled_from(METHOD_NAMES), recipe=recipes)
        @example(method="state", recipe=["view"])
        @example(method="meta_patch", recipe=["dict", [["u", ["view"]], ["b", ["big", 64, 1, -1]]]])
        @example(method="claim", recipe=["big", 64, 1, 0])
        @example(method="claim", recipe=["big", 63, -1, -1])
        @example(method="meta_kv", recipe=["deep", 31, ["none"]])    # the patch {"m": ...} adds a level
        @example(method="meta_kv", recipe=["deep", 32, ["none"]])
        @example(method="state", recipe=["deep", 32, ["json", 1]])
        @example(method="state", recipe=["deep", 31, ["json", []]])
        @example(method="log", recipe=["json", "\u00e9" * 3000])      # truncated at 4096 bytes, between characters
        @example(method="cache", recipe=["json", "x" * 4097])
        @example(method="cache", recipe=["json", "x" * 4096])
        @example(method="state", recipe=["sur", 0xD800])
        @example(method="state", recipe=["list", [["cycle"]]])
        @example(method="meta_patch", recipe=["dict", [[["int", 1], ["none"]]]])
        @example(method="state", recipe=["dict", [["a", ["nan"]], ["a", ["none"]]]])   # the last duplicate wins
        def one(method: str, recipe: list[Any]) -> None:
            event = {"user": USER, "fuzz": {"method": method, "recipe": recipe}}
            assume(event_verdict(event)[0] != "invalid")   # the recipe itself must travel
            want = call_expectation(method, recipe)
            got = lr.flow([CALL], event)
            outcomes["type_error" if want.get("type_error") else "stored"] = 1 + outcomes.get(
                "type_error" if want.get("type_error") else "stored", 0)
            check_call(got, want)

        one()
    assert set(outcomes) == {"type_error", "stored"}, outcomes


def test_lone_surrogates_in_api_arguments_are_type_errors() -> None:
    """Strings that are not UTF-8 raise TypeError at call time, as events with them are invalid_event.

    (Found by this fuzzing: the worker's encoder used to raise UnicodeEncodeError, an uncaught_error.)
    """
    with LoopRunner() as lr:
        for method in ("state", "log", "cache", "claim"):
            got = lr.flow([CALL], {"fuzz": {"method": method, "recipe": ["sur", 0xD800]}})
            assert got["outcome"] == "allow" and "type_error" in got["state"].get("fz", {}), (method, got["denial"])
        got = lr.flow([CALL], {"fuzz": {"method": "meta_patch", "recipe": ["dict", [[["sur", 0xDC00], ["none"]]]]}})
        assert got["outcome"] == "allow" and "type_error" in got["state"].get("fz", {}), got["denial"]


# --------------------------------------------------------------------------------------------
# random bytes on the reply pipe

NOT_API = st.one_of(st.sampled_from(["execute", "configure", "hello", "shutdown", "", "state", "log.", "fetch2"]),
                    st.text(max_size=12)).filter(lambda m: m not in METHODS)
rpc_like = st.one_of(
    st.tuples(st.just(2), NOT_API, st.lists(json_scalars, max_size=3)),                       # notification
    st.tuples(st.just(0), st.integers(0, 2**32), NOT_API, st.lists(json_scalars, max_size=3)),  # request
    st.tuples(st.just(1), st.integers(0, 2**32), st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
              json_scalars),                                                                  # response
    st.lists(json_scalars, max_size=5),                                                       # any array
).map(list)
msgpack_values = st.one_of(rpc_like, json_values, st.binary(max_size=16))


def frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


reply_bytes = st.one_of(
    st.binary(min_size=1, max_size=2048),
    msgpack_values.map(frame),
    st.tuples(st.lists(msgpack_values.map(frame), min_size=1, max_size=3), st.binary(max_size=16)).map(
        lambda t: b"".join(t[0]) + t[1]),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda t: t[0].to_bytes(4, "big") + t[1]),
)

WRITE_FD4 = Action(slug="pipe", limits={"action_timeout_s": 0.3}, source=(
    "import os, time\n"
    "def on_execute(event, api):\n"
    "    os.write(4, bytes.fromhex(event.hex))\n"
    "    time.sleep(30)\n"))
NORMAL = Action(slug="normal", source="def on_execute(event, api):\n    api.state.set('n', event.n)\n")


def test_fuzz_reply_pipe_bytes(no_asyncio_errors: None) -> None:
    kinds: dict[str, int] = {}
    with LoopRunner() as lr:

        @FUZZ
        @given(data=reply_bytes)
        @example(data=b"\x00\x00\x00\x08\xc1\xc1garbage")        # not msgpack
        @example(data=b"\xff\xff\xff\xff")                        # a 4 GiB frame announced
        @example(data=b"\x00\x00\x00\x00")                        # an empty frame
        @example(data=b"\x00\x00")                                  # half a header, then silence
        @example(data=frame([1, 1, None, {"ok": True}]))              # a forged answer to a guessed id
        @example(data=frame([2, "user.setUserId", ["x"]]))            # a method post-login does not offer
        @example(data=frame([0, 7, "execute", [{}]]))                 # a request the worker may not make
        def one(data: bytes) -> None:
            got = lr.flow([WRITE_FD4], {"hex": data.hex()})
            assert got["outcome"] == "deny", got
            kind = got["denial"]["kind"]
            kinds[kind] = kinds.get(kind, 0) + 1
            assert kind in ("protocol_error", "worker_crash", "timeout"), got["denial"]
            assert got["actions"][0]["status"] == "failed"
            after = lr.flow([NORMAL], {"n": lr.flows})
            assert after["outcome"] == "allow" and after["state"] == {"normal": {"n": lr.flows - 1}}, after

        one()
        assert lr.runner.stats()["discarded"] >= sum(kinds.values())
    assert "protocol_error" in kinds and "timeout" in kinds, kinds


# --------------------------------------------------------------------------------------------
# the supervisor's message handlers in-process: WorkerHandle decoding + ExecutionContext admission
#
# The bytes a worker writes are fed straight into ``WorkerHandle.data_received`` (the asyncio
# callback of its pipe) during a BUSY execution whose api calls go to a real ExecutionContext,
# FlowState and Services. The "worker" is a ``sleep`` process in its own session, so a verdict's
# kill is real and harms nothing. Every input must end in a clean state (no verdict yet, or the
# worker's own answer) or a precise kind, with no exception escaping the callback and nothing
# left running; the cost per input byte is measured.

import os as _os
import subprocess as _subprocess
import time as _time

from actionpool.runner._flow import FlowState
from actionpool.runner._handlers import ExecutionContext
from actionpool.runner._services import Services
from actionpool.runner._spawn import Spawned
from actionpool.runner._triggers import profile
from actionpool.runner._worker import State, WorkerHandle

VERDICTS = {"protocol_error", "output_limit"}          # what the supervisor decides on its own
ANSWER_KINDS = {"uncaught_error", "memory_limit"}      # what an answering worker may report


class Handled:
    """One BUSY execution on a handle whose worker is a harmless stand-in process."""

    def __init__(self, services: Services, limits: Limits | None = None) -> None:
        self.proc = _subprocess.Popen(["sleep", "60"], start_new_session=True)
        r1, w1 = _os.pipe()
        r2, w2 = _os.pipe()
        for fd in (w1, r2):   # the stand-in's ends: unused
            _os.close(fd)
        self.handle = WorkerHandle(Spawned(self.proc.pid, r1, w2), max_frame=MAX_FRAME)
        self.handle.state = State.IDLE
        lim = limits or Limits()
        self.flow = FlowState(tenant="fz", trigger="post-login", event={}, actions=[Action(slug="fz", source="")],
                              limits=lim, flow_timeout_s=30.0, denial_message="no")
        ctx = ExecutionContext(self.flow, "fz", profile("post-login"), services, _time.monotonic() + 30)
        self.future = self.handle.execute({}, ctx, 30.0, "timeout", lim.max_output_bytes,
                                          max_queued=lim.max_queued_reply_bytes,
                                          cpu_budget_s=lim.supervisor_cpu_ms / 1000)
        run = self.handle._running
        assert run is not None
        self.msgid = run.msgid

    async def settle(self) -> dict[str, Any] | None:
        """Let request tasks run, end the execution if nothing did, return its error (None: clean answer)."""
        for _ in range(5):
            await asyncio.sleep(0)
        run = self.handle._running
        if run is not None:                  # no verdict and no answer: the timer would end it
            assert self.handle.alive
            self.handle._on_timeout(run, "timeout", 30.0)
        outcome = await asyncio.wait_for(self.future, 5)
        self.handle.kill("done")
        self.proc.wait(5)
        return outcome.error


def rpc_frame(kind: int, *rest: Any) -> bytes:
    return frame([kind, *rest])


OFFERED = sorted(profile("post-login").methods)
params_values = st.lists(st.one_of(json_scalars, json_values, st.binary(max_size=4),
                                   st.just(float("nan")), st.just(2**64 - 1)), max_size=4)
ops = st.one_of(
    st.tuples(st.sampled_from(OFFERED), params_values).map(lambda t: ("notify", t)),
    st.tuples(st.sampled_from(["cache.get", "cache.set", "cache.delete", "fetch"]), params_values).map(
        lambda t: ("request", t)),
    st.tuples(st.sampled_from(["log", "state.set"]), st.just(["info", "x"])).map(lambda t: ("notify", t)),
    st.tuples(NOT_API, params_values).map(lambda t: ("notify", t)),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["kind", "type", "message", "traceback"]),
                                         st.sampled_from(["uncaught_error", "memory_limit", "allow", "x"]))).map(
        lambda e: ("answer", e)),
    reply_bytes.map(lambda b: ("raw", b)),
)


def render(op: tuple[str, Any], msgid: int) -> bytes:
    kind, arg = op
    if kind == "notify":
        return rpc_frame(2, arg[0], arg[1])
    if kind == "request":
        return rpc_frame(0, 7, arg[0], arg[1])
    if kind == "answer":
        return rpc_frame(1, msgid, arg, {"ok": True})
    return arg


async def feed(seq: list[tuple[str, Any]], cuts: list[int], services: Services) -> str:
    """Feed one rendered sequence, cut into pieces, to a BUSY handle; return how the execution ended."""
    h = Handled(services)
    data = b"".join(render(op, h.msgid) for op in seq)
    pieces, last = [], 0
    for c in sorted({c % (len(data) + 1) for c in cuts}):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    started = _time.thread_time()
    for p in pieces:
        if p:
            h.handle.data_received(p)     # nothing may escape the protocol callback
    spent = _time.thread_time() - started
    assert spent < 0.5 + len(data) * 2e-6, (spent, len(data))
    error = await h.settle()
    kind = "answer" if error is None else error["kind"]
    assert kind in VERDICTS | ANSWER_KINDS | {"answer", "timeout"}, error
    if kind == "timeout":     # no verdict and no answer: then no well-formed answer was sent whole
        assert not any(op[0] == "answer" for op in seq) or any(op[0] == "raw" for op in seq), seq
    return kind


async def _services() -> Services:
    return Services(RunnerConfig())


def test_fuzz_message_handlers(no_asyncio_errors: None) -> None:
    verdicts: dict[str, int] = {}
    loop = asyncio.new_event_loop()
    services = loop.run_until_complete(_services())
    try:
        @FUZZ_CHEAP
        @given(seq=st.lists(ops, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=4))
        @example(seq=[("answer", None)], cuts=[])
        @example(seq=[("notify", ("state.set", ["k", 1])), ("answer", None)], cuts=[1, 5])
        @example(seq=[("notify", ("user.setUserId", ["x"])), ("answer", None)], cuts=[])    # not offered
        @example(seq=[("request", ("fetch", ["http://127.0.0.1:9/"])), ("answer", None)], cuts=[])
        @example(seq=[("raw", b"\xff\xff\xff\xff")], cuts=[2])
        @example(seq=[("answer", None), ("notify", ("log", ["info", "after"]))], cuts=[])
        def one(seq: list[tuple[str, Any]], cuts: list[int]) -> None:
            kind = loop.run_until_complete(feed(seq, cuts, services))
            verdicts[kind] = verdicts.get(kind, 0) + 1

        one()
    finally:
        loop.run_until_complete(services.aclose())
        loop.close()
    assert {"answer", "protocol_error"} <= set(verdicts), verdicts


@pytest.mark.parametrize("shape", ["empty_lists", "chains_to_depth_limit", "small_dicts", "flat_mixed", "long_keys"])
def test_handler_cost_per_byte(shape: str) -> None:
    """A ~1 MiB frame of an adversarial shape, through data_received and admission: linear, bounded memory."""
    from test_protocol_cost import SHAPES, peak_bytes, sized, timed

    value, big = sized(SHAPES[shape], MAX_FRAME - 1024)
    _, small = sized(SHAPES[shape], (MAX_FRAME - 1024) // 4)
    loop = asyncio.new_event_loop()
    services = loop.run_until_complete(_services())

    def through_handler(data: bytes) -> None:
        async def go() -> None:
            h = Handled(services, Limits(supervisor_cpu_ms=600_000))   # cost is measured here, not capped
            h.handle.data_received(data)
            h.handle.data_received(rpc_frame(1, h.msgid, None, {"ok": True}))
            error = await h.settle()    # stored, or refused for its number of values: never anything else
            assert error is None or (error["kind"] == "protocol_error" and "values" in error["message"]), error
        loop.run_until_complete(go())

    try:
        from actionpool.protocol import FrameDecoder
        decode = timed(lambda: FrameDecoder(MAX_FRAME).feed(big))
        whole = timed(lambda: through_handler(big))
        part = timed(lambda: through_handler(small))
        # Measured with the thread's CPU time; spawning the stand-in process is part of both.
        assert whole <= 10 * decode + 0.1, (shape, whole, decode)
        assert whole <= 8 * part + 0.1, (shape, whole, part)
        value_bytes = peak_bytes(lambda: FrameDecoder(MAX_FRAME).feed(big))
        peak = peak_bytes(lambda: through_handler(big))
        assert peak <= 4 * value_bytes + (1 << 20), (shape, peak, value_bytes)
    finally:
        loop.run_until_complete(services.aclose())
        loop.close()
