"""Workspace-wide concurrency through Prefect's global concurrency limits with leases.

Every worker of a workspace, on any host, takes a slot of the same global concurrency
limit before it starts a run and gives it back when the run's container is gone. Slots
are held through leases the worker renews; a worker that dies stops renewing, and the
Prefect server takes the slot back when the lease expires.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

__all__ = ["LEASE_SECONDS", "WorkspaceSlots"]

#: The shortest lease Prefect's server grants; renewed every third of it.
LEASE_SECONDS = 60.0

_LOCKED = 423


@dataclass
class _Lease:
    id: UUID
    renewed_at: float


class WorkspaceSlots:
    """The slots this worker holds in its workspace's global concurrency limit."""

    def __init__(
        self,
        client: PrefectClient,
        limit_name: str,
        limit: int,
        logger: logging.Logger | logging.LoggerAdapter,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self._client = client
        self.limit_name = limit_name
        self.limit = limit
        self._logger = logger
        self._lease_seconds = lease_seconds
        self._leases: dict[UUID, _Lease] = {}

    async def ensure_limit(self) -> None:
        """Create the workspace's limit, or set it to the tier's number."""
        await self._client.upsert_global_concurrency_limit_by_name(self.limit_name, self.limit)

    def holds(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self._leases

    async def try_acquire(self, flow_run_id: UUID) -> bool:
        """Take one slot for the run; False when every slot is taken."""
        lease = await self._increment(flow_run_id)
        if lease is not None and not lease.limits:
            # A lease on no limit at all: the limit was deleted. Make it again, once.
            await self._client.release_concurrency_slots_with_lease(lease.lease_id)
            await self.ensure_limit()
            lease = await self._increment(flow_run_id)
        if lease is None or not lease.limits:
            return False
        self._leases[flow_run_id] = _Lease(lease.lease_id, time.monotonic())
        return True

    async def _increment(self, flow_run_id: UUID) -> ConcurrencyLimitWithLeaseResponse | None:
        try:
            response = await self._client.increment_concurrency_slots_with_lease(
                names=[self.limit_name],
                slots=1,
                mode="concurrency",
                lease_duration=self._lease_seconds,
                holder=ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id),
            )
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == _LOCKED:
                return None
            raise
        return ConcurrencyLimitWithLeaseResponse.model_validate(response.json())

    async def release(self, flow_run_id: UUID) -> None:
        lease = self._leases.pop(flow_run_id, None)
        if lease is None:
            return
        try:
            await self._client.release_concurrency_slots_with_lease(lease.id)
        except ObjectNotFound:
            self._logger.debug("Lease of flow run %s had already expired", flow_run_id)

    async def renew_due(self) -> None:
        """Renew every lease older than a third of its duration."""
        now = time.monotonic()
        for flow_run_id, lease in list(self._leases.items()):
            if now - lease.renewed_at < self._lease_seconds / 3:
                continue
            try:
                await self._client.renew_concurrency_lease(lease.id, self._lease_seconds)
            except ObjectNotFound:
                self._logger.warning(
                    "The concurrency slot of flow run %s expired before it was renewed; "
                    "the workspace may briefly run more than %d flow runs at once",
                    flow_run_id,
                    self.limit,
                )
                self._leases.pop(flow_run_id, None)
            else:
                lease.renewed_at = now

    @property
    def renew_interval(self) -> float:
        return self._lease_seconds / 6
