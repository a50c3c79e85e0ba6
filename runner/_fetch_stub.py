"""``--fetch-stub``: canned responses so an action that calls real APIs runs offline.

A stub is a JSON object mapping ``"METHOD URL"`` to ``{status, headers, body}``::

    {"POST https://risk.example.com/v1/score": {"status": 200,
        "headers": {"content-type": "application/json"}, "body": "{\\"score\\": 12}"}}

With a stub configured (``FetchConfig.stub``) the Fetcher never opens a
socket and never resolves a name: the allowlist still applies, each
redirect hop is looked up in the stub too, and a request with no entry fails
with ``http_fetch_error``. URLs are compared after normalisation (case of
scheme and host, default port, an empty path is ``/``); the query string must
match exactly.

A value may also be a non-empty *list* of such objects: the first request
with that key gets the first, the next the second, and so on, the last one
answering any further request. ``actionpool replay`` uses this for a run that
fetched the same URL more than once and got different answers, so each call
is answered with what it got then, not all with the first answer.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import httpcore
import httpx

from ._errors import ConfigError, FetchError

__all__ = ["StubPool", "StubReply", "compile_stub", "load_fetch_stub", "stub_key"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Framing is the stub's own business: the body is given as text, sent as UTF-8.
_DROPPED = frozenset({"content-length", "content-encoding", "transfer-encoding"})


@dataclass(frozen=True)
class StubReply:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def stub_key(method: str, scheme: str, host: str, port: int | None, target: str) -> str:
    default = 443 if scheme == "https" else 80
    return f"{method.upper()} {scheme.lower()}://{host.lower()}:{port or default}{target or '/'}"


def _key_of(entry: str) -> str:
    method, sep, url = entry.strip().partition(" ")
    if not sep or method.upper() not in _METHODS:
        raise ConfigError(f"fetch stub: key {entry!r:.200} must be 'METHOD URL' with METHOD one of "
                          f"{', '.join(sorted(_METHODS))}")
    try:
        u = httpx.URL(url.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ConfigError(f"fetch stub: key {entry!r:.200} has an invalid URL ({exc})") from None
    if u.scheme not in ("http", "https") or not u.raw_host:
        raise ConfigError(f"fetch stub: key {entry!r:.200} needs an absolute http(s) URL")
    return stub_key(method, u.scheme, u.raw_host.decode("ascii"), u.port, u.raw_path.decode("ascii"))


def _reply_of(entry: str, value: Any) -> StubReply:
    where = f"fetch stub: {entry!r:.200}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: the value must be an object {{status, headers, body}}")
    unknown = set(value) - {"status", "headers", "body"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    status = value.get("status", 200)
    if type(status) is not int or not 100 <= status <= 599:
        raise ConfigError(f"{where}: status must be an integer 100..599, got {status!r:.40}")
    headers = value.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise ConfigError(f"{where}: headers must be an object of strings")
    body = value.get("body", "")
    if not isinstance(body, str):
        raise ConfigError(f"{where}: body must be a string (JSON bodies as a serialised string)")
    try:
        raw = tuple((k.encode("ascii"), v.encode("latin-1")) for k, v in headers.items()
                    if k.lower() not in _DROPPED)
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: header names must be ASCII and values Latin-1") from None
    return StubReply(status, raw, body.encode("utf-8"))


def compile_stub(entries: Mapping[str, Any]) -> dict[str, tuple[StubReply, ...]]:
    """Validate a stub mapping (ConfigError naming the bad entry) and index it by normalised key.

    Each key's replies are a tuple, answered in order (the last one repeated): one object is a 1-tuple.
    """
    if not isinstance(entries, Mapping):
        raise ConfigError("fetch stub must be a JSON object mapping 'METHOD URL' to {status, headers, body}")
    out: dict[str, tuple[StubReply, ...]] = {}
    for entry, value in entries.items():
        if not isinstance(entry, str):
            raise ConfigError(f"fetch stub: key {entry!r:.60} must be a string")
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"fetch stub: {entry!r:.200}: the value must be an object {{status, headers, body}} "
                                  "or a non-empty list of them")
            out[_key_of(entry)] = tuple(_reply_of(entry, v) for v in value)
        else:
            out[_key_of(entry)] = (_reply_of(entry, value),)
    return out


def load_fetch_stub(path: str) -> dict[str, Any]:
    """Read a stub file; ConfigError (with the path) if it is unreadable, not JSON or malformed."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        raise ConfigError(f"cannot read fetch stub {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"fetch stub {path} is not valid JSON: {exc}") from None
    compile_stub(data)
    return data


REDACTED = "[redacted]"  # runner/_history.py's marker (imported lazily there: _history imports this module)


@functools.lru_cache(maxsize=1)
def _marker_forms() -> "re.Pattern[str]":
    """The redaction marker as it looks percent-encoded or JSON-escaped (not the marker itself)."""
    from ._history import _char_forms

    return re.compile("".join(_char_forms(c) for c in REDACTED))


class StubPool:
    """Stands where a tenant's connection pool would; answers from the stub, never from the network."""

    def __init__(self, replies: dict[str, tuple[StubReply, ...]], redact: tuple[str, ...] = ()) -> None:
        """``redact``: values replaced in a request's key before the lookup (``FetchConfig.stub_redact``)."""
        from ._history import Redactor

        self._replies = replies
        self._asked: dict[str, int] = {}  # requests answered so far per key: the next reply in its list
        self._redact = Redactor(redact) if redact else None

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        url = request.url
        key = stub_key(request.method.decode("ascii"), url.scheme.decode("ascii"), url.host.decode("ascii"),
                       url.port, url.target.decode("ascii"))
        if self._redact is not None:
            key = self._redact.text(key)
        # A replayed event holds "[redacted]" where the recording redacted a value; an action that URL-encodes
        # it sends "%5Bredacted%5D", while the recorded URL has the marker itself: compare them as equal.
        key = _marker_forms().sub(REDACTED, key)
        replies = self._replies.get(key)
        if replies is None:
            raise FetchError(f"api.fetch: the fetch stub has no entry for {key!r:.300}")
        n = self._asked.get(key, 0)
        self._asked[key] = n + 1
        reply = replies[min(n, len(replies) - 1)]
        return httpcore.Response(reply.status, headers=list(reply.headers), content=reply.body)

    async def aclose(self) -> None:
        return None
