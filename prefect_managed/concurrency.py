"""Workspace-wide concurrency through Prefect's global concurrency limits with leases.

Every worker of a workspace, on any host, takes a slot of the same global concurrency
limit before it starts a run and gives it back when the run's container is gone. Slots
are held through leases the worker renews; a worker that dies stops renewing, and the
Prefect server takes the slot back when the lease expires.

A lease can also vanish before it expires: Prefect's server keeps leases in memory by
default, so a server restart forgets them while the slots they held stay counted, and the
workspace's limit would shrink for good. A worker that finds one of its leases missing
less than a lease after it last asked to renew it knows the lease cannot have expired: it
gives the slot back itself (and takes a new lease for a run still going). A lease missing
later than that may have expired, and then the server has given its slot back already:
giving it back again would count one run too few and let the workspace run one flow run
over its limit, so the worker does not (a slot stays counted only where a server with
in-memory leases restarted and the worker could not renew for a whole lease; with
Prefect's file lease storage, `PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=
prefect.server.concurrency.lease_storage.filesystem`, a restart forgets no lease).

A flow run holds a Prefect API credential, and Prefect OSS has no permissions: its code
could deactivate the limit, raise it or make its slots decay. So before every acquire the
worker reads the limit and sets back what is not the tier's (`assert_limit`), and makes it
again if it was deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

__all__ = ["LEASE_SECONDS", "WorkspaceSlots"]

#: The shortest lease Prefect's server grants; renewed every third of it.
LEASE_SECONDS = 60.0

#: A lease found gone this close to a lease after its last renewal was asked for may have
#: expired (the server's clock and its repossessor's delay are not ours to know exactly).
EXPIRY_MARGIN_SECONDS = 5.0

_LOCKED = 423
_GONE = 410  # what the server answers when renewing a lease it does not have


@dataclass
class _Lease:
    id: UUID
    renewed_at: float  # when the lease was last asked for or renewed (before the request)


class WorkspaceSlots:
    """The slots this worker holds in its workspace's global concurrency limit."""

    def __init__(
        self,
        client: PrefectClient,
        limit_name: str,
        limit: int,
        logger: logging.Logger | logging.LoggerAdapter,
        lease_seconds: float = LEASE_SECONDS,
        released: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        #: Called each time `release` has given a slot back (guarded: never fails it).
        self._released = released
        self.limit_name = limit_name
        self.limit = limit
        self._logger = logger
        self._lease_seconds = lease_seconds
        self._leases: dict[UUID, _Lease] = {}
        self._renewing: set[UUID] = set()  # runs whose lost lease is being replaced
        self._ended: set[UUID] = set()  # runs released while their lease was replaced

    async def ensure_limit(self) -> None:
        """Create the workspace's limit, or set it to the tier's number."""
        try:
            await self._client.upsert_global_concurrency_limit_by_name(self.limit_name, self.limit)
        except ObjectAlreadyExists:
            # Another worker made it between our read and create (Prefect's upsert is
            # not atomic): it exists now, so the second try only sets its number.
            await self._client.upsert_global_concurrency_limit_by_name(self.limit_name, self.limit)

    async def assert_limit(self) -> int:
        """Set the limit back to the tier's if someone changed it; make it if it is gone.
        Returns how many of its slots were free when read."""
        try:
            current = await self._client.read_global_concurrency_limit_by_name(self.limit_name)
        except ObjectNotFound:
            self._logger.warning(
                "The workspace's concurrency limit %r was deleted from outside the workers; "
                "making it again with %d slots",
                self.limit_name,
                self.limit,
            )
            await self.ensure_limit()
            return max(self.limit - len(self._leases), 0)
        changed: dict[str, object] = {}
        if not current.active:
            changed["active"] = True
        if current.limit != self.limit:
            changed["limit"] = self.limit
        if current.slot_decay_per_second:
            changed["slot_decay_per_second"] = 0.0
        # Slots that decayed or were released by someone else: at least this worker's
        # own running flow runs hold one each. Not a lease that may have run out: the
        # server may have given its slot back already, and its renewal counts the run
        # again (counting it here too would leave a slot taken for good).
        held = sum(1 for lease in self._leases.values() if not self.may_have_expired(lease))
        if current.active_slots < held:
            changed["active_slots"] = held
        if changed:
            self._logger.warning(
                "The workspace's concurrency limit %r was changed from outside the workers "
                "(active=%s, limit=%s, slot_decay_per_second=%s, active_slots=%d with %d "
                "held by this worker); set back to %s",
                self.limit_name,
                current.active,
                current.limit,
                current.slot_decay_per_second,
                current.active_slots,
                held,
                ", ".join(f"{key}={value}" for key, value in changed.items()),
            )
            await self._client.update_global_concurrency_limit(
                self.limit_name, GlobalConcurrencyLimitUpdate.model_validate(changed)
            )
        return max(self.limit - max(current.active_slots, len(self._leases)), 0)

    def holds(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self._leases

    def held_runs(self) -> set[UUID]:
        """The flow runs this worker holds a slot for."""
        return set(self._leases)

    async def free_slots(self) -> int:
        """How many of the workspace's slots are free: none, without a request, while
        this worker holds every slot itself (no run can get one then, and the limit is
        checked again when a slot is released); else as the limit reads now
        (`assert_limit`)."""
        if len(self._leases) >= self.limit:
            return 0
        return await self.assert_limit()

    async def acquire_in_order(self, flow_run_ids: list[UUID], checked: bool = False) -> set[UUID]:
        """Slots for the first runs of `flow_run_ids`, as many as are free.

        A poll costs one read of the limit (`free_slots`; none with `checked`: the caller
        has just read it, and offers no more runs than it found free) and an increment per
        slot the read found free (once one finds every slot taken, the later runs are
        not tried: they would find the same), and nothing at all while this worker holds
        every slot itself.
        """
        acquired: set[UUID] = set()
        if not flow_run_ids or len(self._leases) >= self.limit:
            return acquired
        free = len(flow_run_ids) if checked else await self.assert_limit()
        for flow_run_id in flow_run_ids[:free]:
            if not await self.try_acquire(flow_run_id, checked=True):
                break
            acquired.add(flow_run_id)
        return acquired

    async def try_acquire(self, flow_run_id: UUID, checked: bool = False) -> bool:
        """Take one slot for the run; False when every slot is taken. `checked`: the
        caller has just run `assert_limit`."""
        if not checked:
            await self.assert_limit()
        asked = time.monotonic()
        lease = await self._increment(flow_run_id)
        if lease is not None and not lease.limits:
            # A lease on no limit at all: the limit was deleted. Make it again, once.
            await self._client.release_concurrency_slots_with_lease(lease.lease_id)
            await self.ensure_limit()
            lease = await self._increment(flow_run_id)
        if lease is None or not lease.limits:
            return False
        self._leases[flow_run_id] = _Lease(lease.lease_id, asked)
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
            if flow_run_id in self._renewing:
                self._ended.add(flow_run_id)
            return
        # Releasing a lease the server does not have is a silent no-op, which would leave
        # a forgotten lease's slot counted: ask first (renewing is how to ask).
        try:
            # A slot released while its limit is inactive stays counted for good: set the
            # limit back first (a flow run may have switched it off).
            await self.assert_limit()
            if not await self._renew(lease):
                await self._release_lost_slot(flow_run_id, lease)
            else:
                await self._client.release_concurrency_slots_with_lease(lease.id)
        except (httpx.HTTPError, PrefectHTTPStatusError):
            self._logger.warning(
                "Could not release the concurrency slot of flow run %s; the Prefect server "
                "takes it back when its lease expires",
                flow_run_id,
                exc_info=True,
            )
            return
        try:
            self._released()
        except Exception:
            self._logger.debug("Could not announce a released slot", exc_info=True)

    async def _renew(self, lease: _Lease) -> bool:
        """Renew the lease; False when the server no longer has it."""
        asked = time.monotonic()
        try:
            await self._client.renew_concurrency_lease(lease.id, self._lease_seconds)
        except ObjectNotFound:
            return False
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == _GONE:
                return False
            raise
        lease.renewed_at = asked
        return True

    def may_have_expired(self, lease: _Lease) -> bool:
        """Whether a lease the server no longer has may have run out (and its slot been
        given back by the server) rather than been forgotten by a restarted server."""
        unrenewed = time.monotonic() - lease.renewed_at
        return unrenewed >= self._lease_seconds - EXPIRY_MARGIN_SECONDS

    async def _release_lost_slot(self, flow_run_id: UUID, lease: _Lease) -> None:
        if self.may_have_expired(lease):
            self._logger.warning(
                "The concurrency lease of flow run %s ran out before this worker could "
                "renew it; the Prefect server gave its slot back. (If the server restarted "
                "meanwhile and keeps leases in memory, that slot stays counted: run it with "
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
                "prefect.server.concurrency.lease_storage.filesystem.)",
                flow_run_id,
            )
            return
        await self._client.release_concurrency_slots(
            names=[self.limit_name],
            slots=1,
            occupancy_seconds=time.monotonic() - lease.renewed_at,
        )
        self._logger.warning(
            "The concurrency lease of flow run %s was forgotten by a restarted Prefect "
            "server; its slot was given back",
            flow_run_id,
        )

    async def renew_due(self) -> None:
        """Renew every lease older than a third of its duration."""
        now = time.monotonic()
        for flow_run_id, lease in list(self._leases.items()):
            if now - lease.renewed_at < self._lease_seconds / 3:
                continue
            if not await self._renew(lease):
                if self._leases.get(flow_run_id) is not lease:
                    continue  # released meanwhile: the run is over
                # Give the forgotten slot back, and count the run again under a new lease.
                self._leases.pop(flow_run_id, None)
                self._renewing.add(flow_run_id)
                try:
                    await self._release_lost_slot(flow_run_id, lease)
                    acquired = await self.try_acquire(flow_run_id)
                finally:
                    self._renewing.discard(flow_run_id)
                if flow_run_id in self._ended:
                    self._ended.discard(flow_run_id)
                    await self.release(flow_run_id)  # it ended while the new lease was taken
                elif not acquired:
                    self._logger.warning(
                        "The concurrency slot of flow run %s expired before it was renewed "
                        "and every slot is taken now; the workspace may briefly run more "
                        "than %d flow runs at once",
                        flow_run_id,
                        self.limit,
                    )

    @property
    def renew_interval(self) -> float:
        return self._lease_seconds / 6
