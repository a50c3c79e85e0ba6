"""What a recorded run may hold: redacted everywhere, capped in size, with the fetches it made.

Run history is read by operators and by ``actionpool replay``; it must never
hold what the tenant asked to keep out. One :class:`Redactor` per flow
replaces, in every string *and every object key* of the event, the result
(denial text, logs, state, metadata, claims, user id), the recorded fetches,
shadow disagreements and replay output:

* each of the tenant's secret values, wherever it occurs in a string (a
  secret shorter than :data:`MIN_SECRET_CHARS` is a config error at load
  time, never a silent gap);
* each value found at one of the tenant's ``redact`` paths in the event (an
  e-mail, an IP): replaced at its path in the event, and wherever it reappears
  in the result. Such values come from end users and can be of any length, so
  a string (or key) *equal* to one is replaced at any length, and one that
  merely *contains* it only when the value has at least
  :data:`MIN_SUBSTRING_CHARS` characters (below that a substring match
  would wreck unrelated text, and the pattern of the damage would tell a
  reader the value).

The tenant's secrets become one compiled pattern (a trie, longest match
first; built once per tenant) and the flow's path values another, so each
string is scanned twice at most however many secrets a tenant has, and the
walk over a record is one linear pass. Redaction happens first and
truncation after it, so a cut can never leave part of a secret behind.

A record larger than ``[server] history_record_max_bytes`` is truncated
structurally (:func:`truncate`): long strings cut, long lists and objects
cut, each cut marked (``"…[truncated 123 bytes]"``) and the record marked
``"truncated": true``. It stays valid JSON and never exceeds the cap.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

import orjson

__all__ = ["REDACTED", "MIN_SECRET_CHARS", "MIN_SUBSTRING_CHARS", "FETCH_BODY_BYTES", "MAX_RECORDED_FETCHES",
           "Redactor", "flow_redactor", "redact", "redact_paths", "build_record", "truncate", "fetch_entry",
           "stub_from_fetches", "path_values"]

REDACTED = "[redacted]"
# A secret shorter than this is refused at load time: short strings occur by chance in ordinary text
# ("1234", "test"), so redacting them would wreck unrelated data and show a reader where the secret
# is; and a secret that short is guessable anyway. 8 is the usual floor for API keys and passwords.
MIN_SECRET_CHARS = 8
# A value from the event's redact paths is also replaced inside longer strings from this length on
# (an e-mail "a@b.co" has 6 characters); shorter ones only where a whole string or key equals them.
MIN_SUBSTRING_CHARS = 5
# What one recorded fetch keeps: the response body up to this many bytes, these response headers.
FETCH_BODY_BYTES = 64 << 10
MAX_RECORDED_FETCHES = 64
RECORDED_HEADERS = frozenset({"content-type", "content-language", "cache-control", "etag", "expires",
                              "last-modified", "location", "retry-after", "www-authenticate", "link", "vary"})
_MAX_DEPTH = 256  # deeper than anything the protocol or the event check lets through


# ------------------------------------------------------------------ the pattern


def _trie_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``words``, longest first, that scans each position once.

    A plain ``a|b|c`` alternation tries every word at every position (cost: text x words); a trie
    tries at most one branch per character, so the cost is text x (longest word), whatever the count.
    """
    words = [w for w in words if w]
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True
    if not trie:
        return None

    def emit(node: dict[str, Any]) -> str:
        out: list[str] = []
        while True:  # a chain of single children is a literal run, not nested groups
            keys = [k for k in node if k]
            if len(keys) == 1 and "" not in node:
                out.append(re.escape(keys[0]))
                node = node[keys[0]]
                continue
            break
        alts = [re.escape(k) + emit(node[k]) for k in sorted(keys)]
        if alts:
            body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
            out.append(f"(?:{body})?" if "" in node else body)  # greedy: the longer word wins
        return "".join(out)

    try:
        return re.compile(emit(trie))
    except (RecursionError, re.error):  # pathological nesting: longest-first alternation, still one pattern
        ordered = sorted(set(words), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered)))


@functools.lru_cache(maxsize=1024)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """A tenant's secrets change only with its config: their pattern is built once, not per flow."""
    return _trie_pattern(secrets)


class Redactor:
    """Replaces the flow's sensitive values in any JSON-like value: keys and strings, at any depth.

    ``secrets`` are replaced wherever they occur; ``values`` (from the event's redact paths) where a
    whole string equals one, and inside longer strings when at least MIN_SUBSTRING_CHARS long. Two
    patterns, applied secrets first (so a value inside a secret cannot leave the secret's rest behind):
    the tenant's, compiled once, and the flow's own few values.
    """

    def __init__(self, secrets: Iterable[str] = (), values: Iterable[str] = ()) -> None:
        values = [v for v in values if v and v != REDACTED]
        self._exact = frozenset(values)
        self._patterns = [p for p in (_secrets_pattern(tuple(secrets)),
                                      _trie_pattern(v for v in values if len(v) >= MIN_SUBSTRING_CHARS)) if p]

    def __bool__(self) -> bool:
        return bool(self._exact) or bool(self._patterns)

    def text(self, s: str) -> str:
        if s in self._exact:
            return REDACTED
        for p in self._patterns:
            s = p.sub(REDACTED, s)
        return s

    def __call__(self, value: Any, _depth: int = 0) -> Any:
        """A redacted copy of ``value`` (the original is untouched)."""
        if isinstance(value, str):
            return self.text(value)
        if _depth > _MAX_DEPTH:
            return "[too deep]"
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                key = self.text(k) if isinstance(k, str) else k
                if key in out:  # two keys redacted to the same text: both kept, told apart
                    n = 2
                    while f"{key}#{n}" in out:
                        n += 1
                    key = f"{key}#{n}"
                out[key] = self(v, _depth + 1)
            return out
        if isinstance(value, (list, tuple)):
            return [self(v, _depth + 1) for v in value]
        return value


def _leaves(value: Any, out: list[str], depth: int = 0) -> None:
    """The string forms of every scalar under ``value`` (what a redact path covers)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (int, float)):
        out.append(str(value))
    elif depth < _MAX_DEPTH and isinstance(value, dict):
        for v in value.values():
            _leaves(v, out, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(value, list):
        for v in value:
            _leaves(v, out, depth + 1)


def path_values(event: dict[str, Any], paths: Iterable[str]) -> list[str]:
    """The values at the dotted ``paths`` of ``event`` (all the scalars under each, as strings)."""
    found: list[str] = []
    for path in paths:
        node: Any = event
        for p in path.split("."):
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            _leaves(node, found)
    return found


def flow_redactor(secrets: Iterable[str], paths: Iterable[str], event: dict[str, Any]) -> Redactor:
    """The redactor of one flow: the tenant's secrets and the event's values at its redact paths."""
    return Redactor(tuple(secrets), path_values(event, paths))


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    """A copy of ``value`` with every occurrence of a secret replaced, in keys and values."""
    return Redactor(tuple(secrets))(value)


def redact_paths(event: dict[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """A copy of ``event`` with each configured dotted path (``user.email``) replaced where present."""
    out = dict(event)
    for path in paths:
        node, parts = out, path.split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                break
            node[p] = child = dict(child)
            node = child
        else:
            if parts[-1] in node:
                node[parts[-1]] = REDACTED
    return out


# ------------------------------------------------------------------ fetches


def fetch_entry(url: Any, init: Any, result: dict[str, Any] | None = None, *, error: str | None = None,
                message: str = "") -> dict[str, Any]:
    """One fetch as history keeps it: the request line, and the response (capped) or the error.

    Not yet redacted: the whole record is, in one pass, when it is written.
    """
    method = init.get("method") if isinstance(init, dict) else None
    entry: dict[str, Any] = {"method": method.upper() if isinstance(method, str) else "GET",
                             "url": url if isinstance(url, str) else str(url)}
    if result is None:
        entry["error"] = error or "http_fetch_error"
        entry["message"] = message[:1024]
        return entry
    body = result.get("body", "")
    entry["status"] = result.get("status")
    entry["headers"] = {k: v for k, v in (result.get("headers") or {}).items() if k in RECORDED_HEADERS}
    if len(body) <= FETCH_BODY_BYTES // 4:  # fits whatever its characters: no copy on the common path
        entry["body"] = body
        return entry
    raw = body.encode("utf-8", "replace")
    if len(raw) > FETCH_BODY_BYTES:
        entry["body"] = raw[:FETCH_BODY_BYTES].decode("utf-8", "ignore")
        entry["body_truncated"] = len(raw) - FETCH_BODY_BYTES
    else:
        entry["body"] = body
    return entry


def stub_from_fetches(fetches: Iterable[Any]) -> tuple[dict[str, Any], list[str]]:
    """A fetch stub (``"METHOD URL" -> {status, headers, body}``) answering what a run recorded.

    The first answer recorded for a request is the one replayed. Returns the stub and the requests
    that cannot be replayed (recorded as failures, or whose redacted URL no longer parses): a
    replay that makes them again gets ``http_fetch_error``.
    """
    from ._errors import ConfigError
    from ._fetch_stub import compile_stub

    stub: dict[str, Any] = {}
    skipped: list[str] = []
    for f in fetches:
        if not isinstance(f, dict):
            continue
        key = f"{f.get('method')} {f.get('url')}"
        if key in stub:
            continue
        if not isinstance(f.get("status"), int):
            skipped.append(key)
            continue
        entry = {"status": f["status"], "headers": f.get("headers") or {}, "body": f.get("body") or ""}
        try:
            compile_stub({key: entry})
        except ConfigError:
            skipped.append(key)
            continue
        stub[key] = entry
    return stub, skipped


# ------------------------------------------------------------------ the record


def build_record(*, tenant: str, paths: Iterable[str], secrets: Iterable[str], event: dict[str, Any],
                 body: dict[str, Any], seconds: float, recorded_at: float, fetches: list[dict[str, Any]] | None,
                 max_bytes: int) -> dict[str, Any]:
    """The run as history stores it: redacted (keys and values, event and whole result), then capped."""
    paths = tuple(paths)
    red = flow_redactor(secrets, paths, event)
    record = {"flow_id": body["flow_id"], "tenant": tenant, "trigger": body["trigger"],
              "execution_id": red.text(str(body.get("execution_id", ""))), "recorded_at": recorded_at,
              "versions": body.get("versions", {}),
              "timings": {"flow_ms": round(seconds * 1000, 3),
                          "actions_ms": {a["slug"]: a["duration_ms"] for a in body.get("actions", ())}},
              "result": red(body), "event": red(redact_paths(event, paths))}
    if fetches is not None:
        record["fetches"] = red(fetches)
    return truncate(record, max_bytes)


def _marker(n: int, unit: str) -> str:
    return f"…[truncated {n} {unit}]"


class _Cutter:
    """One walk in document order with a byte budget: what fits is kept, the rest is cut and marked."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def cut(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            raw = value.encode("utf-8", "replace")
            cost = len(raw) + 2
            if cost <= self.left:
                self.left -= cost
                return value
            keep = max(self.left - 40, 0)
            self.left = 0
            return raw[:keep].decode("utf-8", "ignore") + _marker(len(raw) - keep, "bytes")
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            items = list(value.items())
            for i, (k, v) in enumerate(items):
                if self.left <= 0 or depth >= _MAX_DEPTH:
                    out["…"] = _marker(len(items) - i, "keys")
                    break
                key = k if isinstance(k, str) else str(k)
                self.left -= len(key.encode("utf-8", "replace")) + 4
                out[key[:256]] = self.cut(v, depth + 1)
            return out
        if isinstance(value, list):
            lst: list[Any] = []
            for i, v in enumerate(value):
                if self.left <= 0 or depth >= _MAX_DEPTH:
                    lst.append(_marker(len(value) - i, "items"))
                    break
                self.left -= 1
                lst.append(self.cut(v, depth + 1))
            return lst
        self.left -= 24  # a number, a boolean or null: at most this much JSON
        return value


# Small, decisive fields first; the bulky ones (state, logs, the event, fetches) take what is left.
_ORDER = ("flow_id", "tenant", "trigger", "execution_id", "recorded_at", "versions", "timings", "result",
          "event", "fetches")
_RESULT_ORDER = ("outcome", "denial", "user_id", "claims", "app_metadata", "user_metadata", "actions", "state",
                 "logs")


def truncate(record: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``record`` if its JSON fits in ``max_bytes``; else a structurally truncated, marked copy that does."""
    size = len(orjson.dumps(record))
    if size <= max_bytes:
        return record
    ordered = {k: record[k] for k in _ORDER if k in record}
    ordered.update((k, v) for k, v in record.items() if k not in ordered)
    res = ordered.get("result")
    if isinstance(res, dict):
        r = {k: res[k] for k in _RESULT_ORDER if k in res}
        r.update((k, v) for k, v in res.items() if k not in r)
        ordered["result"] = r
    # The markers and the closing brackets of the containers cut short need room of their own.
    out = _Cutter(max(max_bytes * 3 // 4 - 256, 0)).cut(ordered)
    out["truncated"] = True
    out["original_bytes"] = size
    if len(orjson.dumps(out)) <= max_bytes:
        return out
    # Deep nesting made the markers themselves too big: keep only what names the run and its decision.
    res = record.get("result") if isinstance(record.get("result"), dict) else {}
    denial = res.get("denial") if isinstance(res.get("denial"), dict) else None
    slim = {k: record.get(k) for k in ("flow_id", "tenant", "trigger", "recorded_at")}
    slim["execution_id"] = str(record.get("execution_id", ""))[:200]
    slim["result"] = {"outcome": res.get("outcome"),
                      "denial": None if denial is None else {k: str(denial.get(k))[:200]
                                                             for k in ("action", "kind", "reason")}}
    slim["truncated"] = True
    slim["original_bytes"] = size
    return slim
