"""Which pools `prefect-managed serve` serves: the oldest `pool_limit`, paused ones counted."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect.client.schemas.objects import WorkPool

from prefect_managed.service import plan_pools, worker_name

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def pool(name: str, minutes: int, paused: bool = False) -> WorkPool:
    return WorkPool(
        name=name, type="prefect:managed", created=T0 + timedelta(minutes=minutes), is_paused=paused
    )


def test_the_oldest_pools_up_to_the_limit_are_served_in_age_order():
    plan = plan_pools([pool("c", 3), pool("a", 1), pool("b", 2)], pool_limit=2)

    assert plan.serve == ["a", "b"]
    assert plan.over_limit == ["c"]


def test_a_paused_pool_still_counts_toward_the_limit_but_is_not_served():
    plan = plan_pools([pool("a", 1, paused=True), pool("b", 2), pool("c", 3)], pool_limit=2)

    assert plan.serve == ["b"]
    assert plan.paused == ["a"]
    assert plan.over_limit == ["c"]


def test_each_pools_worker_is_named_after_the_service_and_the_pool():
    assert worker_name("docker-host-1", "analytics") == "docker-host-1-analytics"
