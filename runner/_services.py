"""The authority the supervisor holds on behalf of actions: the cache and outbound HTTP.

One ``Services`` per Runner: one cache backend, one Fetcher (whose capacity is
partitioned per tenant). ``cache.set`` and ``cache.delete`` answer with the
reference's result object even when the backend is down
(``{"type": "error", "code": "CacheUnavailable"}``); every other failure of a
backend reaches the action as an :class:`ApiFailure` with a documented kind
(``api.ApiError.error_kind``): ``cache_unavailable`` (``cache.get``),
``http_fetch_denied``, ``http_fetch_timeout`` or ``http_fetch_error``; nothing
else escapes to the worker's message loop.
Messages are redacted of query strings, since denial reasons reach the audit
log.
"""

from __future__ import annotations

import logging
from typing import Any

from ._config import RunnerConfig
from ._errors import CacheUnavailable, FetchError
from ._redact import redact_query
from ._worker import ApiFailure

log = logging.getLogger("actionpool.fetch")
log_cache = logging.getLogger("actionpool.cache")

# What api.cache.set and api.cache.delete return while the backend is down (their other errors are
# results too); api.cache.get, which has no result object, raises ApiError ``cache_unavailable``.
CACHE_UNAVAILABLE_RESULT = {"type": "error", "code": "CacheUnavailable"}


class InvalidFetchRequest(ApiFailure):
    """``http_fetch_error`` for a request the action built wrong: never an environmental failure."""


def cache_scope(tenant: str, trigger: str) -> str:
    """Unambiguous scope string: the tenant's length prefix keeps ``a:b``+``c`` apart from ``a``+``b:c``."""
    return f"{len(tenant)}:{tenant}:{trigger}"


class Services:
    def __init__(self, config: RunnerConfig, tenant_hosts: dict[str, tuple[str, ...]] | None = None) -> None:
        from ._cache import open_cache
        from ._fetch import Fetcher

        self.config = config
        self.fetch_config = config.fetch
        # Runtime allowlists by tenant (Runner.set_tenant_policy): the Runner's own dict, read on every fetch.
        self.tenant_hosts: dict[str, tuple[str, ...]] = tenant_hosts if tenant_hosts is not None else {}
        self.cache = open_cache(config.cache_url)
        self.fetcher = Fetcher(config.fetch)

    def hosts_for(self, tenant: str) -> tuple[str, ...]:
        """The tenant's fetch allowlist: the runner-wide hosts plus its runtime override, else its configured ones."""
        override = self.tenant_hosts.get(tenant)
        return self.fetch_config.hosts_for(tenant) if override is None else self.fetch_config.allow_hosts + override

    async def forget_tenant(self, tenant: str) -> None:
        """Drop the tenant's api.cache scopes (every trigger) and its fetch pool; a later flow starts clean."""
        from ._triggers import TRIGGERS

        self.fetcher.forget_tenant(tenant)
        for trigger in TRIGGERS:
            try:
                await self.cache.drop_scope(cache_scope(tenant, trigger))
            except CacheUnavailable as exc:  # redis down: its entries expire on their own (at most 24 h)
                log_cache.warning("forgetting tenant %r: api.cache entries not dropped: %s", tenant, exc)
                return

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        await self.cache.aclose()

    async def cache_get(self, tenant: str, trigger: str, key: str) -> Any:
        try:
            return await self.cache.get(cache_scope(tenant, trigger), key)
        except CacheUnavailable as exc:  # backend down: the action sees an error it may handle
            raise ApiFailure("cache_unavailable", str(exc)) from None

    async def cache_set(self, tenant: str, trigger: str, key: str, value: str, options: dict[str, Any] | None) -> Any:
        """The reference's result object; a backend that is down is one too (``CacheUnavailable``), not a raise."""
        try:
            return await self.cache.set(cache_scope(tenant, trigger), key, value, options)
        except CacheUnavailable as exc:
            log_cache.warning("api.cache.set for tenant %r: %s", tenant, exc)
            return dict(CACHE_UNAVAILABLE_RESULT)

    async def cache_delete(self, tenant: str, trigger: str, key: str) -> Any:
        """Like ``set``: a result object, ``CacheUnavailable`` when the backend is down."""
        try:
            return await self.cache.delete(cache_scope(tenant, trigger), key)
        except CacheUnavailable as exc:
            log_cache.warning("api.cache.delete for tenant %r: %s", tenant, exc)
            return dict(CACHE_UNAVAILABLE_RESULT)

    async def fetch(self, tenant: str, url: str, init: dict[str, Any] | None, budget_s: float,
                    max_reply_bytes: int | None = None, record: list[dict[str, Any]] | None = None) -> Any:
        """``record``: the flow's list of fetches for run history (None, the default: nothing is kept)."""
        if record is None:
            return await self._fetch(tenant, url, init, budget_s, max_reply_bytes)
        from ._history import FETCH_BODIES_BYTES, MAX_RECORDED_FETCHES, fetch_entry

        try:
            result = await self._fetch(tenant, url, init, budget_s, max_reply_bytes)
        except ApiFailure as exc:
            if len(record) < MAX_RECORDED_FETCHES:
                record.append(fetch_entry(url, init, error=exc.kind, message=str(exc)))
            raise
        if len(record) < MAX_RECORDED_FETCHES:  # the flow's bodies together stay within FETCH_BODIES_BYTES
            kept = sum(len(e.get("body", "")) for e in record)  # characters: no re-encoding per fetch
            record.append(fetch_entry(url, init, result, room=FETCH_BODIES_BYTES - kept))
        return result

    async def _fetch(self, tenant: str, url: str, init: dict[str, Any] | None, budget_s: float,
                     max_reply_bytes: int | None) -> Any:
        timeout = min(self.fetch_config.timeout_s, budget_s)
        if timeout <= 0:
            raise ApiFailure("http_fetch_timeout", "no time left in the action's budget for a fetch")
        # The request itself first: a bad init or an overlong URL is the action's mistake, not a transport
        # failure, so it must not let a ``failure = "open"`` action pass (same code for the action).
        from ._fetch import MAX_URL_CHARS  # imported with Fetcher, lazily (httpx)

        try:
            self.fetcher._parse_init(init)
            if type(url) is str and len(url) > MAX_URL_CHARS:
                raise FetchError(f"api.fetch: url longer than {MAX_URL_CHARS} characters")
        except FetchError as exc:
            raise InvalidFetchRequest(exc.error_kind, redact_query(str(exc))) from None
        try:
            return await self.fetcher.fetch(url, init, allow_hosts=self.hosts_for(tenant),
                                            timeout_s=timeout, tenant=tenant, max_reply_bytes=max_reply_bytes)
        except FetchError as exc:
            raise ApiFailure(exc.error_kind, redact_query(str(exc))) from None
        except Exception as exc:  # a bug or a library surprise: still an answer the action can catch
            log.warning("api.fetch failed unexpectedly for tenant %r: %s", tenant, type(exc).__name__,
                        exc_info=True)
            raise ApiFailure("http_fetch_error", f"api.fetch failed: {type(exc).__name__}") from None
