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
first; built once per tenant) and the flow's path values another, each with
a second trie for their URL-encoded and JSON-escaped forms; so each string is
scanned at most four times however many secrets a tenant has, and the walk
over a record is one linear pass. Matches may overlap (two secrets sharing
characters): their union is replaced. Redaction happens first and truncation
after it, so that cut never leaves part of a secret behind; text cut before
it (a log line at its cap) has a trailing secret prefix replaced too.

A record larger than ``[server] history_record_max_bytes`` is truncated
structurally (:func:`truncate`): long strings cut, long lists and objects
cut, each cut marked (``"…[truncated 123 bytes]"``) and the record marked
``"truncated": true``. It stays valid JSON and never exceeds the cap.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

import orjson

__all__ = ["REDACTED", "MIN_SECRET_CHARS", "MIN_SUBSTRING_CHARS", "FETCH_BODY_BYTES", "FETCH_BODIES_BYTES",
           "MAX_RECORDED_FETCHES",
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
# All the response bodies one flow keeps, together: without it 64 fetches x 64 KiB = 4 MiB per flow in flight,
# times every flow in flight, for a record then cut to history_record_max_bytes (256 KiB by default) anyway.
FETCH_BODIES_BYTES = 256 << 10
RECORDED_HEADERS = frozenset({"content-type", "content-language", "cache-control", "etag", "expires",
                              "last-modified", "location", "retry-after", "www-authenticate", "link", "vary"})
_MAX_DEPTH = 256  # deeper than anything the protocol or the event check lets through


# ------------------------------------------------------------------ the pattern


def _trie_pattern(words: Iterable[str], esc: Callable[[str], str] = re.escape) -> re.Pattern[str] | None:
    """One regex matching any of ``words``, longest first, that scans each position once.

    A plain ``a|b|c`` alternation tries every word at every position (cost: text x words); a trie
    tries at most one branch per character, so the cost is text x (longest word), whatever the count.
    ``esc`` turns one character into its regex (:func:`_char_forms`: the character in all its encodings).
    The pattern is a lookahead capturing the word (group 1), so every start position is tried and two
    overlapping secrets are both found.
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
                out.append(esc(keys[0]))
                node = node[keys[0]]
                continue
            break
        alts = [esc(k) + emit(node[k]) for k in sorted(keys)]
        if alts:
            body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
            out.append(f"(?:{body})?" if "" in node else body)  # greedy: the longer word wins
        return "".join(out)

    try:
        return re.compile(f"(?=({emit(trie)}))")  # a lookahead: matches may overlap (see _replace_spans)
    except (RecursionError, re.error):  # pathological nesting: longest-first alternation, still one pattern
        ordered = sorted(set(words), key=len, reverse=True)
        return re.compile("(?=(" + "|".join("".join(map(esc, w)) for w in ordered) + "))")


# Characters that percent-encoding never changes (RFC 3986 "unreserved"): a word made of these only has no
# other form in a URL or a JSON text, and the plain trie covers it alone.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _hex(n: int, width: int) -> str:
    """``n`` in hex as a regex that accepts either case of each letter digit."""
    return "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{n:0{width}X}")


def _char_forms(c: str) -> str:
    """A regex for one character as it may appear: itself, percent-encoded (either hex case), JSON-escaped."""
    if c in _UNRESERVED:
        return re.escape(c)
    forms = [re.escape(c), "".join("%" + _hex(b, 2) for b in c.encode("utf-8", "surrogatepass"))]
    escaped = "" if 0xD800 <= ord(c) <= 0xDFFF else orjson.dumps(c).decode()[1:-1]  # orjson refuses a surrogate
    if escaped and escaped != c:
        forms.append(re.escape(escaped))                 # \" \\ \n \u001f
    if ord(c) > 0x7E or c in "<>&'/":                    # JSON.stringify(ensure_ascii) or HTML-safe: \u00e9 \/
        forms.append(r"\\u" + _hex(ord(c), 4) if ord(c) <= 0xFFFF else re.escape(c))
    if c == "/":
        forms.append(re.escape("\\/"))
    if c == " ":
        forms.append(re.escape("+"))                     # a form-encoded query
    return "(?:" + "|".join(forms) + ")"


def _encoded_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for the words' encoded forms: each character as itself, percent-encoded or JSON-escaped.

    A secret (or an e-mail) in a fetch URL is sent percent-encoded, by ``encodeURIComponent`` or by the HTTP
    client with its own choice of characters to encode (httpx keeps ``/ + = [ ]`` in a query, encodes a
    space and ``"``), and comes back that way in an echoing upstream's body; in ``JSON.stringify`` output its
    quotes and backslashes are escaped. Matching each character in any of its forms covers every such mix.
    Only words with a character outside _UNRESERVED need it (the plain trie covers the others); they form a
    trie of their own, each character written as :func:`_char_forms`, so the cost stays text x longest word.
    """
    return _trie_pattern((w for w in words if w and any(c not in _UNRESERVED for c in w)), _char_forms)


def _base64_cores(secret: str) -> set[str]:
    """The part of a base64 text that only the secret's bytes determine, at each of the 3 byte alignments.

    ``btoa(user + ":" + secret)`` (a Basic authorization an action logs) holds the secret's base64 at an
    offset that depends on what precedes it; each of the 3 alignments has a core of characters that encode
    the secret's bits alone (the 1-2 characters at its edges mix in neighbouring bytes and stay). Standard
    and URL-safe alphabets, padded or not: the core has no padding. A secret of 8 characters has cores of
    10 characters, which ordinary text does not contain by chance.
    """
    import base64

    raw, cores = secret.encode("utf-8", "surrogatepass"), set()
    for offset in range(3):
        enc = base64.b64encode(b"\0" * offset + raw).decode()
        core = enc[-(-offset * 8 // 6):(offset + len(raw)) * 8 // 6]
        if len(core) >= MIN_SECRET_CHARS:
            cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


@functools.lru_cache(maxsize=1024)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """A tenant's secrets change only with its config: their pattern is built once, not per flow.

    It matches each secret and its base64 cores (:func:`_base64_cores`).
    """
    words = set(secrets)
    for secret in secrets:
        words |= _base64_cores(secret)
    return _trie_pattern(words)


@functools.lru_cache(maxsize=1024)
def _secrets_encoded_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """The secrets' URL-encoded and JSON-escaped forms (:func:`_encoded_pattern`), built once per tenant."""
    return _encoded_pattern(secrets)


# Text cut *before* redaction (a log line at max_log_message_bytes, a fetch body at FETCH_BODY_BYTES, an
# error message at 1024/4096 characters) can end with the first part of a secret, which no whole-secret
# pattern matches. Every such cap is at least this many characters, so only a string this long can have
# been cut; its tail is checked for a secret's prefix of at least _CUT_FRAGMENT_CHARS (a shorter tail is
# indistinguishable from ordinary text: replacing every trailing "s" would wreck text and tell a reader
# what a secret starts with).
_CUT_MIN_CHARS = 1024
_CUT_FRAGMENT_CHARS = 4


@functools.lru_cache(maxsize=1024)
def _secret_prefixes(secrets: tuple[str, ...]) -> tuple[frozenset[str], int]:
    """Every proper prefix (at least _CUT_FRAGMENT_CHARS long) of the secrets, and the longest's length."""
    prefixes = frozenset(s[:k] for s in secrets for k in range(_CUT_FRAGMENT_CHARS, len(s)))
    return prefixes, max((len(p) for p in prefixes), default=0)


def _replace_spans(s: str, spans: list[tuple[int, int]]) -> str:
    """``s`` with each union of overlapping spans replaced by one REDACTED.

    Replacing one match at a time left the rest of an overlapping one: with secrets ``abcdefgh12`` and
    ``gh12345678``, the text ``abcdefgh12345678`` became ``[redacted]345678`` (6 characters of the second).
    """
    spans.sort()
    out: list[str] = []
    last, start, end = 0, spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a < end:
            end = max(end, b)
            continue
        out += (s[last:start], REDACTED)
        last, start, end = end, a, b
    out += (s[last:start], REDACTED, s[end:])
    return "".join(out)


class Redactor:
    """Replaces the flow's sensitive values in any JSON-like value: keys and strings, at any depth.

    ``secrets`` are replaced wherever they occur; ``values`` (from the event's redact paths) where a
    whole string equals one, and inside longer strings when at least MIN_SUBSTRING_CHARS long. Two
    patterns, applied secrets first (so a value inside a secret cannot leave the secret's rest behind):
    the tenant's, compiled once, and the flow's own few values.
    """

    def __init__(self, secrets: Iterable[str] = (), values: Iterable[str] = ()) -> None:
        secrets = tuple(secrets)
        values = [v for v in values if v and v != REDACTED]
        self._exact = frozenset(values)
        long_values = tuple(v for v in values if len(v) >= MIN_SUBSTRING_CHARS)
        # Every pattern scans the original text; overlapping matches of any of them merge (_replace_spans).
        self._patterns = [p for p in (_secrets_pattern(secrets), _secrets_encoded_pattern(secrets),
                                      _trie_pattern(long_values), _encoded_pattern(long_values)) if p]
        # The tenant's secrets' prefixes are built once (cached by secrets alone); the flow's few values' here.
        self._prefixes = [_secret_prefixes(secrets), _secret_prefixes.__wrapped__(long_values)]
        self._prefixes = [(p, n) for p, n in self._prefixes if n]

    def __bool__(self) -> bool:
        return bool(self._exact) or bool(self._patterns)

    def text(self, s: str) -> str:
        if s in self._exact:
            return REDACTED
        spans: list[tuple[int, int]] = []
        for p in self._patterns:
            spans.extend((m.start(), m.end(1)) for m in p.finditer(s))
        if spans:
            s = _replace_spans(s, spans)
        if len(s) >= _CUT_MIN_CHARS:  # maybe cut mid-secret before it got here
            for prefixes, longest in self._prefixes:
                for k in range(min(longest, len(s)), _CUT_FRAGMENT_CHARS - 1, -1):
                    if s[-k:] in prefixes:
                        return s[:-k] + REDACTED
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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and self._exact \
                and str(value) in self._exact:  # a numeric redact-path value (a phone, an id) copied as a number
            return REDACTED
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
                message: str = "", room: int = FETCH_BODY_BYTES) -> dict[str, Any]:
    """One fetch as history keeps it: the request line, and the response (capped) or the error.

    ``room``: the bytes of body the flow may still keep (:data:`FETCH_BODIES_BYTES` less what its earlier
    fetches kept); the body is cut to it and to FETCH_BODY_BYTES. Not yet redacted: the whole record is, in
    one pass, when it is written.
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
    cap = max(0, min(FETCH_BODY_BYTES, room))
    if len(body) <= cap // 4:  # fits whatever its characters: no copy on the common path
        entry["body"] = body
        return entry
    raw = body.encode("utf-8", "replace")
    if len(raw) > cap:
        entry["body"] = raw[:cap].decode("utf-8", "ignore")
        entry["body_truncated"] = len(raw) - cap
    else:
        entry["body"] = body
    return entry


def stub_from_fetches(fetches: Iterable[Any]) -> tuple[dict[str, Any], list[str]]:
    """A fetch stub (``"METHOD URL" -> [{status, headers, body}, ...]``) answering what a run recorded.

    A request the run made several times (a GET polled until ready, a counter) is answered in the
    recorded order: the n-th replayed call gets the n-th recorded answer (the last one after that),
    not the first answer every time, which made a faithful replay report a difference. Returns the
    stub and the requests that cannot be replayed (recorded as failures, or whose redacted URL no
    longer parses): a replay that reaches one gets ``http_fetch_error``.
    """
    from ._errors import ConfigError
    from ._fetch_stub import compile_stub

    stub: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    for f in fetches:
        if not isinstance(f, dict):
            continue
        key = f"{f.get('method')} {f.get('url')}"
        if key in skipped:
            continue
        if not isinstance(f.get("status"), int):  # a failed call: this and the later calls are not answered
            if key not in stub:
                skipped.append(key)
            continue
        entry = {"status": f["status"], "headers": f.get("headers") or {}, "body": f.get("body") or ""}
        try:
            compile_stub({key: entry})
        except ConfigError:
            skipped.append(key)
            continue
        stub.setdefault(key, []).append(entry)
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
        for raw, kept in zip(fetches, record["fetches"]):  # an HTTP status is never user data: a numeric
            if isinstance(kept, dict) and "status" in kept:  # redact value equal to it (200) must not unmake
                kept["status"] = raw.get("status")           # the replay stub (stub_from_fetches needs an int)
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
