"""How a flow run's container ended, decided from what Docker says: pure values.

`ContainerReport.from_inspect` reads a container's inspect data once into a typed
report; `ending` decides which message the run's final state gets (out of memory, the
Docker engine lost, an exit before the flow started, or none because the worker already
said why when it stopped the container for its run time); `outcome_of` names the outcome
a usage record carries. No Docker client, no Prefect client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

import docker.errors
import requests.exceptions
from prefect.client.schemas.objects import State

from prefect_managed.metering import parse_docker_time
from prefect_managed.usage import Outcome

__all__ = [
    "CONTAINER_REMOVED_MESSAGE",
    "DOCKER_ENGINE_LOST_MESSAGE",
    "UNSETTLED_MESSAGE",
    "ContainerReport",
    "Ending",
    "docker_lost",
    "ending",
    "outcome_of",
    "refused_a_process",
]

CONTAINER_REMOVED_MESSAGE = (
    "The flow run's container was removed from outside the worker (for example with "
    "`docker rm -f`) before the flow run finished, so the flow run was stopped with it. "
    "Its usage is counted until the worker last saw the container running. Run it again, "
    "and ask whoever manages the Docker host not to remove running flow run containers."
)
UNSETTLED_MESSAGE = (
    "The flow run's container exited, and what the Prefect API holds for the flow run "
    "could not be read back (a state whose data does not parse), so the worker could not "
    "tell how it ended. Its usage is recorded from the container. Run it again."
)
DOCKER_ENGINE_LOST_MESSAGE = (
    "The Docker engine stopped while the flow run was running (a restart of the Docker "
    "daemon stops its containers unless live-restore is on); its container exited with "
    "code {exit_code}. Run it again once the engine is back."
)


@dataclass(frozen=True)
class ContainerReport:
    """What a container is and how it stands, read once from `docker inspect`."""

    id: str
    name: str
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    running: bool = False
    #: removed, dead, or being removed: its exit code and output are not to be had
    gone: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    memory_limit: int = 0
    nano_cpus: int = 0
    pids_limit: int = 0
    #: on the isolated network: the "host:port" destinations its tunnel was given
    isolated_destinations: tuple[str, ...] | None = None

    @classmethod
    def from_inspect(cls, attrs: dict[str, Any]) -> ContainerReport:
        state = attrs.get("State") or {}
        config = attrs.get("Config") or {}
        host = attrs.get("HostConfig") or {}
        env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
        return cls(
            id=attrs["Id"],
            name=str(attrs.get("Name", "")).lstrip("/"),
            image=config.get("Image", ""),
            labels=dict(config.get("Labels") or {}),
            env=env,
            started_at=parse_docker_time(state.get("StartedAt", "")),
            finished_at=parse_docker_time(state.get("FinishedAt", "")),
            running=bool(state.get("Running")),
            gone=bool(state.get("Dead")) or state.get("Status") == "removing",
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            memory_limit=int(host.get("Memory") or 0),
            nano_cpus=int(host.get("NanoCpus") or 0),
            pids_limit=int(host.get("PidsLimit") or 0),
            isolated_destinations=_isolated_destinations(config.get("Entrypoint")),
        )

    def removed(self, last_seen: datetime | None) -> ContainerReport:
        """This container as it stood when it was last seen running, now gone."""
        return dataclasses.replace(
            self, running=False, gone=True, finished_at=last_seen, exit_code=None
        )

    @property
    def flow_run_id(self) -> str | None:
        return self.labels.get("io.prefect.flow-run-id")


class Ending(Enum):
    """Which message the run's final state gets from the worker."""

    REMOVED = "removed"  # removed from outside: CONTAINER_REMOVED_MESSAGE
    RUN_TIME = "run time"  # stopped at the tier's maximum run time
    OUT_OF_MEMORY = "out of memory"
    ENGINE_LOST = "engine lost"  # DOCKER_ENGINE_LOST_MESSAGE
    EXITED = "exited"  # its exit is explained only if the flow never started


def ending(report: ContainerReport | None, *, timed_out: bool, engine_lost: bool) -> Ending:
    """How the container ended, in the order a user needs to hear it."""
    if report is None or report.gone:
        return Ending.REMOVED
    if timed_out:
        return Ending.RUN_TIME
    if report.oom_killed:
        return Ending.OUT_OF_MEMORY
    if engine_lost:
        return Ending.ENGINE_LOST
    return Ending.EXITED


def refused_a_process(state: State | None) -> bool:
    """Whether the run ended on the kernel refusing a new process or thread (EAGAIN from
    fork or clone), which in a container with a process limit means it reached it."""
    message = (state.message if state else None) or ""
    return "[Errno 11] Resource temporarily unavailable" in message or (
        "can't start new thread" in message
    )


def docker_lost(exc: BaseException | None) -> bool:
    """Whether `exc` says the Docker engine could not be reached (not a 404 or 409)."""
    while exc is not None:
        if isinstance(exc, requests.exceptions.ConnectionError):
            return True
        if isinstance(exc, docker.errors.DockerException) and not isinstance(
            exc, docker.errors.APIError
        ):
            return True
        exc = exc.__cause__
    return False


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


def _isolated_destinations(entrypoint: Any) -> tuple[str, ...] | None:
    """The destinations of a container made for the isolated network, read from the
    entrypoint the worker gave it: `/bin/sh .../isolate.sh GRANT LISTENERS -- ...`, each
    listener `address:port=host:port` (prefect_managed.gateway.tunnel)."""
    if (
        not isinstance(entrypoint, list)
        or len(entrypoint) < 4
        or not str(entrypoint[1]).endswith("/isolate.sh")
    ):
        return None
    return tuple(
        listener.split("=", 1)[1] for listener in str(entrypoint[3]).split(",") if "=" in listener
    )
