"""A cancel that the run's container does not carry out is carried out by the worker.

Prefect 3.9's worker leaves a started run's cancel to Prefect's runner inside the
container: it signals the flow's process and the run ends Cancelled. When the container
still runs `runtime.cancel_grace_seconds` after the run became Cancelling (its flow
ignores the signal, or the runner is dead or stopped), `Cancels` stops the container,
after checking that it is that run's managed container of this API. `_finish` then ends
the run Cancelled (`RunStates.ensure_final`) and records it with the `cancelled`
outcome, as for any cancel.

`Cancels` is mixed into `ManagedWorker`. Every `CANCEL_CHECK_SECONDS` it asks the API
once which of the runs it watches (`_watching`: the runs it started and the containers
it took over) are Cancelling. Guarded: an error is logged and the next check tries again.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import InfrastructureNotFound
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_managed.configuration import API_LABEL, MANAGED_LABEL, api_label_value
from prefect_managed.messages import cancel_enforced_message

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from prefect_managed.containers import Containers, Watch
    from prefect_managed.outcome import ContainerReport
    from prefect_managed.policy import Policy

__all__ = ["CANCEL_CHECK_SECONDS", "Cancels", "runs_managed_container"]

#: Seconds between two checks for cancels the containers did not carry out.
CANCEL_CHECK_SECONDS = 5.0
#: Seconds Docker waits after its SIGTERM before it kills the container.
STOP_TIMEOUT_SECONDS = 5


def runs_managed_container(report: ContainerReport | None, flow_run_id: str | None) -> bool:
    """Whether the container is `flow_run_id`'s managed container of this Prefect API
    (what a worker checks before it stops a container a run's record names)."""
    if report is None or flow_run_id is None:
        return False
    labels = report.labels
    return (
        labels.get("io.prefect.flow-run-id") == flow_run_id
        and labels.get(MANAGED_LABEL) == "true"
        and labels.get(API_LABEL) == api_label_value()
    )


class Cancels:
    """Mixed into `ManagedWorker`: the cancels the worker carries out itself."""

    if TYPE_CHECKING:  # what it uses of the worker
        policy: Policy
        _logger: Any
        _containers: Containers
        _watching: dict[UUID, Watch]

        @property
        def client(self) -> PrefectClient: ...

        def get_flow_run_logger(self, flow_run: FlowRun) -> Any: ...

        def _stop_container(self, container_id: str, timeout: int) -> None: ...

    async def _enforce_cancels_forever(self) -> None:
        while True:
            await anyio.sleep(CANCEL_CHECK_SECONDS)
            try:
                await self._enforce_cancels()
            except Exception:  # the API may be unreachable for a while: try again later
                self._logger.warning("Could not check for cancelled flow runs", exc_info=True)

    async def _enforce_cancels(self) -> None:
        """Stop the containers of watched runs Cancelling for longer than the grace."""
        watched = {run_id: watch for run_id, watch in self._watching.items() if not watch.cancelled}
        if not watched:
            return
        cancelling = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(watched)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        grace = self.policy.runtime.cancel_grace_seconds
        now = datetime.now(timezone.utc)
        for flow_run in cancelling:
            watch = watched.get(flow_run.id)
            if watch is None or flow_run.state is None:
                continue
            waited = (now - flow_run.state.timestamp).total_seconds()
            if waited >= grace:
                await self._stop_cancelled(flow_run, watch, waited)

    async def _stop_cancelled(self, flow_run: FlowRun, watch: Watch, waited: float) -> None:
        report = await self._containers.inspect(watch.container_id)
        if report is None or not report.running:
            return  # ended meanwhile: its finish makes the run Cancelled
        if not runs_managed_container(report, str(flow_run.id)):
            self._logger.warning(
                "Not stopping container %s of cancelled flow run %s: it is not that run's "
                "managed container",
                watch.container_id,
                flow_run.id,
            )
            watch.cancelled = True  # never asked again
            return
        message = cancel_enforced_message(int(waited))
        self._logger.warning("Flow run %s: %s", flow_run.id, message)
        self.get_flow_run_logger(flow_run).warning(message)
        watch.cancelled = True
        try:
            await run_sync_in_worker_thread(
                self._stop_container, watch.container_id, STOP_TIMEOUT_SECONDS
            )
        except InfrastructureNotFound:
            pass  # it ended meanwhile
        except Exception:
            watch.cancelled = False  # tried again at the next check
            raise
