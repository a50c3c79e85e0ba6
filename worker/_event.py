"""Read-only views of the event (and of values the api returns to the action).

``event.user.email`` and ``event["user"]["email"]`` both work; a missing field
reads as ``None`` (like JavaScript's ``?.``) so the reference examples port
line by line. Views are built lazily on access, so a large event costs nothing
until the action reads it. Any attempt to mutate raises ``TypeError``.
"""

from __future__ import annotations

from typing import Any, Iterator


def view(value: Any) -> Any:
    """Wrap dicts and lists in read-only views; scalars are already immutable."""
    t = type(value)
    if t is dict:
        return FrozenDict(value)
    if t is list:
        return FrozenList(value)
    return value


def thaw(value: Any) -> Any:
    """A deep, mutable plain copy (for actions that want to build on a value)."""
    if isinstance(value, FrozenDict):
        return {k: thaw(v) for k, v in value._data.items()}
    if isinstance(value, (FrozenList, list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    return value


class FrozenDict:
    """An immutable mapping with attribute access; missing keys read as ``None``."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return view(self._data.get(name))

    def __getitem__(self, key: Any) -> Any:
        return view(self._data.get(key)) if type(key) is str else None

    def get(self, key: str, default: Any = None) -> Any:
        v = self._data.get(key)
        return default if v is None else view(v)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def keys(self) -> list[str]:
        return list(self._data)

    def values(self) -> list[Any]:
        return [view(v) for v in self._data.values()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, view(v)) for k, v in self._data.items()]

    def to_dict(self) -> dict[str, Any]:
        return thaw(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenDict):
            return self._data == other._data
        return isinstance(other, dict) and self._data == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the event is read-only; use api methods to change the flow")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _readonly  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _readonly


class FrozenList(tuple):
    """An immutable sequence whose items are views; out-of-range reads raise as usual."""

    __slots__ = ()

    def __new__(cls, data: list[Any]) -> "FrozenList":
        return super().__new__(cls, [view(v) for v in data])

    def to_list(self) -> list[Any]:
        return thaw(self)

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the event is read-only; use api methods to change the flow")

    append = extend = insert = remove = pop = clear = sort = reverse = _readonly
