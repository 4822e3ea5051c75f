"""`ManagedWorker`: prefect-docker's worker with the managed pool's contract.

prefect-docker creates, watches and stops the containers. This worker adds what
managed execution needs on top, and delegates the policy questions to `policy`:

- the policy is read once, when the worker is made; a bad file stops it there;
- the pool is served only while it is one of the workspace's oldest `pool_limit` pools;
- a run starts only with a slot of the workspace's concurrency limit (`concurrency`),
  otherwise it stays Scheduled as `AwaitingConcurrencySlot`;
- a container that runs out of memory, outlives the tier's maximum run time, or exits
  before its flow started ends its run Crashed with a message saying why (the output of
  an early exit goes to the flow run's logs);
- every container is removed once it has been read.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from contextlib import closing
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
import docker.errors
import httpx
import requests.exceptions
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType
from prefect.client.schemas.objects import FlowRun, State, WorkerStatus
from prefect.events import emit_event
from prefect.exceptions import (
    Abort,
    InfrastructureNotFound,
    ObjectNotFound,
    PrefectHTTPStatusError,
)
from prefect.states import Crashed, Failed, Scheduled
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerResult

from prefect_managed.concurrency import WorkspaceSlots
from prefect_managed.configuration import (
    API_LABEL,
    MANAGED_LABEL,
    WORKSPACE_LABEL,
    ManagedJobConfiguration,
    ManagedVariables,
    api_label_value,
    disk_limit_unsupported,
)
from prefect_managed.dependencies import describe_early_exit, split_extra_pip_packages
from prefect_managed.exceptions import ImageNotAvailable, PolicyError
from prefect_managed.ledger import UsageLedger
from prefect_managed.metering import Meter, parse_docker_time
from prefect_managed.policy import (
    Policy,
    awaiting_slot_message,
    out_of_memory_message,
    pids_limit_message,
    pool_not_served_message,
    run_time_exceeded_message,
    served_pool_names,
)
from prefect_managed.settings import get_policy, get_settings
from prefect_managed.sources import describe_pull_step_failure, redact_url_credentials
from prefect_managed.usage import (
    MonthlyUsage,
    Outcome,
    UsageRecord,
    crossed_thresholds,
    month_of,
    quota_exhausted_message,
    quota_warning_message,
)

if TYPE_CHECKING:
    from prefect.client.schemas.responses import WorkerFlowRunResponse

__all__ = ["ManagedWorker"]

CONTAINER_OUTPUT_LOGGER = "prefect_managed.container"
AWAITING_SLOT = "AwaitingConcurrencySlot"
POOL_CHECK_SECONDS = 10.0
QUOTA_CHECK_SECONDS = 10.0
STATS_INTERVAL = 2.0
RECONCILE_SECONDS = 60.0
QUOTA_EXHAUSTED = "QuotaExhausted"
DOCKER_WAIT_SECONDS = 600.0

CONTAINER_REMOVED_MESSAGE = (
    "The flow run's container was removed from outside the worker (for example with "
    "`docker rm -f`) before the flow run finished, so the flow run was stopped with it. "
    "Its usage is counted until the worker last saw the container running. Run it again, "
    "and ask whoever manages the Docker host not to remove running flow run containers."
)
DOCKER_ENGINE_LOST_MESSAGE = (
    "The Docker engine stopped while the flow run was running (a restart of the Docker "
    "daemon stops its containers unless live-restore is on); its container exited with "
    "code {exit_code}. Run it again once the engine is back."
)


def _refused_a_process(state: State) -> bool:
    """Whether the run ended on the kernel refusing a new process or thread (EAGAIN from
    fork or clone), which in a container with a process limit means it reached it."""
    message = state.message or ""
    return "[Errno 11] Resource temporarily unavailable" in message or (
        "can't start new thread" in message
    )


def _docker_lost(exc: BaseException) -> bool:
    """Whether `exc` says the Docker engine could not be reached (not a 404 or 409)."""
    while exc is not None:
        if isinstance(exc, requests.exceptions.ConnectionError):
            return True
        if isinstance(exc, docker.errors.DockerException) and not isinstance(
            exc, docker.errors.APIError
        ):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


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
            self._inner.started(value)


class ManagedWorker(DockerWorker):
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
            print(f"Error: {exc}", file=sys.stderr)
            raise SystemExit(1) from exc
        super().__init__(*args, **kwargs)
        self._slots: WorkspaceSlots | None = None
        self._ledger: UsageLedger | None = None
        self._background: anyio.abc.TaskGroup | None = None
        self._active: set[str] = set()  # containers being watched (runs and orphans)
        # Containers this worker finished lately: a reconciliation that listed one just
        # before it was removed must not take it over.
        self._finished: deque[str] = deque(maxlen=1000)
        self._pool_served = True
        self._pool_checked_at = -POOL_CHECK_SECONDS
        self._month_usage: MonthlyUsage | None = None
        self._usage_checked_at = -QUOTA_CHECK_SECONDS

    async def setup(self) -> None:
        await super().setup()
        if self.policy.runtime.container_disk is not None:
            info = await run_sync_in_worker_thread(self._docker_info)
            why = disk_limit_unsupported(info.get("Driver", ""), info.get("DriverStatus") or [])
            if why is not None:
                raise PolicyError(
                    get_settings().resolved_policy_file(),
                    f"runtime.container_disk is set but {why}; remove runtime.container_disk "
                    "or move the Docker engine's data to such a file system",
                )
        self._slots = WorkspaceSlots(
            self.client,
            self.policy.concurrency_limit_name,
            self.policy.tier.concurrency_limit,
            self._logger,
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
        self._ledger = UsageLedger(self.client, self.policy.workspace.name, logger=self._logger)
        self._background = anyio.create_task_group()
        await self._exit_stack.enter_async_context(self._background)
        self._exit_stack.callback(self._background.cancel_scope.cancel)
        self._background.start_soon(self._renew_leases_forever)
        self._background.start_soon(self._reconcile_forever)
        tier = self.policy.tier
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
        if not await self._is_pool_served():
            return []
        return await super().get_and_submit_flow_runs()

    async def _is_pool_served(self) -> bool:
        if time.monotonic() - self._pool_checked_at < POOL_CHECK_SECONDS:
            return self._pool_served
        pools = await self.client.read_work_pools(
            work_pool_filter=WorkPoolFilter(type=WorkPoolFilterType(any_=[self.type]))
        )
        served = served_pool_names(
            [(pool.name, pool.created) for pool in pools], self.policy.tier.pool_limit
        )
        is_served = self._work_pool_name in served
        if is_served != self._pool_served or (not is_served and self._pool_checked_at < 0):
            if is_served:
                self._logger.info("Work pool %r is served again", self._work_pool_name)
            else:
                self._logger.error(
                    "%s", pool_not_served_message(self.policy, self._work_pool_name, served)
                )
        self._pool_served = is_served
        self._pool_checked_at = time.monotonic()
        return is_served

    async def _submit_scheduled_flow_runs(
        self, flow_run_response: list[WorkerFlowRunResponse]
    ) -> list[FlowRun]:
        """Submit, oldest first, only the runs that get a workspace concurrency slot.

        Once the workspace's monthly compute quota is used up, new runs end Failed
        (`QuotaExhausted`) instead; runs already running finish.
        """
        assert self._slots is not None
        if flow_run_response and await self._quota_exhausted():
            for entry in flow_run_response:
                if entry.flow_run.id not in self._submitting_flow_run_ids:
                    await self._refuse_over_quota(entry.flow_run)
            return []
        admitted: list[WorkerFlowRunResponse] = []
        for entry in sorted(flow_run_response, key=lambda e: _scheduled_time(e.flow_run)):
            flow_run = entry.flow_run
            if flow_run.id in self._submitting_flow_run_ids or self._slots.holds(flow_run.id):
                admitted.append(entry)
            elif await self._slots.try_acquire(flow_run.id):
                admitted.append(entry)
            else:
                await self._mark_awaiting_slot(flow_run)
        submitted = await super()._submit_scheduled_flow_runs(admitted)
        submitted_ids = {flow_run.id for flow_run in submitted}
        for entry in admitted:
            if entry.flow_run.id not in submitted_ids:
                await self._slots.release(entry.flow_run.id)
        return submitted

    async def _quota_exhausted(self) -> bool:
        assert self._ledger is not None
        month = month_of(datetime.now(timezone.utc))
        stale = time.monotonic() - self._usage_checked_at >= QUOTA_CHECK_SECONDS
        if stale or self._month_usage is None or self._month_usage.month != month:
            self._month_usage = await self._ledger.month_usage(month)
            self._usage_checked_at = time.monotonic()
        return self._month_usage.hours >= self.policy.tier.compute_hours_per_month

    async def _refuse_over_quota(self, flow_run: FlowRun) -> None:
        assert self._month_usage is not None
        message = quota_exhausted_message(
            self._month_usage, self.policy.tier.compute_hours_per_month, self.policy.workspace.tier
        )
        try:
            await self.client.set_flow_run_state(
                flow_run.id, Failed(name=QUOTA_EXHAUSTED, message=message)
            )
        except Abort:
            return
        self.get_flow_run_logger(flow_run).error("%s", message)

    async def _mark_awaiting_slot(self, flow_run: FlowRun) -> None:
        if flow_run.state is None or flow_run.state.name == AWAITING_SLOT:
            return
        try:
            await self.client.set_flow_run_state(
                flow_run.id,
                Scheduled(
                    name=AWAITING_SLOT,
                    scheduled_time=_scheduled_time(flow_run),
                    message=awaiting_slot_message(self.policy),
                ),
            )
        except Abort:
            return
        self.get_flow_run_logger(flow_run).info("%s", awaiting_slot_message(self.policy))

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
        timed_out = anyio.Event()
        meter = Meter()
        error: Exception | None = None
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(self._stop_at_max_run_time, flow_run, started, timed_out)
            watchers.start_soon(self._sample_stats, started, meter)
            try:
                result = await super().run(flow_run, configuration, started)  # type: ignore[arg-type]
            except Exception as exc:
                # Kept out of the task group, which would wrap it in an ExceptionGroup.
                error = exc
            finally:
                watchers.cancel_scope.cancel()
        if started.infrastructure_pid is None:
            assert error is not None
            image = configuration.image or ""
            if not await run_sync_in_worker_thread(self._image_present, image):
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ImageNotAvailable(image, first_line[:300] or type(error).__name__) from error
            raise error  # no container: Prefect's worker reports the failed submission
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        try:
            if error is not None:
                if not _docker_lost(error):
                    raise error
                # A daemon restart: wait for the engine, then finish the run from what the
                # container says. If it does not come back, the reconciliation does it.
                self._logger.warning(
                    "Lost the Docker engine while watching flow run %s; waiting up to %d s "
                    "for it to answer again",
                    flow_run.id,
                    DOCKER_WAIT_SECONDS,
                )
                await self._wait_for_docker()
                result = DockerWorkerResult(status_code=-1, identifier=started.infrastructure_pid)
            await self._finish(
                flow_run,
                container_id,
                meter,
                timed_out=timed_out.is_set(),
                engine_lost=error is not None,
            )
        finally:
            self._active.discard(container_id)
        return result

    async def _wait_for_docker(self) -> None:
        with anyio.fail_after(DOCKER_WAIT_SECONDS):
            while True:
                try:
                    await run_sync_in_worker_thread(self._ping_docker)
                    return
                except (RuntimeError, docker.errors.DockerException, requests.RequestException):
                    await anyio.sleep(2)

    async def _sample_stats(self, started: _StartedProxy, meter: Meter) -> None:
        await started.event.wait()
        assert started.infrastructure_pid is not None
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        # Watched here: the reconciliation must not take it over as an orphan.
        self._active.add(container_id)
        try:
            # One Docker client for the whole run: a sample every few seconds per running
            # container must not pay for building a client each time.
            with closing(await run_sync_in_worker_thread(self._get_client)) as client:
                # What the container is, kept in case it is removed before the worker reads it.
                meter.container = await run_sync_in_worker_thread(
                    self._inspect_with, client, container_id
                )
                while True:
                    stats = await run_sync_in_worker_thread(self._stats, client, container_id)
                    if stats is None:
                        return
                    meter.add(stats)
                    await anyio.sleep(STATS_INTERVAL)
        except (RuntimeError, docker.errors.DockerException, requests.RequestException):
            # Measuring is not worth a run: a container being removed answers stats with
            # an empty body, an engine going away with no answer. The run's watcher and
            # `_finish` deal with both.
            self._logger.debug("Stopped sampling container %s", container_id, exc_info=True)
            return

    async def _stop_at_max_run_time(
        self, flow_run: FlowRun, started: _StartedProxy, timed_out: anyio.Event
    ) -> None:
        await started.event.wait()
        await anyio.sleep(self.policy.tier.max_run_seconds)
        assert started.infrastructure_pid is not None
        timed_out.set()
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        await self._stop_for_run_time(flow_run, container_id)

    async def _stop_for_run_time(self, flow_run: FlowRun, container_id: str) -> None:
        # The state first, so the engine's own report of the stop cannot replace it.
        await self._crash_with_cause(flow_run, run_time_exceeded_message(self.policy))
        try:
            await run_sync_in_worker_thread(self._stop_container, container_id, 10)
        except InfrastructureNotFound:
            pass  # it exited on its own meanwhile

    async def _finish(
        self,
        flow_run: FlowRun,
        container_id: str,
        meter: Meter,
        timed_out: bool = False,
        engine_lost: bool = False,
    ) -> None:
        """Explain, record and remove a container that has exited.

        Uses only what the container itself says (labels, environment, state), so it
        serves runs this worker watched and containers it found orphaned alike. The
        container is removed only once its usage is recorded: if recording fails, the
        next reconciliation finds it again.
        """
        attrs = await run_sync_in_worker_thread(self._inspect, container_id)
        if (
            attrs is None
            or attrs["State"].get("Dead")
            or attrs["State"].get("Status") == "removing"
        ):
            await self._finish_removed(flow_run, meter)
            return
        state = attrs["State"]
        exit_code = state.get("ExitCode")
        oom = bool(state.get("OOMKilled"))
        if timed_out:
            pass  # reported when the container was stopped
        elif oom:
            memory = int(attrs["HostConfig"].get("Memory") or self.policy.tier.memory_bytes)
            await self._crash_with_cause(flow_run, out_of_memory_message(self.policy, memory))
        elif engine_lost:
            await self._crash_with_cause(
                flow_run, DOCKER_ENGINE_LOST_MESSAGE.format(exit_code=exit_code)
            )
        elif exit_code is not None:
            # Exit code 0 too: after a failed pull step, Prefect's runner reports the run
            # Crashed and its process exits 0.
            await self._report_exit_before_flow_start(flow_run, attrs, exit_code)
        final = await self._ensure_final_state(flow_run, exit_code)
        pids_limit = int(attrs["HostConfig"].get("PidsLimit") or 0)
        if (
            pids_limit > 0
            and final is not None
            and (final.is_failed() or final.is_crashed())
            and (meter.pids_exhausted or _refused_a_process(final))
        ):
            # The flow's own error ("Resource temporarily unavailable") does not say why.
            message = pids_limit_message(self.policy, pids_limit)
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            self.get_flow_run_logger(flow_run).error("%s", message)
            final = (await self.client.read_flow_run(flow_run.id)).state
        outcome = outcome_of(final, timed_out=timed_out, out_of_memory=oom)
        try:
            await self._record_usage(flow_run, attrs, meter, outcome, exit_code)
        except Exception:
            self._logger.exception(
                "Could not record the usage of flow run %s; its container is kept and "
                "recorded at the next reconciliation",
                flow_run.id,
            )
            return
        await run_sync_in_worker_thread(self._remove_container, container_id)
        self._finished.append(container_id)

    async def _finish_removed(self, flow_run: FlowRun, meter: Meter) -> None:
        """A container removed by someone else before the worker read it: the run ends
        Crashed saying so (unless it had finished), and its usage is recorded from what
        the worker saw while it ran."""
        self._logger.warning(
            "The container of flow run %s was removed by someone else before it was read",
            flow_run.id,
        )
        await self._crash_with_cause(flow_run, CONTAINER_REMOVED_MESSAGE)
        final = (await self.client.read_flow_run(flow_run.id)).state
        if meter.container is None or meter.last_seen is None:
            return  # never seen running: no compute to count
        attrs = {
            **meter.container,
            "State": {
                **meter.container["State"],
                "FinishedAt": meter.last_seen.isoformat().replace("+00:00", "Z"),
            },
        }
        outcome = outcome_of(final, timed_out=False, out_of_memory=False)
        await self._record_usage(flow_run, attrs, meter, outcome, None)

    async def _ensure_final_state(self, flow_run: FlowRun, exit_code: int | None) -> State | None:
        """The run's state, made Crashed if its container is gone but it is not final."""
        current = (await self.client.read_flow_run(flow_run.id)).state
        if current is not None and (current.is_final() or current.is_cancelling()):
            return current
        await self._propose_crashed_state(
            flow_run,
            f"The flow run's container exited with code {exit_code} without the flow run "
            "reporting a final state.",
        )
        return (await self.client.read_flow_run(flow_run.id)).state

    async def _record_usage(
        self,
        flow_run: FlowRun,
        attrs: dict[str, Any],
        meter: Meter,
        outcome: Outcome,
        exit_code: int | None,
    ) -> None:
        assert self._ledger is not None
        labels = attrs["Config"].get("Labels") or {}
        started_at = parse_docker_time(attrs["State"].get("StartedAt", ""))
        finished_at = parse_docker_time(attrs["State"].get("FinishedAt", ""))
        if started_at is None or finished_at is None:
            return  # the container never ran: no compute to count
        tier = self.policy.tier
        record = UsageRecord.from_timestamps(
            started_at,
            finished_at,
            flow_run_id=flow_run.id,
            flow_run_name=flow_run.name,
            workspace=self.policy.workspace.name,
            tier=self.policy.workspace.tier,
            pool=labels.get("io.prefect.work-pool-name", self._work_pool_name),
            deployment=labels.get("io.prefect.deployment-name"),
            image=attrs["Config"].get("Image", ""),
            peak_memory_bytes=meter.peak_memory_bytes,
            cpu_seconds=meter.cpu_seconds,
            outcome=outcome,
            exit_code=exit_code,
        )
        published = await self._ledger.publish(
            record, tier.compute_hours_per_month, self.policy.workspace.tier
        )
        if published is None:
            return
        before, after = published
        self._month_usage = after
        for threshold in crossed_thresholds(
            before.hours, after.hours, tier.compute_hours_per_month
        ):
            message = quota_warning_message(
                after, tier.compute_hours_per_month, self.policy.workspace.tier, threshold
            )
            self.get_flow_run_logger(flow_run).warning("%s", message)
            emit_event(
                event="prefect-managed.quota.warning",
                resource={
                    "prefect.resource.id": f"prefect-managed.workspace.{after.workspace}",
                    "prefect.resource.name": after.workspace,
                },
                payload={
                    "threshold_percent": threshold,
                    "hours_used": round(after.hours, 4),
                    "quota_hours": tier.compute_hours_per_month,
                    "month": after.month,
                    "message": message,
                },
            )

    async def _crash_with_cause(self, flow_run: FlowRun, message: str) -> None:
        """End the run Crashed with `message`, replacing a Crashed state without a cause.

        The engine in the container may have reported its own Crashed state already
        (its flow process was killed); the worker knows why, so its message wins.
        """
        current = (await self.client.read_flow_run(flow_run.id)).state
        if current is not None and current.is_crashed():
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            self.get_flow_run_logger(flow_run).error("%s", message)
        elif current is None or not current.is_final():
            await self._propose_crashed_state(flow_run, message)

    async def _report_exit_before_flow_start(
        self, flow_run: FlowRun, attrs: dict[str, Any], exit_code: int
    ) -> None:
        """A container that exits before its flow started: its output goes to the flow
        run's logs from here (URL credentials redacted), and the run ends Crashed with a
        message saying why.

        A failed install leaves the run Pending (the engine never ran). A failed pull
        step leaves it Crashed with only "Process exited with status code: 1" from
        Prefect's runner, never having run (run count 0); that message is replaced with
        the step, its source and its error.
        """
        current = await self.client.read_flow_run(flow_run.id)
        crashed_before_start = (
            current.state is not None and current.state.is_crashed() and current.run_count == 0
        )
        if current.state is None or not (current.state.is_pending() or crashed_before_start):
            return
        lines = await run_sync_in_worker_thread(
            self._container_output, attrs["Id"], get_settings().install_log_lines
        )
        lines = [redact_url_credentials(line) for line in lines]
        env = dict(item.split("=", 1) for item in attrs["Config"].get("Env") or [] if "=" in item)
        pip_packages = split_extra_pip_packages(env.get("EXTRA_PIP_PACKAGES"))
        message = describe_pull_step_failure(
            exit_code, lines, await self._pull_steps(current)
        ) or describe_early_exit(exit_code, pip_packages, lines)
        await self.client.create_logs(
            [
                LogCreate(
                    name=CONTAINER_OUTPUT_LOGGER,
                    level=logging.ERROR,
                    message=f"{message}\nContainer output:\n" + "\n".join(lines),
                    timestamp=datetime.now(timezone.utc),
                    flow_run_id=flow_run.id,
                    worker_id=self.backend_id,
                )
            ]
        )
        if crashed_before_start:
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        else:
            await self._propose_crashed_state(flow_run, message)

    async def _pull_steps(self, flow_run: FlowRun) -> list[dict[str, Any]]:
        """The pull steps of the run's deployment, to name the source that failed."""
        if flow_run.deployment_id is None:
            return []
        try:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
        except ObjectNotFound:
            return []
        return list(deployment.pull_steps or [])

    # -- containers a previous worker left behind ----------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self._reconcile_orphans()
            except Exception:
                self._logger.warning("Could not reconcile orphaned containers", exc_info=True)
            await anyio.sleep(RECONCILE_SECONDS)

    async def _reconcile_orphans(self) -> None:
        """Find this pool's containers that no live worker watches, and finish them."""
        containers = await run_sync_in_worker_thread(self._pool_containers)
        if not containers:
            return
        online = {
            worker.name
            for worker in await self.client.read_workers_for_work_pool(self._work_pool_name)
            if worker.status == WorkerStatus.ONLINE and worker.name != self.name
        }
        for attrs in containers:
            labels = attrs["Config"].get("Labels") or {}
            if (
                attrs["Id"] in self._active
                or attrs["Id"] in self._finished
                or labels.get("io.prefect.worker-name") in online
            ):
                continue
            flow_run_id = labels.get("io.prefect.flow-run-id")
            if not flow_run_id:
                continue
            try:
                flow_run = await self.client.read_flow_run(UUID(flow_run_id))
            except ObjectNotFound:
                continue  # not a run of this Prefect server: not ours to touch
            self._active.add(attrs["Id"])
            self._logger.info(
                "Taking over container %s of flow run %s, left by worker %r",
                attrs["Name"],
                flow_run_id,
                labels.get("io.prefect.worker-name"),
            )
            assert self._background is not None
            self._background.start_soon(self._adopt, flow_run, attrs)

    async def _adopt(self, flow_run: FlowRun, attrs: dict[str, Any]) -> None:
        """Watch an orphaned container to its end (within the run time limit), then finish it."""
        container_id = attrs["Id"]
        meter = Meter(container=attrs)
        timed_out = False
        started_at = parse_docker_time(attrs["State"].get("StartedAt", ""))
        try:
            with closing(await run_sync_in_worker_thread(self._get_client)) as client:
                while True:
                    current = await run_sync_in_worker_thread(
                        self._inspect_with, client, container_id
                    )
                    if current is None or not current["State"].get("Running"):
                        break
                    stats = await run_sync_in_worker_thread(self._stats, client, container_id)
                    if stats is not None:
                        meter.add(stats)
                    elapsed = (
                        (datetime.now(timezone.utc) - started_at).total_seconds()
                        if started_at
                        else 0
                    )
                    if not timed_out and elapsed > self.policy.tier.max_run_seconds:
                        timed_out = True
                        await self._stop_for_run_time(flow_run, container_id)
                    await anyio.sleep(STATS_INTERVAL)
            await self._finish(flow_run, container_id, meter, timed_out=timed_out)
        finally:
            self._active.discard(container_id)

    # -- Docker, in worker threads --------------------------------------------------

    def _pool_containers(self) -> list[dict[str, Any]]:
        filters = {
            "label": [
                f"{MANAGED_LABEL}=true",
                f"{WORKSPACE_LABEL}={self.policy.workspace.name}",
                f"{API_LABEL}={api_label_value()}",
                f"io.prefect.work-pool-name={self._work_pool_name}",
            ]
        }
        with closing(self._get_client()) as client:
            found = client.api.containers(all=True, filters=filters)
            return [
                attrs
                for attrs in (self._inspect_with(client, item["Id"]) for item in found)
                if attrs is not None
            ]

    def _inspect(self, container_id: str) -> dict[str, Any] | None:
        with closing(self._get_client()) as client:
            return self._inspect_with(client, container_id)

    @staticmethod
    def _inspect_with(client: docker.DockerClient, container_id: str) -> dict[str, Any] | None:
        try:
            return client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None

    @staticmethod
    def _stats(client: docker.DockerClient, container_id: str) -> dict[str, Any] | None:
        try:
            return client.api.stats(container_id, stream=False, one_shot=True)
        except (docker.errors.NotFound, requests.exceptions.JSONDecodeError):
            return None  # gone, or being removed (an empty answer)

    def _container_output(self, container_id: str, tail: int) -> list[str]:
        with closing(self._get_client()) as client:
            try:
                raw: bytes = client.api.logs(container_id, stdout=True, stderr=True, tail=tail)
            except docker.errors.APIError:  # 404 gone, 409 dead or being removed
                return ["(the container was removed before its output could be read)"]
        return raw.decode(errors="replace").splitlines()

    def _image_present(self, image: str) -> bool:
        with closing(self._get_client()) as client:
            try:
                client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                return False
            except docker.errors.APIError:
                return True  # not the image's fault: report the original error
        return True

    def _docker_info(self) -> dict[str, Any]:
        with closing(self._get_client()) as client:
            return client.info()

    def _ping_docker(self) -> None:
        with closing(self._get_client()) as client:
            client.ping()

    def _remove_container(self, container_id: str) -> None:
        with closing(self._get_client()) as client:
            try:
                client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                return
        self._logger.debug("Removed Docker container %r", container_id)


def outcome_of(state: State | None, *, timed_out: bool, out_of_memory: bool) -> Outcome:
    if timed_out:
        return Outcome.TIMED_OUT
    if out_of_memory:
        return Outcome.OUT_OF_MEMORY
    if state is None:
        return Outcome.CRASHED
    if state.is_completed():
        return Outcome.COMPLETED
    if state.is_failed():
        return Outcome.FAILED
    if state.is_cancelled() or state.is_cancelling():
        return Outcome.CANCELLED
    return Outcome.CRASHED


def _scheduled_time(flow_run: FlowRun) -> datetime:
    details = flow_run.state.state_details if flow_run.state else None
    return (
        (details.scheduled_time if details else None)
        or flow_run.next_scheduled_start_time
        or flow_run.expected_start_time
        or datetime.now(timezone.utc)
    )
