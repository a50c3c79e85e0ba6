"""The many-tenants workload: N tenants x M actions each, Zipf-distributed traffic.

Shared by the bench scenarios S7-S9 and ``actionpool stress --tenants/--actions-per-tenant/--zipf``,
so both speak of the same traffic. Pure and seeded: ``TenantMix(...).pick(rng)`` is reproducible.

A gateway's traffic is skewed: a few big tenants and a long tail. Tenant of rank ``k`` (1-based)
gets a share proportional to ``1 / k**s``; within a tenant each of its actions is equally likely.
``s = 0`` is uniform traffic.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field


def parse_range(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"1-3"`` -> (1, 3). Both bounds positive, low <= high."""
    lo_s, _, hi_s = str(text).partition("-")
    lo = int(lo_s)
    hi = int(hi_s) if hi_s else lo
    if lo < 1 or hi < lo:
        raise ValueError(f"actions per tenant must be N or LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf(s) (``random.choices`` accepts them as is)."""
    if n < 1 or s < 0:
        raise ValueError("zipf needs n >= 1 and s >= 0")
    return list(itertools.accumulate(1.0 / (k ** s) for k in range(1, n + 1)))


@dataclass
class TenantMix:
    """``tenants`` tenants, each with between ``actions[0]`` and ``actions[1]`` actions (seeded)."""

    tenants: int = 300
    actions: tuple[int, int] = (1, 3)
    zipf: float = 1.1
    seed: int = 0
    per_tenant: list[int] = field(init=False)
    _cum: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if self.tenants < 1:
            raise ValueError("tenants must be positive")
        rng = random.Random(self.seed)
        self.per_tenant = [rng.randint(*self.actions) for _ in range(self.tenants)]
        self._cum = zipf_cum_weights(self.tenants, self.zipf)

    @property
    def n_actions(self) -> int:
        return sum(self.per_tenant)

    def pick(self, rng: random.Random) -> tuple[int, int]:
        """(tenant index, action index within the tenant) of the next flow."""
        t = bisect.bisect_left(self._cum, rng.random() * self._cum[-1])
        t = min(t, self.tenants - 1)
        return t, rng.randrange(self.per_tenant[t])

    def plan(self, n: int, seed: int) -> list[tuple[int, int]]:
        rng = random.Random(seed)
        return [self.pick(rng) for _ in range(n)]
