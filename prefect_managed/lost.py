"""Lost hosts: the runs of a Docker host that is gone for good end Crashed and are counted.

A host can vanish with its engine (the machine died, was taken away): nothing on it will
ever finish its runs, and Prefect would show them Running for good. What Prefect gives to
tell is the worker's heartbeat (`BaseWorker` sends one every `PREFECT_WORKER_HEARTBEAT_SECONDS`,
kept on the pool's worker as `last_heartbeat_time`) and the worker's name on each run it
submitted (the `prefect.worker.name` label, which a flow cannot change through the run
gateway: `prefect.` labels are refused). The slots such runs held come back by
themselves: their leases are no longer renewed and expire on the server.

Every `check_seconds`, the first online worker of a pool by name (one decides, so two
hosts do not both act) reads the pool's Pending, Running and Cancelling runs. A run is
lost when the worker named on it is not this one, has no container of it on this
engine (those are taken over or finished by the reconciliation), and has sent no
heartbeat for the policy's `[host] lost_after_seconds`. A lost run is set Crashed, in
a state named `HostLost` whose message says which worker went silent and since when,
and gets one usage record with what is known: from the run's start to the worker's
last heartbeat, outcome `lost`, no memory or CPU samples.

If the host comes back, its worker finds the containers of those runs: a running one is
stopped (its run is over), every one is finished as usual, and its record is not stored
again (the ledger keeps one record per run attempt); the `HostLost` state stays.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Crashed

from prefect_managed.configuration import api_label_value
from prefect_managed.containers import being_made, pool_labels
from prefect_managed.messages import stopped_before_start_message
from prefect_managed.retries import attempt_in
from prefect_managed.run_states import ABANDONED_CLAIM_SECONDS, HOST_LOST, claim_token
from prefect_managed.usage import Outcome, UsageRecord

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["LostHosts", "decider", "lost_host_message", "lost_runs"]

WORKER_LABEL = "prefect.worker.name"
#: How long a run named for this worker must stay in one Pending state, without a
#: container, before a starting worker takes it as left by its predecessor (see
#: `_schedule_unstarted_of_predecessor`).
SETTLED_PENDING_SECONDS = 10.0
#: The pool's runs read per request.
_RUNS_PAGE = 200
#: The states of a run whose host may be gone under it (a paused run waits in its container).
ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]


def lost_host_message(worker: str, last_heard: datetime, lost_after: int) -> str:
    return (
        f"Lost with its Docker host: worker {worker!r}, which ran this flow run, has sent "
        f"no heartbeat since {last_heard.isoformat(timespec='seconds')} (more than the "
        f"policy's [host] lost_after_seconds, {lost_after} s), so its host is taken as "
        "gone. Its usage is recorded up to that heartbeat; if the host comes back, its "
        "container is stopped and nothing is counted twice. Run the flow again."
    )


def decider(
    online: list[str], heard: dict[str, datetime | None], now: datetime, lost_after: int
) -> str | None:
    """The one worker of a pool that looks for lost runs: the first by name of those
    Prefect shows online that were heard from within `lost_after`."""
    live = sorted(
        name
        for name in online
        if (last := heard.get(name)) is not None and (now - last).total_seconds() < lost_after
    )
    return live[0] if live else None


def lost_runs(
    runs: list[FlowRun],
    heard: dict[str, datetime | None],
    me: str,
    seen: set[str],
    now: datetime,
    watching_since: datetime,
    lost_after: int,
) -> list[tuple[FlowRun, str, datetime]]:
    """The runs of `runs` whose worker has been silent for `lost_after` while this
    worker watched (since `watching_since`), with that worker and its last heartbeat.
    Not lost: a run of this worker `me`, one whose container or run is `seen` here, one
    without a worker label, one in a claim (whatever worker an earlier attempt left
    named on it: a live worker is about to set its state; one left there goes back by
    `LostHosts._release_abandoned_claims`)."""
    found = []
    for flow_run in runs:
        worker = (flow_run.labels or {}).get(WORKER_LABEL)
        if not isinstance(worker, str) or worker == me or str(flow_run.id) in seen:
            continue
        if claim_token(flow_run.state) is not None:
            continue
        # A worker Prefect no longer lists: silent since the run's last state.
        last = heard.get(worker) or (flow_run.state.timestamp if flow_run.state else None)
        if last is None or (now - max(last, watching_since)).total_seconds() < lost_after:
            continue
        found.append((flow_run, worker, last))
    return found


class LostHosts:
    """Mixed into `ManagedWorker`: ends the runs of hosts that are gone."""

    if TYPE_CHECKING:  # what it uses of the worker
        from logging import Logger

        from prefect.client.orchestration import PrefectClient

        from prefect_managed.accounting import Accounting
        from prefect_managed.containers import Containers
        from prefect_managed.policy import Policy
        from prefect_managed.run_states import RunStates

        client: PrefectClient
        name: str
        policy: Policy
        _work_pool_name: str
        _logger: Logger
        _containers: Containers
        _accounting: Accounting | None
        _states: RunStates | None
        _running: set[Any]
        _submitting_flow_run_ids: set[Any]
        _claims_seen: dict[Any, float]

        def get_flow_run_logger(self, flow_run: FlowRun) -> Any: ...

    @property
    def _lost_check_seconds(self) -> float:
        return max(5.0, self.policy.host.lost_after_seconds / 4)

    async def _find_lost_forever(self) -> None:
        # Silence counts only while this worker could see it: from its start and from
        # the end of any failure to ask (the API may have been down for everyone).
        watching_since = datetime.now(timezone.utc)
        while True:
            await anyio.sleep(self._lost_check_seconds)
            try:
                await self._end_lost_runs(watching_since)
            except Exception:  # the API or the engine may be away for a while
                self._logger.warning("Could not look for runs of lost hosts", exc_info=True)
                watching_since = datetime.now(timezone.utc)

    async def _end_lost_runs(self, watching_since: datetime) -> list[FlowRun]:
        """Crash and record the pool's runs whose worker went silent; those ended."""
        lost_after = self.policy.host.lost_after_seconds
        if (datetime.now(timezone.utc) - watching_since).total_seconds() < lost_after:
            return []
        workers = await self.client.read_workers_for_work_pool(self._work_pool_name)
        heard = {w.name: w.last_heartbeat_time for w in workers}
        # The server's clock, not this host's: this worker's own last heartbeat as the
        # server stamped it (at most a heartbeat old), against the others' stamps.
        now = heard.get(self.name) or datetime.now(timezone.utc)
        online = [w.name for w in workers if w.status == WorkerStatus.ONLINE]
        if decider(online, heard, now, lost_after) != self.name:
            return []  # another online worker of the pool decides
        runs = await self._pool_runs(ACTIVE)
        await self._release_abandoned_claims(runs)
        if not runs:
            return []
        here = await self._runs_with_containers()
        ended = []
        seen = {*here, *(str(run) for run in self._running)}
        for flow_run, worker, last in lost_runs(
            runs, heard, self.name, seen, now, watching_since, lost_after
        ):
            if await self._end_lost_run(flow_run, worker, last):
                ended.append(flow_run)
        return ended

    async def _release_abandoned_claims(self, runs: list[FlowRun]) -> list[FlowRun]:
        """Put back the runs of `runs` (the pool's active runs, as read) that this worker
        has seen in one claim for `ABANDONED_CLAIM_SECONDS`: a worker killed between
        taking a run (to mark it waiting, or to refuse it) and setting its state left
        it Pending, with no container and nothing to ever start it. Only the pool's
        deciding worker looks, on its own clock (no clocks compared); those put back."""
        assert self._states is not None
        now = time.monotonic()
        claims = {run.state.id: run for run in runs if run.state and claim_token(run.state)}
        self._claims_seen = {claim: self._claims_seen.get(claim, now) for claim in claims}
        released = []
        for claim, flow_run in claims.items():
            if now - self._claims_seen[claim] < ABANDONED_CLAIM_SECONDS:
                continue
            if await self._states.release_abandoned_claim(flow_run):
                self._logger.warning(
                    "Flow run %s was left in a claim by a worker that stopped; put back",
                    flow_run.id,
                )
                released.append(flow_run)
        return released

    async def _schedule_unstarted_of_predecessor(self) -> list[FlowRun]:
        """At start (in the background): the pool's Pending runs named for this worker
        were left by a previous process of the same name (killed while it submitted
        them). Those without a container will never start: they go back to Scheduled.
        Their slots come back when that process's leases expire.

        A run is taken as left only when it is still in the same Pending state, still
        named for this worker and still without a container `SETTLED_PENDING_SECONDS`
        after it was first seen so: another worker that has just set it Pending (Prefect
        sets the state first) puts its own name on it within moments, while the name an
        earlier attempt left still names this worker. Two looks, no clocks compared."""
        assert self._states is not None
        first = {run.id: run.state_id for run in await self._unstarted_named_here()}
        if not first:
            return []
        await anyio.sleep(SETTLED_PENDING_SECONDS)
        message = stopped_before_start_message(self.name)
        again: list[FlowRun] = []
        for flow_run in await self._unstarted_named_here():
            if flow_run.state_id is None or first.get(flow_run.id) != flow_run.state_id:
                continue
            try:
                moved = await self._states.schedule_again(
                    flow_run, message, pending_state_id=flow_run.state_id
                )
            except Exception:  # the next start of this worker looks again
                self._logger.warning(
                    "Could not schedule flow run %s again", flow_run.id, exc_info=True
                )
                continue
            if moved:
                self._logger.warning("Flow run %s: %s", flow_run.id, message)
                again.append(flow_run)
        return again

    async def _unstarted_named_here(self) -> list[FlowRun]:
        """The pool's Pending runs named for this worker that it is not submitting or
        running, and whose container is neither on this engine nor being made by this
        process (`containers.being_made`: a worker restarted in the same process)."""
        runs = await self._pool_runs([StateType.PENDING])
        ours = [
            run
            for run in runs
            if (run.labels or {}).get(WORKER_LABEL) == self.name
            # A run in a claim goes back as the claim would (`_release_abandoned_claims`:
            # to an ending it replaced, never to the queue).
            and claim_token(run.state) is None
            and run.id not in self._running
            and run.id not in self._submitting_flow_run_ids
            and not being_made(str(run.id))
        ]
        if not ours:
            return []
        here = await self._runs_with_containers()
        return [run for run in ours if str(run.id) not in here]

    async def _pool_runs(self, types: list[StateType]) -> list[FlowRun]:
        """The pool's flow runs in a state of one of `types`, every page of them (the
        server answers 200 at most at a time)."""
        runs: list[FlowRun] = []
        while True:
            page = await self.client.read_flow_runs(
                work_pool_filter=WorkPoolFilter(
                    name=WorkPoolFilterName(any_=[self._work_pool_name])
                ),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types))
                ),
                sort=FlowRunSort.ID_DESC,
                limit=_RUNS_PAGE,
                offset=len(runs),
            )
            runs.extend(page)
            if len(page) < _RUNS_PAGE:
                return runs

    async def _runs_with_containers(self) -> set[str]:
        """The ids of the flow runs with a container of this pool on this engine."""
        reports = await self._containers.find(
            pool_labels(self.policy.workspace.name, api_label_value(), self._work_pool_name)
        )
        return {report.flow_run_id for report in reports if report.flow_run_id}

    async def _end_lost_run(self, flow_run: FlowRun, worker: str, last_heard: datetime) -> bool:
        assert self._accounting is not None
        # The record is made before the state: a run set Crashed is not looked at again.
        history = await self.client.read_flow_run_states(flow_run.id)
        record = await self._lost_record(flow_run, history, last_heard)
        message = lost_host_message(worker, last_heard, self.policy.host.lost_after_seconds)
        result = await self.client.set_flow_run_state(
            flow_run.id, Crashed(name=HOST_LOST, message=message)
        )
        if result.status != SetStateStatus.ACCEPT:
            return False  # it ended meanwhile (or another worker ended it)
        self._logger.warning("Flow run %s: %s", flow_run.id, message)
        self.get_flow_run_logger(flow_run).error("%s", message)
        if record is not None:
            await self._accounting.store(flow_run, record)  # on disk until the ledger has it
        return True

    async def _lost_record(
        self, flow_run: FlowRun, history: list[Any], last_heard: datetime
    ) -> UsageRecord | None:
        """The attempt's record from what is known: from its last Pending state (when its
        worker made its container, as a container's own record starts then too) to its
        worker's last heartbeat; no memory or CPU samples. None: it never got that far."""
        pending = [state.timestamp for state in history if state.type == StateType.PENDING]
        started = max(pending) if pending else flow_run.start_time
        if started is None:
            return None
        deployment = None
        if flow_run.deployment_id is not None:
            try:
                deployment = (await self.client.read_deployment(flow_run.deployment_id)).name
            except Exception:  # the record matters more than its deployment's name
                deployment = None
        return UsageRecord.from_timestamps(
            started,
            max(started, last_heard),
            flow_run_id=flow_run.id,
            flow_run_name=flow_run.name,
            workspace=self.policy.workspace.name,
            tier=self.policy.workspace.tier,
            pool=self._work_pool_name,
            deployment=deployment,
            image=str(
                (flow_run.job_variables or {}).get("image") or self.policy.runtime.default_image
            ),
            outcome=Outcome.LOST,
            attempt=attempt_in(history),
        )
