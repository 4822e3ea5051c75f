"""How far back the usage ledger's incremental reads go (pure: a list of artifacts in
place of the server, read as the server pages them, newest first). A record another
worker commits late, up to `OVERLAP` after the time it is stamped with, is counted;
the server itself: tests/test_ledger.py."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from prefect_managed.ledger import OVERLAP, UsageLedger
from prefect_managed.usage import run_key_prefix

T0 = datetime(2026, 3, 10, tzinfo=timezone.utc)
MONTH = "2026-03"


class Artifacts:
    """The artifacts a reader sees: those committed, newest first, in pages."""

    def __init__(self) -> None:
        self.stored: list[SimpleNamespace] = []

    def add(self, stamped: float, committed: bool = True) -> SimpleNamespace:
        artifact = SimpleNamespace(
            id=uuid.uuid4(),
            key=run_key_prefix("ws", MONTH) + uuid.uuid4().hex,
            created=T0 + timedelta(seconds=stamped),
            committed=committed,
        )
        self.stored.append(artifact)
        return artifact

    async def read_artifacts(self, artifact_filter, sort, limit, offset):
        seen = sorted(
            (a for a in self.stored if a.committed), key=lambda a: a.created, reverse=True
        )
        return seen[offset : offset + limit]


@pytest.mark.parametrize("late_by", [10, 180, int(OVERLAP.total_seconds()) - 9])
@pytest.mark.parametrize("every", [1, 7, 59])
def test_a_record_committed_late_within_the_overlap_is_counted(late_by, every):
    """A record a second, read every `every` seconds; one record stamped at 50 s is
    committed `late_by` seconds later."""
    server = Artifacts()
    now = [0.0]
    ledger = UsageLedger(server, "ws", key=b"k", clock=lambda: now[0])
    counted: set[uuid.UUID] = set()
    ledger._count = lambda month, artifact, usage: counted.add(artifact.id)  # type: ignore[method-assign]
    late = server.add(50, committed=False)

    async def scenario() -> None:
        for second in range(0, 50 + late_by + 200):
            now[0] = float(second)
            server.add(second)
            if second == 50 + late_by:
                late.committed = True
            if second % every == 0:
                await ledger.month_usage(MONTH)
        await ledger.month_usage(MONTH)  # a last read, after the last record

    asyncio.run(scenario())
    assert late.id in counted
    assert counted == {a.id for a in server.stored}  # and every other record
