"""How usage looks in Prefect: a table on each run's page and a monthly summary."""

from __future__ import annotations

from typing import Any

from prefect_managed.policy import format_bytes
from prefect_managed.usage import MonthlyUsage, UsageRecord, next_reset

__all__ = ["run_table", "summary_markdown"]


def run_table(record: UsageRecord) -> list[dict[str, Any]]:
    """The rows of a run's usage table artifact (one metric a row)."""
    peak = (
        format_bytes(record.peak_memory_bytes)
        if record.peak_memory_bytes is not None
        else "not sampled"
    )
    cpu = f"{record.cpu_seconds:.1f}" if record.cpu_seconds is not None else "not sampled"
    rows = [
        ("outcome", record.outcome.value),
        ("attempt", str(record.attempt)),
        ("wall time (s)", f"{record.wall_seconds:.1f}"),
        ("billable minutes", str(record.billable_minutes)),
        ("peak memory", peak),
        ("CPU seconds", cpu),
        ("started (UTC)", record.started_at.isoformat(timespec="seconds")),
        ("finished (UTC)", record.finished_at.isoformat(timespec="seconds")),
        ("image", record.image),
        ("work pool", record.pool),
        ("deployment", record.deployment or "(none)"),
        ("workspace", f"{record.workspace} ({record.tier} tier)"),
    ]
    return [{"metric": metric, "value": value} for metric, value in rows]


def _table(title: str, hours: dict[str, float]) -> list[str]:
    lines = [f"| {title} | hours |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in hours.items()]
    return lines


def summary_markdown(usage: MonthlyUsage, quota_hours: float, tier: str) -> str:
    """The workspace's monthly summary, rendered as markdown."""
    percent = usage.percent_of(quota_hours)
    lines = [
        f"# Compute usage of workspace `{usage.workspace}` in {usage.month}",
        "",
        "| used (h) | quota (h) | used | runs | resets (UTC) |",
        "|---:|---:|---:|---:|---|",
        f"| {usage.hours:.2f} | {quota_hours:g} | {percent:.1f} % | {usage.runs} "
        f"| {next_reset(usage.month).date().isoformat()} |",
        "",
        f"Tier: **{tier}**. Each run counts from container start to finish, rounded up to "
        "the next whole minute.",
        "",
        *_table("work pool", usage.hours_by("pool")),
        "",
        *_table("deployment", usage.hours_by("deployment")),
    ]
    return "\n".join(lines) + "\n"
