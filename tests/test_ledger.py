"""The usage ledger against a real Prefect server: two workers (two ledgers) of one
workspace publish records, each sees the other's, nothing counts twice, and a ledger
that has read the month once reads only what is new."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from prefect_managed.ledger import UsageLedger
from prefect_managed.usage import Outcome, UsageRecord, month_of


@flow
def ledger_probe() -> None:
    """Only its flow runs are used: a usage record belongs to a flow run."""


def _record(workspace: str, flow_run_id, seconds: float) -> UsageRecord:
    finished = datetime.now(timezone.utc)
    return UsageRecord.from_timestamps(
        finished - timedelta(seconds=seconds),
        finished,
        flow_run_id=flow_run_id,
        flow_run_name="probe",
        workspace=workspace,
        tier="test",
        pool="ledger-pool",
        image="prefect-managed-runtime:test",
        outcome=Outcome.COMPLETED,
    )


class CountingClient:
    """The Prefect client, counting how many pages of artifacts were read."""

    def __init__(self, client) -> None:
        self._client = client
        self.pages = 0

    async def read_artifacts(self, **kwargs):
        self.pages += 1
        return await self._client.read_artifacts(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


async def _scenario(workspace: str) -> dict[str, object]:
    month = month_of(datetime.now(timezone.utc))
    async with get_client() as client:
        runs = [(await client.create_flow_run(ledger_probe)).id for _ in range(9)]
        counting = CountingClient(client)
        # Pages of 2 and no overlap, so that reading only what is new shows in the count.
        a = UsageLedger(counting, workspace, page_size=2, overlap=timedelta(0))
        b = UsageLedger(client, workspace)
        seen = {"a_empty": (await a.month_usage(month)).minutes}
        for run in runs[:7]:
            assert await b.publish(_record(workspace, run, 61), 10, "test") is not None
        seen["a_after_b"] = (await a.month_usage(month)).minutes
        assert await a.publish(_record(workspace, runs[7], 30), 10, "test") is not None
        seen["again"] = await b.publish(_record(workspace, runs[7], 30), 10, "test")
        assert await b.publish(_record(workspace, runs[8], 61), 10, "test") is not None
        seen["b_after_a"] = (await b.month_usage(month)).minutes
        pages_before = counting.pages
        seen["a_incremental"] = (await a.month_usage(month)).minutes
        seen["pages_incremental"] = counting.pages - pages_before
        fresh = UsageLedger(counting, workspace, page_size=2, overlap=timedelta(0))
        pages_before = counting.pages
        seen["fresh"] = (await fresh.month_usage(month)).minutes
        seen["pages_full"] = counting.pages - pages_before
        seen["runs"] = len((await fresh.month_usage(month)).records)
    return seen


def test_two_ledgers_share_the_month_and_count_each_run_once(prefect_server):
    seen = asyncio.run(_scenario(f"ledger-{uuid.uuid4().hex[:6]}"))

    assert seen["a_empty"] == 0
    assert seen["a_after_b"] == 14  # seven runs of 61 s: 2 billable minutes each
    assert seen["again"] is None  # published once already: not counted again
    assert seen["b_after_a"] == 17  # and one of 30 s (1 minute), one of 61 s (2)
    assert seen["a_incremental"] == 17
    assert (seen["fresh"], seen["runs"]) == (17, 9)
    # Nine records in pages of 2: reading them all takes 5 pages; reading what is new
    # since a's last read (two records, then the newest it had read) takes 2.
    assert (seen["pages_full"], seen["pages_incremental"]) == (5, 2)


@pytest.mark.parametrize("records", [0, 3])
def test_a_new_month_starts_empty(prefect_server, records):
    async def scenario() -> int:
        workspace = f"ledger-{uuid.uuid4().hex[:6]}"
        async with get_client() as client:
            ledger = UsageLedger(client, workspace)
            for _ in range(records):
                run = (await client.create_flow_run(ledger_probe)).id
                await ledger.publish(_record(workspace, run, 5), 10, "test")
            return (await ledger.month_usage("1999-01")).minutes

    assert asyncio.run(scenario()) == 0
