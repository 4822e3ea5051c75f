"""Whether a worker's pool is served: one of the workspace's oldest `pool_limit`
managed pools (`policy.served_pool_names`), checked at most every few seconds, with a
log line when that changes."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterType

from prefect_managed.messages import pool_not_served_message, served_pool_names
from prefect_managed.policy import Policy

__all__ = ["POOL_CHECK_SECONDS", "PoolGate"]

POOL_CHECK_SECONDS = 10.0


class PoolGate:
    """Answers "may this pool's worker take runs?" for one pool."""

    def __init__(
        self,
        client: PrefectClient,
        policy: Policy,
        pool: str,
        pool_type: str,
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self._client = client
        self._policy = policy
        self._pool = pool
        self._type = pool_type
        self._logger = logger
        self._served = True
        self._checked_at = -POOL_CHECK_SECONDS

    async def is_served(self) -> bool:
        if time.monotonic() - self._checked_at < POOL_CHECK_SECONDS:
            return self._served
        pools = await self._client.read_work_pools(
            work_pool_filter=WorkPoolFilter(type=WorkPoolFilterType(any_=[self._type]))
        )
        served = served_pool_names(
            [(pool.name, pool.created) for pool in pools], self._policy.tier.pool_limit
        )
        is_served = self._pool in served
        if is_served != self._served or (not is_served and self._checked_at < 0):
            if is_served:
                self._logger.info("Work pool %r is served again", self._pool)
            else:
                self._logger.error("%s", pool_not_served_message(self._policy, self._pool, served))
        self._served = is_served
        self._checked_at = time.monotonic()
        return is_served
