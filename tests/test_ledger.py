"""The usage ledger against a real Prefect server: two workers (two ledgers) of one
workspace publish records, each sees the other's, nothing counts twice, and a ledger
that has read the month once reads only what is new."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from prefect_managed.ledger import UsageLedger
from prefect_managed.usage import Outcome, UsageRecord, month_of, summary_key


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


class LateClient(CountingClient):
    """The Prefect client, as a reader sees the server while the artifacts of `hidden`
    runs are not committed yet (another worker's transaction still open); the limit of
    each read is kept."""

    def __init__(self, client, hidden: set) -> None:
        super().__init__(client)
        self.hidden = hidden
        self.limits: list[int] = []

    async def read_artifacts(self, **kwargs):
        self.limits.append(kwargs["limit"])
        page = await super().read_artifacts(**kwargs)
        return [artifact for artifact in page if artifact.flow_run_id not in self.hidden]


def test_a_record_committed_late_is_counted_at_the_next_overlap_read(prefect_server):
    """Reads between two overlap reads fetch only what is new, in small pages; the next
    overlap read (within `overlap_every`) finds a record whose artifact became visible
    after newer ones had been read."""

    async def scenario() -> dict[str, object]:
        workspace = f"ledger-{uuid.uuid4().hex[:6]}"
        month = month_of(datetime.now(timezone.utc))
        now = [0.0]
        async with get_client() as client:
            late, newer, newest = [
                (await client.create_flow_run(ledger_probe)).id for _ in range(3)
            ]
            writer = UsageLedger(client, workspace)
            for run in (late, newer):
                await writer.publish(_record(workspace, run, 61), 10, "test")
            reading = LateClient(client, hidden={late})
            reader = UsageLedger(reading, workspace, overlap_every=60, clock=lambda: now[0])
            seen: dict[str, object] = {"first": (await reader.month_usage(month)).minutes}
            reading.hidden.clear()  # the late record is committed now
            await writer.publish(_record(workspace, newest, 61), 10, "test")
            now[0] = 30.0
            pages = reading.pages
            seen["between"] = (await reader.month_usage(month)).minutes
            seen["between_reads"] = (reading.pages - pages, reading.limits[-1])
            now[0] = 61.0
            seen["overlap"] = (await reader.month_usage(month)).minutes
            seen["overlap_limit"] = reading.limits[-1]
        return seen

    seen = asyncio.run(scenario())
    assert seen["first"] == 2  # the late record not visible yet
    assert seen["between"] == 4  # the newest record; what is new only, one small page
    assert seen["between_reads"] == (1, 20)
    assert seen["overlap"] == 6  # the late record too, once the overlap is read again
    assert seen["overlap_limit"] == 200


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


async def _forge(client, artifact_key: str, body: str, signature: str | None, run=None) -> None:
    from prefect.client.schemas.actions import ArtifactCreate

    metadata = {"usage_record": body}
    if signature is not None:
        metadata["usage_signature"] = signature
    await client.create_artifact(
        ArtifactCreate(
            key=artifact_key, type="table", data="[]", metadata_=metadata, flow_run_id=run
        )
    )


async def _forged_scenario(workspace: str) -> dict[str, object]:
    from prefect_managed.settings import ledger_key
    from prefect_managed.usage import run_key, sign_record

    month = month_of(datetime.now(timezone.utc))
    async with get_client() as client:
        earlier, later, precreated = [
            (await client.create_flow_run(ledger_probe)).id for _ in range(3)
        ]
        ledger = UsageLedger(client, workspace)
        await ledger.publish(_record(workspace, earlier, 61), 10, "test")
        # Erase: a newer, unsigned version of the earlier run's key with 0 minutes.
        zero = _record(workspace, earlier, 0)
        await _forge(client, run_key(workspace, month, earlier), zero.model_dump_json(), None)
        # Inflate: records for made-up runs, signed with a guessed key.
        for _ in range(2):
            made_up = uuid.uuid4()
            key = run_key(workspace, month, made_up)
            body = _record(workspace, made_up, 3600).model_dump_json()
            await _forge(client, key, body, sign_record(b"guess", key, body))
        # Another workspace's record under this workspace's key (signed correctly for it).
        other = _record("elsewhere", later, 3600).model_dump_json()
        key = run_key(workspace, month, later)
        await _forge(client, key, other, sign_record(ledger_key(), key, other))
        # Corrupt: an invalid body; pre-create: a run's own key before its worker records it.
        await _forge(client, run_key(workspace, month, uuid.uuid4()), "{not json", "x")
        fake = _record(workspace, precreated, 0).model_dump_json()
        await _forge(client, run_key(workspace, month, precreated), fake, None, precreated)
        seen: dict[str, object] = {
            "minutes": (await ledger.month_usage(month)).minutes,
            "precreated_recorded": await ledger.is_recorded(month, precreated),
        }
        seen["published"] = await ledger.publish(_record(workspace, precreated, 30), 10, "test")
        seen["again"] = await ledger.publish(_record(workspace, precreated, 30), 10, "test")
        fresh = UsageLedger(client, workspace)
        usage = await fresh.month_usage(month)
        seen["fresh_minutes"] = usage.minutes
        seen["runs"] = sorted(str(run) for run, _ in usage.records)
        seen["expected_runs"] = sorted(str(run) for run in (earlier, precreated))
        seen["rejected"] = sorted(fresh.rejected.values())
    return seen


def test_forged_records_are_skipped_reported_once_and_never_hide_a_true_one(prefect_server, caplog):
    caplog.set_level("WARNING", logger="prefect_managed.ledger")
    seen = asyncio.run(_forged_scenario(f"ledger-{uuid.uuid4().hex[:6]}"))

    assert seen["minutes"] == 2  # the earlier run's 61 s; no forged record counts
    assert seen["precreated_recorded"] is False  # a forged record is not "already recorded"
    assert seen["published"] is not None and seen["again"] is None
    assert seen["fresh_minutes"] == 3  # and the pre-created run's true 30 s
    assert seen["runs"] == seen["expected_runs"]
    assert len(seen["rejected"]) == 6
    assert sum("signature does not verify" in reason for reason in seen["rejected"]) == 5
    assert "it is a record of workspace 'elsewhere'" in " ".join(seen["rejected"])
    skipped = [r for r in caplog.records if r.getMessage().startswith("Skipped artifact")]
    # Six forged artifacts, each reported once by each of the two ledgers that read them.
    assert len(skipped) == 12


def test_a_flood_of_forged_versions_does_not_hide_a_runs_true_record(prefect_server):
    async def scenario() -> tuple[bool, bool, object]:
        from prefect_managed.usage import run_key

        workspace = f"ledger-{uuid.uuid4().hex[:6]}"
        month = month_of(datetime.now(timezone.utc))
        async with get_client() as client:
            run = (await client.create_flow_run(ledger_probe)).id
            ledger = UsageLedger(client, workspace)
            await ledger.publish(_record(workspace, run, 61), 10, "test")
            # Newer forged versions, more than the server's default page of 200.
            body = _record(workspace, run, 0).model_dump_json()
            key = run_key(workspace, month, run)
            for _ in range(11):
                await asyncio.gather(*(_forge(client, key, body, "0" * 64, run) for _ in range(20)))
            again = await ledger.publish(_record(workspace, run, 61), 10, "test")
            return (
                await ledger.is_recorded(month, run),
                again is None,
                (await UsageLedger(client, workspace).month_usage(month)).minutes,
            )

    assert asyncio.run(scenario()) == (True, True, 2)


async def _spool_scenario(workspace: str, directory) -> dict[str, object]:
    from prefect_managed.accounting import Accounting
    from prefect_managed.policy import load_policy
    from prefect_managed.spool import Spool

    policy = load_policy(None)
    spool = Spool(directory)
    async with get_client() as client:
        run_id = (await client.create_flow_run(ledger_probe)).id
        ledger = UsageLedger(client, workspace)
        record = _record(workspace, run_id, 90)
        # A worker stopped while its record was being sent: the file is left behind.
        with pytest.raises(ConnectionError), spool.keeping(record):
            raise ConnectionError("the API went away")
        left = sorted(path.name for path in directory.iterdir())
        # Another worker finds a file while its worker still sends it: left alone.
        with spool.keeping(_record(workspace, run_id, 5).model_copy(update={"attempt": 2})):
            with spool.leftovers() as found:
                seen_while_sending = [r.attempt for r, _ in found]
        accounting = Accounting(ledger, policy, lambda _: None, spool)  # type: ignore[arg-type]
        sent = await accounting.send_spooled()
        again = await accounting.send_spooled()
        usage = await UsageLedger(client, workspace).month_usage(record.month)
    return {
        "left": left,
        "seen_while_sending": seen_while_sending,
        "sent": (sent, again),
        "files_after": sorted(path.name for path in directory.iterdir()),
        "records": {key: r.wall_seconds for key, r in usage.records.items()},
        "run": run_id,
    }


def test_a_record_left_on_disk_is_stored_once_by_the_next_worker(prefect_server, tmp_path):
    """The spool: a record whose send failed stays on disk (0600, in a 0700 directory),
    a file another worker is sending is not taken, and the next worker stores it once."""
    workspace = f"spool-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "spool"
    result = asyncio.run(_spool_scenario(workspace, directory))
    run = result["run"]
    assert result["left"] == [f"{run}-1.json"]
    assert result["seen_while_sending"] == [1]  # attempt 2 was being sent: not taken
    assert result["sent"] == (1, 0)
    assert result["files_after"] == []
    assert result["records"] == {(run, 1): 90}
    assert oct(directory.stat().st_mode & 0o777) == "0o700"


class PoolWrites(CountingClient):
    """The Prefect client, keeping each description it wrote to a pool, and when, and
    each version of a monthly summary it wrote, and when."""

    def __init__(self, client) -> None:
        super().__init__(client)
        self.written: list[str] = []
        self.at: list[float] = []
        self.summaries: list[str] = []
        self.summaries_at: list[float] = []

    async def update_work_pool(self, name, work_pool):
        self.written.append(work_pool.description)
        self.at.append(time.monotonic())
        return await self._client.update_work_pool(name, work_pool)

    async def create_artifact(self, artifact):
        if (artifact.key or "").endswith("-summary"):
            self.summaries.append(artifact.data)
            self.summaries_at.append(time.monotonic())
        return await self._client.create_artifact(artifact)


async def _pool_line_scenario(workspace: str, pool: str) -> dict[str, object]:
    from prefect.client.schemas.actions import WorkPoolCreate

    from prefect_managed.accounting import Accounting
    from prefect_managed.policy import load_policy

    policy = load_policy(None)
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=pool, type="prefect:managed", description="The team's pool.")
        )
        writes = PoolWrites(client)
        accounting = Accounting(UsageLedger(writes, workspace), policy, lambda _: None)

        async def store() -> None:
            run = (await client.create_flow_run(ledger_probe)).id
            record = _record(workspace, run, 60).model_copy(update={"pool": pool})
            await accounting.store(None, record)  # type: ignore[arg-type]

        async def shown() -> str:
            return (await client.read_work_pool(pool)).description or ""

        async with anyio.create_task_group() as background:
            background.start_soon(accounting.keep_pool_lines)
            await anyio.sleep(0.1)
            await store()  # after a quiet spell: shown at once, not after the interval
            with anyio.fail_after(POOL_LINE_SECONDS_IN_TEST / 2):
                while "by 1 flow run(s)" not in await shown():
                    await anyio.sleep(0.05)
            # A burst, five runs finishing at once (each record published from the month
            # as read without the others'): written at most once an interval, all shown.
            async with anyio.create_task_group() as burst:
                for _ in range(5):
                    burst.start_soon(store)
            with anyio.fail_after(POOL_LINE_SECONDS_IN_TEST * 3):
                while "by 6 flow run(s)" not in await shown():
                    await anyio.sleep(0.05)
            await anyio.sleep(POOL_LINE_SECONDS_IN_TEST * 1.5)
            await store()  # quiet again: at once
            with anyio.fail_after(POOL_LINE_SECONDS_IN_TEST / 2):
                while "by 7 flow run(s)" not in await shown():
                    await anyio.sleep(0.05)
            await store()  # within the interval, and the worker stops: shown as it stops
            background.cancel_scope.cancel()
        stored = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=[summary_key(workspace, month_of(datetime.now(timezone.utc)))]
                )
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
        return {
            "writes": writes.written,
            "at": writes.at,
            "last": await shown(),
            "summaries": writes.summaries,
            "summaries_at": writes.summaries_at,
            "stored_summaries": [artifact.data for artifact in stored],
        }


POOL_LINE_SECONDS_IN_TEST = 4.0


def test_a_pools_usage_line_is_updated_at_once_then_once_per_burst(prefect_server, monkeypatch):
    """The pool's description shows the month's usage: the first record after a quiet
    spell at once, a burst of records (stored at once) with at most one update an
    interval, counting them all, and a record stored just before the worker stops as it
    stops; the operator's text stays. The month's summary artifact goes with it: one new
    version per update, not one per record, the last one counting every run."""
    import prefect_managed.accounting

    monkeypatch.setattr(prefect_managed.accounting, "POOL_LINE_SECONDS", POOL_LINE_SECONDS_IN_TEST)
    workspace = f"lines-{uuid.uuid4().hex[:8]}"
    result = anyio.run(_pool_line_scenario, workspace, f"lines-{uuid.uuid4().hex[:8]}")
    writes, at = result["writes"], result["at"]
    runs = [int(w.split("by ")[-1].split(" flow")[0]) for w in writes]
    # The first record at once; the burst's five shown (in one write, or two when the
    # burst outlasts an interval); the record after a quiet spell at once; the last one
    # as the worker stops.
    assert runs[0] == 1 and 6 in runs and 7 in runs and runs[-1] == 8, writes
    assert runs == sorted(runs), writes
    # At most one write an interval, but the one made as the worker stops.
    gaps = [later - earlier for earlier, later in zip(at[:-2], at[1:-1], strict=True)]
    assert all(gap >= POOL_LINE_SECONDS_IN_TEST - 0.05 for gap in gaps), (gaps, writes)
    assert result["last"].startswith("The team's pool.\n\nCompute this month"), result["last"]
    assert "by 8 flow run(s)" in result["last"], result["last"]
    summaries, summaries_at = result["summaries"], result["summaries_at"]
    summary_runs = [int(re.search(r"\| [\d.]+ % \| (\d+) \|", s).group(1)) for s in summaries]
    assert summary_runs[0] == 1 and 6 in summary_runs and summary_runs[-1] == 8, summaries
    assert summary_runs == sorted(summary_runs) and len(summaries) < 8, summaries
    gaps = [b - a for a, b in zip(summaries_at[:-2], summaries_at[1:-1], strict=True)]
    assert all(gap >= POOL_LINE_SECONDS_IN_TEST - 0.05 for gap in gaps), (gaps, summaries)
    # What the server keeps: those versions, the newest the last one written.
    assert result["stored_summaries"] == summaries[::-1]


def test_usages_published_at_once_are_shown_together():
    """Two records stored at once each publish the month as read without the other's:
    the pool's line due shows both (and a late record of last month does not replace
    this month's)."""
    from prefect_managed.accounting import Accounting
    from prefect_managed.policy import load_policy
    from prefect_managed.usage import MonthlyUsage

    workspace = "merge"
    first, second, earlier = (_record(workspace, uuid.uuid4(), 60) for _ in range(3))
    month = first.month
    known = _record(workspace, uuid.uuid4(), 60)

    def usage(*records, of=month):
        found = MonthlyUsage(workspace=workspace, month=of)
        for record in records:
            found.add(record)
        return found

    async def scenario():
        accounting = Accounting(None, load_policy(None), lambda _: None)  # type: ignore[arg-type]
        due = anyio.Event()
        accounting._line_is_due(due, "pool", usage(known, first))
        accounting._line_is_due(due, "pool", usage(known, second))
        accounting._line_is_due(due, "pool", usage(earlier, of="2000-01"))
        return due.is_set(), accounting._lines_due["pool"]

    was_set, shown = anyio.run(scenario)
    assert was_set
    assert shown.month == month
    assert set(shown.records) == {(r.flow_run_id, 1) for r in (known, first, second)}


async def _summary_at_start_scenario(workspace: str, pool: str) -> dict[str, object]:
    from prefect.client.schemas.actions import WorkPoolCreate

    from prefect_managed.accounting import Accounting
    from prefect_managed.policy import load_policy

    policy = load_policy(None)
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="prefect:managed"))
        writes = PoolWrites(client)
        killed = UsageLedger(writes, workspace)
        for _ in range(3):
            run = (await client.create_flow_run(ledger_probe)).id
            # Stored, and the worker killed before it wrote the month's summary.
            record = _record(workspace, run, 60).model_copy(update={"pool": pool})
            assert await killed.publish(record, 10, "test", summary=False) is not None
        assert writes.summaries == []
        for _ in range(2):  # the next worker starts, and then another
            await Accounting(UsageLedger(writes, workspace), policy, lambda _: None).show_at_start(
                pool
            )
        stored = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=[summary_key(workspace, month_of(datetime.now(timezone.utc)))]
                )
            )
        )
        line = (await client.read_work_pool(pool)).description or ""
    return {"written": writes.summaries, "stored": [a.data for a in stored], "line": line}


def test_a_starting_worker_writes_the_summary_a_killed_one_left_behind(prefect_server):
    """Three records stored without their summary (their worker killed between the
    two): the next worker's start writes one that counts all three, and a start that
    finds it up to date writes none."""
    workspace = f"start-{uuid.uuid4().hex[:8]}"
    result = anyio.run(_summary_at_start_scenario, workspace, f"start-{uuid.uuid4().hex[:8]}")
    written = result["written"]
    assert len(written) == 1, written
    assert re.search(r"\| [\d.]+ % \| 3 \|", written[0]), written[0]
    assert result["stored"] == written
    assert "by 3 flow run(s)" in result["line"], result["line"]
