"""`ManagedWorker`: prefect-docker's worker with the managed pool's contract.

prefect-docker creates, watches and stops the containers. This worker keeps Prefect's
hooks (setup, admission, `run`, kill) and hands each job to a module of its own:

- `policy`: the limits and messages, read once when the worker is made;
- `concurrency`: a run starts only with a slot of the workspace's limit, otherwise it
  stays Scheduled as `AwaitingConcurrencySlot`; a container taken over from a dead
  worker holds a slot too;
- `accounting`: the month's usage, the quota, and one usage record per run;
- `containers`: Docker calls and the one watch loop (stats, the run-time clock);
- `outcome`: how a container ended, decided from its inspect data;
- `run_states`: the states and log entries that say so;
- `retries`: whether a run that crashed for an infrastructure reason is scheduled again;
- `cancels`: a cancel its container does not carry out is carried out by the worker.

Every background task is guarded: an error is logged, the container is still finished
and removed (now or at the next reconciliation), and its slot given back.
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
import httpx
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound, PrefectHTTPStatusError
from prefect_docker.worker import DockerWorker, DockerWorkerResult

from prefect_managed.accounting import Accounting
from prefect_managed.cancels import Cancels, runs_managed_container
from prefect_managed.capacity import HostCapacity, Need, capacity_for
from prefect_managed.concurrency import WorkspaceSlots
from prefect_managed.configuration import (
    ManagedJobConfiguration,
    ManagedVariables,
    api_label_value,
    disk_limit_unsupported,
)
from prefect_managed.containers import (
    CREATING,
    CREATIONS,
    Containers,
    DockerClients,
    ImageFacts,
    Watch,
    in_daemon_thread,
    is_root_user,
    pool_labels,
)
from prefect_managed.environment_step import EnvironmentStep
from prefect_managed.environments import Environments
from prefect_managed.exceptions import (
    ApiOpenWithoutCredential,
    GpuNotAvailable,
    ImageNotAvailable,
    PolicyError,
    WorkerNotStarted,
)
from prefect_managed.executor import use_prefork
from prefect_managed.finishing import Finishing
from prefect_managed.gateway.host import check_boundary, serve_run_gateway
from prefect_managed.ledger import UsageLedger
from prefect_managed.lost import LostHosts
from prefect_managed.messages import (
    awaiting_room_message,
    awaiting_slot_message,
    stopped_before_start_message,
)
from prefect_managed.metrics import PoolStats
from prefect_managed.outcome import (
    docker_lost,
)
from prefect_managed.pickup import Pickup, announce_released_slot, pool_events
from prefect_managed.policy import Policy
from prefect_managed.pools import PoolGate
from prefect_managed.retries import (
    ATTEMPT_LABEL,
    InfrastructureCause,
    cause_of_start_failure,
)
from prefect_managed.run_states import AWAITING_SLOT, QUOTA_EXHAUSTED, RunStates
from prefect_managed.settings import get_policy, get_settings, ledger_key
from prefect_managed.spool import spool_for
from prefect_managed.takeover import FINISH_SECONDS, TakeOver

if TYPE_CHECKING:
    from prefect.client.schemas.responses import WorkerFlowRunResponse

__all__ = ["ManagedWorker", "WorkerStopped", "stopped_on_request"]

DOCKER_WAIT_SECONDS = 600.0


#: How long a stopping worker takes to put back a run whose container never started.
RESCHEDULE_SECONDS = 10
#: How long a poll stopped while it admitted runs takes to give back the slots it took.
RELEASE_SECONDS = 10


class WorkerStopped(Exception):
    """Raised in Prefect's polling loop to end `BaseWorker.start` after `stop_soon`."""


def stopped_on_request(error: BaseException) -> bool:
    """True when `error` (or every error of its group) is `WorkerStopped`."""
    inner = getattr(error, "exceptions", None)
    if inner is not None:
        return all(stopped_on_request(each) for each in inner)
    return isinstance(error, WorkerStopped)


class _StartedProxy:
    """Passes `task_status.started(...)` on, and remembers the container it names."""

    def __init__(self, inner: anyio.abc.TaskStatus[str] | None) -> None:
        self._inner = inner
        self.infrastructure_pid: str | None = None
        self.event = anyio.Event()

    def started(self, value: str | None = None) -> None:
        self.infrastructure_pid = value
        self.event.set()
        if self._inner is not None:
            self._inner.started(value)  # type: ignore[arg-type]


class ManagedWorker(DockerWorker, TakeOver, Finishing, Cancels, LostHosts):
    """Runs each flow run of a `prefect:managed` pool in a capped, hardened container."""

    type = "prefect:managed"
    job_configuration = ManagedJobConfiguration  # type: ignore[assignment]
    job_configuration_variables = ManagedVariables  # type: ignore[assignment]
    _display_name = "Prefect Managed"
    _description = (
        "Run flows in containers managed for you: deploy code from git or object storage, "
        "list the packages it needs in pip_packages, and each run executes in a capped, "
        "hardened container. No worker, image or cloud account on your side."
    )
    _documentation_url = "https://docs.prefect.io/v3/how-to-guides/deployment_infra/managed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.policy: Policy = get_policy()
        except PolicyError as exc:
            # One clear line and a non-zero exit, not a traceback: the operator fixes
            # the file and starts the worker again.
            raise WorkerNotStarted(exc) from exc
        super().__init__(*args, **kwargs)
        self._docker_clients = DockerClients()
        self._containers = Containers(self._get_client, self._logger)
        self._slots: WorkspaceSlots | None = None
        self._accounting: Accounting | None = None
        self._states: RunStates | None = None
        self._background: anyio.abc.TaskGroup | None = None
        self._active: set[str] = set()  # containers being watched (runs and orphans)
        # Containers this worker finished lately: a reconciliation that listed one just
        # before it was removed must not take it over.
        self._finished: deque[str] = deque(maxlen=1000)
        # Runs taken over from a dead worker that still wait for a slot: no new run is
        # admitted while one waits, so the cap holds while the dead worker's leases expire.
        self._unslotted: set[UUID] = set()
        self._running: set[UUID] = set()  # runs submitted or taken over, until they end
        self._watching: dict[UUID, Watch] = {}  # runs whose container is watched, and how
        self._stray_slots: set[UUID] = set()  # see `_release_stray_slots`
        self._claims_seen: dict[UUID, float] = {}  # see `_release_abandoned_claims`
        self._pool_gate: PoolGate | None = None
        self._environment_step: EnvironmentStep | None = None
        # Set when the runs are abandoned: the threads that wait on their containers end.
        self._abandoned = threading.Event()
        # The runs this worker scheduled again when it stopped, whose container must never
        # be made by the thread a cancel left going; under `containers.CREATIONS`, with
        # the runs being made (`_create_and_start_container`, `_schedule_unstarted_again`).
        self._withdrawn: set[str] = set()
        self._stop_requested = False
        # Runs whose attempt crashed for an infrastructure reason, until their slot is
        # released and they are scheduled again (or not: `_retry_infrastructure_crash`).
        self._infrastructure_crashes: dict[UUID, InfrastructureCause] = {}
        self._capacity: HostCapacity = capacity_for(self._containers, self.policy.host)
        self._told_no_room: deque[UUID] = deque(maxlen=1000)  # runs told they wait for room
        self._reconcile_lock = anyio.Lock()
        self._unlabelled: set[UUID] = set()  # taken-over runs not labelled with this worker yet
        self._draining = False
        #: what the service's metrics read; the service gives each worker of a pool the same
        self.stats = PoolStats()
        # Polls (Prefect's loop, and `_pickup`'s on an event) one at a time.
        self._poll_lock = anyio.Lock()
        # Whether the last poll left runs waiting for a workspace slot or for room on this
        # host (`Pickup`): a run's slot is given back once its container is gone, which
        # is when its room on its host is free too.
        self._left_waiting = False
        workspace = self.policy.workspace.name
        self._pickup = Pickup(
            self._poll_on_wake,
            self._logger,
            subscribe=partial(pool_events, workspace=workspace),
            workspace=workspace,
            # A poll under way may be about to leave runs waiting: it is followed by one more.
            waiting=lambda: self._left_waiting or bool(self._unslotted) or self._poll_lock.locked(),
        )

    def drain(self) -> None:
        """Claim no new runs; the runs in flight go on to their end (`drained`)."""
        if not self._draining:
            self._logger.info("Draining: claiming no new flow runs; %d running", len(self._running))
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    # -- what the service's metrics read ------------------------------------------

    @property
    def runs_in_flight(self) -> int:
        return len(self._running)

    @property
    def slots_held(self) -> int:
        return 0 if self._slots is None else len(self._slots.held_runs())

    @property
    def month_hours(self) -> float | None:
        return None if self._accounting is None else self._accounting.month_hours

    @property
    def host_capacity(self) -> HostCapacity:
        return self._capacity

    async def drained(self) -> bool:
        """Whether nothing of this worker is left: no run in flight, no container of its
        name on the engine (an exited one is finished by a reconciliation first)."""
        if self._running or self._active or self._submitting_flow_run_ids:
            return False
        labels = [
            *pool_labels(self.policy.workspace.name, api_label_value(), self._work_pool_name),
            f"io.prefect.worker-name={self.name}",
        ]
        if not await self._containers.find(labels):
            return True
        await self._reconcile_guarded()
        return False

    def stop_soon(self) -> None:
        """Make `BaseWorker.start` return: its next poll abandons the runs in flight and
        raises `WorkerStopped`, which ends Prefect's loops, and Prefect tears the worker
        down uncancelled (task groups and clients closed, the stopped event sent)."""
        self._stop_requested = True

    def abandon_runs(self) -> None:
        """Stop watching the runs in flight; their containers keep running and are taken
        over by the next worker of this pool (see `_reconcile_orphans`)."""
        self._abandoned.set()
        # Prefect has no public handle on the task group that runs `run` per flow run.
        if self._runs_task_group is not None:
            self._runs_task_group.cancel_scope.cancel()

    async def teardown(self, *exc_info: Any) -> None:
        """Prefect's teardown, with the runs in flight abandoned first.

        `prefect worker start` stopped by a signal tears the worker down without a poll
        that would abandon them (`stop_soon`): the threads that wait on their containers
        would keep the process alive until every container ended."""
        self.abandon_runs()
        await super().teardown(*exc_info)

    def _get_client(self) -> Any:
        """prefect-docker's client for each of its calls and ours, without asking the
        engine for its API version each time (`DockerClients`)."""
        return self._docker_clients()

    async def setup(self) -> None:
        await super().setup()
        if self.policy.tier.disk is not None:
            info = await self._containers.info()
            why = disk_limit_unsupported(info.get("Driver", ""), info.get("DriverStatus") or [])
            if why is not None:
                raise PolicyError(
                    get_settings().resolved_policy_file(),
                    f"the {self.policy.workspace.tier} tier sets disk but {why}; remove the "
                    "tier's disk or move the Docker engine's data to such a file system",
                )
        tier = self.policy.tier
        self._pool_gate = PoolGate(
            self.client, self.policy, self._work_pool_name, self.type, self._logger
        )
        self._slots = WorkspaceSlots(
            self.client,
            self.policy.concurrency_limit_name,
            tier.concurrency_limit,
            self._logger,
            # The workspace's workers with runs waiting for a slot or for room poll when
            # they hear it (this one too, through the server: at once, it would always
            # win them).
            released=partial(announce_released_slot, self.policy.workspace.name),
        )
        try:
            await self._slots.ensure_limit()
        except (httpx.HTTPError, PrefectHTTPStatusError):
            # Started while the Prefect server is unreachable: serve anyway, as Prefect's
            # worker does; the limit is made when the first run takes a slot.
            self._logger.warning(
                "Could not set the workspace's concurrency limit %r (is the Prefect API "
                "reachable?); it is set when the first flow run takes a slot",
                self.policy.concurrency_limit_name,
            )
        ledger = UsageLedger(self.client, self.policy.workspace.name, logger=self._logger)
        self._accounting = Accounting(
            ledger, self.policy, self.get_flow_run_logger, spool_for(self.policy.workspace.name)
        )
        self._states = RunStates(
            self.client,
            self.get_flow_run_logger,
            self._propose_crashed_state,  # private: Prefect's Abort-aware Crashed proposal
            lambda: self.backend_id,
        )
        self._environment_step = EnvironmentStep(
            Environments(self._get_client, self._logger),
            self.policy,
            self.client,
            self._states,
            self._accounting,
            self.get_flow_run_logger,
            self._work_pool_name,
        )
        try:
            await anyio.to_thread.run_sync(check_boundary, self.policy.runtime, self._logger)
        except ApiOpenWithoutCredential as exc:
            raise WorkerNotStarted(exc) from None
        if self.policy.runtime.gateway_on:
            await anyio.to_thread.run_sync(
                serve_run_gateway, self.policy.runtime, ledger_key(), self._logger
            )
        self._background = anyio.create_task_group()
        await self._exit_stack.enter_async_context(self._background)
        self._exit_stack.callback(self._background.cancel_scope.cancel)
        self._background.start_soon(self._renew_leases_forever)
        # Before the first admission: containers a dead predecessor left take their
        # slots first.
        await self._reconcile_guarded()
        self._background.start_soon(self._schedule_predecessors_unstarted_guarded)
        self._background.start_soon(self._reconcile_forever)
        self._background.start_soon(self._enforce_cancels_forever)
        self._background.start_soon(self._find_lost_forever)
        self._background.start_soon(self._accounting.show_at_start, self._work_pool_name)
        self._background.start_soon(self._accounting.keep_pool_lines)
        self._background.start_soon(self._pickup.poll_when_woken_forever)
        self._background.start_soon(self._pickup.wake_for_freed_slots_forever)
        self._background.start_soon(self._pickup.follow_forever, self._work_pool_id)
        self._logger.info(
            "Workspace %r, %s tier: %d concurrent flow runs, %d managed pools, "
            "%s memory and %g CPUs per run, %d s maximum run time",
            self.policy.workspace.name,
            self.policy.workspace.tier,
            tier.concurrency_limit,
            tier.pool_limit,
            tier.memory,
            tier.cpus,
            tier.max_run_seconds,
        )

    async def _renew_leases_forever(self) -> None:
        assert self._slots is not None
        while True:
            await anyio.sleep(self._slots.renew_interval)
            try:
                await self._slots.renew_due()
            except Exception:  # the API may be unreachable for a while: try again later
                self._logger.warning("Could not renew concurrency leases", exc_info=True)

    # -- which pools and runs are served ---------------------------------------------

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        async with self._poll_lock:
            # Checked under the lock: a poll that waited for it admits nothing into the
            # runs' task group once the worker is told to stop.
            if self._stop_requested:
                self.abandon_runs()
                raise WorkerStopped(self.name)
            assert self._pool_gate is not None
            self._left_waiting = False  # until this poll says otherwise
            if self._draining:
                await self._take_waiting_slots()  # taken-over runs still get their slots
                return []
            if not await self._pool_gate.is_served():
                return []
            return await super().get_and_submit_flow_runs()

    async def _poll_on_wake(self) -> None:
        """A poll out of turn (`Pickup`): a run of the pool became due; none once the
        worker is told to stop (Prefect's loop stops it)."""
        if self._stop_requested:
            return
        try:
            await self.get_and_submit_flow_runs()
        except WorkerStopped:
            return

    def _work_pool_id(self) -> UUID | None:
        """The pool's id once the worker has synced with the API (it may create the pool)."""
        return self._work_pool.id if self._work_pool is not None else None

    async def _submit_scheduled_flow_runs(
        self, flow_run_response: list[WorkerFlowRunResponse]
    ) -> list[FlowRun]:
        """Submit, oldest first, only the runs that get a workspace concurrency slot.

        Once the workspace's monthly compute quota is used up, new runs end Failed
        (`QuotaExhausted`) instead; runs already running finish.
        """
        assert self._slots is not None and self._accounting is not None
        assert self._states is not None
        if flow_run_response and await self._accounting.quota_exhausted():
            message = self._accounting.exhausted_message()
            polled = [
                entry.flow_run
                for entry in flow_run_response
                if entry.flow_run.id not in self._submitting_flow_run_ids
            ]
            unchanged = await self._states.unchanged(polled)
            for flow_run in polled:
                if flow_run.id in unchanged:
                    await self._states.refuse(flow_run, QUOTA_EXHAUSTED, message)
            return []
        await self._take_waiting_slots()  # taken-over runs come first
        queue = sorted(flow_run_response, key=lambda e: _scheduled_time(e.flow_run))
        ours = {*self._submitting_flow_run_ids, *self._slots.held_runs()}
        waiting = [entry.flow_run.id for entry in queue if entry.flow_run.id not in ours]
        # No new run while a taken-over one waits for a slot. The room is counted for
        # the runs a slot is free for (none, without a request, while this worker holds
        # every slot): the others wait for a slot wherever they would run.
        roomy: list[UUID] = []
        slotted: list[UUID] = []
        if waiting and not self._unslotted:
            slotted = waiting[: await self._slots.free_slots()]
        if slotted:
            try:
                roomy, why = await self._capacity.admit(
                    slotted, self._need(), anyio.current_time(), owner=self.name
                )
            except Exception as exc:
                # The engine does not answer: admitted as before there was a count, so
                # the start fails as the infrastructure's (and may be retried).
                self._logger.warning("Could not count the room on this host: %s", exc)
                roomy, why = list(slotted), ""
            if why:
                await self._tell_no_room(
                    [e.flow_run for e in queue if e.flow_run.id in slotted[len(roomy) :]], why
                )
        try:
            return await self._admit_with_slots(queue, ours, roomy, slotted)
        finally:
            # Reserved room of a run not being submitted goes back, whatever happened.
            for run in roomy:
                if run not in self._submitting_flow_run_ids and run not in self._running:
                    self._capacity.release(run)

    async def _admit_with_slots(
        self,
        queue: list[WorkerFlowRunResponse],
        ours: set[UUID],
        roomy: list[UUID],
        slotted: list[UUID],
    ) -> list[FlowRun]:
        """Slots for the runs with room (`roomy`, of the `slotted` runs a slot was free
        for when the limit was read); the others marked waiting for a slot or left for
        another host; the runs with both submitted through Prefect."""
        assert self._slots is not None and self._states is not None
        counted = set(slotted)
        acquired = await self._slots.acquire_in_order(roomy, checked=True) if roomy else set()

        def without_room(run: UUID) -> bool:  # left Scheduled, without a slot, for another host
            return run not in roomy and not self._unslotted and run in counted

        def marked(flow_run: FlowRun) -> bool:  # waiting for a slot already
            return flow_run.state is not None and flow_run.state.name == AWAITING_SLOT

        # A run this worker held a slot for was being submitted when the poll read it
        # (Prefect skips it while it is), or runs by now: submitting that one again would
        # start a second container (Prefect's server accepts Pending even from a final
        # state) and give its slot back while it runs. Which ones run is read before the
        # states are: one whose container ends after this has a state other than the
        # poll's by the time they are read (its ending, or the Crashed its finish sets).
        running = {run for run in ours if run in self._running}
        # What the poll read may be old by now (counting room and taking slots ask the
        # engine and the API, and a poll waits for the one before it): a run another
        # host has taken, or this one has run to its end, since is left alone. Not read
        # again: a run that would only wait on, marked so already.
        acting = [
            e.flow_run
            for e in queue
            if e.flow_run.id not in running
            and not without_room(e.flow_run.id)
            and (e.flow_run.id in ours or e.flow_run.id in acquired or not marked(e.flow_run))
        ]
        try:
            unchanged = await self._states.unchanged(acting)
        except BaseException:
            with anyio.move_on_after(RELEASE_SECONDS, shield=True):
                for run in acquired:
                    await self._slots.release(run)
            raise
        admitted: list[WorkerFlowRunResponse] = []
        waiting: list[FlowRun] = []
        no_room = 0
        for entry in queue:
            flow_run = entry.flow_run
            if flow_run.id in ours:
                if flow_run.id in unchanged:  # a running one was not read again
                    admitted.append(entry)
            elif without_room(flow_run.id):
                no_room += 1
            elif flow_run.id not in acquired and marked(flow_run):
                waiting.append(flow_run)  # marking it again does nothing
            elif flow_run.id not in unchanged:
                pass  # taken by another host since the poll (its slot is released below)
            elif flow_run.id in acquired:
                admitted.append(entry)
            else:
                waiting.append(flow_run)
        self.stats.waiting_for_slot = len(waiting)
        self.stats.waiting_for_room = no_room
        self._left_waiting = bool(waiting or no_room)
        admitted = [entry for entry in admitted if entry.flow_run.id not in self._running]
        # Submitted first: Prefect takes each run right after the read above.
        submitted = await super()._submit_scheduled_flow_runs(admitted)
        submitted_ids = {flow_run.id for flow_run in submitted}
        self.stats.admitted += len(submitted_ids - ours)
        for run in {*acquired, *(entry.flow_run.id for entry in admitted)} - submitted_ids:
            await self._slots.release(run)
        message = awaiting_slot_message(self.policy)
        for flow_run in waiting:
            try:
                await self._states.mark_awaiting_slot(flow_run, _scheduled_time(flow_run), message)
            except Exception:  # the API away: it waits, unmarked, for the next poll
                self._logger.warning(
                    "Could not mark flow run %s as waiting for a slot", flow_run.id, exc_info=True
                )
        return submitted

    def _need(self) -> Need:
        """What a new run may take: the tier's memory and CPUs (a run may ask for less
        memory; the tier's is what it can use at most)."""
        return Need(self.policy.tier.memory_bytes, self.policy.tier.cpus)

    async def _tell_no_room(self, flow_runs: list[FlowRun], why: str) -> None:
        """Say once per run, in its logs and the worker's, that it waits for room."""
        for flow_run in flow_runs:
            if flow_run.id in self._told_no_room:
                continue
            self._told_no_room.append(flow_run.id)
            message = awaiting_room_message(why)
            self._logger.info("Flow run %s: %s", flow_run.id, message)
            try:
                self.get_flow_run_logger(flow_run).info("%s", message)
            except Exception:  # a log line never stops admission
                self._logger.debug("Could not log to flow run %s", flow_run.id, exc_info=True)

    def _release_limit_slot(self, flow_run_id: Any) -> None:
        super()._release_limit_slot(flow_run_id)
        # Also when Prefect aborted the submission (another host took the run first).
        self._capacity.release(flow_run_id)
        if self._abandoned.is_set():
            # Stopping: the slot of a run left running is the next worker's to take over
            # (this lease expires); a run scheduled again gives it back itself.
            return
        if self._slots is not None and self._runs_task_group is not None:
            self._runs_task_group.start_soon(self._slots.release, flow_run_id)

    # -- one run ------------------------------------------------------------------

    async def _submit_run_and_capture_errors(  # type: ignore[override]
        self, flow_run: FlowRun, task_status: anyio.abc.TaskStatus[Any] | None = None
    ) -> Any:
        """Prefect's submission of one run; then, once Prefect has set its final state and
        released its slot, a run that crashed for an infrastructure reason is scheduled
        again (not when the worker abandons its runs: that cancels this)."""
        self._running.add(flow_run.id)
        try:
            result = await super()._submit_run_and_capture_errors(flow_run, task_status)
            await self._retry_infrastructure_crash(flow_run)
        except anyio.get_cancelled_exc_class():
            if self._abandoned.is_set():
                with anyio.move_on_after(RESCHEDULE_SECONDS, shield=True):
                    await self._schedule_unstarted_again(flow_run)
            raise
        finally:
            self._running.discard(flow_run.id)
            self._capacity.release(flow_run.id)
        return result

    async def _schedule_predecessors_unstarted_guarded(self) -> None:
        try:
            await self._schedule_unstarted_of_predecessor()
        except Exception:  # the API or the engine away: the runs wait for the next start
            self._logger.warning(
                "Could not look for flow runs a previous worker left Pending", exc_info=True
            )

    async def _schedule_unstarted_again(self, flow_run: FlowRun) -> None:
        """A run abandoned before its container was made: nothing on the engine would
        ever start it, so it goes back to Scheduled (its slot released) for the pool's
        next worker. One with a container is left to the worker that takes it over, and
        so is one whose container is still being made when this gives up waiting."""
        assert self._states is not None
        run = str(flow_run.id)
        with CREATIONS:
            creating = CREATING.get(run)
            if creating is None:
                self._withdrawn.add(run)  # from here its container is never made
        if creating is not None:
            # Half the time this has: the rest is for the lookup and the state.
            made = await anyio.to_thread.run_sync(
                creating.wait, RESCHEDULE_SECONDS / 2, abandon_on_cancel=True
            )
            with CREATIONS:
                if not made or run in CREATING:
                    return  # still being made: the pool's next worker takes it over
                self._withdrawn.add(run)
        try:
            labels = pool_labels(
                self.policy.workspace.name, api_label_value(), self._work_pool_name
            )
            if await self._containers.find([*labels, f"io.prefect.flow-run-id={run}"]):
                return
            message = stopped_before_start_message(self.name)
            if await self._states.schedule_again(flow_run, message) and self._slots is not None:
                await self._slots.release(flow_run.id)
        except Exception:  # the API or the engine gone: the next start of this worker does it
            self._logger.warning(
                "Could not schedule flow run %s again after stopping", flow_run.id, exc_info=True
            )

    async def run(  # type: ignore[override]
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        # The attempt rides on the container, so that whoever finishes it (this worker
        # or one that takes it over) records the attempt it ran.
        configuration.labels[ATTEMPT_LABEL] = str(await self._attempt(flow_run, to_start=True))
        # One inspection of the image (pulled if missing) for all the worker decides
        # from it: its user, its python3 (asked once per image) and its entrypoint.
        facts = await self._containers.image_facts(configuration.image or "", pull=True)
        await self._isolate_or_fall_back(flow_run, configuration, facts)
        self._give_a_home(configuration, facts)
        image = configuration.image
        # Before the environment step, which may give the run an image built from this one.
        command = use_prefork(configuration.image or "", configuration.command, configuration.env)
        if command is not None:
            configuration.command = command
        step = self._environment_step
        if step is not None and step.wanted(configuration):
            if not await step.prepare(flow_run, configuration, facts):
                # The build failed: the run is Crashed and recorded, no container made.
                # Said to Prefect as a start that did not happen (else it logs that the
                # infrastructure returned without reporting).
                if task_status is not None:
                    task_status.started(RuntimeError("the run's environment build failed"))
                return DockerWorkerResult(status_code=1, identifier="")
        create = configuration.container_create_kwargs or {}
        if "entrypoint" in create:
            # isolate.sh starts the tunnel's listeners, then the image's own entrypoint
            # (the environment step may have given the run an image built from this one).
            if facts is None or configuration.image != image:
                facts = await self._containers.image_facts(configuration.image or "")
            entrypoint = facts.entrypoint if facts is not None else None
            create["entrypoint"] = [*create["entrypoint"], *(entrypoint or [])]
        started = _StartedProxy(task_status)
        watches: list[Watch] = []
        error: Exception | None = None
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(self._watch_started, flow_run, started, watches)
            try:
                result = await super().run(flow_run, configuration, started)  # type: ignore[arg-type]
            except Exception as exc:
                # Kept out of the task group, which would wrap it in an ExceptionGroup.
                error = exc
            finally:
                watchers.cancel_scope.cancel()
        if started.infrastructure_pid is None:
            assert error is not None
            # An engine that cannot be reached is the infrastructure's fault (said before
            # the calls below, which fail with it).
            cause = cause_of_start_failure(error)
            if cause is not None:
                self._infrastructure_crashes[flow_run.id] = cause
            # A container made but not started (Docker refused to start it) is the
            # run's: never left behind.
            await self._containers.remove_unstarted(str(flow_run.id))
            if self.policy.tier.gpus and "could not select device driver" in str(error):
                raise GpuNotAvailable(
                    self.policy.workspace.tier, self.policy.tier.gpus, str(error)
                ) from error
            image = configuration.image or ""
            if not await self._containers.image_present(image):
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                missing = ImageNotAvailable(image, first_line[:300] or type(error).__name__)
                self._infrastructure_crashes[flow_run.id] = InfrastructureCause.IMAGE_NOT_AVAILABLE
                raise missing from error
            raise error  # no container: Prefect's worker reports the failed submission
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        watch = watches[0] if watches else Watch(container_id)
        self._active.add(container_id)  # until finished: not the reconciliation's to take
        try:
            if error is not None:
                if not docker_lost(error):
                    raise error
                result = DockerWorkerResult(status_code=-1, identifier=started.infrastructure_pid)
            # An engine told to stop closes its API to new connections first, then stops
            # every container: one that exited for that looks like any other exit to
            # prefect-docker's wait. Asked here, on a new connection, it does not answer.
            engine_lost = error is not None or not await self._containers.answers()
            if engine_lost:
                # A daemon restart: wait for the engine, then finish the run from what the
                # container says. If it does not come back, the reconciliation does it.
                self._logger.warning(
                    "Lost the Docker engine while watching flow run %s; waiting up to %d s "
                    "for it to answer again",
                    flow_run.id,
                    DOCKER_WAIT_SECONDS,
                )
                await self._containers.wait_for_engine(DOCKER_WAIT_SECONDS)
            report = None
            if self._abandoned.is_set():
                return result  # the container may still run: the pool's next worker's
            # A worker told to stop lets a finish that began end (within FINISH_SECONDS):
            # else the exited container would wait for the next worker of the pool.
            with anyio.move_on_after(FINISH_SECONDS, shield=True):
                report = await self._finish(flow_run, watch, engine_lost=engine_lost)
            if report is not None and report.exit_code is not None:
                # prefect-docker's result carries the exit code of a container it did not
                # read again after its wait (without stream_output), so 0; Prefect puts
                # it in the run's "executed" event.
                result = DockerWorkerResult(
                    status_code=report.exit_code, identifier=started.infrastructure_pid
                )
        finally:
            self._active.discard(container_id)
        return result

    def _give_a_home(
        self, configuration: ManagedJobConfiguration, facts: ImageFacts | None
    ) -> None:
        """An image made to run as root (the official image) has no home for the runs'
        uid: HOME is / and not writable, so Prefect, pip and uv could not keep their
        files. Such a run gets HOME=/tmp, unless its deployment sets HOME."""
        if "HOME" in configuration.env:
            return
        if facts is not None and is_root_user(facts.user):
            configuration.env["HOME"] = "/tmp"

    async def _isolate_or_fall_back(
        self, flow_run: FlowRun, configuration: ManagedJobConfiguration, facts: ImageFacts | None
    ) -> None:
        """The isolated network needs `python3` in the image: a run whose image has none
        goes on the host's network, with a warning, unless the policy chose "isolated"
        explicitly (then it fails with what isolate.sh says)."""
        runtime = self.policy.runtime
        if runtime.network_mode != "isolated" or runtime.network_mode_chosen:
            return
        image = configuration.image or ""
        # An image not on the host (its start reports it) or not told: the run stays isolated.
        if (
            facts is None
            or await self._containers.runs_forwarder(facts.id, runtime.user) is not False
        ):
            return
        configuration.leave_isolation()
        message = (
            f"The image {image!r} has no python3 for the isolated network's forwarder, so "
            "this run uses the host's network: it reaches every service on the worker "
            "host's loopback (it still holds a token for its own run, not the worker's "
            "credential). Use an image with python3, or set runtime.network_mode = 'host' in the "
            "policy to choose this for every run and silence this warning."
        )
        self._logger.warning("Flow run %s: %s", flow_run.id, message)
        self.get_flow_run_logger(flow_run).warning(message)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: Any, grace_seconds: int = 30
    ) -> None:
        """prefect-docker's stop, of this run's managed container only.

        `infrastructure_pid` is read from the flow run, which its run could once change
        through the API: the container must carry the run's id and the managed labels of
        this API before anything is stopped."""
        _, container_id = self._parse_infrastructure_pid(infrastructure_pid)
        flow_run_id = (configuration.labels or {}).get("io.prefect.flow-run-id")
        report = await self._containers.inspect(container_id)
        if not runs_managed_container(report, flow_run_id):
            self._logger.warning(
                "Not stopping container %s for flow run %s: it is not that run's managed "
                "container (its infrastructure_pid %r names another)",
                container_id,
                flow_run_id,
                infrastructure_pid,
            )
            raise InfrastructureNotFound(
                f"container {container_id} is not flow run {flow_run_id}'s managed container"
            )
        await super().kill_infrastructure(infrastructure_pid, configuration, grace_seconds)

    def _create_and_start_container(self, configuration: Any) -> Any:
        """prefect-docker's create and start (in a worker thread), never for a run that a
        stopping worker scheduled again: a cancel leaves this thread going, and the run's
        container would start beside the one the pool's next worker makes."""
        run = (configuration.labels or {}).get("io.prefect.flow-run-id", "")
        done = threading.Event()
        with CREATIONS:
            if run in self._withdrawn:
                raise RuntimeError(
                    f"flow run {run} was scheduled again when its worker stopped; "
                    "its container is not made"
                )
            CREATING[run] = done
        try:
            return super()._create_and_start_container(configuration)
        finally:
            with CREATIONS:
                if CREATING.get(run) is done:
                    del CREATING[run]
            done.set()

    def _watch_container_safe(self, container: Any, configuration: Any, created_event: Any) -> Any:
        """prefect-docker's watch, in a daemon thread that an abandoned run leaves behind.

        The watch blocks on the container's output and exit; in the worker thread it would
        keep the process alive until every abandoned container ended.
        """
        return in_daemon_thread(
            partial(
                DockerWorker._watch_container_safe, self, container, configuration, created_event
            ),
            self._abandoned,
            f"watch {container.name}",
            abandoned_result=container,  # nobody waits for it any more
        )

    async def _watch_started(
        self, flow_run: FlowRun, started: _StartedProxy, watches: list[Watch]
    ) -> None:
        await started.event.wait()
        assert started.infrastructure_pid is not None
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        # Watched here: the reconciliation must not take it over as an orphan.
        self._active.add(container_id)
        waited = datetime.now(timezone.utc) - _scheduled_time(flow_run)
        self.stats.observe_start(max(0.0, waited.total_seconds()))
        watch = Watch(container_id)
        watches.append(watch)
        await self._watch(flow_run, watch)

    async def _watch(self, flow_run: FlowRun, watch: Watch) -> None:
        async def stop() -> None:
            await self._stop_for_run_time(flow_run, watch.container_id)

        self._watching[flow_run.id] = watch  # for the cancels its container ignores
        try:
            await self._containers.watch(watch, self.policy.tier.max_run_seconds, stop)
        finally:
            if self._watching.get(flow_run.id) is watch:
                del self._watching[flow_run.id]


def _scheduled_time(flow_run: FlowRun) -> datetime:
    details = flow_run.state.state_details if flow_run.state else None
    return (
        (details.scheduled_time if details else None)
        or flow_run.next_scheduled_start_time
        or flow_run.expected_start_time
        or datetime.now(timezone.utc)
    )
