"""Infrastructure retries, decided from what happened: pure values.

A flow run that crashed for an infrastructure reason (its container removed from
outside, the Docker engine lost under it, its image not available, the engine not
reachable to start it) is scheduled again as a new attempt, up to the tier's
`infrastructure_retries`. Nothing the flow or its user caused is retried: a Failed run,
a nonzero exit of the flow, out of memory, the maximum run time, the process limit, the
quota, refused job variables, GPUs not available, a failed pull step or install.

Attempts are counted from the run's state history in the Prefect server, never in a
worker's memory, so a restarted worker or another worker of the pool counts the same:
the retries from the states named `AwaitingInfrastructureRetry`, a container's attempt
from every start of the run (`attempt_in`: a run retried with `prefect flow-run retry`
is a new attempt too, recorded on its own). Each container carries its attempt in the
label `io.prefect-managed.attempt`, so a taken-over container is recorded as the attempt
it ran.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum

from prefect.client.schemas.objects import State

from prefect_managed.exceptions import GpuNotAvailable, ImageNotAvailable
from prefect_managed.outcome import Ending, docker_lost

__all__ = [
    "ATTEMPT_LABEL",
    "INFRASTRUCTURE_RETRY",
    "InfrastructureCause",
    "attempt_in",
    "attempt_of",
    "claim_message",
    "claim_token",
    "cause_of_ending",
    "cause_of_start_failure",
    "infrastructure_retry_message",
    "last_attempt_message",
    "retries_done",
]

#: The name of the Scheduled state of a run scheduled again for an infrastructure reason.
INFRASTRUCTURE_RETRY = "AwaitingInfrastructureRetry"
#: The container label holding which attempt of its flow run it is (1, 2, ...).
ATTEMPT_LABEL = "io.prefect-managed.attempt"


class InfrastructureCause(str, Enum):
    """Why a run crashed, when the infrastructure is to blame (the text ends a sentence)."""

    REMOVED = "its container was removed from outside the worker"
    ENGINE_LOST = "the Docker engine stopped while it ran"
    IMAGE_NOT_AVAILABLE = "its image was not on the Docker host and could not be pulled"
    ENGINE_UNREACHABLE = "the Docker engine could not be reached to start its container"


def cause_of_ending(how: Ending, final: State | None) -> InfrastructureCause | None:
    """The infrastructure cause of a container's ending, if the run ended Crashed by it.

    Only a removed container and a lost engine are the infrastructure's; a run that
    reached another final state (Completed, Failed, Cancelled) before is not retried.
    """
    if final is None or not final.is_crashed():
        return None
    if how is Ending.REMOVED:
        return InfrastructureCause.REMOVED
    if how is Ending.ENGINE_LOST:
        return InfrastructureCause.ENGINE_LOST
    return None


def cause_of_start_failure(error: BaseException) -> InfrastructureCause | None:
    """The infrastructure cause of a container that could not be made or started.

    A missing image that could not be pulled, or an engine that could not be reached.
    A GPU tier on a host without GPUs is the operator's to fix, never retried; any other
    refusal (a job variable, an image not allowed, Docker refusing the container's
    settings) is not the infrastructure's.
    """
    if isinstance(error, GpuNotAvailable):
        return None
    if isinstance(error, ImageNotAvailable):
        return InfrastructureCause.IMAGE_NOT_AVAILABLE
    if docker_lost(error):
        return InfrastructureCause.ENGINE_UNREACHABLE
    return None


def retries_done(history: Iterable[State]) -> int:
    """How many times the run was scheduled again for an infrastructure reason."""
    return sum(1 for state in history if state.name == INFRASTRUCTURE_RETRY)


def claim_message(token: str) -> str:
    """The message of a managed worker's claim: a Pending state it sets only to set
    another state after it (`RunStates._claim`), never to start a container."""
    return f"Taken by a managed worker to set its state ({token})."


_CLAIM = re.compile(
    "^" + re.escape(claim_message("TOKEN")).replace("TOKEN", "([0-9a-f]{32})") + "$"
)


def claim_token(state: State | None) -> str | None:
    """The token of a claim's Pending state (`RunStates._claim`); None for any other
    state (Prefect's own submission's Pending among them)."""
    if state is None or not state.is_pending():
        return None
    found = _CLAIM.match(state.message or "")
    return found.group(1) if found else None


def attempt_in(history: Iterable[State]) -> int:
    """Which attempt of the run its latest start is: how many times a worker has taken
    it to start a container, at least 1. Each start is the Pending state Prefect's worker
    sets on a run it submits, from a state that is not Pending (Prefect refuses Pending
    after Pending; a run goes back to Scheduled, by any retry, before it is started
    again); a managed worker's claim (`claim_message`) only sets another state after it
    and starts nothing. So a run retried after an infrastructure crash, retried with
    `prefect flow-run retry` or the UI's Retry, resumed after a suspension, or put back
    in Scheduled by a flow's own doing (a run cannot set its own Pending), is a new
    attempt each time it is started, whichever host starts it; Prefect's own flow
    retries stay in the start they were made in.

    Each attempt's usage is recorded under its own key: a container started under an
    earlier attempt's number would find that record and count nowhere."""
    starts, before = 0, None
    for state in history:
        if (
            state.is_pending()
            and not (before is not None and before.is_pending())
            and claim_token(state) is None
        ):
            starts += 1
        before = state
    return max(1, starts)


def attempt_of(labels: Mapping[str, str]) -> int:
    """The attempt a container ran (its label), 1 for a container without one."""
    try:
        attempt = int(labels.get(ATTEMPT_LABEL, "1"))
    except ValueError:
        return 1
    return max(1, attempt)


def infrastructure_retry_message(
    cause: InfrastructureCause, attempt: int, retries: int, tier: str
) -> str:
    """The message of the Scheduled state (and the run's log line) of a retry.

    `attempt` is the attempt now scheduled (2 for the first retry).
    """
    return (
        f"Flow run crashed for an infrastructure reason: {cause.value}. It is scheduled "
        f"again as attempt {attempt} of at most {retries + 1} (the {tier} tier's "
        f"infrastructure_retries is {retries}); a worker of the pool starts it like a new "
        "flow run once a concurrency slot is free."
    )


def last_attempt_message(cause: InfrastructureCause, attempt: int, retries: int, tier: str) -> str:
    """The log line of a run that crashed for an infrastructure reason on its last attempt."""
    return (
        f"Flow run crashed for an infrastructure reason: {cause.value}. Attempt {attempt} "
        f"was its last (the {tier} tier's infrastructure_retries is {retries}), so it is "
        "not scheduled again; run it again yourself."
    )
