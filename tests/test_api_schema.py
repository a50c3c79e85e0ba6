"""The API schema in protocol/_schema.py: JSON checks, per-method arity/types, snake_case aliases."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actionpool.protocol import METHODS, ApiMethod, Kind, Param, check_json, check_params, pack, snake_case
from actionpool.protocol._schema import MAX_JSON_DEPTH


def nested_list(levels: int) -> Any:
    """``levels`` nested containers: nested_list(1) == [], nested_list(2) == [[]]."""
    v: Any = []
    for _ in range(levels - 1):
        v = [v]
    return v


def nested_dict(levels: int) -> Any:
    v: Any = {}
    for _ in range(levels - 1):
        v = {"k": v}
    return v


# --------------------------------------------------------------------------- check_json accepts


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 1.5, 1e308, -1e-308,
        "", "text", "ü\x00\U0001f600", [], {}, (), (1, "a"), [None, [True, [1.5, ["s"]]]],
        {"a": {"b": [1, {"c": None}]}, "": 0}, {"k": (1, [2, (3,)])},
        nested_list(MAX_JSON_DEPTH), nested_dict(MAX_JSON_DEPTH),
    ],
)
def test_check_json_accepts_plain_values(value: Any) -> None:
    assert check_json(value, "v") >= 0   # accepted: the number of values inside


def test_shared_non_circular_sub_object_is_accepted() -> None:
    shared = {"k": [1, 2, {"deep": "x"}]}
    lst = [shared, shared]
    check_json([shared, shared, {"again": shared}, (shared,), lst, lst], "v")
    check_json({"a": lst, "b": lst, "c": [lst, [lst]]}, "v")


def test_wide_values_are_fine() -> None:
    check_json(list(range(10_000)), "v")
    check_json({str(i): [i] for i in range(5_000)}, "v")


def test_custom_max_depth() -> None:
    check_json([[1]], "v", max_depth=2)
    with pytest.raises(TypeError):
        check_json([[[1]]], "v", max_depth=2)
    check_json(5, "v", max_depth=0)  # scalars have no depth
    with pytest.raises(TypeError):
        check_json([], "v", max_depth=0)


# --------------------------------------------------------------------------- check_json rejects


def _function() -> None:
    pass


class Custom:
    pass


class Callable_:
    def __call__(self) -> None:
        pass


class IntE(enum.IntEnum):
    A = 1


class StrSub(str):
    pass


def circular_list() -> Any:
    a: list[Any] = [1]
    a.append(a)
    return a


def circular_dict() -> Any:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


def indirect_cycle() -> Any:
    a: list[Any] = []
    b = {"a": a}
    a.append({"x": [b]})
    return a


def cycle_via_tuple() -> Any:
    a: list[Any] = []
    a.append((a,))
    return a


REJECTED: dict[str, tuple[Any, str]] = {
    "function": (_function, "function"),
    "lambda": (lambda: 0, "function"),
    "builtin": (len, "function"),
    "method": (Custom().__init__, "function"),
    "callable-object": (Callable_(), "function"),
    "class": (Custom, "type"),
    "datetime": (datetime.datetime(2024, 1, 1), "datetime"),
    "date": (datetime.date(2024, 1, 1), "date"),
    "set": ({1, 2}, "set"),
    "frozenset": (frozenset(), "frozenset"),
    "bytes": (b"x", "bytes"),
    "bytearray": (bytearray(b"x"), "bytearray"),
    "custom-object": (Custom(), "Custom"),
    "decimal": (decimal.Decimal("1.5"), "Decimal"),
    "fraction": (fractions.Fraction(1, 3), "Fraction"),
    "complex": (1j, "complex"),
    "int-enum": (IntE.A, "IntE"),
    "str-subclass": (StrSub("x"), "StrSub"),
    "ordered-dict": (collections.OrderedDict(), "OrderedDict"),
    "defaultdict": (collections.defaultdict(list), "defaultdict"),
    "deque": (collections.deque(), "deque"),
    "range": (range(3), "range"),
    "generator": ((i for i in ()), "generator"),
    "int-key": ({1: "a"}, "not a string"),
    "none-key": ({None: 1}, "not a string"),
    "bool-key": ({True: 1}, "not a string"),
    "bytes-key": ({b"k": 1}, "not a string"),
    "tuple-key": ({(1,): 1}, "not a string"),
    "nested-int-key": ({"ok": [{"fine": 1, 2: 3}]}, "not a string"),
    "circular-list": (circular_list(), "circular"),
    "circular-dict": (circular_dict(), "circular"),
    "indirect-cycle": (indirect_cycle(), "circular"),
    "cycle-via-tuple": (cycle_via_tuple(), "circular"),
    "big-int": (2**64, "64 bits"),
    "big-negative-int": (-(2**63) - 1, "64 bits"),
    "huge-int": (10**100, "64 bits"),
    "nan": (math.nan, "not a JSON number"),
    "inf": (math.inf, "not a JSON number"),
    "-inf": (-math.inf, "not a JSON number"),
    "too-deep-list": (nested_list(MAX_JSON_DEPTH + 1), "deeper"),
    "too-deep-dict": (nested_dict(MAX_JSON_DEPTH + 1), "deeper"),
    "far-too-deep": (nested_list(100_000), "deeper"),
    "nested-nan": ({"a": [1, 2, {"b": math.nan}]}, "not a JSON number"),
    "nested-set": ([1, [2, (3, {4})]], "set"),
}


@pytest.mark.parametrize("case", REJECTED.values(), ids=REJECTED.keys())
def test_check_json_rejects_with_type_error(case: tuple[Any, str]) -> None:
    value, fragment = case
    with pytest.raises(TypeError) as exc:
        check_json(value, "api.x: value")
    msg = str(exc.value)
    assert msg.startswith("api.x: value"), msg
    assert fragment in msg, msg


def test_rejection_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"^v\[1\]\['b'\]\[0\]: set is not JSON-serialisable$"):
        check_json([0, {"b": [set()]}], "v")


def test_rejection_message_is_bounded_for_long_keys() -> None:
    with pytest.raises(TypeError) as exc:
        check_json({"k" * 10_000: [object()]}, "v")
    assert len(str(exc.value)) < 200


def test_rejected_value_is_not_mutated() -> None:
    value = {"a": [1, 2], "b": circular_list()}
    snapshot = repr(value)
    with pytest.raises(TypeError):
        check_json(value, "v")
    assert repr(value) == snapshot


# --------------------------------------------------------------------------- hypothesis: only TypeError

hashable_keys = st.one_of(
    st.text(max_size=5), st.integers(-5, 5), st.none(), st.booleans(), st.binary(max_size=3),
    st.tuples(st.integers(0, 3)), st.frozensets(st.integers(0, 3), max_size=2),
)

anything_leaf = st.one_of(
    st.none(),
    st.booleans(),
    # Bounded: see the report about integers beyond Python's 4300-digit str() limit.
    st.integers(min_value=-(2**100), max_value=2**100),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=5),
    st.datetimes(),
    st.dates(),
    st.decimals(allow_nan=True),
    st.complex_numbers(max_magnitude=10),
    st.sets(st.integers(0, 5), max_size=3),
    st.frozensets(st.text(max_size=2), max_size=3),
    st.just(Custom()),
    st.just(_function),
    st.just(lambda: 1),
    st.just(IntE.A),
    st.just(StrSub("s")),
    st.just(bytearray(b"ba")),
)

anything = st.recursive(
    anything_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.dictionaries(hashable_keys, children, max_size=3),
    ),
    max_leaves=15,
)


@st.composite
def maybe_shared_or_circular(draw: st.DrawFn) -> Any:
    value = draw(anything)
    how = draw(st.sampled_from(["plain", "shared", "circular", "deep"]))
    if how == "shared":
        return [value, {"again": value}, (value,)]
    if how == "circular":
        root: list[Any] = [value]
        holder = draw(st.sampled_from(["list", "dict"]))
        root.append(root if holder == "list" else {"back": root})
        return root
    if how == "deep":
        depth = draw(st.integers(MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH + 2))
        for _ in range(depth):
            value = [value]
        return value
    return value


def oracle(v: Any, on_path: frozenset[int] = frozenset(), depth: int = 0) -> bool:
    """Independent recursive statement of check_json's contract: True when acceptable."""
    t = type(v)
    if v is None or t in (bool, str):
        return True
    if t is int:
        return -(2**63) <= v < 2**64
    if t is float:
        return math.isfinite(v)
    if t in (list, tuple, dict):
        if depth >= MAX_JSON_DEPTH or id(v) in on_path:
            return False
        inner = on_path | {id(v)}
        if t is dict:
            return all(type(k) is str and oracle(x, inner, depth + 1) for k, x in v.items())
        return all(oracle(x, inner, depth + 1) for x in v)
    return False


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=maybe_shared_or_circular())
def test_check_json_only_raises_type_error_and_matches_the_contract(value: Any) -> None:
    try:
        check_json(value, "v")
    except TypeError:
        accepted = False
    else:
        accepted = True
    assert accepted == oracle(value)
    if accepted:
        pack(value)  # whatever check_json lets through must be encodable on the wire


# --------------------------------------------------------------------------- METHODS table


def test_methods_table_is_consistent() -> None:
    assert METHODS, "empty API table"
    for name, m in METHODS.items():
        assert isinstance(m, ApiMethod) and m.name == name
        assert re.fullmatch(r"[a-z][A-Za-z]*(\.[a-z][A-Za-z]*)?", name), name
        assert all(isinstance(p, Param) and isinstance(p.kind, Kind) for p in m.params)
        optional = [p.optional for p in m.params]
        # Positional padding only works if every optional parameter comes last.
        assert optional == sorted(optional), name
        assert len({p.name for p in m.params}) == len(m.params), name


def test_value_returning_methods() -> None:
    assert {n for n, m in METHODS.items() if m.returns} == {"cache.get", "cache.set", "cache.delete", "fetch"}


# --------------------------------------------------------------------------- check_params

GOOD = {Kind.STR: "s", Kind.JSON: {"a": [1, None, 2.5]}, Kind.OBJECT: {"k": "v", "n": [1]}}
BAD = {
    Kind.STR: [1, b"s", ["s"], StrSub("s"), 1.5, True, {"s": 1}],
    Kind.OBJECT: [[], "s", 1, ("a",), collections.OrderedDict(a=1), {1: "a"}, {"k": set()}, {"k": math.nan}, True],
    Kind.JSON: [set(), b"x", math.inf, lambda: 0, {1: 2}, 2**64, nested_list(MAX_JSON_DEPTH + 1), Custom()],
}
METHOD_LIST = list(METHODS.values())
IDS = [m.name for m in METHOD_LIST]


def required(m: ApiMethod) -> int:
    return sum(not p.optional for p in m.params)


@pytest.mark.parametrize("m", METHOD_LIST, ids=IDS)
def test_check_params_full_arguments(m: ApiMethod) -> None:
    args = [GOOD[p.kind] for p in m.params]
    out = check_params(m, args)
    assert out == args
    assert out is not args


@pytest.mark.parametrize("m", METHOD_LIST, ids=IDS)
def test_check_params_pads_optional_with_none(m: ApiMethod) -> None:
    args = [GOOD[p.kind] for p in m.params[: required(m)]]
    out = check_params(m, list(args))
    assert out == args + [None] * (len(m.params) - required(m))
    # Explicit None for an optional parameter is the same as omitting it.
    assert check_params(m, out) == out


@pytest.mark.parametrize("m", METHOD_LIST, ids=IDS)
def test_check_params_arity(m: ApiMethod) -> None:
    full = [GOOD[p.kind] for p in m.params]
    counts = [len(full) + 1, len(full) + 3]
    if required(m) > 0:
        counts += [required(m) - 1, 0]
    for n in counts:
        args = (full * 4)[:n]
        with pytest.raises(TypeError, match=rf"^api\.{re.escape(m.name)}\(\) takes .* arguments \({n} given\)$"):
            check_params(m, args)


@pytest.mark.parametrize("m", METHOD_LIST, ids=IDS)
def test_check_params_rejects_wrong_types(m: ApiMethod) -> None:
    for i, p in enumerate(m.params):
        bads = list(BAD[p.kind])
        if not p.optional and p.kind is not Kind.JSON:
            bads.append(None)  # a required string/object cannot be nil; JSON null is a value
        for bad in bads:
            args = [GOOD[q.kind] for q in m.params]
            args[i] = bad
            with pytest.raises(TypeError) as exc:
                check_params(m, args)
            assert str(exc.value).startswith(f"api.{m.name}: {p.name}"), (bad, str(exc.value))


@pytest.mark.parametrize("m", [m for m in METHOD_LIST if any(p.kind is Kind.JSON for p in m.params)], ids=lambda m: m.name)
def test_json_params_accept_null_and_scalars(m: ApiMethod) -> None:
    for v in (None, 0, "s", [1], {"k": None}, True, 2**64 - 1):
        args = [v if p.kind is Kind.JSON else GOOD[p.kind] for p in m.params]
        assert check_params(m, args) == args


def test_object_kind_messages() -> None:
    m = METHODS["user.setAppMetadata"]
    with pytest.raises(TypeError, match=r"^api\.user\.setAppMetadata: patch must be an object \(dict\), got list$"):
        check_params(m, [[]])
    m = METHODS["fetch"]
    with pytest.raises(TypeError, match=r"^api\.fetch: init must be an object \(dict\), got str$"):
        check_params(m, ["http://127.0.0.1/", "GET"])
    with pytest.raises(TypeError, match=r"^api\.fetch: url must be a string, got NoneType$"):
        check_params(m, [None])


def test_arity_message_for_ranges() -> None:
    with pytest.raises(TypeError, match=r"^api\.cache\.set\(\) takes 2 to 3 arguments \(1 given\)$"):
        check_params(METHODS["cache.set"], ["k"])
    with pytest.raises(TypeError, match=r"^api\.deny\(\) takes 1 arguments \(2 given\)$"):
        check_params(METHODS["deny"], ["a", "b"])


# --------------------------------------------------------------------------- snake_case

SNAKE = {
    "deny": "deny",
    "access": "access",
    "validation": "validation",
    "error": "error",
    "state": "state",
    "set": "set",
    "log": "log",
    "user": "user",
    "setAppMetadata": "set_app_metadata",
    "setUserMetadata": "set_user_metadata",
    "setUserId": "set_user_id",
    "session": "session",
    "setCustomClaim": "set_custom_claim",
    "idToken": "id_token",
    "accessToken": "access_token",
    "cache": "cache",
    "get": "get",
    "delete": "delete",
    "fetch": "fetch",
}
SEGMENTS = sorted({seg for name in METHODS for seg in name.split(".")})


@pytest.mark.parametrize("segment", SEGMENTS)
def test_snake_case_of_every_method_segment(segment: str) -> None:
    snake = snake_case(segment)
    assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", snake), snake
    # Undo it: the snake name capitalises back to the camel one.
    head, *rest = snake.split("_")
    assert head + "".join(w.capitalize() for w in rest) == segment
    if segment in SNAKE:
        assert snake == SNAKE[segment]


def test_every_known_segment_is_in_the_table() -> None:
    # A new method segment should get an explicit expectation above.
    assert set(SEGMENTS) <= set(SNAKE), set(SEGMENTS) - set(SNAKE)


def test_snake_aliases_do_not_collide_within_a_namespace() -> None:
    spaces: dict[str, dict[str, str]] = {}
    for name in METHODS:
        *ns, leaf = name.split(".")
        space = spaces.setdefault(ns[0] if ns else "", {})
        for alias in {leaf, snake_case(leaf)}:
            assert space.setdefault(alias, name) == name, (alias, name, space[alias])
    namespaces = {name.split(".")[0] for name in METHODS if "." in name}
    assert len({snake_case(n) for n in namespaces}) == len(namespaces)


@pytest.mark.parametrize(
    "camel, snake",
    [("x", "x"), ("a1B", "a1_b"), ("v2Token", "v2_token"), ("already_snake", "already_snake")],
)
def test_snake_case_general(camel: str, snake: str) -> None:
    assert snake_case(camel) == snake


def test_check_json_counts_values_and_caps_them() -> None:
    from actionpool.protocol._schema import MAX_JSON_VALUES

    assert check_json("x", "v") == 0
    assert check_json([1, [2, 3], {"a": None}], "v") == 6
    assert check_json([0] * MAX_JSON_VALUES, "v") == MAX_JSON_VALUES
    with pytest.raises(ValueError, match=r"^v: more than 100000 values"):
        check_json([0] * (MAX_JSON_VALUES + 1), "v")
    with pytest.raises(ValueError):
        check_json([[[]] * 60_000, [[]] * 60_000], "v", tree=True)
    assert check_json([0] * (MAX_JSON_VALUES + 1), "v", max_values=None) == MAX_JSON_VALUES + 1
    tally = [0]
    check_params(METHODS["state.set"], ["k", [1, 2]], tally=tally)
    check_params(METHODS["log"], ["info", "m"], tally=tally)
    assert tally == [2]
