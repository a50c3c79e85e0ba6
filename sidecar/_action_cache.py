"""The sidecar's cache of built Actions (deployed versions and ``/test`` drafts): LRU, bytes per tenant.

Building an Action hashes its source and keeps it; a flow reuses the one
built for its (tenant, slug, version). Drafts sent to ``/test`` go through the
same cache, so without a bound a tenant could grow the shared process by the
size of every draft it ever sent (issue 16, class 4). Each tenant has its own
LRU within ``[server] action_cache_max_bytes``: one tenant's drafts evict only
that tenant's entries, and an entry larger than the whole budget is built for
its one use and never kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from ..runner import Action

ENTRY_OVERHEAD = 1024  # the Action object, its dicts and digests, beside the source itself


def cost(action: Action) -> int:
    """Bytes an entry holds, roughly: the source (UTF-8) plus a fixed overhead."""
    return len(action.source.encode("utf-8", "surrogatepass")) + ENTRY_OVERHEAD


class ActionCache:
    def __init__(self, max_bytes_per_tenant: int) -> None:
        self.max_bytes = max_bytes_per_tenant
        self._tenants: dict[str, OrderedDict[tuple[str, str], tuple[Action, int]]] = {}
        self._bytes: dict[str, int] = {}

    def get_or_build(self, tenant: str, slug: str, version: str, build: Callable[[], Action]) -> Action:
        lru = self._tenants.setdefault(tenant, OrderedDict())
        hit = lru.get((slug, version))
        if hit is not None:
            lru.move_to_end((slug, version))
            return hit[0]
        action = build()
        size = cost(action)
        if size > self.max_bytes:
            return action  # used once, never kept
        lru[(slug, version)] = (action, size)
        total = self._bytes.get(tenant, 0) + size
        while total > self.max_bytes:
            _, (_, gone) = lru.popitem(last=False)
            total -= gone
        self._bytes[tenant] = total
        return action

    def forget(self, tenant: str) -> None:
        """Drop every entry of a tenant (deleted: its compiled actions must not outlive it)."""
        self._tenants.pop(tenant, None)
        self._bytes.pop(tenant, None)

    def bytes(self, tenant: str) -> int:
        return self._bytes.get(tenant, 0)

    def stats(self) -> dict[str, int]:
        """Bytes held per tenant (a metric)."""
        return dict(self._bytes)
