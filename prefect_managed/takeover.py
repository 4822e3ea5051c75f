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
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound, PrefectHTTPStatusError
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_managed.configuration import api_label_value
from prefect_managed.containers import Watch, orphans, pool_labels, workspace_labels

if TYPE_CHECKING:
    from collections import deque

    import anyio.abc
    from prefect.client.orchestration import PrefectClient

    from prefect_managed.accounting import Accounting
    from prefect_managed.capacity import HostCapacity
    from prefect_managed.concurrency import WorkspaceSlots
    from prefect_managed.containers import Containers
    from prefect_managed.outcome import ContainerReport
    from prefect_managed.policy import Policy
    from prefect_managed.retries import InfrastructureCause

__all__ = ["FINISH_SECONDS", "RECONCILE_SECONDS", "TakeOver"]

#: Seconds between two reconciliations.
RECONCILE_SECONDS = 60.0
#: The longest a worker that is told to stop waits for a finish that began.
FINISH_SECONDS = 120.0


class TakeOver:
    """Mixed into `ManagedWorker`: the reconciliation of containers left behind."""

    if TYPE_CHECKING:  # what it uses of the worker
        name: str
        policy: Policy
        _work_pool_name: str
        _logger: Any
        _containers: Containers
        _slots: WorkspaceSlots | None
        _accounting: Accounting | None
        _background: anyio.abc.TaskGroup | None
        _active: set[str]
        _finished: deque[str]
        _unslotted: set[UUID]
        _running: set[UUID]
        _stray_slots: set[UUID]
        _infrastructure_crashes: dict[UUID, InfrastructureCause]

        @property
        def client(self) -> PrefectClient: ...

        async def _watch(self, flow_run: FlowRun, watch: Watch) -> None: ...

        async def _finish(
            self, flow_run: FlowRun, watch: Watch, engine_lost: bool = False
        ) -> ContainerReport | None: ...

        async def _retry_infrastructure_crash(self, flow_run: FlowRun) -> None: ...

        def _stop_container(self, container_id: str, timeout: int) -> None: ...

        async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None: ...

        _reconcile_lock: anyio.Lock
        _unlabelled: set[UUID]
        _capacity: HostCapacity
        _submitting_flow_run_ids: set[UUID]

    async def _reconcile_forever(self) -> None:
        while True:
            await anyio.sleep(RECONCILE_SECONDS)
            await self._reconcile_guarded()

    async def _reconcile_guarded(self) -> None:
        """One reconciliation at a time (the drain asks for them too)."""
        async with self._reconcile_lock:
            await self._reconcile_once()

    async def _reconcile_once(self) -> None:
        # Room reserved for runs this worker no longer submits nor runs goes back.
        self._capacity.sweep(self.name, {*self._submitting_flow_run_ids, *self._running})
        await self._relabel_taken_over()
        try:
            sent = await self._accounting.send_spooled() if self._accounting else 0
            if sent:
                self._logger.info("Stored %d usage record(s) kept on disk", sent)
        except Exception:
            self._logger.warning("Could not store the usage records kept on disk", exc_info=True)
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

    async def _online_workers(self, pool: str) -> set[str]:
        """The names of the pool's workers Prefect shows online, this one aside."""
        return {
            worker.name
            for worker in await self.client.read_workers_for_work_pool(pool)
            if worker.status == WorkerStatus.ONLINE and worker.name != self.name
        }

    async def _reconcile_orphans(self) -> None:
        """Find this pool's containers that no live worker watches, and finish them;
        then the workspace's exited containers that no worker of their pool finished."""
        found = await self._containers.find(
            pool_labels(self.policy.workspace.name, api_label_value(), self._work_pool_name)
        )
        if found:
            await self._take_over(found)
        await self._finish_left_behind()

    async def _finish_left_behind(self) -> None:
        """Record and remove the exited containers of the workspace's other pools whose
        run is final and whose worker is not online (a worker stopped between the exit and
        the removal, of a pool nobody serves any more). Left alone: a running container
        (its pool's workers take it over), and one whose worker Prefect shows online (it
        may be finishing it)."""
        labels = workspace_labels(self.policy.workspace.name, api_label_value())
        online: dict[str, set[str]] = {}
        for report in await self._containers.find(labels):
            pool = report.labels.get("io.prefect.work-pool-name", "")
            if (
                pool == self._work_pool_name
                or report.running
                or not report.flow_run_id
                or report.id in {*self._active, *self._finished}
                or report.finished_at is None
            ):
                continue
            if pool not in online:
                online[pool] = await self._online_workers(pool) if pool else set()
            if report.labels.get("io.prefect.worker-name") in online[pool]:
                continue
            flow_run = await self._run_of(report)
            if flow_run is None or flow_run.state is None or not flow_run.state.is_final():
                continue
            self._logger.info(
                "Finishing container %s of flow run %s (pool %r), left by worker %r",
                report.name,
                report.flow_run_id,
                pool,
                report.labels.get("io.prefect.worker-name"),
            )
            self._active.add(report.id)
            try:
                await self._finish(flow_run, Watch(report.id, report=report))
            except Exception:
                self._logger.warning(
                    "Could not finish container %s; the next reconciliation tries again",
                    report.name,
                    exc_info=True,
                )
            finally:
                self._active.discard(report.id)
                # Its pool's workers schedule an infrastructure retry, not this one.
                self._infrastructure_crashes.pop(flow_run.id, None)

    async def _relabel_taken_over(self) -> None:
        """Label the taken-over runs with this worker, again at each reconciliation until
        it worked and while they run (else another host could take them as lost)."""
        for flow_run_id in list(self._unlabelled):
            if flow_run_id not in self._running:
                self._unlabelled.discard(flow_run_id)
                continue
            try:
                await self._give_worker_labels_to_flow_run(flow_run_id)
            except Exception:
                self._logger.warning(
                    "Could not label flow run %s with this worker; trying again at the next "
                    "reconciliation",
                    flow_run_id,
                    exc_info=True,
                )
            else:
                self._unlabelled.discard(flow_run_id)

    async def _run_of(self, report: ContainerReport) -> FlowRun | None:
        """The flow run of a container left behind; None when it is not this server's
        (not ours to touch) or cannot be read now (the next reconciliation tries again:
        one run that cannot be read never holds up the others)."""
        try:
            return await self.client.read_flow_run(UUID(str(report.flow_run_id)))
        except ObjectNotFound:
            return None
        except Exception:
            self._logger.warning(
                "Could not read flow run %s of container %s; the next reconciliation tries again",
                report.flow_run_id,
                report.name,
                exc_info=True,
            )
            return None

    async def _take_over(self, found: list[ContainerReport]) -> None:
        online = await self._online_workers(self._work_pool_name)
        watched = {*self._active, *self._finished}
        for report in orphans(found, watched, online):
            flow_run = await self._run_of(report)
            if flow_run is None:
                continue
            self._active.add(report.id)
            self._running.add(flow_run.id)
            # The run's worker label names who runs it now (the lost-host check reads it).
            self._unlabelled.add(flow_run.id)
            await self._relabel_taken_over()
            self._logger.info(
                "Taking over container %s of flow run %s, left by worker %r",
                report.name,
                report.flow_run_id,
                report.labels.get("io.prefect.worker-name"),
            )
            if report.running and flow_run.state is not None and flow_run.state.is_final():
                # Its run is over (ended while its host was away, taken as lost): the
                # container stops; it is then finished, and recorded only if it was not.
                self._logger.warning(
                    "Stopping container %s: its flow run %s is already %s",
                    report.name,
                    report.flow_run_id,
                    flow_run.state.name,
                )
                try:
                    await run_sync_in_worker_thread(self._stop_container, report.id, 10)
                except InfrastructureNotFound:
                    pass  # it exited meanwhile
            elif report.running:
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
            # A worker told to stop lets a finish that began end (within FINISH_SECONDS):
            # else the exited container would wait for the next worker of the pool.
            with anyio.move_on_after(FINISH_SECONDS, shield=True):
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
