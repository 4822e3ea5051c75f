"""Capacity-aware admission: a host takes only the runs its Docker engine has room for.

The workspace's slots say how many runs the workspace may run; they say nothing about
whether *this* host can start one more. A host admits a run only when the memory limits
and CPU caps of the managed containers running on its engine, plus those of the runs it
has admitted whose containers are not made yet, plus the new run's, fit what the engine
reports (`docker info`: `MemTotal`, `NCPU`) less the policy's `[host]` reserves. A run
that does not fit keeps its Scheduled state and no slot, so another host takes it at
its next poll (or this one, once a container ends).

Every worker of one process that uses the same engine shares one `HostCapacity`
(`capacity_for`): `prefect-managed serve` runs a worker per pool, and the check and the
reservation are made without an `await` between them, so two pools' polls cannot both
take the last room. Processes are not coordinated: run one service per engine.

`fits` is pure and is what the unit tests check; `HostCapacity` adds the engine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from prefect_managed.configuration import MANAGED_LABEL
from prefect_managed.policy import Host
from prefect_managed.policy_values import format_bytes

if TYPE_CHECKING:
    from prefect_managed.containers import Containers

__all__ = ["Capacity", "HostCapacity", "Need", "capacity_for", "fits"]

#: How long the engine's totals are kept before `docker info` is asked again.
INFO_SECONDS = 60.0


@dataclass(frozen=True)
class Need:
    """What one run's container may take: its memory limit and CPU cap."""

    memory: int
    cpus: float

    def __add__(self, other: Need) -> Need:
        return Need(self.memory + other.memory, self.cpus + other.cpus)


NOTHING = Need(0, 0.0)


@dataclass(frozen=True)
class Capacity:
    """What runs on one host may be given in all."""

    memory: int
    cpus: float

    @classmethod
    def of_engine(cls, info: dict[str, object], host: Host) -> Capacity:
        memory = int(info.get("MemTotal") or 0)  # type: ignore[call-overload]
        cpus = float(info.get("NCPU") or 0)  # type: ignore[arg-type]
        return cls(
            memory=max(0, memory - host.reserve_memory_bytes),
            cpus=max(0.0, cpus - host.reserve_cpus) * host.cpu_overcommit,
        )

    def describe(self, held: Need) -> str:
        return (
            f"{format_bytes(held.memory)} of {format_bytes(self.memory)} memory and "
            f"{held.cpus:g} of {self.cpus:g} CPUs held"
        )


def fits(capacity: Capacity, held: Need, each: Need, wanted: int) -> int:
    """How many of `wanted` runs needing `each` fit beside what is `held`."""
    count = 0
    while count < wanted:
        total = held + Need(each.memory * (count + 1), each.cpus * (count + 1))
        # A small tolerance: CPU caps are sums of floats.
        if total.memory > capacity.memory or total.cpus > capacity.cpus + 1e-9:
            break
        count += 1
    return count


class HostCapacity:
    """The room on one engine, shared by the workers of this process that use it."""

    def __init__(self, containers: Containers, host: Host) -> None:
        self._containers = containers
        self._host = host
        self._capacity: Capacity | None = None
        self._asked_at = -math.inf
        # admitted, container not running yet: what each needs, and which worker took it
        self._pending: dict[UUID, tuple[Need, str]] = {}
        self.held = NOTHING  # as last counted, for the log and the metrics

    @property
    def capacity(self) -> Capacity | None:
        return self._capacity

    async def admit(
        self, runs: list[UUID], each: Need, now: float, owner: str = ""
    ) -> tuple[list[UUID], str]:
        """The first runs of `runs` this host has room for, reserved until `release`;
        and, when some do not fit, why (for the log)."""
        if not runs:
            return [], ""
        if self._capacity is None or now - self._asked_at >= INFO_SECONDS:
            self._capacity = Capacity.of_engine(await self._containers.info(), self._host)
            self._asked_at = now
        running = await self._containers.running([f"{MANAGED_LABEL}=true"])
        # From here to the reservation there is no await: the workers of this process
        # see one count.
        started = {report.flow_run_id for report in running}
        held = NOTHING
        for report in running:
            held += Need(report.memory_limit, report.nano_cpus / 1e9)
        offered = set(runs)  # offered again: not counted twice
        for run, (need, _) in self._pending.items():
            if str(run) not in started and run not in offered:
                held += need
        self.held = held
        assert self._capacity is not None
        count = fits(self._capacity, held, each, len(runs))
        admitted = runs[:count]
        for run in admitted:
            self._pending[run] = (each, owner)
        why = ""
        if count < len(runs):
            why = (
                f"this host has room for {count} more of {len(runs)} waiting flow runs "
                f"of {format_bytes(each.memory)} and {each.cpus:g} CPUs "
                f"({self._capacity.describe(held)}; the policy's [host] reserves "
                f"{format_bytes(self._host.reserve_memory_bytes)} and "
                f"{self._host.reserve_cpus:g} CPUs, CPU caps overcommitted "
                f"{self._host.cpu_overcommit:g} times)"
            )
        return admitted, why

    def release(self, run: UUID) -> None:
        """The run ended or was not started: its reservation goes."""
        self._pending.pop(run, None)

    def sweep(self, owner: str, keep: set[UUID]) -> None:
        """Drop `owner`'s reservations for runs it no longer submits nor runs (a path
        that gave none back: a submission Prefect dropped, an error, an abandon)."""
        for run, (_, by) in list(self._pending.items()):
            if by == owner and run not in keep:
                del self._pending[run]


_shared: dict[tuple[str, Host], HostCapacity] = {}


def capacity_for(containers: Containers, host: Host) -> HostCapacity:
    """The `HostCapacity` of the engine this process reaches (`DOCKER_HOST`)."""
    key = (os.environ.get("DOCKER_HOST", ""), host)
    if key not in _shared:
        _shared[key] = HostCapacity(containers, host)
    return _shared[key]
