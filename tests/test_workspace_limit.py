"""The workspace's concurrency limit against a real Prefect server, changed from outside
the workers (as a flow run holding the API credential could): every acquire and release
sets it back, or makes it again when it was deleted, and says so in the worker's log."""

from __future__ import annotations

import asyncio
import logging
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from prefect_managed.concurrency import WorkspaceSlots


async def _scenario(name: str, logger: logging.Logger) -> dict[str, object]:
    async with get_client() as client:
        slots = WorkspaceSlots(client, name, 1, logger)
        await slots.ensure_limit()
        first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        seen: dict[str, object] = {"first": await slots.try_acquire(first)}
        # Loosened while a run holds the only slot: switched off, raised, made to decay.
        await client.update_global_concurrency_limit(
            name,
            GlobalConcurrencyLimitUpdate(active=False, limit=50, slot_decay_per_second=10.0),
        )
        seen["second_while_loosened"] = await slots.try_acquire(second)
        limit = await client.read_global_concurrency_limit_by_name(name)
        seen["after_acquire"] = (limit.active, limit.limit, limit.slot_decay_per_second)
        seen["active_slots"] = limit.active_slots
        await slots.release(first)
        # Deleted: the next acquire makes it again and is admitted.
        await client.delete_global_concurrency_limit_by_name(name)
        seen["third_after_delete"] = await slots.try_acquire(third)
        limit = await client.read_global_concurrency_limit_by_name(name)
        seen["remade"] = (limit.active, limit.limit, limit.active_slots)
        await slots.release(third)
        seen["end_slots"] = (await client.read_global_concurrency_limit_by_name(name)).active_slots
    return seen


def test_a_loosened_or_deleted_limit_is_set_back_before_the_next_admission(prefect_server, caplog):
    logger = logging.getLogger("test-workspace-limit")
    caplog.set_level("WARNING", logger=logger.name)
    seen = asyncio.run(_scenario(f"prefect-managed-limit-{uuid.uuid4().hex[:6]}", logger))

    assert seen["first"] is True
    assert seen["second_while_loosened"] is False  # the cap of 1 held
    assert seen["after_acquire"] == (True, 1, 0.0)
    assert seen["active_slots"] == 1
    assert seen["third_after_delete"] is True
    assert seen["remade"] == (True, 1, 1)
    assert seen["end_slots"] == 0  # nothing leaked
    messages = [record.getMessage() for record in caplog.records]
    assert any("was changed from outside the workers" in m and "active=True" in m for m in messages)
    assert any("was deleted from outside the workers" in m for m in messages)
