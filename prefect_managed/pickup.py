"""Pickup on events: the worker polls at once when one of its pool's runs becomes due,
or when a workspace slot it waits for is given back.

Prefect's worker looks for scheduled runs every `PREFECT_WORKER_QUERY_SECONDS` (10 s by
default), so an ad-hoc run (`run_deployment`, the UI's Run button) waits up to that long
before a worker sees it. The managed worker also follows the server's event stream for
its pool, with Prefect's own subscriber (what `prefect events stream` reads), and polls as
soon as one of the pool's runs is Scheduled.

A run that waits for a workspace slot would likewise wait for a poll once the slot is
given back. So a worker that gives a slot back says so in an event of its own
(`SLOT_RELEASED`, about the workspace), and every worker of the workspace whose last poll
left runs waiting for a slot, or for room on its host (the slot of a run is given back
once its container is gone, and with it the container's room; room freed by another
workspace's run on the same engine is not announced here), polls when it hears it. The
releasing worker hears it from the server like the others: waking itself at once would
make it win the waiting runs over the other hosts every time. A flow run cannot send the
event (the run gateway refuses event names in the managed pool's namespace). Polling
stays as it is: it is the fallback while the subscription is down, and the subscription
is opened again after a pause.

A poll on an event is the same poll as the loop's, under the same lock: a run is never
admitted twice, and wakes that come while a poll runs make one more poll, not many.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from uuid import UUID

import anyio

#: The events that make a run of the pool due now: Prefect names a flow run's state
#: events after the state (`prefect.flow-run.<state name>`): a new run, and a run
#: scheduled again at once after an infrastructure crash (`retries.INFRASTRUCTURE_RETRY`).
#: Never `AwaitingConcurrencySlot`, which the worker's own poll sets.
DUE_EVENTS = ("prefect.flow-run.Scheduled", "prefect.flow-run.AwaitingInfrastructureRetry")

#: What a worker says once it has given a workspace slot back; its resource is the
#: workspace (`workspace_resource`).
SLOT_RELEASED = "prefect-managed.workspace.slot-released"

#: Seconds between a dropped subscription and the next attempt.
RESUBSCRIBE_SECONDS = 5.0

#: The least time between two polls woken by released slots: a busy workspace releases
#: slots faster than a worker needs to look (each release heard by every waiting worker
#: of the workspace would be a poll each), and one poll admits every slot it finds free.
SLOT_WAKE_SECONDS = 1.0

Subscribe = Callable[[UUID], AbstractAsyncContextManager[AsyncIterator[Any]]]


def of_pool(event: Any, pool_id: UUID) -> bool:
    """Whether the event names the pool as its run's `work-pool`. Checked here again: the
    server did not apply a related-resource filter to its live stream (only to the
    backfill it reads from its database), and the subscription's resource filter does not
    say in which role the pool is named."""
    wanted = f"prefect.work-pool.{pool_id}"
    return any(
        related.id == wanted and related.role == "work-pool"
        for related in getattr(event, "related", ())
    )


def workspace_resource(workspace: str) -> str:
    return f"prefect-managed.workspace.{workspace}"


def of_workspace(event: Any, workspace: str) -> bool:
    """Whether the event says a slot of the workspace was given back."""
    resource = getattr(event, "resource", None)
    return (
        getattr(event, "event", None) == SLOT_RELEASED
        and resource is not None
        and resource.id == workspace_resource(workspace)
    )


def announce_released_slot(workspace: str) -> None:
    """Tell the workspace's workers (through the server) that one of its slots is free."""
    from prefect.events import emit_event

    emit_event(event=SLOT_RELEASED, resource={"prefect.resource.id": workspace_resource(workspace)})


def pool_events(
    pool_id: UUID, workspace: str | None = None
) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
    """Prefect's subscriber to the due events of the runs of one work pool, and to the
    released slots of its workspace (filtered again with `of_pool` and `of_workspace`)."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    names, resources = list(DUE_EVENTS), [f"prefect.work-pool.{pool_id}"]
    if workspace is not None:
        names.append(SLOT_RELEASED)
        resources.append(workspace_resource(workspace))
    return get_events_subscriber(
        filter=EventFilter(
            event=EventNameFilter(name=names),
            any_resource=EventAnyResourceFilter(id=resources),
        ),
        reconnect_on_clean_close=True,
    )


class Pickup:
    """Wakes `poll` for each due event of the pool, for released slots of `workspace`
    while `waiting()` (runs wait for a slot or for room; at most once every
    `slot_wake_seconds`), and when `wake` is called."""

    def __init__(
        self,
        poll: Callable[[], Awaitable[object]],
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        subscribe: Subscribe = pool_events,
        resubscribe_seconds: float = RESUBSCRIBE_SECONDS,
        workspace: str | None = None,
        waiting: Callable[[], bool] = lambda: False,
        slot_wake_seconds: float = SLOT_WAKE_SECONDS,
    ) -> None:
        self._poll = poll
        self._logger = logger
        self._subscribe = subscribe
        self._resubscribe_seconds = resubscribe_seconds
        self._workspace = workspace
        self._waiting = waiting
        self._slot_wake_seconds = slot_wake_seconds
        self._due = anyio.Event()
        self._slot_freed = anyio.Event()
        #: Whether the subscription is up (polling alone serves the pool while it is not).
        self.subscribed = False
        #: Polls made because of a wake (an event).
        self.polls = 0

    def wake(self) -> None:
        """Poll as soon as the poll under way, if any, is over."""
        self._due.set()

    async def poll_when_woken_forever(self) -> None:
        while True:
            await self._due.wait()
            self._due = anyio.Event()
            self.polls += 1
            try:
                await self._poll()
            except Exception:  # the loop's next poll tries again, as Prefect's does
                self._logger.warning("A poll on an event failed", exc_info=True)

    async def wake_for_freed_slots_forever(self) -> None:
        """A wake for the released slots heard, at most one every `slot_wake_seconds`:
        slots released meanwhile make one more wake at its end, not one each."""
        while True:
            await self._slot_freed.wait()
            self._slot_freed = anyio.Event()
            self.wake()
            await anyio.sleep(self._slot_wake_seconds)

    async def follow_forever(self, pool_id: Callable[[], UUID | None]) -> None:
        """Follow the pool's due events, once the pool is known (the worker's first
        sync with the API makes or reads it), subscribing again whenever the stream
        drops."""
        while (pool := pool_id()) is None:
            await anyio.sleep(1)
        first = True
        while True:
            try:
                async with self._subscribe(pool) as events:
                    if not self.subscribed:
                        self._logger.info(
                            "Following the pool's events: a scheduled flow run is picked up at once"
                        )
                    self.subscribed = True
                    # Runs scheduled while it was down: the loop may not have seen them.
                    self.wake()
                    async for event in events:
                        if of_pool(event, pool):
                            self.wake()
                        elif self._slot_for_a_waiting_run(event):
                            self._slot_freed.set()
            except Exception as exc:
                if self.subscribed or first:
                    self._logger.warning(
                        "Could not follow the pool's events (%s: %s): flow runs are picked "
                        "up by polling until it is back (subscribing again every %g s)",
                        type(exc).__name__,
                        exc,
                        self._resubscribe_seconds,
                    )
                else:
                    self._logger.debug("Could not follow the pool's events", exc_info=True)
            first = False
            self.subscribed = False
            await anyio.sleep(self._resubscribe_seconds)

    def _slot_for_a_waiting_run(self, event: Any) -> bool:
        return (
            self._workspace is not None and of_workspace(event, self._workspace) and self._waiting()
        )
