"""A unified diff of two action sources whose cost is bounded, whatever the sources are.

difflib's matcher is quadratic or worse on adversarial input: two 100 kB sources of short lines that
repeat just under its "popular line" threshold took 19 s of the one event loop. Here the common
prefix and suffix (what most edits leave alone) are cut off in linear time, and difflib matches only
the changed middle, and only while that middle is at most ``MAX_LINE_PAIRS`` line pairs (about 0.1 s
at worst, measured). A larger middle is shown whole, as one removal and one addition: a correct
unified diff, just not a minimal one, and the answer says so (``exact: false``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

MAX_LINE_PAIRS = 1_000_000   # len(a middle) * len(b middle) that difflib may match
CONTEXT = 3

Opcode = tuple[str, int, int, int, int]


def unified(a: str, b: str, fromfile: str, tofile: str, max_pairs: int = MAX_LINE_PAIRS) -> tuple[str, bool]:
    """``(diff, exact)``: the unified diff of ``a`` -> ``b``; ``exact`` is False when the middle was too large."""
    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    ops, exact = opcodes(la, lb, max_pairs)
    return "".join(_format(la, lb, ops, fromfile, tofile)), exact


def opcodes(a: list[str], b: list[str], max_pairs: int = MAX_LINE_PAIRS) -> tuple[list[Opcode], bool]:
    """difflib-style opcodes covering both sequences, with difflib's matching limited to a bounded middle."""
    n = min(len(a), len(b))
    pre = 0
    while pre < n and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    ma, mb = a[pre:len(a) - suf], b[pre:len(b) - suf]
    ops: list[Opcode] = [("equal", 0, pre, 0, pre)] if pre else []
    exact = True
    if ma or mb:
        if len(ma) * len(mb) <= max_pairs:
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ma, mb).get_opcodes():
                ops.append((tag, i1 + pre, i2 + pre, j1 + pre, j2 + pre))
        else:
            exact = False
            tag = "replace" if ma and mb else ("delete" if ma else "insert")
            ops.append((tag, pre, pre + len(ma), pre, pre + len(mb)))
    if suf:
        ops.append(("equal", len(a) - suf, len(a), len(b) - suf, len(b)))
    return ops, exact


def _grouped(ops: list[Opcode], n: int = CONTEXT) -> Iterator[list[Opcode]]:
    """Hunks with ``n`` lines of context (difflib.SequenceMatcher.get_grouped_opcodes, on given opcodes)."""
    codes = list(ops)
    if not codes or all(c[0] == "equal" for c in codes):
        return
    if codes[0][0] == "equal":
        tag, i1, i2, j1, j2 = codes[0]
        codes[0] = tag, max(i1, i2 - n), i2, max(j1, j2 - n), j2
    if codes[-1][0] == "equal":
        tag, i1, i2, j1, j2 = codes[-1]
        codes[-1] = tag, i1, min(i2, i1 + n), j1, min(j2, j1 + n)
    nn = n + n
    group: list[Opcode] = []
    for tag, i1, i2, j1, j2 in codes:
        if tag == "equal" and i2 - i1 > nn:
            group.append((tag, i1, min(i2, i1 + n), j1, min(j2, j1 + n)))
            yield group
            group = []
            i1, j1 = max(i1, i2 - n), max(j1, j2 - n)
        group.append((tag, i1, i2, j1, j2))
    if group and not (len(group) == 1 and group[0][0] == "equal"):
        yield group


def _range(start: int, stop: int) -> str:
    beginning, length = start + 1, stop - start
    if length == 1:
        return f"{beginning}"
    if not length:
        beginning -= 1
    return f"{beginning},{length}"


def _format(a: list[str], b: list[str], ops: list[Opcode], fromfile: str, tofile: str) -> Iterator[str]:
    """difflib.unified_diff's text for the given opcodes."""
    started = False
    for group in _grouped(ops):
        if not started:
            started = True
            yield f"--- {fromfile}\n"
            yield f"+++ {tofile}\n"
        first, last = group[0], group[-1]
        yield f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@\n"
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                for line in a[i1:i2]:
                    yield " " + line
                continue
            if tag in ("replace", "delete"):
                for line in a[i1:i2]:
                    yield "-" + line
            if tag in ("replace", "insert"):
                for line in b[j1:j2]:
                    yield "+" + line


__all__ = ["MAX_LINE_PAIRS", "opcodes", "unified"]
