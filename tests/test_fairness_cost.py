"""The supervisor's per-flow shortcuts keep their exact meaning.

* ``check_json`` decides without building paths (it names the path only of a
  value it refuses): its verdict must agree with a plain recursive statement
  of the rules on every value.
* Flow ids and execute request ids come from a buffered ``os.urandom``: still
  distinct, and a forked child never replays its parent's ids.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings, strategies as st

from actionpool.protocol import check_json
from actionpool.runner import _rand

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([b"x", {1, 2}, object(), 2**64, -(2**63) - 1, -(2**63), 2**64 - 1, math.nan]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=30,
)


_MIN_INT, _MAX_INT = -(2**63), 2**64


def _model_accepts(v: object, depth_left: int) -> bool:
    """The rules of ``check_json``, stated recursively (the reference its fast walk must match)."""
    t = type(v)
    if t is dict or t is list or t is tuple:
        if depth_left <= 0:
            return False
        if t is dict and not all(type(k) is str for k in v):  # type: ignore[union-attr]
            return False
        items = v.values() if t is dict else v  # type: ignore[union-attr]
        return all(_model_accepts(item, depth_left - 1) for item in items)
    if t is str or t is bool or v is None:
        return True
    if t is int:
        return _MIN_INT <= v < _MAX_INT  # type: ignore[operator]
    if t is float:
        return math.isfinite(v)  # type: ignore[arg-type]
    return False


def _accepts(value: object, max_depth: int) -> bool:
    try:
        check_json(value, "v", max_depth=max_depth)
    except TypeError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(value=values, max_depth=st.integers(0, 5))
def test_fast_verdict_agrees_with_the_full_walk(value: object, max_depth: int) -> None:
    assert _accepts(value, max_depth) == _model_accepts(value, max_depth)


def test_errors_still_name_the_place() -> None:
    loop: list[object] = []
    loop.append(loop)
    for value, message in (
        ({"a": [1, {"b": b"x"}]}, "v['a'][1]['b']: bytes is not JSON-serialisable"),
        ({"a": {"b": math.inf}}, "v['a']['b']: inf is not a JSON number"),
        ({"a": loop}, "circular reference"),
        ({1: 2}, "object key of type int"),
        ([[[[]]]], "nested deeper than 3 levels"),
    ):
        with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_json(value, "v", max_depth=3)
    check_json({"deep": [[1]]}, "v", max_depth=3)


def test_ids_are_distinct_and_sized() -> None:
    ids = {_rand.random_hex(16) for _ in range(5000)}
    assert len(ids) == 5000 and all(len(i) == 32 for i in ids)
    nums = [_rand.random_u32() for _ in range(5000)]
    assert all(0 <= n < 2**32 for n in nums) and len(set(nums)) > 4990


def test_forked_child_does_not_repeat_the_parent_ids() -> None:
    _rand.random_hex(16)  # the buffer now holds bytes a child would replay without the fork hook
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, _rand.random_hex(16).encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != _rand.random_hex(16)
