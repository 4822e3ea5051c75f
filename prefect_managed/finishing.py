"""How a run's container ends: the run-time stop, then explaining, recording and
removing the container, and scheduling again a run that crashed for an infrastructure
reason.

`Finishing` is mixed into `ManagedWorker`. `_finish` uses only what the container itself
says (labels, environment, state), so it serves the runs this worker watched and the
containers it took over from a dead worker alike; the decisions are `outcome`'s and
`retries`' (pure), the states `run_states`', the record `accounting`'s.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import anyio
import httpx
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound, PrefectHTTPStatusError
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from pydantic import ValidationError

from prefect_managed.container_output import log_entries
from prefect_managed.containers import Watch
from prefect_managed.messages import (
    container_output_dropped_message,
    out_of_memory_message,
    pids_limit_message,
    run_time_exceeded_message,
)
from prefect_managed.outcome import (
    CONTAINER_REMOVED_MESSAGE,
    DOCKER_ENGINE_LOST_MESSAGE,
    UNSETTLED_MESSAGE,
    ContainerReport,
    Ending,
    ending,
    outcome_of,
    refused_a_process,
)
from prefect_managed.retries import (
    ATTEMPT_LABEL,
    InfrastructureCause,
    attempt_in,
    attempt_of,
    cause_of_ending,
)
from prefect_managed.settings import get_settings

if TYPE_CHECKING:
    from collections import deque

    from prefect.client.orchestration import PrefectClient

    from prefect_managed.accounting import Accounting
    from prefect_managed.concurrency import WorkspaceSlots
    from prefect_managed.containers import Containers
    from prefect_managed.policy import Policy
    from prefect_managed.run_states import RunStates

__all__ = ["API_WAIT_SECONDS", "Finishing"]

T = TypeVar("T")

#: How long the finish of a removed container waits for the Prefect API to answer.
API_WAIT_SECONDS = 600
API_RETRY_SECONDS = 5.0


class Finishing:
    """Mixed into `ManagedWorker`: the end of a run's container."""

    if TYPE_CHECKING:  # what it uses of the worker
        policy: Policy
        _work_pool_name: str
        _logger: Any
        _containers: Containers
        _slots: WorkspaceSlots | None
        _states: RunStates | None
        _accounting: Accounting | None
        _finished: deque[str]
        _infrastructure_crashes: dict[UUID, InfrastructureCause]

        @property
        def client(self) -> PrefectClient: ...

        @property
        def backend_id(self) -> UUID | None: ...

        def _stop_container(self, container_id: str, timeout: int) -> None: ...

    async def _retry_infrastructure_crash(self, flow_run: FlowRun) -> None:
        """Schedule the run again when its attempt crashed for an infrastructure reason
        (`_infrastructure_crashes`) and the tier's `infrastructure_retries` allow it. The
        attempt's slot is released first: the next attempt is admitted like a new run."""
        cause = self._infrastructure_crashes.pop(flow_run.id, None)
        if cause is None:
            return
        assert self._states is not None
        try:
            if self._slots is not None:
                await self._slots.release(flow_run.id)
            await self._states.retry_for_infrastructure(
                flow_run,
                cause,
                self.policy.tier.infrastructure_retries,
                self.policy.workspace.tier,
            )
        except Exception:
            self._logger.exception(
                "Could not schedule flow run %s again after it crashed for an "
                "infrastructure reason (%s)",
                flow_run.id,
                cause.value,
            )

    async def _attempt(self, flow_run: FlowRun, to_start: bool = False) -> int:
        """Which attempt of the run this is, from its state history in the server.

        `to_start`: for the label of a container about to be made; a history that cannot
        be read (the API away, or states that do not parse) then stops the start (its
        record would go under a guessed attempt, maybe an earlier one's, and count
        nowhere). At the finish, a container whose history cannot be read is taken for
        the run's latest attempt (1 is never above its label)."""
        try:
            return attempt_in(await self.client.read_flow_run_states(flow_run.id))
        except Exception as error:  # the API away, or a history that does not parse
            if to_start:
                raise RuntimeError(
                    f"Could not read the state history of flow run {flow_run.id}, which "
                    "says which attempt of the run its container is: not started "
                    f"({error})"
                ) from error
            self._logger.warning(
                "Could not read the state history of flow run %s; its container is taken "
                "for the run's latest attempt",
                flow_run.id,
                exc_info=True,
            )
            return 1

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

    async def _finish(
        self, flow_run: FlowRun, watch: Watch, engine_lost: bool = False
    ) -> ContainerReport | None:
        """Explain, record and remove a container that has exited; what it said when read
        (None when it was gone).

        Uses only what the container itself says (labels, environment, state), so it
        serves runs this worker watched and containers it took over alike. The container
        is removed only once its usage is recorded: if recording fails, the next
        reconciliation finds it again.
        """
        assert self._states is not None and self._accounting is not None
        report = await self._containers.inspect(watch.container_id)
        if report is not None and report.running:
            # Never recorded nor removed while it runs (a watch ended by a stop of the
            # worker): whoever watches it next finishes it.
            return None
        how = ending(report, timed_out=watch.timed_out, engine_lost=engine_lost)
        if await self._of_earlier_attempt(flow_run, report or watch.report):
            await self._finish_earlier_attempt(flow_run, watch, report, how)
            return report
        if report is None or how is Ending.REMOVED:
            self._logger.warning(
                "The container of flow run %s was removed by someone else before it was read",
                flow_run.id,
            )
            await self._finish_removed(flow_run, watch)
            return report
        try:
            final, crashed_by = await self._settle(flow_run, watch, report, how)
        except (ValidationError, ObjectNotFound):
            # What the API holds for the run does not parse, or the run is gone: no later
            # reconciliation would change that, so the usage is recorded from what the
            # container says rather than never (any other error keeps the container for
            # the next reconciliation, as the API or the engine may be back by then).
            self._logger.exception(
                "Could not settle the state of flow run %s; its usage is recorded from its "
                "container alone",
                flow_run.id,
            )
            await self._crash_unsettled(flow_run)
            final, crashed_by = None, how
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
            return report
        await self._containers.remove(report.id)
        self._finished.append(report.id)
        self._note_infrastructure_crash(flow_run, crashed_by, final)
        return report

    async def _crash_unsettled(self, flow_run: FlowRun) -> None:
        """Propose Crashed on a run whose state cannot be read, so that it is not left
        running with its container gone; the answer is not read (it may not parse either),
        and the server refuses the proposal on a run that has ended."""
        try:
            await self.client.request(
                "POST",
                "/flow_runs/{id}/set_state",
                path_params={"id": flow_run.id},
                json={"state": {"type": "CRASHED", "message": UNSETTLED_MESSAGE}},
            )
        except Exception:
            self._logger.warning(
                "Could not propose Crashed on flow run %s", flow_run.id, exc_info=True
            )

    async def _settle(
        self, flow_run: FlowRun, watch: Watch, report: ContainerReport, how: Ending
    ) -> tuple[State | None, Ending]:
        """The run's final state, made so where the container's ending says why (run
        time, memory, the engine lost, an exit before the flow started, the process
        limit), the container's output forwarded; and the ending to retry it for."""
        assert self._states is not None
        states, policy = self._states, self.policy
        known: State | None = None  # the run's state, when read since its container exited
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
            # Its output is read only when the run did not start its flow.
            output = partial(self._containers.output, report.id, get_settings().install_log_lines)
            known = await states.report_exit_before_flow_start(flow_run, report, output)
        await self._forward_output(flow_run, report.id)
        final = await states.ensure_final(flow_run, report.exit_code, known)
        crashed_by = how
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
            crashed_by = Ending.EXITED  # the process limit: never retried
        return final, crashed_by

    async def _finish_removed(self, flow_run: FlowRun, watch: Watch) -> None:
        """A container removed from outside: its record first, from what its watch saw
        (kept on disk until the ledger has it, so that no stop of the worker or the API
        loses it), then the run's Crashed state. Each API call is tried again while the
        API does not answer, for up to `API_WAIT_SECONDS`."""
        assert self._states is not None and self._accounting is not None
        states, accounting = self._states, self._accounting
        current = await self._patiently(partial(states.state, flow_run.id), flow_run)
        seen = watch.report
        if seen is not None and seen.started_at is not None:  # else it never ran
            # Counted until the watch last sampled it, or until now: the watch ends
            # within seconds of the removal.
            last_seen = watch.meter.last_seen or datetime.now(timezone.utc)
            final = current if current is not None and current.is_final() else None
            outcome = outcome_of(final, timed_out=False, out_of_memory=False)
            try:
                await accounting.record(
                    flow_run, seen.removed(last_seen), watch.meter, outcome, self._work_pool_name
                )
            except Exception:
                self._logger.warning(
                    "Could not store the usage record of flow run %s yet; it is kept on "
                    "disk and stored at the next reconciliation",
                    flow_run.id,
                    exc_info=True,
                )
        await self._patiently(
            partial(states.crash_with_cause, flow_run, CONTAINER_REMOVED_MESSAGE), flow_run
        )
        final_state = await self._patiently(partial(states.state, flow_run.id), flow_run)
        self._note_infrastructure_crash(flow_run, Ending.REMOVED, final_state)

    async def _patiently(self, call: Callable[[], Awaitable[T]], flow_run: FlowRun) -> T | None:
        """`call()`, tried again every few seconds while the API does not answer, for up
        to `API_WAIT_SECONDS`; None if it never did."""
        deadline = time.monotonic() + API_WAIT_SECONDS
        while True:
            try:
                return await call()
            except (httpx.HTTPError, PrefectHTTPStatusError):
                if time.monotonic() > deadline:
                    self._logger.exception(
                        "The Prefect API did not answer for %d s while finishing flow run %s",
                        API_WAIT_SECONDS,
                        flow_run.id,
                    )
                    return None
                await anyio.sleep(API_RETRY_SECONDS)

    def _note_infrastructure_crash(
        self, flow_run: FlowRun, how: Ending, final: State | None
    ) -> None:
        """Remember a run whose attempt crashed for an infrastructure reason: it is
        scheduled again once its slot is released (`_retry_infrastructure_crash`). Said
        only once the attempt is recorded and its container gone, so that nothing of the
        attempt is left to finish."""
        cause = cause_of_ending(how, final)
        if cause is not None:
            self._infrastructure_crashes[flow_run.id] = cause

    async def _of_earlier_attempt(self, flow_run: FlowRun, report: ContainerReport | None) -> bool:
        """Whether the container ran an earlier attempt of a run scheduled again since
        (one kept because its record failed, say): its run's state is not its to set."""
        if report is None or ATTEMPT_LABEL not in report.labels:
            return False
        return attempt_of(report.labels) < await self._attempt(flow_run)

    async def _finish_earlier_attempt(
        self, flow_run: FlowRun, watch: Watch, report: ContainerReport | None, how: Ending
    ) -> None:
        """Record and remove a container of an earlier attempt, leaving the run's state
        (that of a later attempt) alone."""
        assert self._accounting is not None
        self._logger.info(
            "Container %s ran an earlier attempt of flow run %s, which was scheduled again "
            "since; recording its usage and removing it without changing the run's state",
            watch.container_id,
            flow_run.id,
        )
        outcome = outcome_of(
            None, timed_out=how is Ending.RUN_TIME, out_of_memory=how is Ending.OUT_OF_MEMORY
        )
        if report is None or how is Ending.REMOVED:
            seen, last_seen = watch.report, watch.meter.last_seen
            if seen is not None and last_seen is not None:
                await self._accounting.record(
                    flow_run, seen.removed(last_seen), watch.meter, outcome, self._work_pool_name
                )
            return
        await self._accounting.record(flow_run, report, watch.meter, outcome, self._work_pool_name)
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
            output = await self._containers.output_tail(container_id, limit)
            if output is None:
                return  # gone
            since = output.earliest  # a min over every line: computed once
            if since is None:
                return  # nothing written
            logged = await self._states.logs_since(flow_run.id, since)
            if logged.output_sent:
                return  # an earlier finish of this container, or the early-exit report
            # The later lines of messages the run's logs hold are not sent again;
            # Prefect's records that never reached the API (logged just before a hard
            # crash, when its API handler had no time to send them) are kept.
            output = output.without_lines_in(logged.later_lines).with_records_not_in(
                logged.first_lines
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
