"""Which runs are lost with their host, and which worker decides (pure: Prefect's own
FlowRun objects, no server). The lost host itself, for real: tests/test_topology.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import uuid4

from prefect.client.schemas.objects import FlowRun
from prefect.states import Pending, Running

from prefect_managed.lost import decider, lost_host_message, lost_runs
from prefect_managed.usage import MonthlyUsage, Outcome, UsageRecord

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
LONG_AGO = NOW - timedelta(hours=1)


def run_of(worker: str | None, state_at: datetime = LONG_AGO) -> FlowRun:
    labels = {"prefect.worker.name": worker} if worker else {}
    return FlowRun(id=uuid4(), flow_id=uuid4(), labels=labels, state=Running(timestamp=state_at))


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_one_worker_decides_the_first_online_one_heard_from_lately():
    heard = {"a": ago(500), "b": ago(10), "c": ago(5), "d": None}

    assert decider(["a", "b", "c", "d"], heard, NOW, lost_after=180) == "b"
    assert decider(["c"], heard, NOW, lost_after=180) == "c"
    assert decider(["a", "d"], heard, NOW, lost_after=180) is None


def test_a_run_is_lost_only_when_its_worker_was_silent_for_the_whole_time_watched():
    silent, alive, mine, here, unlabelled, forgotten, fresh = (
        run_of("gone"),
        run_of("alive"),
        run_of("me"),
        run_of("gone"),
        run_of(None),
        run_of("unknown"),
        run_of("unknown", state_at=ago(30)),
    )
    heard = {"gone": ago(400), "alive": ago(20), "me": ago(1)}
    runs = [silent, alive, mine, here, unlabelled, forgotten, fresh]

    found = lost_runs(runs, heard, "me", {str(here.id)}, NOW, ago(3600), lost_after=180)
    just_started = lost_runs(runs, heard, "me", set(), NOW, ago(100), lost_after=180)

    assert [(run.id, worker, last) for run, worker, last in found] == [
        (silent.id, "gone", ago(400)),
        (forgotten.id, "unknown", LONG_AGO),
    ]
    # Watching for only 100 s (a start, or the API back after an outage): nothing yet.
    assert just_started == []


def claimed_by_a_worker_of(worker: str) -> FlowRun:
    """A run a live worker has just taken to mark it waiting, still named for the
    worker of an earlier attempt."""
    message = f"Taken by a managed worker to set its state ({uuid4().hex})."
    return FlowRun(
        id=uuid4(),
        flow_id=uuid4(),
        labels={"prefect.worker.name": worker},
        state=Pending(message=message, timestamp=LONG_AGO),
    )


def test_a_run_in_a_claim_is_not_lost_whatever_worker_it_names():
    claimed = claimed_by_a_worker_of("gone")
    pending = run_of("gone")
    pending.state = Pending(timestamp=LONG_AGO)  # Prefect's own submission: lost

    found = lost_runs([claimed, pending], {"gone": ago(400)}, "me", set(), NOW, ago(3600), 180)

    assert [run.id for run, _, _ in found] == [pending.id]


class Released:
    """What `_release_abandoned_claims` uses of the worker: the runs it put back."""

    def __init__(self) -> None:
        self.put_back: list = []

    async def release_abandoned_claim(self, flow_run) -> bool:
        self.put_back.append(flow_run.id)
        return True


def test_a_claim_is_put_back_only_once_seen_standing_longer_than_a_live_worker_holds_one(
    monkeypatch,
):
    import logging

    import anyio

    from prefect_managed import lost
    from prefect_managed.lost import LostHosts
    from prefect_managed.run_states import ABANDONED_CLAIM_SECONDS

    clock = [1000.0]
    monkeypatch.setattr(lost, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    worker = LostHosts()
    worker._states = Released()
    worker._claims_seen = {}
    worker._logger = logging.getLogger("test.lost")
    left, later = claimed_by_a_worker_of("gone"), claimed_by_a_worker_of("gone")
    plain = run_of("gone")

    def look(*runs) -> list:
        return [run.id for run in anyio.run(worker._release_abandoned_claims, list(runs))]

    assert look(left, plain) == []  # first seen now
    clock[0] += ABANDONED_CLAIM_SECONDS - 1
    assert look(left, later, plain) == []  # a live worker may still hold it
    clock[0] += 1
    assert look(left, later, plain) == [left.id]
    # Claimed again since (a new claim state): its time starts again.
    later.state = claimed_by_a_worker_of("gone").state
    clock[0] += ABANDONED_CLAIM_SECONDS
    assert look(later) == []  # the old claim was standing that long, the new one not
    clock[0] += ABANDONED_CLAIM_SECONDS - 1
    assert look(later) == []
    clock[0] += 1
    assert look(later) == [later.id]
    assert worker._states.put_back == [left.id, later.id]


def test_the_message_names_the_worker_its_last_heartbeat_and_what_to_do():
    message = lost_host_message("host-b-pool", ago(200), 180)

    assert "'host-b-pool'" in message and "2026-12-05T11:56:40+00:00" in message
    assert "lost_after_seconds, 180 s" in message and "Run the flow again" in message


def record(outcome: Outcome, minutes: int, run=None) -> UsageRecord:
    return UsageRecord.from_timestamps(
        LONG_AGO,
        LONG_AGO + timedelta(minutes=minutes),
        flow_run_id=run or uuid4(),
        flow_run_name="lost-one",
        workspace="w",
        tier="free",
        pool="p",
        image="i",
        outcome=outcome,
    )


def test_a_lost_record_gives_way_to_the_containers_own_in_either_order():
    run = uuid4()
    lost, real = record(Outcome.LOST, 2, run), record(Outcome.CRASHED, 5, run)
    first_lost, first_real = MonthlyUsage("w", lost.month), MonthlyUsage("w", lost.month)

    assert first_lost.add(lost) and first_lost.add(real)
    assert first_real.add(real) and not first_real.add(lost)
    assert not first_lost.add(record(Outcome.COMPLETED, 9, run))  # the real one stays
    for usage in (first_lost, first_real):
        assert (usage.runs, usage.minutes) == (1, 5)
