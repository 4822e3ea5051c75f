"""The states and log entries the worker gives a flow run, through Prefect's client.

Every message says what happened and what to do (they come from `policy`, `outcome`,
`sources` and `dependencies`); this module only knows how to set them so that the
worker's explanation wins over the engine's own report, and never replaces a final
state the run reached by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import anyio
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas import OrchestrationResult, SetStateStatus
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import TERMINAL_STATES, FlowRun, State
from prefect.client.schemas.sorting import LogSort
from prefect.exceptions import Abort, ObjectNotFound
from prefect.logging import get_logger
from prefect.states import Cancelled, Crashed, Failed, Pending, Scheduled

from prefect_managed.container_output import CONTAINER_OUTPUT_LOGGER, batches
from prefect_managed.dependencies import describe_early_exit, split_extra_pip_packages
from prefect_managed.messages import CANCELLED_AT_EXIT_MESSAGE
from prefect_managed.outcome import ContainerReport
from prefect_managed.retries import (
    INFRASTRUCTURE_RETRY,
    InfrastructureCause,
    claim_message,
    claim_token,
    infrastructure_retry_message,
    last_attempt_message,
    retries_done,
)
from prefect_managed.sources import describe_pull_step_failure, redact_url_credentials

logger = get_logger("managed.run_states")

__all__ = [
    "ABANDONED_CLAIM_SECONDS",
    "AWAITING_SLOT",
    "CONTAINER_OUTPUT_LOGGER",
    "HOST_LOST",
    "QUOTA_EXHAUSTED",
    "RunStates",
    "claim_token",
]

AWAITING_SLOT = "AwaitingConcurrencySlot"
QUOTA_EXHAUSTED = "QuotaExhausted"
#: The Crashed state of a run whose Docker host was lost (`lost`).
HOST_LOST = "HostLost"

#: Logs read per page, and pages at most, when looking for the container's output.
_LOG_PAGE = 200
_LOG_PAGES = 50


#: How long a claim and the state set after it may hold up a stopping worker.
CLAIM_SECONDS = 30
#: How long a run may be seen in one claim before it is taken as left there (its worker
#: killed between the claim and the state): a live worker sets the state, or releases
#: the claim, within twice `CLAIM_SECONDS`, and a request of its still in flight after
#: that (a slow server) must not land on a run that was put back and started since.
ABANDONED_CLAIM_SECONDS = 10 * CLAIM_SECONDS


ABANDONED_CLAIM_MESSAGE = (
    "Put back in Scheduled: the worker that took this flow run to mark it waiting (or to "
    "refuse it) stopped before it could; a worker of the pool starts it as usual."
)


RunLogger = Callable[[FlowRun], "logging.Logger | logging.LoggerAdapter[Any]"]


@dataclass(frozen=True)
class RunLogs:
    """What a run's logs hold from a moment on (`RunStates.logs_since`)."""

    first_lines: set[str]  # the first line of each message
    later_lines: set[str]  # the later lines of multi-line messages
    output_sent: bool  # an entry of the container's output is among them


class RunStates:
    """Sets a flow run's states for the worker."""

    def __init__(
        self,
        client: PrefectClient,
        run_logger: RunLogger,
        propose_crashed: Callable[[FlowRun, str], Any],
        worker_id: Callable[[], UUID | None],
    ) -> None:
        self._client = client
        self._run_logger = run_logger
        # Prefect's `BaseWorker._propose_crashed_state` (it handles Abort and logs).
        self._propose_crashed = propose_crashed
        self._worker_id = worker_id

    async def state(self, flow_run_id: UUID) -> State | None:
        return (await self._client.read_flow_run(flow_run_id)).state

    async def crash_with_cause(self, flow_run: FlowRun, message: str) -> None:
        """End the run Crashed with `message`, replacing a Crashed state without a cause.

        The engine in the container may have reported its own Crashed state already
        (its flow process was killed); the worker knows why, so its message wins.
        """
        current = await self.state(flow_run.id)
        if current is not None and current.is_crashed():
            if current.message == message:
                return  # said already
            await self._client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            self._run_logger(flow_run).error("%s", message)
        elif current is None or not current.is_final():
            await self._propose_crashed(flow_run, message)

    async def ensure_final(
        self, flow_run: FlowRun, exit_code: int | None, known: State | None = None
    ) -> State | None:
        """The run's state, made Crashed if its container is gone but it is not final,
        or Cancelled if it was being cancelled (its runner did not say so before the
        container stopped: the worker stopped it, or the runner died).

        `known`: its state as read since its container exited (so not read again)."""
        current = known if known is not None else await self.state(flow_run.id)
        if current is not None and current.is_final():
            return current
        if current is not None and current.is_cancelling():
            await self._client.set_flow_run_state(
                flow_run.id, Cancelled(message=CANCELLED_AT_EXIT_MESSAGE), force=True
            )
            self._run_logger(flow_run).info("%s", CANCELLED_AT_EXIT_MESSAGE)
            return await self.state(flow_run.id)
        await self._propose_crashed(
            flow_run,
            f"The flow run's container exited with code {exit_code} without the flow run "
            "reporting a final state.",
        )
        return await self.state(flow_run.id)

    async def force_crashed(self, flow_run: FlowRun, message: str) -> State | None:
        await self._client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        self._run_logger(flow_run).error("%s", message)
        return await self.state(flow_run.id)

    async def report_exit_before_flow_start(
        self,
        flow_run: FlowRun,
        report: ContainerReport,
        output: Callable[[], Awaitable[list[str]]],
    ) -> State | None:
        """A container that exits before its flow started: its output goes to the flow
        run's logs (URL credentials redacted), and the run ends Crashed saying why.

        A failed install leaves the run Pending (the engine never ran). A failed pull
        step leaves it Crashed with only "Process exited with status code: 1" from
        Prefect's runner, never having run (run count 0); that message is replaced with
        the step, its source and its error. `output` reads the container's last lines;
        it is called only for such a run.

        Returns the run's state as read when the run had started its flow (nothing to
        report), else None.
        """
        current = await self._client.read_flow_run(flow_run.id)
        crashed_before_start = (
            current.state is not None and current.state.is_crashed() and current.run_count == 0
        )
        if current.state is None or not (current.state.is_pending() or crashed_before_start):
            return current.state
        lines = [redact_url_credentials(line) for line in await output()]
        pip_packages = split_extra_pip_packages(report.env.get("EXTRA_PIP_PACKAGES"))
        exit_code = report.exit_code if report.exit_code is not None else -1
        pull_steps = await self._pull_steps(current)
        try:
            described = describe_pull_step_failure(
                exit_code, lines, pull_steps, report.isolated_destinations
            )
        except Exception:  # the pull steps are the deployment's input: never stop the finish
            logger.warning(
                "Could not describe flow run %s's pull steps", flow_run.id, exc_info=True
            )
            described = None
        message = described or describe_early_exit(exit_code, pip_packages, lines)
        await self._client.create_logs(
            [
                LogCreate(
                    name=CONTAINER_OUTPUT_LOGGER,
                    level=logging.ERROR,
                    message=f"{message}\nContainer output:\n" + "\n".join(lines),
                    timestamp=datetime.now(timezone.utc),  # type: ignore[arg-type]
                    flow_run_id=flow_run.id,
                    worker_id=self._worker_id(),
                )
            ]
        )
        if crashed_before_start:
            await self._client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        else:
            await self._propose_crashed(flow_run, message)

    async def logs_since(self, flow_run_id: UUID, since: datetime) -> RunLogs:
        """What the run's logs hold from `since` (less a minute, for the clocks of the
        container and the server) on, newest first, at most `_LOG_PAGES` pages: the first
        and the later lines of each message, and whether an entry of the container's
        output is among them (sent by an earlier `_finish` of the same container, or by
        the early-exit report; its lines are never older than the output's first)."""
        log_filter = LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
            timestamp=LogFilterTimestamp(after_=since - timedelta(minutes=1)),  # type: ignore[arg-type]
        )
        first_lines: set[str] = set()
        later_lines: set[str] = set()
        output_sent = False
        for page in range(_LOG_PAGES):
            logs = await self._client.read_logs(
                log_filter=log_filter,
                limit=_LOG_PAGE,
                offset=page * _LOG_PAGE,
                sort=LogSort.TIMESTAMP_DESC,  # the newest first: those a crash may lose
            )
            for log in logs:
                first, *rest = log.message.split("\n")
                first_lines.add(first)
                later_lines.update(line.rstrip("\r") for line in rest if line.strip())
                output_sent = output_sent or log.name == CONTAINER_OUTPUT_LOGGER
            if len(logs) < _LOG_PAGE:
                break
        return RunLogs(first_lines, later_lines, output_sent)

    async def send_logs(self, entries: list[LogCreate]) -> None:
        """Log entries to the API, in batches of bounded size."""
        for batch in batches(entries):
            await self._client.create_logs(batch)

    async def _pull_steps(self, flow_run: FlowRun) -> list[dict[str, Any]]:
        """The pull steps of the run's deployment, to name the source that failed."""
        if flow_run.deployment_id is None:
            return []
        try:
            deployment = await self._client.read_deployment(flow_run.deployment_id)
        except ObjectNotFound:
            return []
        return list(deployment.pull_steps or [])

    async def unchanged(self, flow_runs: list[FlowRun]) -> set[UUID]:
        """Of runs a poll read, those still in the state it read (one read of them all).

        Between a poll and what the worker does with its runs (room counted, slots
        taken) another host may have taken a run and even finished it; Prefect accepts
        Pending from Completed (without a persisted result), Failed or Crashed, so a
        claim alone would run it again."""
        if not flow_runs:
            return set()
        polled = {flow_run.id: flow_run.state_id for flow_run in flow_runs}
        current = await self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(polled))),
            limit=len(polled),
        )
        return {run.id for run in current if run.state_id == polled[run.id]}

    async def _claim(self, flow_run: FlowRun, token: str) -> UUID | None:
        """Take a run read by a poll before setting a state on it, as Prefect's workers
        take a run to submit it; the Pending state's id, or None when the run is not
        this worker's to change. `token` marks the claim's Pending as this call's.

        Scheduled → Pending is the one transition Prefect's server refuses once another
        worker has taken the run, or it runs, or it is being cancelled
        (`PreventPendingTransitions`); any other state is set whatever the run's current
        one is. A state set from what a poll read is set only after this succeeds, so it
        never replaces what another host or the run did since the poll (which would run
        the run twice, or undo a cancel).

        Prefect also accepts Pending from Completed (without a persisted result), Failed
        and Crashed: a run another host finished since `unchanged` read it. Such a claim
        has no scheduled time (Prefect copies it only from a Scheduled state); the run's
        ending is put back and the claim given up. So is an ending a full deployment
        concurrency limit replaced (the server's own `AwaitingConcurrencySlot` or
        Cancelled, on a rejected claim)."""
        try:
            result: OrchestrationResult[Any] = await self._client.set_flow_run_state(
                flow_run.id, Pending(message=claim_message(token))
            )
        except ObjectNotFound:  # deleted since the poll
            return None
        claimed = result.state
        if claimed is None or result.status not in (SetStateStatus.ACCEPT, SetStateStatus.REJECT):
            return None
        ours = claim_token(claimed) == token
        if result.status == SetStateStatus.REJECT and not ours:
            # A full deployment limit writes its own state in place of the claim.
            if claimed.name == AWAITING_SLOT or claimed.is_cancelled():
                await self._put_back(flow_run, claimed)
            return None
        if not ours:
            return None
        # (A rejected claim with this call's token: a retry of a request the server had
        # applied, which Prefect answers with the state it made.)
        if claimed.state_details.scheduled_time is None and await self._put_back(flow_run, claimed):
            return None
        return claimed.id

    async def _put_back(self, flow_run: FlowRun, made: State) -> bool:
        """Whether `made` (a claim, or what the server set in its place) replaced a
        final state; if so, that state is set again, result included (forced: Prefect
        would refuse a move back to it)."""
        # Read and sent as stored: Prefect's client would drop a stored result's
        # reference, and its models a result serializer's own fields.
        response = await self._client.request(
            "GET", "/flow_run_states/", params={"flow_run_id": str(flow_run.id)}
        )
        response.raise_for_status()
        history: list[dict[str, Any]] = response.json()
        ids = [state.get("id") for state in history]
        made_id = str(made.id)
        if made_id not in ids or ids.index(made_id) == 0:
            return False
        before = history[ids.index(made_id) - 1]
        if before.get("type") not in TERMINAL_STATES:  # StateType's values are strings
            return False
        again = {key: before.get(key) for key in ("type", "name", "message", "data")}
        again["state_details"] = {
            **(before.get("state_details") or {}),
            "transition_id": str(uuid4()),
        }
        response = await self._client.request(
            "POST",
            "/flow_runs/{id}/set_state",
            path_params={"id": flow_run.id},
            json={"state": again, "force": True},
        )
        response.raise_for_status()
        logger.warning(
            "Flow run %s ended (%s) after the poll that found it; its state is put back",
            flow_run.id,
            before.get("name"),
        )
        return True

    async def _claim_then_set(self, flow_run: FlowRun, state: State) -> bool:
        """Set `state` on a run this worker takes first (`_claim`); whether it was set.

        Shielded for up to `CLAIM_SECONDS`: a worker stopping between the claim and the
        state would leave the run Pending with nothing to start it. Should the state not
        be set after a claim that may have been made (an error, or the time up), a run
        still in this claim goes back to the state before it (`_release_claim`); a cancel
        made in between ends the run Cancelled (it has no infrastructure)."""
        token = uuid4().hex
        settled = False  # nothing of this call's claim is left to release
        try:
            with anyio.move_on_after(CLAIM_SECONDS, shield=True):
                claimed = await self._claim(flow_run, token)
                if claimed is None:  # refused, or given up by `_claim` itself
                    settled = True
                    return False
                result: OrchestrationResult[Any] = await self._client.set_flow_run_state(
                    flow_run.id, state
                )
                if result.status == SetStateStatus.ACCEPT:
                    settled = True
                    return True
                current = await self.state(flow_run.id)
                if current is not None and current.is_cancelling():
                    await self._client.set_flow_run_state(
                        flow_run.id, Cancelled(message="Cancelled before it started.")
                    )
        finally:
            if not settled:
                with anyio.move_on_after(CLAIM_SECONDS, shield=True):
                    await self._release_claim(
                        flow_run, token, f"Put back in Scheduled: {state.name} could not be set."
                    )
        return False

    async def _release_claim(self, flow_run: FlowRun, token: str, message: str) -> bool:
        """A run still in the claim `token` goes back to the state before it: Scheduled
        with `message` (else nothing would ever start it), or the ending the claim
        replaced (never the queue: that would run a finished run again). Whether it went
        back."""
        try:
            current = await self.state(flow_run.id)
            if claim_token(current) != token:
                return False
            if await self._put_back(flow_run, current):
                return True
            return await self.schedule_again(flow_run, message, current.id)
        except ObjectNotFound:  # deleted meanwhile
            return False
        except Exception:
            logger.warning(
                "Flow run %s may be left Pending: its claim could not be put back",
                flow_run.id,
                exc_info=True,
            )
            return False

    async def release_abandoned_claim(self, flow_run: FlowRun) -> bool:
        """A run left in a claim (`claim_token` of its state as read): its worker was
        killed between the claim and the state it was to set, so nothing would ever
        start it. It goes back as that worker would have put it back; whether it did."""
        token = claim_token(flow_run.state)
        if token is None:
            return False
        return await self._release_claim(flow_run, token, ABANDONED_CLAIM_MESSAGE)

    async def refuse(self, flow_run: FlowRun, name: str, message: str) -> None:
        """End a run that will not start Failed, with `message` (e.g. QuotaExhausted).
        Taken first (`_claim`): a run another host started meanwhile is left to it."""
        if await self._claim_then_set(flow_run, Failed(name=name, message=message)):
            self._run_logger(flow_run).error("%s", message)

    async def mark_awaiting_slot(
        self, flow_run: FlowRun, scheduled_time: datetime, message: str
    ) -> None:
        """Put a run that has no workspace slot (none was free, or its room was counted
        and the slot taken meanwhile) in Scheduled `AwaitingConcurrencySlot`, in its
        place (`scheduled_time`). Taken first
        (`_claim`): a run another host took meanwhile is left to it; one this worker took
        is back in Scheduled at once, for whichever host has a slot first."""
        if flow_run.state is None or flow_run.state.name == AWAITING_SLOT:
            return
        waiting = Scheduled(name=AWAITING_SLOT, scheduled_time=scheduled_time, message=message)
        if await self._claim_then_set(flow_run, waiting):
            self._run_logger(flow_run).info("%s", message)

    async def schedule_again(
        self, flow_run: FlowRun, message: str, pending_state_id: UUID | None = None
    ) -> bool:
        """Put a run whose container never started back in Scheduled, due now, for any
        worker of the pool (only from Pending, and only from the Pending state
        `pending_state_id` when given: a run that went on is left as it is)."""
        current = await self.state(flow_run.id)
        if current is None or not current.is_pending():
            return False
        if pending_state_id is not None and current.id != pending_state_id:
            return False
        try:
            result: OrchestrationResult[Any] = await self._client.set_flow_run_state(
                flow_run.id, Scheduled(message=message, scheduled_time=datetime.now(timezone.utc))
            )
        except Abort:
            return False
        if result.status != SetStateStatus.ACCEPT:
            return False
        self._run_logger(flow_run).warning("%s", message)
        return True

    async def retry_for_infrastructure(
        self, flow_run: FlowRun, cause: InfrastructureCause, retries: int, tier: str
    ) -> int | None:
        """Schedule a run that crashed for an infrastructure reason again, as a new
        attempt, unless it has had its `retries` already; returns the attempt scheduled.

        Attempts are counted from the run's state history in the server (its states named
        `AwaitingInfrastructureRetry`), so every worker counts the same. Only a run that
        is still Crashed is scheduled again. The Scheduled state goes through Prefect's
        orchestration (a Crashed run of a deployment may be rescheduled), so any worker
        of the pool picks it up and admits it like a new run.
        """
        current = await self.state(flow_run.id)
        if current is None or not current.is_crashed():
            return None
        done = retries_done(await self._client.read_flow_run_states(flow_run.id))
        if done >= retries:
            if retries:
                self._run_logger(flow_run).error(
                    "%s", last_attempt_message(cause, done + 1, retries, tier)
                )
            return None
        attempt = done + 2
        message = infrastructure_retry_message(cause, attempt, retries, tier)
        result: OrchestrationResult[Any] = await self._client.set_flow_run_state(
            flow_run.id,
            Scheduled(
                name=INFRASTRUCTURE_RETRY,
                message=message,
                scheduled_time=datetime.now(timezone.utc),
            ),
        )
        if result.status != SetStateStatus.ACCEPT:
            details = getattr(result.details, "reason", None)
            self._run_logger(flow_run).error(
                "Flow run crashed for an infrastructure reason (%s), but could not be "
                "scheduled again: %s",
                cause.value,
                details or result.status.value,
            )
            return None
        self._run_logger(flow_run).warning("%s", message)
        return attempt
