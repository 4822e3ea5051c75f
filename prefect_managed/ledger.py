"""Usage records stored in the Prefect server, as artifacts.

Each run's record is a table artifact on the run's page, under a key of its own
(`usage-<workspace>-<yyyymm>-run-<flow run id>`; a later start of the run, after an
infrastructure retry or `prefect flow-run retry`, adds `-attempt-<n>`), with the record
itself in the artifact's metadata. The month's totals are always computed from those
records, each attempt of each run counted once, so publishing a record twice never
counts it twice. The monthly summary (`usage-<workspace>-<yyyymm>-summary`) is a
markdown rendering of those totals; each update adds a version to the key's history.

Records are signed (HMAC-SHA256) with a key only workers hold (`settings.ledger_key`):
a flow run holds a Prefect API credential and can write artifacts under any key, so
only a record whose signature verifies, for this workspace and month and under its own
run's key, is counted. Anything else under the prefix is skipped and reported once in
the worker's log, never a crash. Every version of a key is read, so a newer forged
artifact cannot hide the true record.

A ledger reads a month's records in full once, then only the records created since
the newest it had read (newest first). At most once every `OVERLAP_EVERY` a read goes on
down to `OVERLAP` (plus `OVERLAP_EVERY`, which the reads in between moved the newest on
by) before that newest, so that a record committed up to `OVERLAP` late by another
worker (or stamped by a server replica whose clock is behind) is counted too; a record
is counted once however often it is read. Every read going down the whole overlap made
each run's finish parse every record of the last five minutes: at a few hundred runs a
minute, pages of them per run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort

from prefect_managed.artifacts import run_table, summary_markdown
from prefect_managed.usage import (
    MonthlyUsage,
    UsageRecord,
    check_record,
    run_key,
    run_key_prefix,
    sign_record,
    summary_key,
)

__all__ = ["UsageLedger", "artifact_record"]

_RECORD = "usage_record"
_SIGNATURE = "usage_signature"
#: Prefect truncates each artifact metadata value to 500 characters: a record's JSON is
#: stored in parts of at most this many, under usage_record, usage_record_1, ...
_PART = 480
_PAGE = 200
#: The page of a read of only what is new since the last read.
_NEW_PAGE = 20
#: How far before the newest record already read an incremental read goes on reading,
#: once every `OVERLAP_EVERY` seconds.
OVERLAP = timedelta(minutes=5)
OVERLAP_EVERY = 60.0


@dataclass
class _Month:
    usage: MonthlyUsage
    newest: datetime | None = None  # when the newest record read was created
    overlapped_at: float = -math.inf  # when a read last went down the whole overlap


def artifact_record(
    key: bytes, workspace: str, month: str, artifact: Artifact
) -> UsageRecord | str:
    """The verified record an artifact holds, or why it holds none (`check_record`)."""
    metadata = artifact.metadata_ or {}
    parts = []
    for index in range(len(metadata)):
        part = metadata.get(_RECORD if index == 0 else f"{_RECORD}_{index}")
        if part is None:
            break
        parts.append(part)
    return check_record(
        key, workspace, month, artifact.key or "", "".join(parts) or None, metadata.get(_SIGNATURE)
    )


class UsageLedger:
    """One workspace's usage records in the Prefect server."""

    def __init__(
        self,
        client: PrefectClient,
        workspace: str,
        page_size: int = _PAGE,
        overlap: timedelta = OVERLAP,
        key: bytes | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        overlap_every: float = OVERLAP_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from prefect_managed.settings import ledger_key

        self._client = client
        self.workspace = workspace
        self._page_size = page_size
        self._overlap = overlap
        self._overlap_every = overlap_every
        self._clock = clock
        self._key = ledger_key() if key is None else key
        self._logger = logger or logging.getLogger(__name__)
        self._months: dict[str, _Month] = {}
        #: Artifacts under the usage prefix that were not counted, by id: why not.
        self.rejected: dict[UUID, str] = {}

    async def is_recorded(self, month: str, flow_run_id: UUID, attempt: int = 1) -> bool:
        """Whether the run's attempt has a valid record (a forged one does not count)."""
        key = run_key(self.workspace, month, flow_run_id, attempt)
        offset = 0
        while True:  # every version: a flood of forged ones must not hide the true one
            page = await self._client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=self._page_size,
                offset=offset,
            )
            if any(isinstance(self._check(month, artifact), UsageRecord) for artifact in page):
                return True
            if len(page) < self._page_size:
                return False
            offset += self._page_size

    def _check(self, month: str, artifact: Artifact) -> UsageRecord | str:
        return artifact_record(self._key, self.workspace, month, artifact)

    def _count(self, month: str, artifact: Artifact, usage: MonthlyUsage) -> None:
        checked = self._check(month, artifact)
        if isinstance(checked, UsageRecord):
            usage.add(checked)
        elif artifact.id not in self.rejected:
            self.rejected[artifact.id] = checked
            self._logger.warning(
                "Skipped artifact %r (id %s, created %s) under workspace %r's usage records: "
                "%s. It is not counted; a flow run may have written it.",
                artifact.key,
                artifact.id,
                artifact.created,
                self.workspace,
                checked,
            )

    async def month_usage(self, month: str) -> MonthlyUsage:
        """The month's usage: every record of the workspace's runs in that month."""
        known = self._months.get(month)
        seen = _Month(MonthlyUsage(self.workspace, month)) if known is None else known
        now = self._clock()
        stop_at = seen.newest  # None: the whole month
        overlapping = stop_at is None or now - seen.overlapped_at >= self._overlap_every
        if stop_at is not None and overlapping:
            # The reads since the last overlap moved `newest` on (by up to
            # `overlap_every`): a record committed up to `overlap` late is still read.
            stop_at -= self._overlap + timedelta(seconds=self._overlap_every)
        # Only what is new since the last read: a small first page (it usually ends
        # there), then full ones (inserts meanwhile shift the offsets by what they add).
        page_size = self._page_size if overlapping else min(self._page_size, _NEW_PAGE)
        prefix = run_key_prefix(self.workspace, month)
        newest = seen.newest
        offset = 0
        while True:
            page = await self._client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=prefix)),
                sort=ArtifactSort.CREATED_DESC,
                limit=page_size,
                offset=offset,
            )
            for artifact in page:
                if stop_at is not None and artifact.created and artifact.created < stop_at:
                    page = []  # everything older was read before
                    break
                if artifact.created and (newest is None or artifact.created > newest):
                    newest = artifact.created
                if artifact.key and artifact.key.startswith(prefix):
                    self._count(month, artifact, seen.usage)
            if len(page) < page_size:
                break
            offset += page_size
            page_size = self._page_size
        seen.newest = newest
        if overlapping:
            seen.overlapped_at = now
        self._months = {month: seen}  # only the month in use is kept
        return MonthlyUsage(self.workspace, month, dict(seen.usage.records))

    @property
    def client(self) -> PrefectClient:
        return self._client

    async def publish(
        self, record: UsageRecord, quota_hours: float, tier: str, summary: bool = True
    ) -> tuple[MonthlyUsage, MonthlyUsage] | None:
        """Store a run attempt's record once and, with `summary`, update the month's
        summary (else the caller does, `publish_summary`).

        Returns the month's usage before and after the record, or None when the
        attempt was already recorded.
        """
        # The month's records are read anyway (for the summary): a valid record of this
        # attempt among them, every version of every key read, means it is stored.
        before = await self.month_usage(record.month)
        if not MonthlyUsage(before.workspace, before.month, dict(before.records)).add(record):
            return None  # stored already (a `lost` record gives way to the real one)
        key = run_key(self.workspace, record.month, record.flow_run_id, record.attempt)
        record_json = record.model_dump_json()
        parts = [record_json[i : i + _PART] for i in range(0, len(record_json), _PART)]
        metadata = {_RECORD if i == 0 else f"{_RECORD}_{i}": part for i, part in enumerate(parts)}
        metadata[_SIGNATURE] = sign_record(self._key, key, record_json)
        await self._client.create_artifact(
            ArtifactCreate(
                key=key,
                type="table",
                data=json.dumps(run_table(record)),
                description=(
                    f"Compute used by this flow run: {record.billable_minutes} billable "
                    f"minute(s), {record.outcome.value}."
                ),
                metadata_=metadata,
                flow_run_id=record.flow_run_id,
            )
        )
        after = MonthlyUsage(before.workspace, before.month, dict(before.records))
        after.add(record)
        if summary:
            await self.publish_summary(after, quota_hours, tier)
        return before, after

    async def publish_summary(
        self, usage: MonthlyUsage, quota_hours: float, tier: str, if_changed: bool = False
    ) -> None:
        """A new version of the month's summary; with `if_changed`, only when the newest
        version says something else."""
        key = summary_key(self.workspace, usage.month)
        data = summary_markdown(usage, quota_hours, tier)
        if if_changed:
            newest = await self._client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            if newest and newest[0].data == data:
                return
        await self._client.create_artifact(
            ArtifactCreate(
                key=key,
                type="markdown",
                data=data,
                description=f"Compute usage of workspace {self.workspace} in {usage.month}",
            )
        )
