"""What ``actionpool check`` (and validation at deploy) finds in one action file, shared by every language's checker.

Its own module so that ``_check.py`` (Python, and the registry of checkers) and ``_check_js.py`` both import
it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Report:
    """What ``check`` found in one file: the handlers it would call, and the problems."""

    path: str
    handlers: dict[str, str] = field(default_factory=dict)   # trigger -> handler name
    problems: list[str] = field(default_factory=list)        # "LINE: message" or "message"

    @property
    def ok(self) -> bool:
        return not self.problems


Checker = Callable[[str, str, "str | None"], Report]


@dataclass(frozen=True)
class SourceProblem:
    """Why a source cannot be deployed, where known: 1-based ``line`` and ``column`` in the action's own text."""

    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}: " if self.line and self.column else f"{self.line}: " if self.line else ""
        return where + self.message

