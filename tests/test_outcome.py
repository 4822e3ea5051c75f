"""How a container ended, decided from its inspect data: the worker's decision logic
without Docker (the same decisions are proven for real in test_limits, test_faults and
test_hostile)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import docker.errors
import pytest
import requests.exceptions
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Crashed, Failed, Running

from prefect_managed.accounting import usage_record_of
from prefect_managed.containers import Containers, Watch
from prefect_managed.metering import Meter
from prefect_managed.outcome import (
    ContainerReport,
    Ending,
    docker_lost,
    ending,
    outcome_of,
    refused_a_process,
)
from prefect_managed.policy import Policy
from prefect_managed.usage import Outcome

RUN_ID = uuid4()


def inspect_data(**state) -> dict:
    return {
        "Id": "abc123",
        "Name": "/proud-otter",
        "Config": {
            "Image": "prefect-managed-runtime:3.9.1",
            "Labels": {
                "io.prefect.flow-run-id": str(RUN_ID),
                "io.prefect.work-pool-name": "pool-a",
                "io.prefect.deployment-name": "etl",
            },
            "Env": ["EXTRA_PIP_PACKAGES=six", "NO_VALUE", "A=b=c"],
        },
        "HostConfig": {"Memory": 536870912, "PidsLimit": 256},
        "State": {
            "Status": "exited",
            "Running": False,
            "OOMKilled": False,
            "Dead": False,
            "ExitCode": 0,
            "StartedAt": "2026-12-03T10:00:00.123456789Z",
            "FinishedAt": "2026-12-03T10:01:30.5Z",
            **state,
        },
    }


def test_a_report_reads_the_inspect_data_once_into_typed_fields():
    report = ContainerReport.from_inspect(inspect_data())
    assert report.name == "proud-otter" and report.flow_run_id == str(RUN_ID)
    assert report.env == {"EXTRA_PIP_PACKAGES": "six", "A": "b=c"}
    assert report.started_at == datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert (report.memory_limit, report.pids_limit, report.exit_code) == (536870912, 256, 0)
    assert not report.running and not report.gone


def test_a_container_never_started_has_no_start_time_and_no_record():
    report = ContainerReport.from_inspect(inspect_data(StartedAt="0001-01-01T00:00:00Z"))
    assert report.started_at is None
    flow_run = FlowRun(id=RUN_ID, flow_id=uuid4(), name="r")
    assert usage_record_of(report, flow_run, Policy(), Meter(), Outcome.CRASHED, "p") is None


@pytest.mark.parametrize(
    ("state", "timed_out", "engine_lost", "expected"),
    [
        ({"Status": "removing"}, False, False, Ending.REMOVED),
        ({"Dead": True}, True, False, Ending.REMOVED),
        ({"OOMKilled": True, "ExitCode": 137}, True, False, Ending.RUN_TIME),
        ({"OOMKilled": True, "ExitCode": 137}, False, True, Ending.OUT_OF_MEMORY),
        ({"ExitCode": 255}, False, True, Ending.ENGINE_LOST),
        ({"ExitCode": 1}, False, False, Ending.EXITED),
    ],
)
def test_the_ending_says_first_what_the_user_most_needs_to_hear(
    state, timed_out, engine_lost, expected
):
    report = ContainerReport.from_inspect(inspect_data(**state))
    assert ending(report, timed_out=timed_out, engine_lost=engine_lost) is expected
    assert ending(None, timed_out=timed_out, engine_lost=engine_lost) is Ending.REMOVED


def test_a_removed_container_is_counted_until_it_was_last_seen():
    seen = ContainerReport.from_inspect(inspect_data(Status="running", Running=True))
    last_seen = seen.started_at + timedelta(seconds=125)
    removed = seen.removed(last_seen)
    assert removed.gone and not removed.running and removed.exit_code is None
    flow_run = FlowRun(id=RUN_ID, flow_id=uuid4(), name="r")
    record = usage_record_of(removed, flow_run, Policy(), Meter(), Outcome.CRASHED, "default")
    assert record is not None
    assert (record.wall_seconds, record.billable_minutes) == (125.0, 3)
    assert (record.pool, record.deployment) == ("pool-a", "etl")


@pytest.mark.parametrize(
    ("state", "timed_out", "oom", "expected"),
    [
        (Completed(), True, True, Outcome.TIMED_OUT),
        (Completed(), False, True, Outcome.OUT_OF_MEMORY),
        (Completed(), False, False, Outcome.COMPLETED),
        (Failed(), False, False, Outcome.FAILED),
        (Crashed(), False, False, Outcome.CRASHED),
        (Running(), False, False, Outcome.CRASHED),
        (None, False, False, Outcome.CRASHED),
    ],
)
def test_the_outcome_of_a_run(state, timed_out, oom, expected):
    assert outcome_of(state, timed_out=timed_out, out_of_memory=oom) is expected


def test_a_refused_fork_is_recognised_in_the_runs_message():
    assert refused_a_process(
        Failed(message="BlockingIOError: [Errno 11] Resource temporarily unavailable")
    )
    assert refused_a_process(Crashed(message="RuntimeError: can't start new thread"))
    assert not refused_a_process(Failed(message="ValueError: bad"))
    assert not refused_a_process(None)


def test_only_an_unreachable_engine_counts_as_lost():
    try:
        try:
            raise requests.exceptions.ConnectionError("refused")
        except requests.exceptions.ConnectionError as cause:
            raise RuntimeError("watching failed") from cause
    except RuntimeError as exc:
        chained = exc
    assert docker_lost(chained)
    assert docker_lost(docker.errors.DockerException("no socket"))
    assert not docker_lost(docker.errors.NotFound("gone"))
    assert not docker_lost(ValueError("x"))


def test_a_failing_run_time_stop_is_logged_and_retried_never_ends_the_watch(caplog):
    containers = Containers(lambda: None, logging.getLogger("test.containers"))  # type: ignore[arg-type]
    watch = Watch("abc123")
    watch.report = ContainerReport.from_inspect(
        inspect_data(Running=True, StartedAt="2026-01-01T10:00:00Z")
    )
    calls = []

    async def stop() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the Prefect API is down")

    async def two_checks() -> None:
        await containers._check_run_time(watch, 60, stop)
        await containers._check_run_time(watch, 60, stop)
        await containers._check_run_time(watch, 60, stop)

    with caplog.at_level(logging.ERROR):
        asyncio.run(two_checks())
    assert watch.timed_out and watch.stopped
    assert len(calls) == 2  # retried once after the failure, then never again
    assert "Could not stop container abc123 at the maximum run time" in caplog.text


@pytest.mark.parametrize("cut", ["ended", "connection dropped"])
def test_a_stats_stream_cut_while_the_container_runs_is_opened_again(monkeypatch, cut):
    """Docker's stats stream of a running container may end without a word (an engine
    restarted with live-restore, a dropped connection): the container is watched again,
    so its run time is still clocked and its usage sampled; a stopped container's stream
    (Docker's zero time) ends the watch without asking Docker anything more."""
    import prefect_managed.containers as containers_module

    monkeypatch.setattr(containers_module, "STREAM_AGAIN_SECONDS", 0.0)
    started = (datetime.now(timezone.utc) - timedelta(seconds=120)).isoformat()
    calls: list[str] = []

    def sample(memory: int, read: str = "2026-12-04T15:00:00.000000001Z") -> dict:
        return {"read": read, "memory_stats": {"usage": memory}}

    def first_stream():
        yield sample(100)
        if cut == "connection dropped":
            raise requests.exceptions.ChunkedEncodingError("connection dropped")

    streams = iter([first_stream(), iter([sample(300), sample(0, "0001-01-01T00:00:00Z")])])

    class Api:
        def inspect_container(self, container_id: str) -> dict:
            calls.append("inspect")
            return inspect_data(Running=True, StartedAt=started, FinishedAt="0001-01-01T00:00:00Z")

        def stats(self, container_id: str, stream: bool, decode: bool):
            calls.append("stats")
            return next(streams)

    class Client:
        api = Api()

        def close(self) -> None:
            calls.append("close")

    stopped: list[int] = []

    async def stop() -> None:
        stopped.append(1)

    containers = Containers(lambda: Client(), logging.getLogger("test.containers"))  # type: ignore[arg-type,return-value]
    watch = Watch("abc123")
    asyncio.run(containers.watch(watch, 60, stop))
    assert calls == ["inspect", "stats", "inspect", "stats", "close"]
    assert watch.meter.peak_memory_bytes == 300  # sampled on the second stream
    assert watch.timed_out and watch.stopped and stopped == [1]  # clocked past its 60 s


def test_a_container_within_its_run_time_is_not_stopped():
    containers = Containers(lambda: None, logging.getLogger("test.containers"))  # type: ignore[arg-type]
    watch = Watch("abc123")
    watch.report = ContainerReport.from_inspect(
        inspect_data(Running=True, StartedAt=datetime.now(timezone.utc).isoformat())
    )

    async def stop() -> None:
        raise AssertionError("stopped too early")

    asyncio.run(containers._check_run_time(watch, 3600, stop))
    assert not watch.timed_out


def test_a_worker_takes_over_only_containers_no_live_worker_watches():
    from prefect_managed.containers import orphans

    def report(container_id: str, worker: str, run: bool = True) -> ContainerReport:
        labels = {"io.prefect.worker-name": worker}
        if run:
            labels["io.prefect.flow-run-id"] = str(uuid4())
        return ContainerReport(id=container_id, name=container_id, image="i", labels=labels)

    found = [
        report("mine-watched", "me"),
        report("mine-after-crash", "me"),
        report("of-a-live-worker", "alive"),
        report("of-a-dead-worker", "dead"),
        report("not-a-run", "dead", run=False),
    ]
    taken = orphans(found, watched={"mine-watched"}, online_workers={"alive"})
    assert [r.id for r in taken] == ["mine-after-crash", "of-a-dead-worker"]
