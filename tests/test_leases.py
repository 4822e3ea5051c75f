"""What a worker does with a concurrency lease the Prefect server no longer has, without
a server: a lease forgotten by a restarted server (gone well within its duration) gives
its slot back; a lease that ran out (the server gave its slot back already) does not give
it back twice, which would let the workspace run one flow run over its limit. The same is
proven for real by the fault tests and the two-hosts tests of tests/test_topology.py."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from prefect.exceptions import PrefectHTTPStatusError

from prefect_managed.concurrency import EXPIRY_MARGIN_SECONDS, WorkspaceSlots

LEASE = 60.0


class FakeLimitsApi:
    """The server's side of one global concurrency limit with leases: `active` slots,
    leases it knows, and every slot given back without a lease."""

    def __init__(self, limit: int = 1) -> None:
        self.limit = limit
        self.active = 0
        self.leases: set[UUID] = set()
        self.decrements: list[int] = []
        self.requests: list[str] = []

    async def read_global_concurrency_limit_by_name(self, name: str) -> Any:
        self.requests.append("read")
        return SimpleNamespace(
            active=True, limit=self.limit, slot_decay_per_second=0.0, active_slots=self.active
        )

    async def increment_concurrency_slots_with_lease(self, **_: Any) -> httpx.Response:
        self.requests.append("increment")
        request = httpx.Request("POST", "http://x")
        if self.active >= self.limit:
            raise PrefectHTTPStatusError.from_httpx_error(
                httpx.HTTPStatusError(
                    "locked", request=request, response=httpx.Response(423, request=request)
                )
            )
        lease_id = uuid4()
        self.leases.add(lease_id)
        self.active += 1
        body = {
            "lease_id": str(lease_id),
            "limits": [{"id": str(uuid4()), "name": "l", "limit": 1}],
        }
        return httpx.Response(200, json=body, request=httpx.Request("POST", "http://x"))

    async def renew_concurrency_lease(self, lease_id: UUID, lease_duration: float) -> None:
        if lease_id not in self.leases:
            request = httpx.Request("POST", "http://x")
            response = httpx.Response(410, request=request)
            raise PrefectHTTPStatusError.from_httpx_error(
                httpx.HTTPStatusError("gone", request=request, response=response)
            )

    async def release_concurrency_slots_with_lease(self, lease_id: UUID) -> None:
        if lease_id in self.leases:
            self.leases.discard(lease_id)
            self.active -= 1

    async def release_concurrency_slots(self, names: list[str], slots: int, **_: Any) -> None:
        self.decrements.append(slots)
        self.active = max(0, self.active - slots)

    async def update_global_concurrency_limit(self, name: str, concurrency_limit: Any) -> None:
        self.requests.append("update")
        fields = concurrency_limit.model_dump(exclude_unset=True)
        self.limit = fields.get("limit", self.limit)
        self.active = fields.get("active_slots", self.active)

    def forget_all(self) -> None:
        """A server restart with in-memory leases: the leases go, the count stays."""
        self.leases.clear()

    def expire_all(self) -> None:
        """The server's repossessor revoking leases that ran out: both go."""
        self.active -= len(self.leases)
        self.leases.clear()


@pytest.fixture
def api() -> FakeLimitsApi:
    return FakeLimitsApi()


@pytest.fixture
def slots(api: FakeLimitsApi) -> WorkspaceSlots:
    return WorkspaceSlots(api, "prefect-managed-ws", 1, logging.getLogger("test"), LEASE)  # type: ignore[arg-type]


def sync(test):
    """Run an async test body on a fresh event loop (no async test plugin is used)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def age_leases(slots: WorkspaceSlots, seconds: float) -> None:
    for lease in slots._leases.values():
        lease.renewed_at = time.monotonic() - seconds


@sync
async def test_a_lease_forgotten_by_a_restarted_server_gives_its_slot_back(api, slots):
    run = uuid4()
    assert await slots.try_acquire(run)
    api.forget_all()
    age_leases(slots, 10)
    await slots.release(run)
    assert api.decrements == [1]
    assert api.active == 0


@sync
async def test_a_lease_that_ran_out_is_not_given_back_twice(api, slots, caplog):
    run = uuid4()
    assert await slots.try_acquire(run)
    age_leases(slots, LEASE + 1)
    api.expire_all()  # the server gave the slot back itself
    await slots.release(run)
    assert api.decrements == []
    assert api.active == 0
    assert "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE" in caplog.text


@sync
async def test_a_lease_near_its_end_counts_as_possibly_run_out(api, slots):
    run = uuid4()
    assert await slots.try_acquire(run)
    age_leases(slots, LEASE - EXPIRY_MARGIN_SECONDS / 2)
    api.expire_all()
    await slots.release(run)
    assert api.decrements == []


@sync
async def test_a_running_flow_run_whose_lease_ran_out_is_counted_again_once(api, slots):
    """Renewal finds the lease gone after it ran out: the run still holds one slot, the
    server's count is one (never two, never zero)."""
    run = uuid4()
    assert await slots.try_acquire(run)
    age_leases(slots, LEASE + 1)
    api.expire_all()
    await slots.renew_due()
    assert slots.holds(run)
    assert api.active == 1 and api.decrements == []
    await slots.release(run)
    assert api.active == 0


@sync
async def test_a_running_flow_run_whose_lease_was_forgotten_is_counted_again_once(api, slots):
    run = uuid4()
    assert await slots.try_acquire(run)
    age_leases(slots, LEASE / 2)
    api.forget_all()
    await slots.renew_due()
    assert slots.holds(run)
    assert api.active == 1 and api.decrements == [1]


@sync
async def test_two_leases_that_ran_out_together_are_counted_again_without_a_slot_left_over():
    """The Prefect server down longer than a lease: it gave both runs' slots back. The
    first renewal to find its lease gone counts its run again; the limit it reads then
    shows no slot taken, while the worker still has the second run's (also run out)
    lease. Counting that lease as held would set the count to one, the second run
    would then take a slot of its own too, and after both runs one slot would stay
    taken for good."""
    api = FakeLimitsApi(limit=3)
    slots = WorkspaceSlots(api, "prefect-managed-ws", 3, logging.getLogger("test"), LEASE)  # type: ignore[arg-type]
    runs = [uuid4(), uuid4()]
    for run in runs:
        assert await slots.try_acquire(run)
    age_leases(slots, LEASE + 1)
    api.expire_all()
    assert api.active == 0
    await slots.renew_due()
    assert all(slots.holds(run) for run in runs)
    assert api.active == 2
    for run in runs:
        await slots.release(run)
    assert api.active == 0


@sync
async def test_a_long_queue_takes_the_free_slots_in_order_and_asks_for_no_more():
    """Admission of ten queued runs with two free slots: the first two get them and the
    other eight are not tried (a poll costs one read and an increment per free slot, not
    two requests per queued run); once the worker holds every slot, a poll costs nothing."""
    api = FakeLimitsApi(limit=2)
    slots = WorkspaceSlots(api, "prefect-managed-ws", 2, logging.getLogger("test"), LEASE)  # type: ignore[arg-type]
    queue = [uuid4() for _ in range(10)]
    assert await slots.acquire_in_order(queue) == set(queue[:2])
    assert api.requests == ["read", "increment", "increment"]
    assert api.active == 2 and slots.held_runs() == set(queue[:2])
    api.requests.clear()
    assert await slots.acquire_in_order(queue[2:]) == set()
    assert api.requests == []  # every slot is this worker's: none can be free
    assert await slots.acquire_in_order([]) == set()
    assert api.requests == []  # nothing queued: no request at all
    await slots.release(queue[0])
    api.requests.clear()
    assert await slots.acquire_in_order(queue[2:]) == {queue[2]}
    assert api.requests == ["read", "increment"]


@sync
async def test_slots_taken_by_another_worker_are_not_asked_for_and_a_refusal_stops_the_poll():
    """Two of three slots held elsewhere (another worker of the workspace): one run is
    tried. Then two slots read free, but the other worker takes one between the read
    and the increments: the second increment is refused and the poll stops there."""
    api = FakeLimitsApi(limit=3)
    api.active = 2
    slots = WorkspaceSlots(api, "prefect-managed-ws", 3, logging.getLogger("test"), LEASE)  # type: ignore[arg-type]
    queue = [uuid4() for _ in range(4)]
    assert await slots.acquire_in_order(queue) == {queue[0]}
    assert api.requests == ["read", "increment"]

    api = FakeLimitsApi(limit=3)
    api.active = 1
    read = api.read_global_concurrency_limit_by_name

    async def read_then_taken(name: str) -> Any:
        found = await read(name)
        api.active += 1  # the other worker's increment
        return found

    api.read_global_concurrency_limit_by_name = read_then_taken  # type: ignore[method-assign]
    slots = WorkspaceSlots(api, "prefect-managed-ws", 3, logging.getLogger("test"), LEASE)  # type: ignore[arg-type]
    assert await slots.acquire_in_order(queue) == {queue[0]}
    assert api.requests == ["read", "increment", "increment"]


@sync
async def test_each_slot_given_back_is_announced_once(api):
    """`released` (the workers' released-slot event) follows each slot given back, a
    forgotten lease's too; not a release of a slot the worker does not hold, nor one
    whose request failed (the lease expires on the server and no one is told)."""
    said: list[str] = []
    slots = WorkspaceSlots(
        api,  # type: ignore[arg-type]
        "prefect-managed-ws",
        1,
        logging.getLogger("test"),
        LEASE,
        released=lambda: said.append("released"),
    )
    run = uuid4()
    assert await slots.try_acquire(run)
    await slots.release(run)
    await slots.release(run)  # not held any more
    await slots.release(uuid4())  # never held
    assert said == ["released"]
    assert await slots.try_acquire(run)
    api.forget_all()  # a restarted server: the slot is given back without its lease
    await slots.release(run)
    assert said == ["released", "released"] and api.active == 0

    async def down(lease_id: UUID) -> None:
        raise httpx.ConnectError("the API is away")

    assert await slots.try_acquire(run)
    api.release_concurrency_slots_with_lease = down  # type: ignore[method-assign]
    await slots.release(run)
    assert said == ["released", "released"]
