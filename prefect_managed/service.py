"""`prefect-managed serve`: one process serving every managed pool of the workspace.

The service composes one `ManagedWorker` per pool, each running Prefect's own
`BaseWorker.start` (see `_run_worker`) in one task group, and adds only the supervision:

- every `poll_seconds` it reads the workspace's `prefect:managed` pools, keeps the
  oldest `pool_limit` of them (the rule `ManagedWorker` itself applies, paused pools
  counted), and serves those that are not paused;
- a pool created later gets a worker at the next poll, without a restart; a pool
  that is deleted, paused or pushed out of the tier's count loses its worker;
- a worker is named `<service name>-<pool>`, so a restarted service takes over the
  containers its previous incarnation left behind (`ManagedWorker` reconciles them);
- a worker that fails is started again after a pause;
- `drain()` (SIGUSR1 to `prefect-managed serve`) makes every worker claim no new runs
  and the service return once no run or container of its workers is left;
- `health()` and `workers()`/`stats()` are what `metrics.HealthServer` serves.

Stopping a worker (pool gone, or the service shutting down) stops its loops: it claims
no new runs, and running containers keep running; the next worker of that pool with the
same name (or any worker of the pool once this one is offline) finishes and records
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType
from prefect.client.schemas.objects import WorkPool
from prefect.logging import get_logger

from prefect_managed.messages import served_pool_names
from prefect_managed.metrics import PoolStats
from prefect_managed.policy import Policy
from prefect_managed.worker import ManagedWorker, stopped_on_request

__all__ = ["ManagedService", "PoolPlan", "plan_pools", "worker_name"]

logger = get_logger("managed.service")

#: How long a failed worker waits before it is started again.
RESTART_SECONDS = 10.0
#: How often a draining service checks whether its workers are done.
DRAIN_CHECK_SECONDS = 2.0


def worker_name(service_name: str, pool: str) -> str:
    """The stable name of the service's worker for `pool`."""
    return f"{service_name}-{pool}"


@dataclass(frozen=True)
class PoolPlan:
    """Which managed pools to serve, and why the others are not served."""

    serve: list[str]
    paused: list[str] = field(default_factory=list)
    over_limit: list[str] = field(default_factory=list)


def plan_pools(pools: list[WorkPool], pool_limit: int) -> PoolPlan:
    """Serve the oldest `pool_limit` pools that are not paused.

    Paused pools still count toward the tier's pool count, as they do for
    `ManagedWorker`; otherwise pausing an old pool would let a newer one in here
    while the worker itself refused it.
    """
    counted = set(served_pool_names([(pool.name, pool.created) for pool in pools], pool_limit))
    ordered = sorted(pools, key=lambda pool: (pool.created, pool.name))
    return PoolPlan(
        serve=[p.name for p in ordered if p.name in counted and not p.is_paused],
        paused=[p.name for p in ordered if p.name in counted and p.is_paused],
        over_limit=[p.name for p in ordered if p.name not in counted],
    )


class ManagedService:
    """Runs a `ManagedWorker` for each managed pool the workspace may use."""

    def __init__(
        self,
        name: str,
        policy: Policy,
        poll_seconds: float = 10.0,
        worker_factory: Callable[..., ManagedWorker] = ManagedWorker,
        client_factory: Callable[[], PrefectClient] = get_client,
    ) -> None:
        self.name = name
        self.policy = policy
        self.poll_seconds = poll_seconds
        self._worker_factory = worker_factory
        self._client_factory = client_factory
        self._running: dict[str, anyio.Event] = {}  # pool -> the event that stops its worker
        self._stop_requested = False
        self._started_at: float | None = None
        self._stopping: anyio.Event | None = None  # made in `run`, inside the event loop
        self._reported: PoolPlan | None = None
        self._workers: dict[str, ManagedWorker] = {}  # pool -> its worker now
        self._stats: dict[str, PoolStats] = {}  # pool -> what its workers counted
        self._draining = False
        self._planned_at: float | None = None  # monotonic time of the last pool read

    @property
    def served(self) -> list[str]:
        return sorted(self._running)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Claim no new runs, let the running ones end (and be recorded), then return
        from `run`. Pools are no longer looked for meanwhile."""
        if self._draining:
            return
        self._draining = True
        logger.info(
            "Service %r draining: claiming no new flow runs; it stops once the runs of "
            "its workers have ended",
            self.name,
        )
        for worker in list(self._workers.values()):
            worker.drain()
        if self._stopping is not None:
            self._stopping.set()  # wakes the loop, which then waits for the drain

    def workers(self) -> list[tuple[str, ManagedWorker]]:
        return sorted(self._workers.items())

    def stats(self) -> list[tuple[str, PoolStats]]:
        return sorted(self._stats.items())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether a process supervisor should keep this service, and what it says."""
        age = None if self._planned_at is None else time.monotonic() - self._planned_at
        body: dict[str, Any] = {
            "service": self.name,
            "status": "stopping"
            if self._stop_requested
            else "draining"
            if self._draining
            else "serving",
            "pools": self.served,
            "seconds_since_pools_read": None if age is None else round(age, 1),
        }
        if self._stop_requested:
            return False, body
        if self._draining:
            return True, body  # reads no pools while it drains
        stale = self.poll_seconds * 3 + 30
        if age is None and self._started_at is not None:
            age = time.monotonic() - self._started_at  # not read yet: since the start
        if age is None or age > stale:
            body["problem"] = (
                f"the managed pools were not read from the Prefect API in the last "
                f"{stale:g} s: is PREFECT_API_URL reachable?"
            )
            return False, body
        return True, body

    def stop(self) -> None:
        """Stop every worker: no new runs; running containers keep running."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    async def run(self) -> None:
        """Serve until `stop()`; returns once every worker has stopped."""
        logger.info(
            "Service %r serving the managed pools of workspace %r (%s tier: up to %d pools)",
            self.name,
            self.policy.workspace.name,
            self.policy.workspace.tier,
            self.policy.tier.pool_limit,
        )
        self._started_at = time.monotonic()
        self._stopping = stopping = anyio.Event()
        if self._stop_requested or self._draining:
            stopping.set()
        async with self._client_factory() as client, anyio.create_task_group() as workers:
            # A drain asked for before the first read still starts the workers, which
            # finish what an earlier service of this name left; a stop does not.
            first = not self._stop_requested
            while first or not stopping.is_set():
                first = False
                try:
                    plan = await self._plan(client)
                except Exception:  # the API may be unreachable for a while: keep serving
                    logger.warning("Could not read the managed work pools", exc_info=True)
                else:
                    self._planned_at = time.monotonic()
                    self._apply(plan, workers)
                with anyio.move_on_after(self.poll_seconds):
                    await stopping.wait()
            if self._draining and not self._stop_requested:
                await self._wait_for_drain()
            for pool in list(self._running):
                self._running.pop(pool).set()
        logger.info("Service %r stopped", self.name)

    async def _wait_for_drain(self) -> None:
        """Until every worker has nothing left, or `stop()` (a signal) ends the wait."""
        while not self._stop_requested:
            done = True
            for pool, worker in list(self._workers.items()):
                try:
                    done = await worker.drained() and done
                except Exception:  # the engine may be away for a while: ask again
                    logger.warning("Could not tell whether %r drained", pool, exc_info=True)
                    done = False
            if done:
                logger.info("Service %r drained: no flow run of its workers is left", self.name)
                return
            await anyio.sleep(DRAIN_CHECK_SECONDS)

    async def _plan(self, client: PrefectClient) -> PoolPlan:
        pools = await client.read_work_pools(
            work_pool_filter=WorkPoolFilter(type=WorkPoolFilterType(any_=[ManagedWorker.type]))
        )
        return plan_pools(pools, self.policy.tier.pool_limit)

    def _apply(self, plan: PoolPlan, workers: anyio.abc.TaskGroup) -> None:
        for pool in list(self._running):
            if pool not in plan.serve:
                reason = (
                    "it is paused"
                    if pool in plan.paused
                    else "it is beyond the tier's pool count"
                    if pool in plan.over_limit
                    else "it was deleted"
                )
                logger.info("Stopped serving work pool %r: %s", pool, reason)
                self._running.pop(pool).set()
                self._workers.pop(pool, None)
        for pool in plan.serve:
            if pool not in self._running:
                stop = anyio.Event()
                self._running[pool] = stop
                logger.info(
                    "Serving work pool %r with worker %r", pool, worker_name(self.name, pool)
                )
                workers.start_soon(self._serve_pool, pool, stop)
        if plan.over_limit and (
            self._reported is None or plan.over_limit != self._reported.over_limit
        ):
            logger.warning(
                "Not serving work pools %s: workspace %r is on the %s tier, which allows "
                "%d managed pools (the oldest). Delete a managed pool you no longer use, "
                "or move the workspace to a tier with more pools.",
                ", ".join(repr(name) for name in plan.over_limit),
                self.policy.workspace.name,
                self.policy.workspace.tier,
                self.policy.tier.pool_limit,
            )
        self._reported = plan

    async def _serve_pool(self, pool: str, stop: anyio.Event) -> None:
        while not stop.is_set():
            worker = self._worker_factory(
                name=worker_name(self.name, pool),
                work_pool_name=pool,
                # A deleted pool must stay deleted: Prefect's worker would make it again.
                create_pool_if_not_found=False,
            )
            worker.stats = self._stats.setdefault(pool, PoolStats())
            if self._draining:
                worker.drain()
            self._workers[pool] = worker
            try:
                await _run_worker(worker, stop)
            except Exception:
                logger.exception(
                    "The worker of work pool %r failed; starting it again in %g s",
                    pool,
                    RESTART_SECONDS,
                )
            with anyio.move_on_after(RESTART_SECONDS):
                await stop.wait()


async def _run_worker(worker: ManagedWorker, stop: anyio.Event) -> None:
    """Prefect's `BaseWorker.start` (its loops, worker events, metrics) until `stop` is set.

    Not cancelled: cancelling `start` would cancel the worker's teardown half-way and
    leave its task groups open. `stop_soon` makes the worker's next poll abandon the runs
    in flight (their containers keep running for the next worker of this name) and end
    Prefect's loops, and Prefect tears the worker down.
    """

    async def stop_when_asked() -> None:
        await stop.wait()
        worker.stop_soon()

    async with anyio.create_task_group() as group:
        group.start_soon(stop_when_asked)
        try:
            await worker.start(printer=logger.info)
        except BaseException as error:
            if not stopped_on_request(error):
                raise
        group.cancel_scope.cancel()
    logger.info("Worker %r stopped", worker.name)
