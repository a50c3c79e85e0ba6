"""The many-tenants workload of bench S7-S9 and ``actionpool stress --tenants/--actions-per-tenant/--zipf``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from actionpool.benchmarks._tenants import TenantMix, parse_range, zipf_cum_weights
from actionpool.benchmarks.stress import NORMAL_KINDS, Traffic, run_stress


def test_parse_range() -> None:
    assert parse_range("3") == (3, 3)
    assert parse_range("1-3") == (1, 3)
    for bad in ("0", "3-1", "x", "-1"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_zipf_mix_is_skewed_seeded_and_within_bounds() -> None:
    mix = TenantMix(300, (1, 3), 1.1, seed=7)
    assert len(mix.per_tenant) == 300 and all(1 <= n <= 3 for n in mix.per_tenant)
    assert mix.n_actions == sum(mix.per_tenant)
    plan = mix.plan(20_000, seed=1)
    assert plan == TenantMix(300, (1, 3), 1.1, seed=7).plan(20_000, seed=1)   # reproducible
    assert all(0 <= t < 300 and 0 <= a < mix.per_tenant[t] for t, a in plan)
    by_tenant = Counter(t for t, _ in plan)
    # Zipf(1.1) over 300 ranks: rank 1 gets ~1/H = 19 %, rank 2 about half of that.
    top = by_tenant[0] / len(plan)
    assert 0.14 < top < 0.25, top
    assert 1.6 < by_tenant[0] / by_tenant[1] < 2.6
    assert len(by_tenant) > 150   # the long tail is there too


def test_zipf_zero_is_uniform() -> None:
    cum = zipf_cum_weights(4, 0.0)
    assert cum == [1.0, 2.0, 3.0, 4.0]
    counts = Counter(t for t, _ in TenantMix(4, (1, 1), 0.0).plan(8000, seed=2))
    assert all(1700 < c < 2300 for c in counts.values())


def test_traffic_gives_each_tenant_its_own_copies_of_the_actions() -> None:
    kind = NORMAL_KINDS[0]
    plain = Traffic(4)
    assert plain.flow(5, kind) == ("stress-1", kind.actions)
    t = Traffic(20, "2", 1.1, seed=3)
    seen: dict[str, set[str]] = {}
    for i in range(500):
        tenant, acts = t.flow(i, kind)
        assert [a.slug for a in acts] == [a.slug for a in kind.actions]
        seen.setdefault(tenant, set()).add(acts[0].digest)
    assert all(len(d) <= 2 for d in seen.values())
    assert len({d for ds in seen.values() for d in ds}) == sum(len(d) for d in seen.values())  # never shared
    unique = Traffic(20, "1", 0.0, unique=True)
    assert len({unique.flow(i, kind)[1][0].digest for i in range(50)}) == 50


async def test_stress_with_many_tenants_zipf_traffic_is_answered_right() -> None:
    report: dict[str, Any] = await run_stress(executions=240, concurrency=16, hostile_share=0.1, seed=11,
                                              tenants=40, actions_per_tenant="1-3", zipf=1.1, progress=False)
    assert report["ok"], report["problems"]
    assert report["unanswered"] == 0 and report["wrong_answers"] == 0
    assert report["zipf"] == 1.1 and report["actions_per_tenant"] == "1-3"
    assert "overloaded" not in report["by_kind"]
