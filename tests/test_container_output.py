"""The container's own output in the flow run's logs.

Unit tests (no Docker) for the pure parts: Prefect's records left out, the cap keeping
the last part, the time order of both streams, the split into log entries and batches.
End-to-end tests (marked `docker`) against a real Prefect server, `prefect worker start`
and a Docker engine: a flow whose subprocess writes to stdout and stderr and which then
segfaults, and a flow whose output is over a small cap.
"""

from __future__ import annotations

from uuid import uuid4

import pytest

from prefect_managed.container_output import (
    CONTAINER_OUTPUT_LOGGER,
    STDERR_PREFIX,
    PrefectRecords,
    StreamTail,
    batches,
    log_entries,
    merge,
)
from prefect_managed.policy import Policy, container_output_dropped_message

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
