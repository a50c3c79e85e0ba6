"""The authority the supervisor holds on behalf of actions: the cache and outbound HTTP.

One ``Services`` per Runner: one cache backend, one shared HTTP client.
Errors of the backends are mapped to :class:`ApiFailure` with a machine
readable kind; the action sees them as ``api.ApiError``.
"""

from __future__ import annotations

from typing import Any

from ._config import RunnerConfig
from ._worker import ApiFailure


def cache_scope(tenant: str, trigger: str) -> str:
    """Unambiguous scope string: the tenant's length prefix keeps ``a:b``+``c`` apart from ``a``+``b:c``."""
    return f"{len(tenant)}:{tenant}:{trigger}"


class Services:
    def __init__(self, config: RunnerConfig) -> None:
        from ._cache import open_cache
        from ._fetch import Fetcher

        self.config = config
        self.fetch_config = config.fetch
        self.cache = open_cache(config.cache_url)
        self.fetcher = Fetcher(config.fetch)

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        await self.cache.aclose()

    async def cache_get(self, tenant: str, trigger: str, key: str) -> Any:
        try:
            return await self.cache.get(cache_scope(tenant, trigger), key)
        except Exception as exc:  # backend down: the action sees an error it may handle
            raise ApiFailure("cache_unavailable", f"cache unavailable: {type(exc).__name__}") from exc

    async def cache_set(self, tenant: str, trigger: str, key: str, value: str, options: dict[str, Any] | None) -> Any:
        try:
            return await self.cache.set(cache_scope(tenant, trigger), key, value, options)
        except Exception as exc:
            return {"type": "error", "code": "CacheUnavailable"}

    async def cache_delete(self, tenant: str, trigger: str, key: str) -> Any:
        try:
            return await self.cache.delete(cache_scope(tenant, trigger), key)
        except Exception as exc:
            return {"type": "error", "code": "CacheUnavailable"}

    async def fetch(self, tenant: str, url: str, init: dict[str, Any] | None, budget_s: float) -> Any:
        from ._fetch import FetchError

        timeout = min(self.fetch_config.timeout_s, budget_s)
        if timeout <= 0:
            raise ApiFailure("http_fetch_timeout", "no time left in the action's budget for a fetch")
        try:
            return await self.fetcher.fetch(url, init, allow_hosts=self.fetch_config.hosts_for(tenant), timeout_s=timeout)
        except FetchError as exc:
            raise ApiFailure(exc.error_kind, str(exc)) from None
