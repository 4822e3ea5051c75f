"""Taking over the containers a dead worker left behind.

`TakeOver` is the part of `ManagedWorker` that reconciles: at setup and every
`RECONCILE_SECONDS` it lists this pool's containers (`containers.pool_labels`), keeps
those no live worker watches (`containers.orphans`), gives each running one a slot of
the workspace's limit (or records that it waits for one, and admission then admits no
new run), and watches it to its end in the worker's background group, where
`ManagedWorker._finish` explains, records and removes it; once its slot is given back, a
run that crashed for an infrastructure reason is scheduled again (`retries`). Every step
is guarded: an error is logged, the container and slot are given back, and the next
reconciliation tries again; the worker's other background tasks go on. Each
reconciliation also gives back a slot held for a run this worker no longer runs
(`_release_stray_slots`), so that no race can shrink the workspace's cap for good.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import httpx
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from prefect_managed.configuration import api_label_value
from prefect_managed.containers import Watch, orphans, pool_labels

if TYPE_CHECKING:
    from collections import deque

    import anyio.abc
    from prefect.client.orchestration import PrefectClient

    from prefect_managed.concurrency import WorkspaceSlots
    from prefect_managed.containers import Containers
    from prefect_managed.outcome import ContainerReport
    from prefect_managed.policy import Policy

__all__ = ["RECONCILE_SECONDS", "TakeOver"]

#: Seconds between two reconciliations.
RECONCILE_SECONDS = 60.0


class TakeOver:
    """Mixed into `ManagedWorker`: the reconciliation of containers left behind."""

    if TYPE_CHECKING:  # what it uses of the worker
        name: str
        policy: Policy
        _work_pool_name: str
        _logger: Any
        _containers: Containers
        _slots: WorkspaceSlots | None
        _background: anyio.abc.TaskGroup | None
        _active: set[str]
        _finished: deque[str]
        _unslotted: set[UUID]
        _running: set[UUID]
        _stray_slots: set[UUID]

        @property
        def client(self) -> PrefectClient: ...

        async def _watch(self, flow_run: FlowRun, watch: Watch) -> None: ...

        async def _finish(
            self, flow_run: FlowRun, watch: Watch, engine_lost: bool = False
        ) -> ContainerReport | None: ...

        async def _retry_infrastructure_crash(self, flow_run: FlowRun) -> None: ...

    async def _reconcile_forever(self) -> None:
        while True:
            await anyio.sleep(RECONCILE_SECONDS)
            await self._reconcile_guarded()

    async def _reconcile_guarded(self) -> None:
        try:
            await self._reconcile_orphans()
        except Exception:
            self._logger.warning("Could not reconcile orphaned containers", exc_info=True)
        try:
            await self._release_stray_slots()
        except Exception:
            self._logger.warning("Could not give back stray concurrency slots", exc_info=True)

    async def _release_stray_slots(self) -> None:
        """A safety net: a slot this worker holds for a flow run it no longer runs nor
        waits to take over is given back at the second reconciliation in a row that finds
        it so (at the first, the run may be between its slot and its start). Without it,
        a slot missed by a race would be renewed for good and shrink the workspace's cap."""
        assert self._slots is not None
        stray = self._slots.held_runs() - self._running - self._unslotted
        released = stray & self._stray_slots
        for flow_run_id in released:
            self._logger.warning(
                "Gave back the concurrency slot of flow run %s, which this worker held "
                "without running it",
                flow_run_id,
            )
            await self._slots.release(flow_run_id)
        self._stray_slots = stray - released

    async def _reconcile_orphans(self) -> None:
        """Find this pool's containers that no live worker watches, and finish them."""
        found = await self._containers.find(
            pool_labels(self.policy.workspace.name, api_label_value(), self._work_pool_name)
        )
        if not found:
            return
        online = {
            worker.name
            for worker in await self.client.read_workers_for_work_pool(self._work_pool_name)
            if worker.status == WorkerStatus.ONLINE and worker.name != self.name
        }
        watched = {*self._active, *self._finished}
        for report in orphans(found, watched, online):
            try:
                flow_run = await self.client.read_flow_run(UUID(str(report.flow_run_id)))
            except ObjectNotFound:
                continue  # not a run of this Prefect server: not ours to touch
            self._active.add(report.id)
            self._running.add(flow_run.id)
            self._logger.info(
                "Taking over container %s of flow run %s, left by worker %r",
                report.name,
                report.flow_run_id,
                report.labels.get("io.prefect.worker-name"),
            )
            if report.running:
                await self._hold_slot(flow_run.id)
            assert self._background is not None
            self._background.start_soon(self._adopt, flow_run, Watch(report.id))

    async def _hold_slot(self, flow_run_id: UUID) -> None:
        """A taken-over run counts against the cap: it takes a slot, or waits for one
        before any new run is admitted."""
        assert self._slots is not None
        if self._slots.holds(flow_run_id):
            return
        try:
            if await self._slots.try_acquire(flow_run_id):
                return
        except (httpx.HTTPError, PrefectHTTPStatusError):
            self._logger.warning("Could not take a slot for flow run %s", flow_run_id)
        self._unslotted.add(flow_run_id)

    async def _take_waiting_slots(self) -> None:
        """Give the taken-over runs that wait for a slot one each, before any new run.

        A run whose container ends while its slot is being taken (its `_adopt` has
        released nothing and left `_unslotted`) gives that slot straight back: nothing
        else would, and its lease would be renewed for good."""
        assert self._slots is not None
        for flow_run_id in list(self._unslotted):
            if not await self._slots.try_acquire(flow_run_id):
                continue
            if flow_run_id in self._unslotted:
                self._unslotted.discard(flow_run_id)
            else:
                await self._slots.release(flow_run_id)

    async def _adopt(self, flow_run: FlowRun, watch: Watch) -> None:
        """Watch a taken-over container to its end (within the run time), then finish it.
        Any error is logged: the next reconciliation takes the container over again."""
        assert self._slots is not None
        try:
            await self._watch(flow_run, watch)
            await self._finish(flow_run, watch)
        except Exception:
            self._logger.exception(
                "Could not finish container %s of flow run %s; the next reconciliation "
                "takes it over again",
                watch.container_id,
                flow_run.id,
            )
        finally:
            self._active.discard(watch.container_id)
            self._unslotted.discard(flow_run.id)
            self._running.discard(flow_run.id)
            with anyio.CancelScope(shield=True):
                try:
                    await self._slots.release(flow_run.id)
                except Exception:  # its lease expires on the server
                    self._logger.warning(
                        "Could not release the slot of flow run %s", flow_run.id, exc_info=True
                    )
        # Its slot given back: a run whose attempt crashed for an infrastructure reason
        # (its container removed, the engine lost) is scheduled again like a new run.
        await self._retry_infrastructure_crash(flow_run)
