"""Usage arithmetic (pure): rounding, months, thresholds, and counting each run once."""

from datetime import datetime, timedelta, timezone
from uuid import uuid4

import docker.errors
import pytest

from prefect_managed.metering import Meter, parse_docker_time
from prefect_managed.usage import (
    MonthlyUsage,
    Outcome,
    UsageRecord,
    billable_minutes,
    crossed_thresholds,
    next_reset,
)


@pytest.mark.parametrize(
    ("seconds", "minutes"), [(0, 0), (0.4, 1), (59.9, 1), (60, 1), (60.001, 2), (3600, 60)]
)
def test_billable_minutes_round_up_to_the_next_whole_minute(seconds, minutes):
    assert billable_minutes(seconds) == minutes


def test_quotas_reset_on_the_first_of_the_next_month_utc():
    assert next_reset("2026-11") == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert next_reset("2026-12") == datetime(2027, 1, 1, tzinfo=timezone.utc)


def test_thresholds_are_crossed_once():
    assert crossed_thresholds(7.0, 8.5, 10) == [80]
    assert crossed_thresholds(8.5, 9.0, 10) == []
    assert crossed_thresholds(7.0, 10.0, 10) == [80, 100]


def record(**values) -> UsageRecord:
    start = datetime(2026, 11, 30, 23, 59, 30, tzinfo=timezone.utc)
    defaults = dict(
        flow_run_id=uuid4(),
        flow_run_name="r",
        workspace="w",
        tier="free",
        pool="p",
        image="i",
        outcome=Outcome.COMPLETED,
    )
    return UsageRecord.from_timestamps(
        start, start + timedelta(seconds=61), **{**defaults, **values}
    )


def test_a_record_counts_in_the_month_it_finished_and_once_only():
    one = record()
    assert one.month == "2026-12" and one.billable_minutes == 2
    usage = MonthlyUsage("w", "2026-12")
    assert usage.add(one) and not usage.add(one.model_copy())
    assert usage.minutes == 2 and usage.hours_by("pool") == {"p": 2 / 60}


def test_docker_timestamps_parse_to_utc():
    assert parse_docker_time("2026-11-24T20:16:20.123456789Z") == datetime(
        2026, 11, 24, 20, 16, 20, 123456, tzinfo=timezone.utc
    )
    assert parse_docker_time("0001-01-01T00:00:00Z") is None


def test_the_meter_keeps_the_highest_memory_and_cpu():
    meter = Meter()
    meter.add(
        {"memory_stats": {"max_usage": 300}, "cpu_stats": {"cpu_usage": {"total_usage": 2e9}}}
    )
    meter.add(
        {"memory_stats": {"max_usage": 200}, "cpu_stats": {"cpu_usage": {"total_usage": 3e9}}}
    )
    assert (meter.peak_memory_bytes, meter.cpu_seconds) == (300, 3.0)


def _sample(memory: int, read: str = "2026-12-04T15:00:00.000000001Z") -> dict:
    return {"read": read, "memory_stats": {"usage": memory}}


def test_a_stats_stream_feeds_the_meter_every_sample_until_the_container_stops():
    """Each of Docker's samples counts (cgroup v2 has no high-water mark, so a peak seen
    in a sample the worker skipped would be lost); a stopped container's zero-time sample
    ends the watch; a stream that ends without saying (None) is asked about again."""
    from prefect_managed.containers import _feed

    meter = Meter()
    samples = iter([_sample(100), _sample(500), _sample(200), _sample(0, "0001-01-01T00:00:00Z")])
    assert _feed(samples, meter, 2) is True
    assert meter.peak_memory_bytes == 500
    assert _feed(samples, meter, 2) is False  # the third sample, then the stopped one
    assert meter.peak_memory_bytes == 500 and meter.last_seen is not None
    assert _feed(iter([_sample(900)]), meter, 2) is None  # the stream ended, unsaid why
    assert meter.peak_memory_bytes == 900

    def cut():
        yield _sample(1)
        raise ValueError("a cut JSON answer")

    assert _feed(cut(), Meter(), 2) is None  # asked about again: it may still run

    def gone():
        raise docker.errors.NotFound("no such container")
        yield

    assert _feed(gone(), Meter(), 2) is False
