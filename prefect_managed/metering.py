"""Measuring a container: Docker's timestamps and cgroup statistics."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["Meter", "parse_docker_time"]


def parse_docker_time(value: str) -> datetime | None:
    """'2026-11-24T20:16:20.123456789Z' -> an aware datetime; None for Docker's zero time."""
    if not value or value.startswith("0001-"):
        return None
    head, _, fraction = value.rstrip("Z").partition(".")
    moment = datetime.fromisoformat(head).replace(tzinfo=timezone.utc)
    if fraction:
        digits = "".join(ch for ch in fraction if ch.isdigit())[:6].ljust(6, "0")
        moment = moment.replace(microsecond=int(digits))
    return moment


@dataclass
class Meter:
    """The highest memory and the CPU time seen in a container's stats samples, and when
    the last sample was taken (how long a container removed from outside is counted)."""

    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    last_seen: datetime | None = None
    peak_pids: int = 0
    pids_limit: int | None = None

    @property
    def pids_exhausted(self) -> bool:
        """Whether a sample saw the container at its limit of processes and threads."""
        return self.pids_limit is not None and self.peak_pids >= self.pids_limit

    def add(self, stats: dict[str, Any]) -> None:
        self.last_seen = datetime.now(timezone.utc)
        pids = stats.get("pids_stats") or {}
        self.peak_pids = max(self.peak_pids, int(pids.get("current") or 0))
        if pids.get("limit"):
            self.pids_limit = int(pids["limit"])
        memory = stats.get("memory_stats") or {}
        # cgroup v1 keeps a high-water mark; cgroup v2 reports only current usage.
        seen = memory.get("max_usage") or memory.get("usage")
        if seen:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, int(seen))
        total = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if total:
            self.cpu_seconds = max(self.cpu_seconds or 0.0, total / 1e9)
