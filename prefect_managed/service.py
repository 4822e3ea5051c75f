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
- a worker that fails is started again after a pause.

Stopping a worker (pool gone, or the service shutting down) stops its loops: it claims
no new runs, and running containers keep running; the next worker of that pool with the
same name (or any worker of the pool once this one is offline) finishes and records
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType
from prefect.client.schemas.objects import WorkPool
from prefect.logging import get_logger

from prefect_managed.messages import served_pool_names
from prefect_managed.policy import Policy
from prefect_managed.worker import ManagedWorker, stopped_on_request

__all__ = ["ManagedService", "PoolPlan", "plan_pools", "worker_name"]

logger = get_logger("managed.service")

#: How long a failed worker waits before it is started again.
RESTART_SECONDS = 10.0


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
        self._stopping: anyio.Event | None = None  # made in `run`, inside the event loop
        self._reported: PoolPlan | None = None

    @property
    def served(self) -> list[str]:
        return sorted(self._running)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

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
        self._stopping = stopping = anyio.Event()
        if self._stop_requested:
            stopping.set()
        async with self._client_factory() as client, anyio.create_task_group() as workers:
            while not stopping.is_set():
                try:
                    plan = await self._plan(client)
                except Exception:  # the API may be unreachable for a while: keep serving
                    logger.warning("Could not read the managed work pools", exc_info=True)
                else:
                    self._apply(plan, workers)
                with anyio.move_on_after(self.poll_seconds):
                    await stopping.wait()
            for pool in list(self._running):
                self._running.pop(pool).set()
        logger.info("Service %r stopped", self.name)

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
