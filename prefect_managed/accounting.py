"""The workspace's compute accounting, as the worker uses it: the month's usage (cached
for the quota check), a run's record built from its container report and stored once,
and the warnings when a record takes the month across a quota threshold.

The arithmetic is in `usage`, the storage in `ledger`; this module joins them for one
worker. `usage_record_of` is pure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import anyio
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event
from prefect.logging import get_logger

from prefect_managed.environments import BUILD_SECONDS_LABEL
from prefect_managed.ledger import UsageLedger
from prefect_managed.metering import Meter
from prefect_managed.outcome import ContainerReport
from prefect_managed.policy import Policy
from prefect_managed.retries import attempt_of
from prefect_managed.spool import Spool
from prefect_managed.usage import (
    MonthlyUsage,
    Outcome,
    UsageRecord,
    crossed_thresholds,
    month_of,
    pool_usage_line,
    quota_exhausted_message,
    quota_warning_message,
    with_pool_usage,
)

__all__ = ["POOL_LINE_SECONDS", "QUOTA_CHECK_SECONDS", "Accounting", "usage_record_of"]

logger = get_logger("managed.accounting")

#: How long the worker trusts the month's usage it read before reading it again.
QUOTA_CHECK_SECONDS = 10.0
#: At most one update of a pool's usage line (a read and a write of the pool), and of
#: the month's summary artifact (a new version), in this many seconds: the first record
#: after a quiet spell shows at once, a burst's last record within this time.
POOL_LINE_SECONDS = 5.0


def merged_usage(waiting: MonthlyUsage | None, usage: MonthlyUsage) -> MonthlyUsage:
    """What to show of a month's usage read twice: records stored at once each read the
    month without the other's, so a month read again shows both; a record of last
    month, stored late, does not replace this month's."""
    if waiting is not None and waiting.month == usage.month:
        merged = MonthlyUsage(workspace=usage.workspace, month=usage.month)
        for record in (*waiting.records.values(), *usage.records.values()):
            merged.add(record)
        return merged
    if waiting is not None and waiting.month > usage.month:
        return waiting
    return usage


def usage_record_of(
    report: ContainerReport,
    flow_run: FlowRun,
    policy: Policy,
    meter: Meter,
    outcome: Outcome,
    default_pool: str,
) -> UsageRecord | None:
    """The run's record from its container's own timestamps and labels (which attempt
    it ran); None when it never ran."""
    if report.started_at is None or report.finished_at is None:
        return None
    return UsageRecord.from_timestamps(
        report.started_at,
        report.finished_at,
        build_seconds=build_seconds_of(report.labels),
        flow_run_id=flow_run.id,
        flow_run_name=flow_run.name,
        workspace=policy.workspace.name,
        tier=policy.workspace.tier,
        pool=report.labels.get("io.prefect.work-pool-name", default_pool),
        deployment=report.labels.get("io.prefect.deployment-name"),
        image=report.image,
        peak_memory_bytes=meter.peak_memory_bytes,
        cpu_seconds=meter.cpu_seconds,
        outcome=outcome,
        exit_code=report.exit_code,
        attempt=attempt_of(report.labels),
    )


def build_seconds_of(labels: dict[str, str]) -> float:
    """The environment build seconds a run's container carries (set by its worker; the
    reserved label cannot come from job variables)."""
    try:
        seconds = float(labels.get(BUILD_SECONDS_LABEL, "0"))
    except ValueError:
        return 0.0
    return seconds if 0 <= seconds < 366 * 86400 else 0.0


class Accounting:
    """One worker's view of its workspace's usage."""

    def __init__(
        self,
        ledger: UsageLedger,
        policy: Policy,
        run_logger: Callable[[FlowRun], logging.Logger | logging.LoggerAdapter[Any]],
        spool: Spool | None = None,
    ) -> None:
        self._ledger = ledger
        self._policy = policy
        self._run_logger = run_logger
        self._spool = spool
        self._month: MonthlyUsage | None = None
        self._checked_at = -QUOTA_CHECK_SECONDS
        #: Pools whose usage line is due, with the usage it is to show.
        self._lines_due: dict[str, MonthlyUsage] = {}
        #: Months whose summary artifact is due, with the usage it is to show.
        self._summaries_due: dict[str, MonthlyUsage] = {}
        self._line_due: anyio.Event | None = None  # set while `keep_pool_lines` runs

    async def quota_exhausted(self) -> bool:
        """Whether the month's compute quota is used up (read at most every few seconds)."""
        month = month_of(datetime.now(timezone.utc))
        stale = time.monotonic() - self._checked_at >= QUOTA_CHECK_SECONDS
        if stale or self._month is None or self._month.month != month:
            self._month = await self._ledger.month_usage(month)
            self._checked_at = time.monotonic()
        return self._month.hours >= self._policy.tier.compute_hours_per_month

    @property
    def month_hours(self) -> float | None:
        """The month's compute hours as last read (None before the first read)."""
        return None if self._month is None else self._month.hours

    def exhausted_message(self) -> str:
        assert self._month is not None, "quota_exhausted() first"
        return quota_exhausted_message(
            self._month,
            self._policy.tier.compute_hours_per_month,
            self._policy.workspace.tier,
        )

    async def _publish(self, record: UsageRecord) -> tuple[MonthlyUsage, MonthlyUsage] | None:
        """The record stored; the month's summary with it, unless `keep_pool_lines`
        runs (then it is due, and shown with the pool's line)."""
        quota, tier = self._policy.tier.compute_hours_per_month, self._policy.workspace.tier
        summary = self._line_due is None
        published = await self._ledger.publish(record, quota, tier, summary=summary)
        if published is not None and not summary:
            after = published[1]
            if self._line_due is None:  # the loop has stopped meanwhile: shown here
                await self._show_summary(after)
            else:
                self._summaries_due[after.month] = merged_usage(
                    self._summaries_due.get(after.month), after
                )
                self._line_due.set()
        return published

    async def show_on_pool(self, pool: str, usage: MonthlyUsage | None = None) -> None:
        """Keep the month's usage and quota in the pool's description, where the UI's
        Work Pools list and the pool's page show it. Guarded: never stops a finish."""
        try:
            if usage is None:
                usage = await self._ledger.month_usage(month_of(datetime.now(timezone.utc)))
            client = self._ledger.client
            work_pool = await client.read_work_pool(pool)
            line = pool_usage_line(
                usage, self._policy.tier.compute_hours_per_month, self._policy.workspace.tier
            )
            description = with_pool_usage(work_pool.description, line)
            if description != work_pool.description:
                await client.update_work_pool(pool, WorkPoolUpdate(description=description))
        except Exception:
            logger.warning("Could not show the month's usage on work pool %r", pool, exc_info=True)

    async def keep_pool_lines(self) -> None:
        """Show the usage of records stored meanwhile on their pools and in the month's
        summary, at most once in `POOL_LINE_SECONDS`, until cancelled (then what is
        still due, within a few seconds). While this runs, a stored record's line and
        summary are shown from here, off its run's finish."""
        self._line_due = due = anyio.Event()
        try:
            while True:
                await due.wait()
                self._line_due = due = anyio.Event()
                await self._show_due_lines()
                await anyio.sleep(POOL_LINE_SECONDS)
        finally:
            self._line_due = None
            with anyio.move_on_after(5, shield=True):
                await self._show_due_lines()
            if self._lines_due:
                logger.warning(
                    "Stopped before showing the month's usage on work pool(s) %s; the "
                    "next worker of the pool shows it when it starts",
                    ", ".join(sorted(self._lines_due)),
                )
            if self._summaries_due:
                logger.warning(
                    "Stopped before updating the usage summary of %s; the next worker "
                    "updates it when it starts, or the month's next usage record",
                    ", ".join(sorted(self._summaries_due)),
                )

    async def show_at_start(self, pool: str) -> None:
        """The month's usage on the pool, and its summary artifact when its newest
        version says otherwise than the records (a worker killed between a record and
        its summary left it behind). Guarded: never stops the worker."""
        try:
            usage = await self._ledger.month_usage(month_of(datetime.now(timezone.utc)))
        except Exception:
            logger.warning("Could not read the month's usage", exc_info=True)
            return
        await self.show_on_pool(pool, usage)
        if usage.records:  # just read: not read again
            await self._show_summary(usage, read_again=False, if_changed=True)

    async def _show_summary(
        self, due: MonthlyUsage, read_again: bool = True, if_changed: bool = False
    ) -> bool:
        """Write the summary of `due`'s month: `due` with what the month's records say
        now (other workers stored some meanwhile; it never shows fewer runs than a
        version before it of this worker's). Guarded: False when it could not be
        written."""
        quota, tier = self._policy.tier.compute_hours_per_month, self._policy.workspace.tier
        try:
            usage = (
                merged_usage(due, await self._ledger.month_usage(due.month)) if read_again else due
            )
            await self._ledger.publish_summary(usage, quota, tier, if_changed=if_changed)
        except Exception:
            logger.warning("Could not update the usage summary of %s", due.month, exc_info=True)
            return False
        return True

    async def _show_due_lines(self) -> None:
        for month in sorted(self._summaries_due):
            usage = self._summaries_due[month]
            if not await self._show_summary(usage):
                continue  # due still: written with the next line, or as the worker stops
            if self._summaries_due.get(month) is usage:  # else a later record's is due
                del self._summaries_due[month]
        for pool in list(self._lines_due):
            usage = self._lines_due[pool]
            await self.show_on_pool(pool, usage)
            if self._lines_due.get(pool) is usage:  # else a later record's is due
                del self._lines_due[pool]

    def _line_is_due(self, due: anyio.Event, pool: str, usage: MonthlyUsage) -> None:
        self._lines_due[pool] = merged_usage(self._lines_due.get(pool), usage)
        due.set()

    async def send_spooled(self) -> int:
        """Store the records a worker of this host kept on disk but did not store (it
        stopped, or the API failed); how many were sent."""
        if self._spool is None:
            return 0
        sent = 0
        with self._spool.leftovers() as found:
            for record, path in found:
                await self._publish(record)
                path.unlink(missing_ok=True)
                sent += 1
        return sent

    async def record(
        self,
        flow_run: FlowRun,
        report: ContainerReport,
        meter: Meter,
        outcome: Outcome,
        default_pool: str,
    ) -> None:
        """Store the record of the run's attempt once; warn when it crosses a quota
        threshold."""
        record = usage_record_of(report, flow_run, self._policy, meter, outcome, default_pool)
        if record is None:
            return  # the container never ran: no compute to count
        await self.store(flow_run, record)

    async def store(self, flow_run: FlowRun, record: UsageRecord) -> None:
        """Store `record` once (kept on disk until the ledger has it); warn when it
        crosses a quota threshold."""
        if self._spool is None:
            published = await self._publish(record)
        else:
            with self._spool.keeping(record):  # on disk until the ledger has it
                published = await self._publish(record)
        if published is None:
            return
        before, after = published
        self._month = after
        if self._line_due is not None:
            self._line_is_due(self._line_due, record.pool, after)
        else:
            await self.show_on_pool(record.pool, after)
        quota = self._policy.tier.compute_hours_per_month
        tier = self._policy.workspace.tier
        for threshold in crossed_thresholds(before.hours, after.hours, quota):
            message = quota_warning_message(after, quota, tier, threshold)
            self._run_logger(flow_run).warning("%s", message)
            emit_event(
                event="prefect-managed.quota.warning",
                resource={
                    "prefect.resource.id": f"prefect-managed.workspace.{after.workspace}",
                    "prefect.resource.name": after.workspace,
                },
                payload={
                    "threshold_percent": threshold,
                    "hours_used": round(after.hours, 4),
                    "quota_hours": quota,
                    "month": after.month,
                    "message": message,
                },
            )
