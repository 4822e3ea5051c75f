"""Compute usage: one record per flow run attempt, the month's totals and the quota.

Pure values and arithmetic. Measuring lives in `metering`, storage in `ledger`,
rendering in `artifacts`.

Compute is counted as Prefect Cloud counts it, "from compute startup to teardown,
rounded up to the nearest minute": from the container's start to its finish as Docker
timestamps them, dependency installation included.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from uuid import UUID

from pydantic import BaseModel, Field, ValidationError

__all__ = [
    "MonthlyUsage",
    "Outcome",
    "UsageRecord",
    "billable_minutes",
    "check_record",
    "crossed_thresholds",
    "month_of",
    "next_reset",
    "POOL_USAGE_PREFIX",
    "pool_usage_line",
    "quota_exhausted_message",
    "quota_warning_message",
    "run_key",
    "run_key_prefix",
    "with_pool_usage",
    "sign_record",
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
    #: its Docker host was lost: counted up to its worker's last heartbeat (`lost`)
    LOST = "lost"


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
    #: seconds this run spent building its environment before its container started
    build_seconds: float = Field(default=0.0, ge=0)
    billable_minutes: int = Field(ge=0)
    peak_memory_bytes: int | None = Field(default=None, description="None when not sampled")
    cpu_seconds: float | None = Field(default=None, description="None when not sampled")
    outcome: Outcome
    exit_code: int | None = None
    attempt: int = Field(
        default=1,
        ge=1,
        description="Which attempt of the flow run this was: 1, then 2, 3... each time "
        "a worker started the run again (an infrastructure retry, `prefect flow-run "
        "retry`); records written before retries existed are attempt 1",
    )

    @classmethod
    def from_timestamps(
        cls, started_at: datetime, finished_at: datetime, build_seconds: float = 0.0, **values
    ) -> UsageRecord:
        wall = max(0.0, (finished_at - started_at).total_seconds())
        return cls(
            started_at=started_at,
            finished_at=finished_at,
            wall_seconds=round(wall, 3),
            build_seconds=round(build_seconds, 3),
            billable_minutes=billable_minutes(wall + build_seconds),
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


def run_key(workspace: str, month: str, flow_run_id: UUID, attempt: int = 1) -> str:
    """The artifact key of one attempt's record: lowercase letters, digits and dashes.

    The first attempt's key is the run's (`...-run-<flow run id>`), as before retries
    existed; a retried attempt's adds `-attempt-<n>`.
    """
    suffix = "" if attempt == 1 else f"-attempt-{attempt}"
    return f"{run_key_prefix(workspace, month)}{flow_run_id}{suffix}"


def summary_key(workspace: str, month: str) -> str:
    return f"usage-{workspace}-{month.replace('-', '')}-summary"


_SIGNED = b"prefect-managed usage record v1\n"


def sign_record(key: bytes, artifact_key: str, record_json: str) -> str:
    """The record's signature: HMAC-SHA256 over its artifact key and its exact JSON, so a
    signed record cannot be altered, moved to another run's key or another month."""
    message = _SIGNED + artifact_key.encode() + b"\n" + record_json.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def check_record(
    key: bytes,
    workspace: str,
    month: str,
    artifact_key: str,
    record_json: str | None,
    signature: str | None,
) -> UsageRecord | str:
    """The record an artifact holds, or why it is not one to count.

    Only a record signed with the workers' key, for this workspace and month, stored
    under its own run's key, counts: anything else was written by someone else (a flow
    holds a Prefect API credential) or damaged.
    """
    if not record_json:
        return "it holds no usage record"
    if not signature or not hmac.compare_digest(
        sign_record(key, artifact_key, record_json), signature
    ):
        return "its signature does not verify (not written by a worker of this workspace)"
    try:
        record = UsageRecord.model_validate_json(record_json)
    except ValidationError as exc:
        return f"its record is not valid ({exc.error_count()} error(s))"
    if record.workspace != workspace or record.month != month:
        return f"it is a record of workspace {record.workspace!r} in {record.month}"
    if run_key(workspace, month, record.flow_run_id, record.attempt) != artifact_key:
        if artifact_key.startswith(run_key(workspace, month, record.flow_run_id)):
            return f"its record is of attempt {record.attempt}, another than its key's"
        return "its record names another flow run than its key"
    return record


@dataclass
class MonthlyUsage:
    """A workspace's usage in one month, from its run records (each attempt of each run
    counted once)."""

    workspace: str
    month: str
    #: by (flow run id, attempt)
    records: dict[tuple[UUID, int], UsageRecord] = field(default_factory=dict)

    def add(self, record: UsageRecord) -> bool:
        """Count a record; False when this attempt of this run was already counted.

        A `lost` record (its host taken as gone) is provisional: the attempt's record
        from its container, if one comes, counts instead, in whichever order they are
        read."""
        key = (record.flow_run_id, record.attempt)
        known = self.records.get(key)
        if known is not None and not (
            known.outcome is Outcome.LOST and record.outcome is not Outcome.LOST
        ):
            return False
        self.records[key] = record
        return True

    @property
    def runs(self) -> int:
        """How many flow runs used compute (a run retried counts once here)."""
        return len({flow_run_id for flow_run_id, _ in self.records})

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


#: The first words of the line a managed pool's description shows its usage in.
POOL_USAGE_PREFIX = "Compute this month"


def pool_usage_line(usage: MonthlyUsage, quota_hours: float, tier: str) -> str:
    """The month's usage and quota as a managed pool's description shows them."""
    reset = next_reset(usage.month).date().isoformat()
    return (
        f"{POOL_USAGE_PREFIX} ({usage.month}): {usage.hours:.2f} of {quota_hours:g} h "
        f"used ({usage.percent_of(quota_hours):.0f} %) by {usage.runs} flow run(s) of "
        f"workspace {usage.workspace!r}, {tier} tier; the quota resets on {reset} (UTC)."
    )


def with_pool_usage(description: str | None, line: str) -> str:
    """The pool's description with its usage line replaced by `line` (added at the end
    when it has none); the operator's own text is kept."""
    kept = [
        text for text in (description or "").splitlines() if not text.startswith(POOL_USAGE_PREFIX)
    ]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n\n".join(part for part in ("\n".join(kept), line) if part)


def quota_exhausted_message(usage: MonthlyUsage, quota_hours: float, tier: str) -> str:
    reset = next_reset(usage.month).date().isoformat()
    return (
        f"Not started: workspace {usage.workspace!r} has used {usage.hours:.2f} h of compute "
        f"in {usage.month}, and the {tier} tier's monthly quota is {quota_hours:g} h. The "
        f"quota resets on {reset} (UTC); run the flow again then, or ask for a tier with "
        "more compute hours."
    )
