"""Compute usage: one record per flow run, the month's totals and the quota.

Pure values and arithmetic. Measuring lives in `metering`, storage in `ledger`,
rendering in `artifacts`.

Compute is counted as Prefect Cloud counts it, "from compute startup to teardown,
rounded up to the nearest minute": from the container's start to its finish as Docker
timestamps them, dependency installation included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from uuid import UUID

from pydantic import BaseModel, Field

__all__ = [
    "MonthlyUsage",
    "Outcome",
    "UsageRecord",
    "billable_minutes",
    "crossed_thresholds",
    "month_of",
    "next_reset",
    "quota_exhausted_message",
    "quota_warning_message",
    "run_key",
    "run_key_prefix",
    "summary_key",
]

WARNING_THRESHOLDS = (80, 100)


class Outcome(str, Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CRASHED = "crashed"
    OUT_OF_MEMORY = "out of memory"
    TIMED_OUT = "timed out"
    CANCELLED = "cancelled"


def billable_minutes(wall_seconds: float) -> int:
    """Whole minutes, rounded up; any compute at all bills at least one minute."""
    return max(1, math.ceil(wall_seconds / 60)) if wall_seconds > 0 else 0


class UsageRecord(BaseModel):
    """What one flow run's container used."""

    flow_run_id: UUID
    flow_run_name: str
    workspace: str
    tier: str
    pool: str
    deployment: str | None = None
    image: str
    started_at: datetime
    finished_at: datetime
    wall_seconds: float = Field(ge=0)
    billable_minutes: int = Field(ge=0)
    peak_memory_bytes: int | None = Field(default=None, description="None when not sampled")
    cpu_seconds: float | None = Field(default=None, description="None when not sampled")
    outcome: Outcome
    exit_code: int | None = None

    @classmethod
    def from_timestamps(cls, started_at: datetime, finished_at: datetime, **values) -> UsageRecord:
        wall = max(0.0, (finished_at - started_at).total_seconds())
        return cls(
            started_at=started_at,
            finished_at=finished_at,
            wall_seconds=round(wall, 3),
            billable_minutes=billable_minutes(wall),
            **values,
        )

    @property
    def month(self) -> str:
        return month_of(self.finished_at)


def month_of(moment: datetime) -> str:
    """'2026-11' for a moment in November 2026 (UTC)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m")


def next_reset(month: str) -> datetime:
    """The first moment of the month after `month` (UTC), when quotas reset."""
    year, number = (int(part) for part in month.split("-"))
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return datetime(year, number, 1, tzinfo=timezone.utc)


def run_key_prefix(workspace: str, month: str) -> str:
    return f"usage-{workspace}-{month.replace('-', '')}-run-"


def run_key(workspace: str, month: str, flow_run_id: UUID) -> str:
    """The artifact key of one run's record: lowercase letters, digits and dashes."""
    return f"{run_key_prefix(workspace, month)}{flow_run_id}"


def summary_key(workspace: str, month: str) -> str:
    return f"usage-{workspace}-{month.replace('-', '')}-summary"


@dataclass
class MonthlyUsage:
    """A workspace's usage in one month, from its run records (each run counted once)."""

    workspace: str
    month: str
    records: dict[UUID, UsageRecord] = field(default_factory=dict)

    def add(self, record: UsageRecord) -> bool:
        """Count a record; False when this run was already counted."""
        if record.flow_run_id in self.records:
            return False
        self.records[record.flow_run_id] = record
        return True

    @property
    def minutes(self) -> int:
        return sum(record.billable_minutes for record in self.records.values())

    @property
    def hours(self) -> float:
        return self.minutes / 60

    def percent_of(self, quota_hours: float) -> float:
        return 100 * self.hours / quota_hours

    def hours_by(self, attribute: str) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for record in self.records.values():
            totals[str(getattr(record, attribute) or "(none)")] += record.billable_minutes / 60
        return dict(sorted(totals.items()))

    def runs_by_outcome(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for record in self.records.values():
            counts[record.outcome.value] += 1
        return dict(sorted(counts.items()))


def crossed_thresholds(before_hours: float, after_hours: float, quota_hours: float) -> list[int]:
    """The warning thresholds (percent) that a run moved usage across."""
    before, after = 100 * before_hours / quota_hours, 100 * after_hours / quota_hours
    return [limit for limit in WARNING_THRESHOLDS if before < limit <= after]


def quota_warning_message(
    usage: MonthlyUsage, quota_hours: float, tier: str, threshold: int
) -> str:
    reset = next_reset(usage.month).date().isoformat()
    if threshold >= 100:
        return (
            f"Workspace {usage.workspace!r} has used {usage.hours:.2f} h of compute this month, "
            f"all of the {tier} tier's {quota_hours:g} h quota. New flow runs will not start "
            f"until the quota resets on {reset} (UTC)."
        )
    return (
        f"Workspace {usage.workspace!r} has used {usage.hours:.2f} h of compute this month, "
        f"{usage.percent_of(quota_hours):.0f} % of the {tier} tier's {quota_hours:g} h quota "
        f"(resets on {reset} UTC)."
    )


def quota_exhausted_message(usage: MonthlyUsage, quota_hours: float, tier: str) -> str:
    reset = next_reset(usage.month).date().isoformat()
    return (
        f"Not started: workspace {usage.workspace!r} has used {usage.hours:.2f} h of compute "
        f"in {usage.month}, and the {tier} tier's monthly quota is {quota_hours:g} h. The "
        f"quota resets on {reset} (UTC); run the flow again then, or ask for a tier with "
        "more compute hours."
    )
