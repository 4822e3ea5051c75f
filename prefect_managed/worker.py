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
from contextlib import closing
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import docker.errors
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import Abort, InfrastructureNotFound
from prefect.states import Crashed, Scheduled
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerResult

from prefect_managed.concurrency import WorkspaceSlots
from prefect_managed.configuration import ManagedJobConfiguration, ManagedVariables
from prefect_managed.dependencies import describe_early_exit
from prefect_managed.exceptions import PolicyError
from prefect_managed.policy import (
    Policy,
    awaiting_slot_message,
    out_of_memory_message,
    pool_not_served_message,
    run_time_exceeded_message,
    served_pool_names,
)
from prefect_managed.settings import get_policy, get_settings

if TYPE_CHECKING:
    from prefect.client.schemas.responses import WorkerFlowRunResponse

__all__ = ["ManagedWorker"]

CONTAINER_OUTPUT_LOGGER = "prefect_managed.container"
AWAITING_SLOT = "AwaitingConcurrencySlot"
POOL_CHECK_SECONDS = 10.0


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
        self._pool_served = True
        self._pool_checked_at = -POOL_CHECK_SECONDS

    async def setup(self) -> None:
        await super().setup()
        self._slots = WorkspaceSlots(
            self.client,
            self.policy.concurrency_limit_name,
            self.policy.tier.concurrency_limit,
            self._logger,
        )
        await self._slots.ensure_limit()
        renewals = anyio.create_task_group()
        await self._exit_stack.enter_async_context(renewals)
        self._exit_stack.callback(renewals.cancel_scope.cancel)
        renewals.start_soon(self._renew_leases_forever)
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
        """Submit, oldest first, only the runs that get a workspace concurrency slot."""
        assert self._slots is not None
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
        async with anyio.create_task_group() as deadline:
            deadline.start_soon(self._stop_at_max_run_time, flow_run, started, timed_out)
            result = await super().run(flow_run, configuration, started)  # type: ignore[arg-type]
            deadline.cancel_scope.cancel()
        _, container_id = self._parse_infrastructure_pid(result.identifier)
        try:
            if timed_out.is_set():
                pass  # already reported when the container was stopped
            elif await run_sync_in_worker_thread(self._was_oom_killed, container_id):
                memory = int(configuration.mem_limit or self.policy.tier.memory_bytes)
                await self._crash_with_cause(flow_run, out_of_memory_message(self.policy, memory))
            elif result.status_code != 0:
                await self._report_exit_before_flow_start(
                    flow_run, configuration, container_id, result.status_code
                )
        finally:
            await run_sync_in_worker_thread(self._remove_container, container_id)
        return result

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

    async def _stop_at_max_run_time(
        self, flow_run: FlowRun, started: _StartedProxy, timed_out: anyio.Event
    ) -> None:
        await started.event.wait()
        await anyio.sleep(self.policy.tier.max_run_seconds)
        assert started.infrastructure_pid is not None
        timed_out.set()
        # The state first, so the engine's own report of the stop cannot replace it.
        await self._crash_with_cause(flow_run, run_time_exceeded_message(self.policy))
        _, container_id = self._parse_infrastructure_pid(started.infrastructure_pid)
        try:
            await run_sync_in_worker_thread(self._stop_container, container_id, 10)
        except InfrastructureNotFound:
            pass  # it exited on its own meanwhile

    async def _report_exit_before_flow_start(
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        container_id: str,
        exit_code: int,
    ) -> None:
        """A container that exits while its run is still Pending never started the flow.

        The engine in the container reports nothing then, so the container's output
        (the installer's, usually) goes to the flow run's logs from here, and the run
        ends Crashed with a message saying why.
        """
        current = await self.client.read_flow_run(flow_run.id)
        if current.state is None or not current.state.is_pending():
            return
        lines = await run_sync_in_worker_thread(
            self._container_output, container_id, get_settings().install_log_lines
        )
        message = describe_early_exit(exit_code, configuration.pip_packages, lines)
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
        await self._propose_crashed_state(flow_run, message)

    def _was_oom_killed(self, container_id: str) -> bool:
        with closing(self._get_client()) as client:
            try:
                state = client.api.inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                return False
        return bool(state.get("OOMKilled"))

    def _container_output(self, container_id: str, tail: int) -> list[str]:
        with closing(self._get_client()) as client:
            try:
                raw: bytes = client.containers.get(container_id).logs(
                    stdout=True, stderr=True, tail=tail
                )
            except docker.errors.NotFound:
                return ["(the container was removed before its output could be read)"]
        return raw.decode(errors="replace").splitlines()

    def _remove_container(self, container_id: str) -> None:
        with closing(self._get_client()) as client:
            try:
                client.containers.get(container_id).remove(force=True)
            except docker.errors.NotFound:
                return
        self._logger.debug("Removed Docker container %r", container_id)


def _scheduled_time(flow_run: FlowRun) -> datetime:
    details = flow_run.state.state_details if flow_run.state else None
    return (
        (details.scheduled_time if details else None)
        or flow_run.next_scheduled_start_time
        or flow_run.expected_start_time
        or datetime.now(timezone.utc)
    )
