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

    async def acquire_in_order(self, flow_run_ids: list[UUID], checked: bool = False) -> set[UUID]:
        acquired = set()
        for flow_run_id in flow_run_ids:
            if not await self.try_acquire(flow_run_id):
                break
            acquired.add(flow_run_id)
        return acquired

    async def free_slots(self) -> int:
        if self.fail:
            raise httpx.ConnectError("the Prefect API is down")
        return self.free

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


class PolledStates:
    """Stands in for RunStates: `moved` runs changed since the poll; what was marked."""

    def __init__(self, moved: set[UUID]) -> None:
        self.moved = moved
        self.marked: list[UUID] = []
        self.refused: list[UUID] = []

    async def unchanged(self, flow_runs: list[Any]) -> set[UUID]:
        return {flow_run.id for flow_run in flow_runs} - self.moved

    async def mark_awaiting_slot(self, flow_run: Any, scheduled_time: Any, message: str) -> None:
        self.marked.append(flow_run.id)

    async def refuse(self, flow_run: Any, name: str, message: str) -> None:
        self.refused.append(flow_run.id)


def test_a_run_another_host_took_since_the_poll_is_neither_submitted_nor_marked(
    worker, monkeypatch
):
    """Slots for two of four runs; one with a slot and one without moved on since the
    poll: the first's slot goes back, neither is submitted or marked waiting."""
    from prefect.workers.base import BaseWorker

    slots = FakeSlots(free=2)
    worker._slots = slots  # type: ignore[assignment]
    due = {"state": None, "next_scheduled_start_time": None, "expected_start_time": None}
    runs = [SimpleNamespace(id=uuid4(), state_id=uuid4(), **due) for _ in range(4)]
    took_with_slot, stays_with_slot, took_without, waits = (run.id for run in runs)
    states = PolledStates(moved={took_with_slot, took_without})
    worker._states = states  # type: ignore[assignment]
    submitted: list[UUID] = []

    async def submit(self, entries):  # Prefect's claim and start
        assert not states.marked  # submitted first: Prefect's claim follows the read
        submitted.extend(entry.flow_run.id for entry in entries)
        return [entry.flow_run for entry in entries]

    monkeypatch.setattr(BaseWorker, "_submit_scheduled_flow_runs", submit)
    queue = [SimpleNamespace(flow_run=run) for run in runs]
    ids = [run.id for run in runs]  # a slot was free for each when the limit was read
    result = asyncio.run(worker._admit_with_slots(queue, set(), ids, ids))
    assert [run.id for run in result] == submitted == [stays_with_slot]
    assert states.marked == [waits]
    assert slots.held == {stays_with_slot} and slots.released == [took_with_slot]
    assert (worker.stats.waiting_for_slot, worker.stats.admitted) == (1, 1)


def test_a_run_of_this_worker_that_ended_since_the_poll_is_not_submitted_again(worker, monkeypatch):
    """Runs this worker holds a slot for, polled while still Scheduled (their submission
    had just begun): one whose container has come and gone by the time admission
    decides is not submitted again (Prefect's server would take Pending from its
    ending and a second container would run the flow again); one whose container ends
    while the states are read is not either; one still as polled goes on to Prefect's
    submission, which skips a run it is still submitting."""
    from prefect.workers.base import BaseWorker

    slots = FakeSlots(free=0)
    worker._slots = slots  # type: ignore[assignment]
    due = {"state": None, "next_scheduled_start_time": None, "expected_start_time": None}
    runs = [SimpleNamespace(id=uuid4(), state_id=uuid4(), **due) for _ in range(3)]
    ended, ends_during_the_read, due_again = (run.id for run in runs)
    slots.held.update(run.id for run in runs)
    states = PolledStates(moved={ended})
    worker._states = states  # type: ignore[assignment]
    worker._running.add(ends_during_the_read)
    read: list[UUID] = []
    unchanged = states.unchanged

    async def container_ends_meanwhile(flow_runs: list[Any]) -> set[UUID]:
        worker._running.discard(ends_during_the_read)
        read.extend(flow_run.id for flow_run in flow_runs)
        return await unchanged(flow_runs)

    states.unchanged = container_ends_meanwhile  # type: ignore[method-assign]
    submitted: list[UUID] = []

    async def submit(self, entries):
        submitted.extend(entry.flow_run.id for entry in entries)
        return [entry.flow_run for entry in entries]

    monkeypatch.setattr(BaseWorker, "_submit_scheduled_flow_runs", submit)
    queue = [SimpleNamespace(flow_run=run) for run in runs]
    ours = {run.id for run in runs}
    assert asyncio.run(worker._admit_with_slots(queue, ours, [], [])) == [runs[2]]
    assert submitted == [due_again]
    assert read == [ended, due_again]  # the running one is not read: it is left alone
    assert not slots.released and not states.marked  # its finish gives a slot back


def test_a_mark_that_fails_is_logged_and_the_poll_goes_on(worker, monkeypatch, caplog):
    from prefect.workers.base import BaseWorker

    worker._slots = FakeSlots(free=0)  # type: ignore[assignment]
    due = {"state": None, "next_scheduled_start_time": None, "expected_start_time": None}
    runs = [SimpleNamespace(id=uuid4(), state_id=uuid4(), **due) for _ in range(2)]
    states = PolledStates(moved=set())

    async def api_away(flow_run: Any, scheduled_time: Any, message: str) -> None:
        states.marked.append(flow_run.id)
        raise httpx.ConnectError("the Prefect API is down")

    states.mark_awaiting_slot = api_away  # type: ignore[method-assign]
    worker._states = states  # type: ignore[assignment]

    async def submit(self, entries):
        return []

    monkeypatch.setattr(BaseWorker, "_submit_scheduled_flow_runs", submit)
    queue = [SimpleNamespace(flow_run=run) for run in runs]
    with caplog.at_level(logging.WARNING):
        ids = [r.id for r in runs]
        assert asyncio.run(worker._admit_with_slots(queue, set(), ids, ids)) == []
    assert states.marked == [run.id for run in runs]  # the second tried after the first failed
    assert f"Could not mark flow run {runs[0].id} as waiting for a slot" in caplog.text


def test_with_the_quota_used_up_only_runs_still_as_polled_are_refused(worker):
    class UsedUp:
        async def quota_exhausted(self) -> bool:
            return True

        def exhausted_message(self) -> str:
            return "used up"

    worker._slots = FakeSlots(free=1)  # type: ignore[assignment]
    worker._accounting = UsedUp()  # type: ignore[assignment]
    moved, still = uuid4(), uuid4()
    states = PolledStates(moved={moved})
    worker._states = states  # type: ignore[assignment]
    queue = [SimpleNamespace(flow_run=SimpleNamespace(id=run)) for run in (moved, still)]
    assert asyncio.run(worker._submit_scheduled_flow_runs(queue)) == []
    assert states.refused == [still]


class Room:
    """Stands in for HostCapacity: room for every run it is asked about; what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[UUID]] = []

    async def admit(self, runs: list[UUID], each: Any, now: float, owner: str = "") -> Any:
        self.asked.append(list(runs))
        return list(runs), ""

    def release(self, run: UUID) -> None:
        pass


class Quota:
    async def quota_exhausted(self) -> bool:
        return False


@pytest.mark.parametrize(("free", "asked"), [(0, []), (1, [1]), (5, [3])])
def test_the_room_is_counted_only_for_the_runs_a_slot_is_free_for(worker, monkeypatch, free, asked):
    """Three runs waiting: the engine is asked about as many as slots are free, and not
    at all while none is (this worker holding every slot: no request either). The runs
    no slot was free for wait for one, marked so once: a run marked already is not read
    again (`unchanged`) nor marked again."""
    from prefect.workers.base import BaseWorker

    slots = FakeSlots(free=free)
    room = Room()
    worker._slots, worker._capacity = slots, room  # type: ignore[assignment]
    worker._accounting = Quota()  # type: ignore[assignment]
    read: list[UUID] = []

    class States(PolledStates):
        async def unchanged(self, flow_runs: list[Any]) -> set[UUID]:
            read.extend(flow_run.id for flow_run in flow_runs)
            return await super().unchanged(flow_runs)

        async def mark_awaiting_slot(self, flow_run: Any, scheduled_time: Any, message: str):
            if flow_run.state is None:  # as RunStates: a run marked already is left as it is
                self.marked.append(flow_run.id)

    states = States(moved=set())
    worker._states = states  # type: ignore[assignment]

    async def submit(self, entries):
        return [entry.flow_run for entry in entries]

    monkeypatch.setattr(BaseWorker, "_submit_scheduled_flow_runs", submit)
    due = {"next_scheduled_start_time": None, "expected_start_time": None}
    from prefect.states import Scheduled

    already = Scheduled(name="AwaitingConcurrencySlot")
    runs = [SimpleNamespace(id=uuid4(), state_id=uuid4(), state=None, **due) for _ in range(3)]
    if free == 0:
        runs[2].state = already  # marked at an earlier poll
    queue = [SimpleNamespace(flow_run=run) for run in runs]
    submitted = asyncio.run(worker._submit_scheduled_flow_runs(queue))
    admitted = min(free, 3)
    assert [len(runs) for runs in room.asked] == asked
    assert {run.id for run in submitted} == {run.id for run in runs[:admitted]}
    assert set(states.marked) == {run.id for run in runs[admitted:] if run.state is None}
    assert runs[2].id not in read if free == 0 else set(read) == {run.id for run in runs}
    assert worker.stats.waiting_for_slot == 3 - admitted
    assert worker.stats.waiting_for_room == 0
    assert worker._left_waiting is (admitted < 3)


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


# -- a stopping worker and the container being made --------------------------------------


class FakeEngine:
    """Stands in for `Containers.find`: the runs whose container has been made."""

    def __init__(self) -> None:
        self.made: set[str] = set()

    async def find(self, labels: list[str]) -> list[Any]:
        (run,) = [label.split("=", 1)[1] for label in labels if "flow-run-id=" in label]
        return [SimpleNamespace(flow_run_id=run)] if run in self.made else []


class FakeStates:
    def __init__(self) -> None:
        self.scheduled_again: list[UUID] = []

    async def schedule_again(self, flow_run: Any, message: str) -> bool:
        self.scheduled_again.append(flow_run.id)
        return True


@pytest.fixture
def stopping(worker, monkeypatch):
    """A stopping worker whose engine makes a container only when `proceed` is set."""
    import threading

    from prefect_docker.worker import DockerWorker

    engine, proceed, made = FakeEngine(), threading.Event(), []

    def create(self, configuration):
        proceed.wait(10)
        run = configuration.labels["io.prefect.flow-run-id"]
        engine.made.add(run)
        made.append(run)
        return f"container of {run}"

    monkeypatch.setattr(DockerWorker, "_create_and_start_container", create)
    worker._containers = engine  # type: ignore[assignment]
    worker._states = FakeStates()  # type: ignore[assignment]
    worker._slots = FakeSlots(free=1)  # type: ignore[assignment]
    worker._abandoned.set()
    return SimpleNamespace(worker=worker, engine=engine, proceed=proceed, made=made)


def _configuration(run: UUID) -> Any:
    return SimpleNamespace(labels={"io.prefect.flow-run-id": str(run)})


def test_a_run_scheduled_again_at_stop_never_gets_the_container_a_late_thread_would_make(
    stopping,
):
    """The cancel of a run leaves prefect-docker's create thread going: once the run is
    Scheduled again, that thread must not make its container (two would run)."""
    worker, run = stopping.worker, uuid4()
    asyncio.run(worker._slots.try_acquire(run))
    asyncio.run(worker._schedule_unstarted_again(SimpleNamespace(id=run)))
    assert worker._states.scheduled_again == [run]
    assert worker._slots.released == [run]

    stopping.proceed.set()
    with pytest.raises(RuntimeError, match="scheduled again when its worker stopped"):
        worker._create_and_start_container(_configuration(run))
    assert stopping.made == []


def test_a_run_whose_container_is_being_made_at_stop_is_left_for_the_next_worker(stopping):
    """A stop that finds the run's container being made waits for it, then leaves the
    run (and its slot) to the worker that takes the container over."""
    import threading

    worker, run = stopping.worker, uuid4()
    asyncio.run(worker._slots.try_acquire(run))
    created: list[Any] = []
    thread = threading.Thread(
        target=lambda: created.append(worker._create_and_start_container(_configuration(run)))
    )
    thread.start()
    from prefect_managed.containers import being_made

    while not being_made(str(run)):
        thread.join(0.01)
    threading.Timer(0.3, stopping.proceed.set).start()
    asyncio.run(worker._schedule_unstarted_again(SimpleNamespace(id=run)))
    thread.join(10)
    assert created == [f"container of {run}"]
    assert worker._states.scheduled_again == []
    assert worker._slots.released == [] and worker._slots.holds(run)


def test_a_starting_worker_takes_as_its_predecessors_only_runs_that_stay_pending_in_its_name(
    worker, monkeypatch
):
    """Prefect sets a run Pending before it names the worker: a run another worker just
    set Pending may still carry this worker's name from an earlier attempt. Only a run
    seen twice in the same Pending state in this worker's name, with no container and
    not this worker's own, goes back to Scheduled."""
    import prefect_managed.lost as lost_module

    monkeypatch.setattr(lost_module, "SETTLED_PENDING_SECONDS", 0)

    from prefect.states import Pending

    def pending(name: str = "unit-worker") -> Any:
        state = Pending()  # Prefect's own submission's
        return SimpleNamespace(
            id=uuid4(), state_id=state.id, state=state, labels={"prefect.worker.name": name}
        )

    left, renamed, restarted, other, own, contained, making, claimed = (pending() for _ in range(8))
    other.labels["prefect.worker.name"] = "another-worker"
    # Left in a claim (by this worker's predecessor, or another's since): it goes back
    # as a claim does (`_release_abandoned_claims`), to an ending it replaced.
    claimed.state = Pending(message=f"Taken by a managed worker to set its state ({'0' * 32}).")
    claimed.state_id = claimed.state.id
    looks: list[list[Any]] = [
        [left, renamed, restarted, other, own, contained, making, claimed],
        [
            left,
            SimpleNamespace(**{**vars(renamed), "labels": {"prefect.worker.name": "w2"}}),
            SimpleNamespace(**{**vars(restarted), "state_id": uuid4()}),  # Pending anew
            other,
            own,
            contained,
            making,
            claimed,
        ],
    ]
    # Its container being made by an earlier worker of this process (`serve` restarts
    # a failed worker in the same process): the thread a cancel left going makes it.
    import threading

    from prefect_managed.containers import CREATING

    monkeypatch.setitem(CREATING, str(making.id), threading.Event())

    async def pool_runs(types):
        return looks.pop(0)

    async def with_containers():
        return {str(contained.id)}

    class States(FakeStates):
        async def schedule_again(self, flow_run, message, pending_state_id=None):
            assert pending_state_id == flow_run.state_id  # only from the state it saw
            return await super().schedule_again(flow_run, message)

    worker._pool_runs = pool_runs  # type: ignore[method-assign]
    worker._runs_with_containers = with_containers  # type: ignore[method-assign]
    worker._states = States()  # type: ignore[assignment]
    worker._submitting_flow_run_ids.add(own.id)
    again = asyncio.run(worker._schedule_unstarted_of_predecessor())
    assert [run.id for run in again] == [left.id] == worker._states.scheduled_again
    assert not looks  # looked twice


def test_the_deciding_worker_puts_back_a_run_left_in_a_claim_and_ends_no_run_in_one(
    worker, monkeypatch
):
    """The lost-host check's read of the pool's active runs also finds a run a killed
    worker left in a claim: put back once seen for `ABANDONED_CLAIM_SECONDS`, never set
    Crashed as lost, though it names a silent worker."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.objects import WorkerStatus
    from prefect.states import Pending

    from prefect_managed import lost
    from prefect_managed.run_states import ABANDONED_CLAIM_SECONDS

    clock = [0.0]
    monkeypatch.setattr(lost, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    now = datetime.now(timezone.utc)
    claim = Pending(message=f"Taken by a managed worker to set its state ({'a' * 32}).")
    claimed = SimpleNamespace(
        id=uuid4(), state=claim, state_id=claim.id, labels={"prefect.worker.name": "gone"}
    )

    class Client:
        async def read_workers_for_work_pool(self, pool):
            return [
                SimpleNamespace(
                    name="unit-worker", status=WorkerStatus.ONLINE, last_heartbeat_time=now
                ),
                SimpleNamespace(
                    name="gone",
                    status=WorkerStatus.OFFLINE,
                    last_heartbeat_time=now - timedelta(hours=1),
                ),
            ]

    class States:
        released: list = []

        async def release_abandoned_claim(self, flow_run):
            self.released.append(flow_run.id)
            return True

    async def pool_runs(types):
        return [claimed]

    async def with_containers():
        return set()

    ended: list = []

    async def end_lost_run(flow_run, worker_name, last):
        ended.append(flow_run.id)
        return True

    monkeypatch.setattr(ManagedWorker, "client", property(lambda self: Client()))
    worker._pool_runs = pool_runs  # type: ignore[method-assign]
    worker._runs_with_containers = with_containers  # type: ignore[method-assign]
    worker._end_lost_run = end_lost_run  # type: ignore[method-assign]
    worker._states = States()  # type: ignore[assignment]
    long_ago = now - timedelta(hours=2)

    asyncio.run(worker._end_lost_runs(long_ago))
    clock[0] += ABANDONED_CLAIM_SECONDS
    asyncio.run(worker._end_lost_runs(long_ago))

    assert worker._states.released == [claimed.id]
    assert ended == []


def test_a_run_whose_submission_ended_since_the_poll_is_not_submitted_again(worker, monkeypatch):
    """A poll that read a run while the previous poll's submission of it was under way
    (the run still Scheduled, its slot held) must not submit it again once that
    submission is over and the run's container runs: Prefect would start it twice. Its
    slot stays held."""
    from prefect.workers.base import BaseWorker

    slots = FakeSlots(free=2)
    worker._slots = slots  # type: ignore[assignment]
    due = {"state": None, "next_scheduled_start_time": None, "expected_start_time": None}
    running, new = (SimpleNamespace(id=uuid4(), state_id=uuid4(), **due) for _ in range(2))
    assert asyncio.run(slots.try_acquire(running.id))
    worker._running.add(running.id)  # its submission ended between the read and now
    worker._states = PolledStates(moved=set())  # type: ignore[assignment]
    submitted: list[UUID] = []

    async def submit(self, entries):
        submitted.extend(entry.flow_run.id for entry in entries)
        return [entry.flow_run for entry in entries]

    monkeypatch.setattr(BaseWorker, "_submit_scheduled_flow_runs", submit)
    queue = [SimpleNamespace(flow_run=run) for run in (running, new)]
    asyncio.run(worker._admit_with_slots(queue, {running.id}, [new.id], [new.id]))
    assert submitted == [new.id]
    assert slots.held == {running.id, new.id} and slots.released == []
