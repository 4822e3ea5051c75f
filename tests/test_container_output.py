"""The container's own output in the flow run's logs.

Unit tests (no Docker) for the pure parts: Prefect's records left out, the cap keeping
the last part, the time order of both streams, the split into log entries and batches.
End-to-end tests (marked `docker`) against a real Prefect server, `prefect worker start`
and a Docker engine: a flow whose subprocess writes to stdout and stderr and which then
segfaults, and a flow whose output is over a small cap.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from uuid import uuid4

import pytest
import tomllib

from prefect_managed.container_output import (
    CONTAINER_OUTPUT_LOGGER,
    RECENT_RECORDS_MAX_BYTES,
    STDERR_PREFIX,
    PrefectRecords,
    StreamTail,
    batches,
    log_entries,
    merge,
)
from prefect_managed.messages import container_output_dropped_message
from prefect_managed.policy import Policy

# -- unit: Prefect's own records ------------------------------------------------------

PREFECT_LINES = [
    "10:44:53.833 | INFO    | Flow run 'crimson-owl' - Beginning flow run 'crimson-owl'",
    "10:44:53.900 | INFO    | Task run 'add-0' - Finished in state Completed()",
    '10:44:53.901 | WARNING | Flow run "o\'brien" - a name with a quote',
    "10:44:54.001 | INFO    | prefect.flow_runs.runner - Opening process...",
    "10:44:54.002 | ERROR   | prefect.task_runs - boom",
]


def kept(lines: list[str]) -> list[str]:
    records = PrefectRecords()
    return [line for line in lines if not records.is_prefect(line)]


@pytest.mark.parametrize("line", PREFECT_LINES)
def test_a_record_prefect_also_sent_to_the_api_is_left_out(line):
    assert kept([line, "user line"]) == ["user line"]


@pytest.mark.parametrize(
    "line",
    [
        "10:44:54.002 | WARNING | prefect.deployments.steps.core - a pull step's record",
        "10:44:54.002 | INFO    | my.library - a library's own record",
        "print('10:44:53.833 | INFO    | Flow run ...')",
        "Fatal Python error: Segmentation fault",
    ],
)
def test_other_lines_are_kept(line):
    assert kept([line]) == [line]


def test_the_traceback_of_a_prefect_record_is_left_out_and_what_follows_kept():
    lines = [
        "10:44:53.833 | ERROR   | Flow run 'crimson-owl' - Encountered exception during "
        "execution: Traceback (most recent call last):",
        '  File "/flow.py", line 3, in f',
        "    raise KeyError('a')",
        "KeyError: 'a'",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        '  File "/flow.py", line 5, in f',
        "    raise ValueError('b')",
        "ValueError: b",
        "Fatal Python error: Segmentation fault",
        "  an indented line of the user's",
    ]
    assert kept(lines) == lines[-2:]


def test_a_logged_exception_with_its_traceback_on_the_next_line_is_left_out():
    lines = [
        "10:44:53.833 | ERROR   | Flow run 'crimson-owl' - it failed",
        "Traceback (most recent call last):",
        '  File "/flow.py", line 3, in f',
        "RuntimeError: x",
        "err-marker",
    ]
    assert kept(lines) == ["err-marker"]


def test_colours_do_not_hide_a_prefect_record():
    assert kept(["\x1b[36m10:44:53.833\x1b[0m | INFO    | Flow run 'a' - hi"]) == []


# -- unit: reading a stream with a bound ---------------------------------------------


def frames(stream_lines: list[tuple[str, str]]) -> list[bytes]:
    return [f"{stamp} {text}\n".encode() for stamp, text in stream_lines]


def tail_of(stream: str, lines: list[tuple[str, str]], max_bytes: int) -> StreamTail:
    tail = StreamTail(stream, max_bytes)
    for frame in frames(lines):
        tail.feed(frame)
    tail.close()
    return tail


def test_a_stream_over_the_cap_keeps_its_last_lines_and_counts_the_rest():
    lines = [(f"2026-12-03T10:00:00.{n:09d}Z", f"line-{n:04d}") for n in range(1000)]
    tail = tail_of("stdout", lines, 100)  # 10 bytes a line with its break
    assert [line.text for line in tail.lines] == [f"line-{n:04d}" for n in range(990, 1000)]
    assert tail.size == 100
    assert (tail.dropped_lines, tail.dropped_bytes) == (990, 9900)


def test_a_line_longer_than_the_cap_keeps_its_end_and_pieces_join():
    tail = StreamTail("stdout", 50)
    tail.feed(b"2026-12-03T10:00:00.1Z " + b"a" * 16384)  # Docker's 16 KiB pieces
    tail.feed(b"2026-12-03T10:00:00.2Z " + b"b" * 100 + b"\n")
    tail.feed(b"2026-12-03T10:00:00.3Z end without break")
    tail.close()
    texts = [line.text for line in tail.lines]
    assert texts == ["end without break"]
    assert tail.dropped_bytes == 16384 + 100 + 1


def test_a_flood_never_holds_more_than_the_cap():
    tail = StreamTail("stderr", 4096)
    for n in range(100_000):
        tail.feed(f"2026-12-03T10:00:00.{n:09d}Z flood {n}\n".encode())
        assert tail.size <= 4096
    tail.close()
    assert tail.lines[-1].text == "flood 99999"


def test_both_streams_merge_in_time_order_and_the_cap_keeps_the_last_part():
    out = tail_of(
        "stdout",
        [("2026-12-03T10:00:01.5Z", "out-b"), ("2026-12-03T10:00:03.000000001Z", "out-d")],
        1000,
    )
    err = tail_of(
        "stderr",
        [("2026-12-03T10:00:01.45Z", "err-a"), ("2026-12-03T10:00:02Z", "err-c")],
        1000,
    )
    merged = merge([out, err], 1000)
    assert [line.text for line in merged.lines] == ["err-a", "out-b", "err-c", "out-d"]
    capped = merge([out, err], 12)
    assert [line.text for line in capped.lines] == ["err-c", "out-d"]
    assert (capped.dropped_lines, capped.dropped_bytes) == (2, 12)


def test_prefects_last_records_that_the_api_never_got_are_put_back_in_order():
    err = tail_of(
        "stderr",
        [
            ("2026-12-03T10:00:01Z", "10:00:01.000 | INFO    | Flow run 'a' - sent"),
            ("2026-12-03T10:00:02Z", "err-marker"),
            ("2026-12-03T10:00:03Z", "10:00:03.000 | ERROR   | Flow run 'a' - lost"),
            ("2026-12-03T10:00:03Z", "Traceback (most recent call last):"),
            ("2026-12-03T10:00:03Z", '  File "f.py", line 1'),
            ("2026-12-03T10:00:03Z", "RuntimeError: x"),
        ],
        1000,
    )
    out = tail_of("stdout", [("2026-12-03T10:00:04Z", "out-marker")], 1000)
    output = merge([out, err], 1000)
    assert [line.text for line in output.lines] == ["err-marker", "out-marker"]
    assert output.earliest_record is not None and output.earliest_record.second == 1

    back = output.with_records_not_in({"sent", "something else"})
    assert [line.text for line in back.lines] == [
        "err-marker",
        "10:00:03.000 | ERROR   | Flow run 'a' - lost",
        "Traceback (most recent call last):",
        '  File "f.py", line 1',
        "RuntimeError: x",
        "out-marker",
    ]
    assert output.with_records_not_in({"sent", "lost"}).lines == output.lines


def test_the_record_prefect_prints_only_to_the_console_is_not_put_back():
    """Prefect's engine logs the run's UI link with `send_to_api` off: it is never in
    the run's logs, and never one the API lost."""
    run = "7078de0e-d1b4-4983-a443-6093016977f6"
    err = tail_of(
        "stderr",
        [
            ("2026-12-03T10:00:01Z", "10:00:01.000 | INFO    | Flow run 'a' - Beginning"),
            (
                "2026-12-03T10:00:01Z",
                f"10:00:01.001 | INFO    | Flow run 'a' - View at http://127.0.0.1:4200/runs/flow-run/{run}",
            ),
            (
                "2026-12-03T10:00:02Z",
                "10:00:02.000 | INFO    | Flow run 'a' - View at my dashboard",
            ),
        ],
        1000,
    )
    output = merge([err], 1000)
    back = output.with_records_not_in({"Beginning"})
    assert [line.text for line in back.lines] == [
        "10:00:02.000 | INFO    | Flow run 'a' - View at my dashboard"  # the flow's own
    ]


def test_the_later_lines_of_a_message_the_run_logs_hold_are_not_sent_again():
    """A block printed with log_prints: Prefect's console shows its first line in its own
    format (left out) and the rest as plain lines, which the run's logs already hold."""
    err = tail_of(
        "stderr",
        [
            ("2026-12-03T10:00:01Z", "10:00:01.000 | INFO    | Flow run 'a' - | Hello |"),
            ("2026-12-03T10:00:01Z", "  ======="),
            ("2026-12-03T10:00:01Z", "     \\ ^__^"),
            ("2026-12-03T10:00:02Z", "a line of the flow's own"),
        ],
        1000,
    )
    output = merge([err], 1000)
    assert output.earliest is not None and output.earliest.second == 1
    kept = output.without_lines_in({"  =======", "     \\ ^__^"})
    assert [line.text for line in kept.lines] == ["a line of the flow's own"]


TRACEBACK = b"Traceback (most recent call last):"


def test_prefects_kept_records_are_bounded():
    tail = StreamTail("stderr", 10**6)
    for n in range(20_000):
        tail.feed(f"2026-12-03T10:00:00Z 10:00:00.000 | INFO    | Flow run 'a' - r{n}\n".encode())
    tail.feed(
        b"2026-12-03T10:00:01Z 10:00:01.000 | ERROR   | Flow run 'a' - x: " + TRACEBACK + b"\n"
    )
    for n in range(20_000):
        tail.feed(f"2026-12-03T10:00:01Z   a traceback's flood {n}\n".encode())
    assert tail.records_size <= RECENT_RECORDS_MAX_BYTES
    assert sum(line.size for record in tail.records for line in record) == tail.records_size
    assert tail.prefect_lines == 40_001


# -- unit: log entries and batches ---------------------------------------------------


def test_entries_mark_stderr_redact_credentials_and_say_what_was_dropped_first():
    out = tail_of("stdout", [("2026-12-03T10:00:01Z", "out https://user:tok@git.example/x")], 9)
    err = tail_of("stderr", [("2026-12-03T10:00:02Z", "err-marker")], 100)
    output = merge([out, err], 100)
    assert output.dropped_bytes > 0
    run_id = uuid4()
    message = container_output_dropped_message(Policy(), output.dropped_bytes, 0)
    entries = log_entries(output, run_id, None, message)
    assert entries[0].level == 30 and "container_output_max_size" in entries[0].message
    assert all(entry.name == CONTAINER_OUTPUT_LOGGER for entry in entries)
    assert all(entry.flow_run_id == run_id for entry in entries)
    assert STDERR_PREFIX + "err-marker" in entries[-1].message

    whole = merge([tail_of("stdout", [("2026-12-03T10:00:01Z", "https://u:p@h/x")], 100)], 100)
    assert log_entries(whole, run_id, None, message)[0].message == "https://***@h/x"


def test_entries_and_batches_are_bounded():
    lines = [(f"2026-12-03T10:00:00.{n:09d}Z", "x" * 99) for n in range(1000)]
    output = merge([tail_of("stdout", lines, 10**6)], 10**6)
    entries = log_entries(output, uuid4(), None, max_chars=1000)
    assert all(len(entry.message) <= 1000 for entry in entries)
    assert sum(entry.message.count("x" * 99) for entry in entries) == 1000
    groups = batches(entries, max_chars=5000)
    assert all(sum(len(entry.message) for entry in group) <= 5000 for group in groups)
    assert [entry for group in groups for entry in group] == entries

    long_line = merge([tail_of("stdout", [("2026-12-03T10:00:00Z", "y" * 2500)], 10**6)], 10**6)
    pieces = log_entries(long_line, uuid4(), None, max_chars=1000)
    assert [len(entry.message) for entry in pieces] == [1000, 1000, 500]


# -- end to end: a real Prefect server, worker and Docker engine ---------------------


def run_logs(flow_run_id) -> list:
    """Every log of a run, as the UI reads them (Prefect's client, in pages)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
                offset=len(logs),
            )
            logs.extend(page)
            if len(page) < 200:
                return logs


def output_lines(logs: list) -> list[str]:
    return [
        line
        for log in logs
        if log.name == CONTAINER_OUTPUT_LOGGER
        for line in log.message.splitlines()
    ]


def start_run(deployment_id, **parameters):
    from prefect.deployments import run_deployment

    return run_deployment(deployment_id, parameters=parameters, timeout=0).id


@pytest.mark.docker
def test_a_segfaulting_flows_subprocess_output_reaches_its_logs_once(deploy, docker_client):
    from helpers import wait_for_settled_run

    deployment_id = deploy("output_then_segfault", "output-then-segfault")
    flow_run_id = start_run(deployment_id)

    run = wait_for_settled_run(docker_client, flow_run_id)

    assert run.state.is_crashed(), run.state
    logs = run_logs(flow_run_id)
    lines = output_lines(logs)
    assert "out-marker" in lines, lines
    assert STDERR_PREFIX + "err-marker" in lines, lines
    # Prefect's own records are in the run's logs once: sent by Prefect's API handler,
    # or, logged just before the crash and never sent, from the container's output.
    sent = [log for log in logs if "sent-marker" in log.message]
    assert [log.name for log in sent] == ["prefect.flow_runs"], sent
    assert len([log for log in logs if "last-words-marker" in log.message]) == 1, logs
    # The engine's UI link, printed to the console only, is not put back.
    assert not [line for line in lines if "/runs/flow-run/" in line], lines
    api_messages = {
        log.message.split("\n")[0] for log in logs if log.name != CONTAINER_OUTPUT_LOGGER
    }
    for line in lines:
        record = re.match(
            r"^\d\d:\d\d:\d\d\.\d{3} \| .*? - (.*)$", line.removeprefix(STDERR_PREFIX)
        )
        assert record is None or record[1] not in api_messages, line


@pytest.mark.docker
def test_output_over_the_cap_keeps_its_last_part_and_says_what_was_dropped(
    deploy, docker_client, runtime_image, package_index, tmp_path
):
    from conftest import worker_policy
    from helpers import create_pool, wait_for_settled_run, worker

    pool = create_pool("output-cap-pool")
    policy = worker_policy(
        tmp_path / "output-cap.toml",
        runtime_image,
        package_index.url,
        "output-cap",
        container_output_max_size="4k",
    )
    deployment_id = deploy("numbered_lines", "numbered-lines", pool=pool)
    with worker(pool, policy, "output-cap-worker"):
        flow_run_id = start_run(deployment_id, count=2000)
        run = wait_for_settled_run(docker_client, flow_run_id)

    assert run.state.is_completed(), run.state
    logs = run_logs(flow_run_id)
    lines = output_lines(logs)
    numbered = [line for line in lines if line.startswith("numbered-line-")]
    assert numbered[-1] == "numbered-line-01999", lines[-5:]
    assert "numbered-line-00000" not in numbered
    assert sum(len(line) + 1 for line in numbered) <= 4096
    dropped = [log for log in logs if log.name == CONTAINER_OUTPUT_LOGGER and log.level == 30]
    assert len(dropped) == 1, dropped
    assert "of the container's output are not in these logs" in dropped[0].message
    assert "keeps the last 4 KiB" in dropped[0].message
    assert "container_output_max_size" in dropped[0].message


@pytest.mark.docker
@pytest.mark.parametrize("prebuilt", [False, True], ids=["install-in-run", "environment-build"])
def test_an_early_exits_output_is_sent_once_by_its_report(
    deploy, docker_client, runtime_image, package_index, tmp_path, prebuilt
):
    """A failed install in the run's own container (an early exit: its report carries
    the output, the forwarding must not send it again), or in the environment's builder."""
    from conftest import worker_policy
    from helpers import create_pool, wait_for_settled_run, worker
    from services import write_policy

    name = f"early-exit-{'prebuilt' if prebuilt else 'in-run'}"
    pool = create_pool(f"{name}-pool")
    policy = worker_policy(tmp_path / f"{name}.toml", runtime_image, package_index.url, name)
    tables = tomllib.loads(policy.read_text())
    tables["runtime"]["prebuilt_environments"] = prebuilt
    write_policy(policy, **tables)
    deployment_id = deploy(
        "hello", name, {"pip_packages": ["managed-probe-missing==9.9.9"]}, pool=pool
    )
    with worker(pool, policy, f"{name}-worker"):
        flow_run_id = start_run(deployment_id)
        run = wait_for_settled_run(docker_client, flow_run_id)

    assert run.state.is_crashed(), run.state
    entries = [log for log in run_logs(flow_run_id) if log.name == CONTAINER_OUTPUT_LOGGER]
    assert len(entries) == 1, entries
    assert "+uv pip install managed-probe-missing==9.9.9" in entries[0].message


def test_the_output_counts_as_sent_once_the_runs_logs_hold_an_entry(prefect_server):
    """What keeps a second `_finish` of one container from sending its output again."""
    import anyio
    from prefect import flow
    from prefect.client.orchestration import get_client

    from prefect_managed.run_states import RunStates

    @flow(name="output-sent-probe")
    def probe() -> None: ...

    async def check() -> tuple[bool, bool, bool]:
        async with get_client() as client:
            run = await client.create_flow_run(probe)
            other = await client.create_flow_run(probe)
            states = RunStates(client, lambda _: None, lambda *_: None, lambda: None)  # type: ignore[arg-type,return-value]
            since = datetime(2026, 12, 3, 10, 0, tzinfo=timezone.utc)
            before = (await states.logs_since(run.id, since)).output_sent
            output = merge([tail_of("stdout", [("2026-12-03T10:00:00Z", "hello")], 100)], 100)
            await states.send_logs(log_entries(output, run.id, None))
            # Another run's logs, and a record of the flow that names the logger, count not.
            await client.create_logs(
                [
                    {
                        "name": "prefect.flow_runs",
                        "level": 20,
                        "message": f"printing {CONTAINER_OUTPUT_LOGGER}",
                        "timestamp": "2026-12-03T10:00:00Z",
                        "flow_run_id": str(other.id),
                    }
                ]
            )
            return (
                before,
                (await states.logs_since(run.id, since)).output_sent,
                (await states.logs_since(other.id, since)).output_sent,
            )

    assert anyio.run(check) == (False, True, False)
