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
- `run_states`: the states and log entries that say so.

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
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerResult

from prefect_managed.accounting import Accounting
from prefect_managed.concurrency import WorkspaceSlots
from prefect_managed.configuration import (
    ManagedJobConfiguration,
    ManagedVariables,
    disk_limit_unsupported,
)
from prefect_managed.container_output import log_entries
from prefect_managed.containers import Containers, Watch, in_daemon_thread
from prefect_managed.exceptions import (
    GpuNotAvailable,
    ImageNotAvailable,
    PolicyError,
    WorkerNotStarted,
)
from prefect_managed.ledger import UsageLedger
from prefect_managed.outcome import (
    CONTAINER_REMOVED_MESSAGE,
    DOCKER_ENGINE_LOST_MESSAGE,
    Ending,
    docker_lost,
    ending,
    outcome_of,
    refused_a_process,
)
from prefect_managed.policy import (
    Policy,
    awaiting_slot_message,
    container_output_dropped_message,
    out_of_memory_message,
    pids_limit_message,
    run_time_exceeded_message,
)
from prefect_managed.pools import PoolGate
from prefect_managed.run_states import QUOTA_EXHAUSTED, RunStates
from prefect_managed.settings import get_policy, get_settings
from prefect_managed.takeover import TakeOver

if TYPE_CHECKING:
    from prefect.client.schemas.responses import WorkerFlowRunResponse

__all__ = ["ManagedWorker", "WorkerStopped", "stopped_on_request"]

DOCKER_WAIT_SECONDS = 600.0


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


class ManagedWorker(DockerWorker, TakeOver):
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
        self._pool_gate: PoolGate | None = None
        # Set when the runs are abandoned: the threads that wait on their containers end.
        self._abandoned = threading.Event()
        self._stop_requested = False

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
            self.client, self.policy.concurrency_limit_name, tier.concurrency_limit, self._logger
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
        self._accounting = Accounting(ledger, self.policy, self.get_flow_run_logger)
        self._states = RunStates(
            self.client,
            self.get_flow_run_logger,
            self._propose_crashed_state,  # private: Prefect's Abort-aware Crashed proposal
            lambda: self.backend_id,
        )
        self._background = anyio.create_task_group()
        await self._exit_stack.enter_async_context(self._background)
        self._exit_stack.callback(self._background.cancel_scope.cancel)
        self._background.start_soon(self._renew_leases_forever)
        # Before the first admission: containers a dead predecessor left take their
        # slots first.
        await self._reconcile_guarded()
        self._background.start_soon(self._reconcile_forever)
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
        if self._stop_requested:
            self.abandon_runs()
            raise WorkerStopped(self.name)
        assert self._pool_gate is not None
        if not await self._pool_gate.is_served():
            return []
        return await super().get_and_submit_flow_runs()

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
            for entry in flow_run_response:
                if entry.flow_run.id not in self._submitting_flow_run_ids:
                    await self._states.refuse(entry.flow_run, QUOTA_EXHAUSTED, message)
            return []
        for flow_run_id in list(self._unslotted):  # taken-over runs come first
            if await self._slots.try_acquire(flow_run_id):
                self._unslotted.discard(flow_run_id)
        admitted: list[WorkerFlowRunResponse] = []
        for entry in sorted(flow_run_response, key=lambda e: _scheduled_time(e.flow_run)):
            flow_run = entry.flow_run
            if flow_run.id in self._submitting_flow_run_ids or self._slots.holds(flow_run.id):
                admitted.append(entry)
            elif not self._unslotted and await self._slots.try_acquire(flow_run.id):
                admitted.append(entry)
            else:
                await self._states.mark_awaiting_slot(
                    flow_run, _scheduled_time(flow_run), awaiting_slot_message(self.policy)
                )
        submitted = await super()._submit_scheduled_flow_runs(admitted)
        submitted_ids = {flow_run.id for flow_run in submitted}
        for entry in admitted:
            if entry.flow_run.id not in submitted_ids:
                await self._slots.release(entry.flow_run.id)
        return submitted

    def _release_limit_slot(self, flow_run_id: Any) -> None:
        super()._release_limit_slot(flow_run_id)
        if self._slots is not None and self._runs_task_group is not None:
            self._runs_task_group.start_soon(self._slots.release, flow_run_id)

    # -- one run ------------------------------------------------------------------

    async def run(  # type: ignore[override]
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
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
                raise ImageNotAvailable(image, first_line[:300] or type(error).__name__) from error
            raise error  # no container: Prefect's worker reports the failed submission
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        watch = watches[0] if watches else Watch(container_id)
        self._active.add(container_id)  # until finished: not the reconciliation's to take
        try:
            if error is not None:
                if not docker_lost(error):
                    raise error
                # A daemon restart: wait for the engine, then finish the run from what the
                # container says. If it does not come back, the reconciliation does it.
                self._logger.warning(
                    "Lost the Docker engine while watching flow run %s; waiting up to %d s "
                    "for it to answer again",
                    flow_run.id,
                    DOCKER_WAIT_SECONDS,
                )
                await self._containers.wait_for_engine(DOCKER_WAIT_SECONDS)
                result = DockerWorkerResult(status_code=-1, identifier=started.infrastructure_pid)
            await self._finish(flow_run, watch, engine_lost=error is not None)
        finally:
            self._active.discard(container_id)
        return result

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
        watch = Watch(container_id)
        watches.append(watch)
        await self._watch(flow_run, watch)

    async def _watch(self, flow_run: FlowRun, watch: Watch) -> None:
        async def stop() -> None:
            await self._stop_for_run_time(flow_run, watch.container_id)

        await self._containers.watch(watch, self.policy.tier.max_run_seconds, stop)

    async def _stop_for_run_time(self, flow_run: FlowRun, container_id: str) -> None:
        assert self._states is not None
        try:
            # The state first, so the engine's own report of the stop cannot replace it.
            await self._states.crash_with_cause(flow_run, run_time_exceeded_message(self.policy))
        except Exception:
            # The API may be down: stop the container anyway; `_finish` says why later.
            self._logger.warning(
                "Could not set flow run %s Crashed at its maximum run time; stopping its "
                "container first",
                flow_run.id,
                exc_info=True,
            )
        try:
            await run_sync_in_worker_thread(self._stop_container, container_id, 10)
        except InfrastructureNotFound:
            pass  # it exited on its own meanwhile

    async def _finish(self, flow_run: FlowRun, watch: Watch, engine_lost: bool = False) -> None:
        """Explain, record and remove a container that has exited.

        Uses only what the container itself says (labels, environment, state), so it
        serves runs this worker watched and containers it took over alike. The container
        is removed only once its usage is recorded: if recording fails, the next
        reconciliation finds it again.
        """
        assert self._states is not None and self._accounting is not None
        states, policy = self._states, self.policy
        report = await self._containers.inspect(watch.container_id)
        how = ending(report, timed_out=watch.timed_out, engine_lost=engine_lost)
        if report is None or how is Ending.REMOVED:
            self._logger.warning(
                "The container of flow run %s was removed by someone else before it was read",
                flow_run.id,
            )
            await states.crash_with_cause(flow_run, CONTAINER_REMOVED_MESSAGE)
            seen, last_seen = watch.report, watch.meter.last_seen
            if seen is not None and last_seen is not None:  # else it never ran: no compute
                final = await states.state(flow_run.id)
                outcome = outcome_of(final, timed_out=False, out_of_memory=False)
                await self._accounting.record(
                    flow_run, seen.removed(last_seen), watch.meter, outcome, self._work_pool_name
                )
            return
        if how is Ending.RUN_TIME:  # said when it was stopped; again if that failed
            await states.crash_with_cause(flow_run, run_time_exceeded_message(policy))
        elif how is Ending.OUT_OF_MEMORY:
            memory = report.memory_limit or policy.tier.memory_bytes
            await states.crash_with_cause(flow_run, out_of_memory_message(policy, memory))
        elif how is Ending.ENGINE_LOST:
            message = DOCKER_ENGINE_LOST_MESSAGE.format(exit_code=report.exit_code)
            await states.crash_with_cause(flow_run, message)
        elif report.exit_code is not None:
            # Exit code 0 too: after a failed pull step, Prefect's runner reports the run
            # Crashed and its process exits 0.
            output = await self._containers.output(report.id, get_settings().install_log_lines)
            await states.report_exit_before_flow_start(flow_run, report, output)
        await self._forward_output(flow_run, report.id)
        final = await states.ensure_final(flow_run, report.exit_code)
        if (
            report.pids_limit > 0
            and final is not None
            and (final.is_failed() or final.is_crashed())
            and (watch.meter.pids_exhausted or refused_a_process(final))
        ):
            # The flow's own error ("Resource temporarily unavailable") does not say why.
            final = await states.force_crashed(
                flow_run, pids_limit_message(policy, report.pids_limit)
            )
        outcome = outcome_of(
            final, timed_out=how is Ending.RUN_TIME, out_of_memory=report.oom_killed
        )
        try:
            await self._accounting.record(
                flow_run, report, watch.meter, outcome, self._work_pool_name
            )
        except Exception:
            self._logger.exception(
                "Could not record the usage of flow run %s; its container is kept and "
                "recorded at the next reconciliation",
                flow_run.id,
            )
            return
        await self._containers.remove(report.id)
        self._finished.append(report.id)

    async def _forward_output(self, flow_run: FlowRun, container_id: str) -> None:
        """The container's own output to the run's logs, once per run, at most the tier's
        `container_output_max_size` (its last part). Guarded: a failure is logged and
        the container is finished anyway."""
        assert self._states is not None
        limit = self.policy.tier.container_output_max_bytes
        if not limit:
            return
        try:
            if await self._states.container_output_sent(flow_run.id):
                return  # an earlier finish of this container, or the early-exit report
            output = await self._containers.output_tail(container_id, limit)
            if output is None:
                return
            since = output.earliest_record
            if since is not None:
                # Prefect's records that never reached the API (logged just before a
                # hard crash, when its API handler had no time to send them) are kept.
                output = output.with_records_not_in(
                    await self._states.messages_since(flow_run.id, since)
                )
            if not output.lines:
                return
            dropped = container_output_dropped_message(
                self.policy, output.dropped_bytes, output.dropped_lines
            )
            # Redacting and splitting up to the cap's size: off the event loop too.
            entries = await run_sync_in_worker_thread(
                log_entries, output, flow_run.id, self.backend_id, dropped
            )
            await self._states.send_logs(entries)
        except Exception:
            self._logger.warning(
                "Could not send the output of the container of flow run %s to its logs",
                flow_run.id,
                exc_info=True,
            )


def _scheduled_time(flow_run: FlowRun) -> datetime:
    details = flow_run.state.state_details if flow_run.state else None
    return (
        (details.scheduled_time if details else None)
        or flow_run.next_scheduled_start_time
        or flow_run.expected_start_time
        or datetime.now(timezone.utc)
    )
