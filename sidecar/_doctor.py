"""The sidecar's part of ``actionpool doctor``: does the store answer, and would a restart of it lose data?

``runner/_doctor.py`` checks the host a worker runs on; this checks the Redis a sidecar keeps its actions,
versions and run history in (``CONFIG GET save`` / ``appendonly``). A warning, never a failure
(docs/gateway.md, "The store failing").
"""

from __future__ import annotations

import asyncio
from typing import Any


async def _store_check(url: str) -> dict[str, Any]:
    """Whether the Redis at ``url`` answers and persists; never raises."""
    import redis.asyncio as aioredis

    from ._store import persistence_problem

    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        try:
            await client.ping()
        except Exception as exc:
            return {"url": url, "reachable": False, "warning": f"unreachable: {type(exc).__name__}: {exc}"}
        problem = await persistence_problem(client)
        return {"url": url, "reachable": True, "persistent": problem is None,
                **({"warning": problem} if problem else {})}
    finally:
        await client.aclose()


def store_url_of(store: str | None, config: str | None) -> str | None:
    """The Redis to check: ``--store``, else the config's ``[store] url`` (None: nothing to check)."""
    if store:
        return store
    if config:
        from ._config import load_config

        return load_config(config).store_url
    return None



def store_report(store: str | None, config: str | None) -> dict[str, Any] | None:
    """The store check for ``doctor --store/--config``; None when neither names a store."""
    url = store_url_of(store, config)
    return asyncio.run(_store_check(url)) if url else None
