"""The logic of pickup on events (prefect_managed/pickup.py), with a stand-in event stream:
wakes during a poll make one more poll, a stream that drops is followed again, and a
released workspace slot wakes only a worker with runs waiting for one.
The real stream, from a real server, is in tests/test_pickup.py."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from types import SimpleNamespace
from uuid import uuid4

import anyio
import pytest

from prefect_managed.pickup import SLOT_RELEASED, Pickup, of_workspace, workspace_resource

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_wakes_during_a_poll_make_one_more_poll_not_one_each():
    polls: list[int] = []
    release = anyio.Event()

    async def poll() -> None:
        polls.append(len(polls))
        if len(polls) == 1:
            await release.wait()

    pickup = Pickup(poll, logging.getLogger("test"))
    async with anyio.create_task_group() as group:
        group.start_soon(pickup.poll_when_woken_forever)
        pickup.wake()
        await anyio.sleep(0.05)
        assert polls == [0]  # the first poll runs
        for _ in range(5):
            pickup.wake()
        release.set()
        await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    assert polls == [0, 1]
    assert pickup.polls == 2


async def test_a_failed_poll_does_not_end_the_pickup(caplog):
    calls = 0

    async def poll() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the API is down")

    pickup = Pickup(poll, logging.getLogger("test"))
    async with anyio.create_task_group() as group:
        group.start_soon(pickup.poll_when_woken_forever)
        pickup.wake()
        await anyio.sleep(0.05)
        pickup.wake()
        await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    assert calls == 2
    assert "A poll on an event failed" in caplog.text


async def test_each_event_wakes_a_poll_and_a_dropped_stream_is_followed_again(caplog):
    """The pool's id is awaited; each event wakes the poller; the stream dropping is
    logged once with the fallback, and a new subscription polls at once (runs scheduled
    while it was down)."""
    pool = uuid4()
    subscribed: list[object] = []
    woken: list[str] = []
    other = uuid4()
    streams = [["run-1", "other-pool", "run-2"], RuntimeError("connection lost"), ["run-3"]]

    def event(name: str) -> SimpleNamespace:
        """Prefect's event as far as the pickup reads it: its run's related resources."""
        of = other if name == "other-pool" else pool
        related = [SimpleNamespace(id=f"prefect.work-pool.{of}", role="work-pool")]
        return SimpleNamespace(name=name, related=related)

    @asynccontextmanager
    async def subscribe(pool_id):
        subscribed.append(pool_id)
        stream = streams.pop(0) if streams else []
        if isinstance(stream, Exception):
            raise stream

        async def events():
            for name in stream:
                woken.append(f"event {name}")
                yield event(name)
                await anyio.sleep(0.01)
            await anyio.sleep_forever() if not streams else None
            raise ConnectionError("the server went away")

        yield events()

    async def poll() -> None:
        woken.append("poll")

    known: list = [None, None]

    def pool_id():
        return known.pop(0) if known else pool

    caplog.set_level(logging.INFO)
    pickup = Pickup(poll, logging.getLogger("test"), subscribe, resubscribe_seconds=0.01)
    async with anyio.create_task_group() as group:
        group.start_soon(pickup.poll_when_woken_forever)
        group.start_soon(pickup.follow_forever, pool_id)
        with anyio.fail_after(10):
            while len(subscribed) < 3 or "event run-3" not in woken or woken[-1] != "poll":
                await anyio.sleep(0.05)
        assert pickup.subscribed
        group.cancel_scope.cancel()
    assert subscribed == [pool, pool, pool]
    assert woken.count("event run-1") == woken.count("event run-3") == 1
    # Another pool's event (the server's live stream does not filter on the pool) wakes
    # nothing: the entry after it is the next event, not a poll.
    after = woken[woken.index("event other-pool") + 1]
    assert after == "event run-2", woken
    assert woken[-1] == "poll"
    assert pickup.polls >= 2
    messages = [record.getMessage() for record in caplog.records]
    # Once when it drops; the failed attempt after it is not repeated at warning level.
    assert sum("Could not follow the pool's events" in m for m in messages) == 1, messages
    assert any("ConnectionError: the server went away" in m for m in messages), messages
    assert any("RuntimeError: connection lost" in m for m in messages) is False, messages
    assert any("picked up by polling until it is back" in m for m in messages)
    assert sum("Following the pool's events" in m for m in messages) == 2, messages


async def test_a_released_slot_wakes_a_worker_with_runs_waiting_for_one():
    """The workspace's released-slot event wakes a poll only while the worker's last
    poll left runs waiting for a slot, and only for its own workspace; an event of that
    name about another resource, or another event about the workspace, wakes nothing."""
    pool = uuid4()
    waiting = [False]
    polls: list[str] = []
    delivered: list[str] = []
    gate = anyio.Event()

    def event(name: str, resource: str) -> SimpleNamespace:
        return SimpleNamespace(event=name, resource=SimpleNamespace(id=resource), related=[])

    ours = workspace_resource("acme")
    script = [
        ("idle", event(SLOT_RELEASED, ours)),  # nothing waits: no poll
        ("waits", event(SLOT_RELEASED, ours)),  # a run waits: a poll
        ("waits", event(SLOT_RELEASED, workspace_resource("other"))),
        ("waits", event("prefect-managed.workspace.slot-taken", ours)),
        ("waits", event(SLOT_RELEASED, "prefect-managed.workspace.acme.x")),
    ]

    @asynccontextmanager
    async def subscribe(pool_id):
        async def events():
            await gate.wait()
            for label, item in script:
                waiting[0] = label == "waits"
                delivered.append(label)
                yield item
                await anyio.sleep(0.05)  # a woken poll runs before the next event
            await anyio.sleep_forever()

        yield events()

    async def poll() -> None:
        polls.append(delivered[-1] if delivered else "start")

    pickup = Pickup(
        poll,
        logging.getLogger("test"),
        subscribe,
        workspace="acme",
        waiting=lambda: waiting[0],
        slot_wake_seconds=0.01,
    )
    async with anyio.create_task_group() as group:
        group.start_soon(pickup.poll_when_woken_forever)
        group.start_soon(pickup.wake_for_freed_slots_forever)
        group.start_soon(pickup.follow_forever, lambda: pool)
        with anyio.fail_after(10):
            while pickup.polls < 1:  # the poll every (re)subscription makes
                await anyio.sleep(0.01)
            gate.set()
            while len(delivered) < len(script):
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)
        group.cancel_scope.cancel()
    assert polls == ["start", "waits"], polls
    assert of_workspace(event(SLOT_RELEASED, ours), "acme")
    assert not of_workspace(event(SLOT_RELEASED, ours), "acm")


async def test_released_slots_wake_at_most_one_poll_a_gap():
    """A burst of released slots (a busy workspace) makes one poll at once and one more
    at the end of the gap, not one each; a release after the gap wakes at once again."""
    pool = uuid4()
    polls: list[float] = []
    bursts = [anyio.Event(), anyio.Event()]
    released = SimpleNamespace(
        event=SLOT_RELEASED, resource=SimpleNamespace(id=workspace_resource("acme")), related=[]
    )

    @asynccontextmanager
    async def subscribe(pool_id):
        async def events():
            for burst in bursts:
                await burst.wait()
                for _ in range(10):  # over 0.2 s
                    yield released
                    await anyio.sleep(0.02)
            await anyio.sleep_forever()

        yield events()

    async def poll() -> None:
        polls.append(anyio.current_time())

    pickup = Pickup(
        poll,
        logging.getLogger("test"),
        subscribe,
        workspace="acme",
        waiting=lambda: True,
        slot_wake_seconds=0.5,
    )
    async with anyio.create_task_group() as group:
        group.start_soon(pickup.poll_when_woken_forever)
        group.start_soon(pickup.wake_for_freed_slots_forever)
        group.start_soon(pickup.follow_forever, lambda: pool)
        with anyio.fail_after(10):
            while pickup.polls < 1:  # the poll every (re)subscription makes
                await anyio.sleep(0.01)
            start = len(polls)
            bursts[0].set()
            await anyio.sleep(1.5)
            first_burst = polls[start:]
            bursts[1].set()
            await anyio.sleep(0.2)
        group.cancel_scope.cancel()
    assert len(first_burst) == 2, first_burst
    assert first_burst[1] - first_burst[0] >= 0.5
    assert len(polls) == start + 3, polls
