"""Query strings out of every log line: API keys often travel as ``?api_key=...``.

httpx logs each request URL at INFO, httpcore traces at DEBUG, aiohttp (fetch's
client) may name a URL in a warning; our own
lines name URLs too. A :class:`logging.Filter` on each of those loggers
rewrites the record before any handler sees it. A logger filter does not see
records of its child loggers, so every logger that writes is listed by name.
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact_query", "install_log_redaction", "REDACTED_LOGGERS"]

# "?" followed by at least one character up to whitespace, a quote, '<', '>' or '#':
# one pass, linear in the text (no nested quantifiers).
_QUERY = re.compile(r"\?[^\s'\"<>#]+")
_MARK = "?[redacted]"

REDACTED_LOGGERS = (
    "httpx",
    "httpcore", "httpcore.connection", "httpcore.connection_pool", "httpcore.http11", "httpcore.http2",
    "httpcore.proxy", "httpcore.socks",
    "aiohttp", "aiohttp.client", "aiohttp.internal",  # fetch's client (runner/_fetch_client.py)
    "actionpool", "actionpool.fetch",
)


def redact_query(text: str) -> str:
    """``text`` with every query string replaced by ``?[redacted]``."""
    return _QUERY.sub(_MARK, text) if "?" in text else text


class QueryRedactor(logging.Filter):
    """Formats the record once, redacted; never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler's own error path
            return True
        if "?" in message:
            record.msg = redact_query(message)
            record.args = None
        return True


_FILTER = QueryRedactor()


def install_log_redaction() -> None:
    """Attach the filter to every logger in :data:`REDACTED_LOGGERS` (idempotent)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
