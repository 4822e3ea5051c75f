"""The worker's own decisions without Docker or a server: what a take-over does with a
slot, that admission waits while a taken-over run has none, that a failed take-over is
logged and gives its slot back, and that a bad policy stops the worker with one line.
The same behaviour is proven for real in test_faults and test_serve."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

import prefect_managed.worker as worker_module
from prefect_managed.containers import Watch
from prefect_managed.exceptions import ManagedError, PolicyError, WorkerNotStarted
from prefect_managed.policy import Policy
from prefect_managed.worker import ManagedWorker


class FakeSlots:
    """Stands in for WorkspaceSlots: `free` slots, each taken by a flow run id."""

    def __init__(self, free: int, fail: bool = False) -> None:
        self.free = free
        self.fail = fail
        self.held: set[UUID] = set()
        self.released: list[UUID] = []

    def holds(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self.held

    def held_runs(self) -> set[UUID]:
        return set(self.held)

    async def try_acquire(self, flow_run_id: UUID) -> bool:
        if self.fail:
            raise httpx.ConnectError("the Prefect API is down")
        if self.free <= 0:
            return False
        self.free -= 1
        self.held.add(flow_run_id)
        return True

    async def release(self, flow_run_id: UUID) -> None:
        if self.fail:
            raise RuntimeError("the Prefect API is down")
        self.released.append(flow_run_id)
        if flow_run_id in self.held:
            self.held.discard(flow_run_id)
            self.free += 1


@pytest.fixture
def worker(monkeypatch) -> ManagedWorker:
    monkeypatch.setattr(worker_module, "get_policy", Policy)
    return ManagedWorker(work_pool_name="unit-pool", name="unit-worker")


def test_a_taken_over_run_takes_a_free_slot(worker):
    worker._slots = FakeSlots(free=1)  # type: ignore[assignment]
    run = uuid4()
    asyncio.run(worker._hold_slot(run))
    assert worker._slots.holds(run)
    assert not worker._unslotted


@pytest.mark.parametrize("slots", [FakeSlots(free=0), FakeSlots(free=1, fail=True)])
def test_a_taken_over_run_without_a_slot_waits_for_one_and_blocks_new_runs(worker, slots):
    worker._slots = slots  # type: ignore[assignment]
    run = uuid4()
    asyncio.run(worker._hold_slot(run))
    assert worker._unslotted == {run}  # admission takes it first, and admits nothing else


def test_a_waiting_taken_over_run_gets_the_next_free_slot(worker):
    worker._slots = FakeSlots(free=0)  # type: ignore[assignment]
    run = uuid4()
    asyncio.run(worker._hold_slot(run))
    asyncio.run(worker._take_waiting_slots())
    assert worker._unslotted == {run}  # still no slot: still waiting
    worker._slots.free = 1
    asyncio.run(worker._take_waiting_slots())
    assert worker._slots.holds(run) and not worker._unslotted


def test_a_taken_over_run_that_ends_while_its_slot_is_taken_gives_it_back(worker, monkeypatch):
    """Its container ends (its take-over finishes, releasing nothing) while admission is
    taking the slot it waited for: the slot goes straight back, not renewed for good."""
    slots = FakeSlots(free=0)
    worker._slots = slots  # type: ignore[assignment]
    run = SimpleNamespace(id=uuid4())
    asyncio.run(worker._hold_slot(run.id))
    slots.free = 1
    acquire = slots.try_acquire

    async def done(*args: Any) -> None:
        return None

    monkeypatch.setattr(worker, "_watch", done)
    monkeypatch.setattr(worker, "_finish", done)

    async def acquire_while_the_container_ends(flow_run_id: UUID) -> bool:
        await worker._adopt(run, Watch("abc123"))  # its finish, during the request
        return await acquire(flow_run_id)

    monkeypatch.setattr(slots, "try_acquire", acquire_while_the_container_ends)
    asyncio.run(worker._take_waiting_slots())
    assert not slots.held and slots.free == 1
    assert not worker._unslotted


def test_a_slot_held_for_no_run_goes_back_at_the_second_reconciliation(worker, caplog):
    slots = FakeSlots(free=3)
    worker._slots = slots  # type: ignore[assignment]
    running, waiting, stray = uuid4(), uuid4(), uuid4()
    for run in (running, waiting, stray):
        asyncio.run(slots.try_acquire(run))
    worker._running.add(running)
    worker._unslotted.add(waiting)
    asyncio.run(worker._release_stray_slots())
    assert slots.held == {running, waiting, stray}  # maybe between its slot and its start
    with caplog.at_level(logging.WARNING):
        asyncio.run(worker._release_stray_slots())
    assert slots.held == {running, waiting} and slots.released == [stray]
    assert f"Gave back the concurrency slot of flow run {stray}" in caplog.text
    asyncio.run(worker._release_stray_slots())
    assert slots.released == [stray]


def test_a_failed_take_over_is_logged_and_gives_its_slot_and_container_back(
    worker, monkeypatch, caplog
):
    worker._slots = FakeSlots(free=1)  # type: ignore[assignment]
    run = SimpleNamespace(id=uuid4())
    asyncio.run(worker._hold_slot(run.id))
    worker._active.add("abc123")

    async def failing_watch(*args: Any) -> None:
        raise RuntimeError("the Prefect API is down")

    monkeypatch.setattr(worker, "_watch", failing_watch)
    with caplog.at_level(logging.ERROR):
        asyncio.run(worker._adopt(run, Watch("abc123")))  # does not raise
    assert "Could not finish container abc123" in caplog.text
    assert "abc123" not in worker._active  # the next reconciliation takes it over again
    assert worker._slots.released == [run.id] and not worker._slots.held


def test_a_failed_slot_release_after_a_take_over_does_not_raise(worker, monkeypatch, caplog):
    worker._slots = FakeSlots(free=1, fail=True)  # type: ignore[assignment]
    run = SimpleNamespace(id=uuid4())

    async def done(*args: Any) -> None:
        return None

    monkeypatch.setattr(worker, "_watch", done)
    monkeypatch.setattr(worker, "_finish", done)
    with caplog.at_level(logging.WARNING):
        asyncio.run(worker._adopt(run, Watch("abc123")))
    assert f"Could not release the slot of flow run {run.id}" in caplog.text


def test_a_bad_policy_stops_the_worker_with_one_line(monkeypatch):
    problem = PolicyError("policy.toml", "tiers.free.memory must be a size")

    def broken() -> Policy:
        raise problem

    monkeypatch.setattr(worker_module, "get_policy", broken)
    with pytest.raises(WorkerNotStarted) as raised:
        ManagedWorker(work_pool_name="unit-pool")
    error = raised.value
    assert isinstance(error, ManagedError) and isinstance(error, SystemExit)
    assert error.code == f"Error: {problem}"  # what Python prints, with exit status 1
    assert "\n" not in str(error.code)


def test_a_stop_request_abandons_the_runs_and_ends_prefects_loops_at_the_next_poll(worker):
    from prefect_managed.worker import WorkerStopped, stopped_on_request

    worker.stop_soon()
    with pytest.raises(WorkerStopped) as raised:
        asyncio.run(worker.get_and_submit_flow_runs())
    assert worker._abandoned.is_set()  # the threads waiting on containers let go
    assert stopped_on_request(raised.value)
    # Prefect's loops raise it inside a task group: the group is a stop too, unless
    # something else failed with it.
    from exceptiongroup import BaseExceptionGroup

    assert stopped_on_request(BaseExceptionGroup("loops", [raised.value]))
    assert not stopped_on_request(BaseExceptionGroup("loops", [raised.value, ValueError()]))
    assert not stopped_on_request(ValueError())
