"""Usage records stored in the Prefect server, as artifacts.

Each run's record is a table artifact on the run's page, under a key of its own
(`usage-<workspace>-<yyyymm>-run-<flow run id>`), with the record itself in the
artifact's metadata. The month's totals are always computed from those records,
each run counted once, so publishing a record twice never counts it twice. The
monthly summary (`usage-<workspace>-<yyyymm>-summary`) is a markdown rendering
of those totals; each update adds a version to the key's history.

A ledger reads a month's records in full once, then only the records created since
(newest first, down to `OVERLAP` before the newest it had read, so that a record
committed late by another worker is not skipped); a record is counted once however
often it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from prefect_managed.artifacts import run_table, summary_markdown
from prefect_managed.usage import (
    MonthlyUsage,
    UsageRecord,
    run_key,
    run_key_prefix,
    summary_key,
)

__all__ = ["UsageLedger"]

_RECORD = "usage_record"
_PAGE = 200
#: How far before the newest record already read an incremental read goes on reading.
OVERLAP = timedelta(minutes=5)


@dataclass
class _Month:
    usage: MonthlyUsage
    newest: datetime | None = None  # when the newest record read was created


class UsageLedger:
    """One workspace's usage records in the Prefect server."""

    def __init__(
        self,
        client: PrefectClient,
        workspace: str,
        page_size: int = _PAGE,
        overlap: timedelta = OVERLAP,
    ) -> None:
        self._client = client
        self.workspace = workspace
        self._page_size = page_size
        self._overlap = overlap
        self._months: dict[str, _Month] = {}

    async def is_recorded(self, month: str, flow_run_id: UUID) -> bool:
        key = run_key(self.workspace, month, flow_run_id)
        found = await self._client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
        return bool(found)

    async def month_usage(self, month: str) -> MonthlyUsage:
        """The month's usage: every record of the workspace's runs in that month."""
        known = self._months.get(month)
        seen = _Month(MonthlyUsage(self.workspace, month)) if known is None else known
        stop_at = None if known is None or known.newest is None else known.newest - self._overlap
        prefix = run_key_prefix(self.workspace, month)
        newest = seen.newest
        offset = 0
        while True:
            page = await self._client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=prefix)),
                sort=ArtifactSort.CREATED_DESC,
                limit=self._page_size,
                offset=offset,
            )
            for artifact in page:
                if stop_at is not None and artifact.created and artifact.created < stop_at:
                    page = []  # everything older was read before
                    break
                if artifact.created and (newest is None or artifact.created > newest):
                    newest = artifact.created
                if artifact.key and artifact.key.startswith(prefix) and artifact.metadata_:
                    raw = artifact.metadata_.get(_RECORD)
                    if raw:
                        seen.usage.add(UsageRecord.model_validate_json(raw))
            if len(page) < self._page_size:
                break
            offset += self._page_size
        seen.newest = newest
        self._months = {month: seen}  # only the month in use is kept
        return MonthlyUsage(self.workspace, month, dict(seen.usage.records))

    async def publish(
        self, record: UsageRecord, quota_hours: float, tier: str
    ) -> tuple[MonthlyUsage, MonthlyUsage] | None:
        """Store a run's record once and update the month's summary.

        Returns the month's usage before and after the record, or None when the run
        was already recorded.
        """
        if await self.is_recorded(record.month, record.flow_run_id):
            return None
        before = await self.month_usage(record.month)
        await self._client.create_artifact(
            ArtifactCreate(
                key=run_key(self.workspace, record.month, record.flow_run_id),
                type="table",
                data=json.dumps(run_table(record)),
                description=(
                    f"Compute used by this flow run: {record.billable_minutes} billable "
                    f"minute(s), {record.outcome.value}."
                ),
                metadata_={_RECORD: record.model_dump_json()},
                flow_run_id=record.flow_run_id,
            )
        )
        after = MonthlyUsage(before.workspace, before.month, dict(before.records))
        after.add(record)
        await self.publish_summary(after, quota_hours, tier)
        return before, after

    async def publish_summary(self, usage: MonthlyUsage, quota_hours: float, tier: str) -> None:
        await self._client.create_artifact(
            ArtifactCreate(
                key=summary_key(self.workspace, usage.month),
                type="markdown",
                data=summary_markdown(usage, quota_hours, tier),
                description=f"Compute usage of workspace {self.workspace} in {usage.month}",
            )
        )
