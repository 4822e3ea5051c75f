"""A flow run container's own output, for the flow run's logs: pure values and functions.

When a run's container ends, the worker reads what it wrote to stdout and stderr from
Docker (json-file, rotated: at most `runtime.log_max_files` x `runtime.log_max_size`)
and sends it to the run's logs under `CONTAINER_OUTPUT_LOGGER`, so that what never went
through Prefect's logging (a subprocess's output, a C extension's stderr, the last words
of a crash) outlives the container. This module holds the parts that need no Docker and
no Prefect server:

- `StreamTail` reads one stream from Docker's log frames (with timestamps), leaves out
  Prefect's own log records (`PrefectRecords`) and keeps at most the last `max_bytes`,
  so a flood costs the worker a bounded amount of memory;
- `merge` puts both streams in time order and keeps the last `max_bytes` of them;
- `log_entries` turns the lines into Prefect log entries of bounded size (credentials in
  URLs redacted) and `batches` groups them for `create_logs`.

Prefect's records are left out because they reach the API already: Prefect's console
handler prints every record of the `prefect.flow_runs` and `prefect.task_runs` loggers
(the engine's and `get_run_logger()`'s) to the container's stderr, and its API handler
sends the same record to the run's logs. They are recognised by Prefect's console format
(`HH:MM:SS.mmm | LEVEL   | Flow run 'name' - ...`, `Task run 'name' - ...`, or
`prefect.flow_runs... - ...`), with the traceback that follows such a record. Limits: a
record whose message holds line breaks (other than its traceback) keeps its later lines;
a deployment that changes Prefect's console format (`PREFECT_LOGGING_*` in its env) gets
its records forwarded too. The container's own output is left as it is (`docker logs`
shows everything, and the early-exit diagnosis reads it whole).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from uuid import UUID

from prefect.client.schemas.actions import LogCreate

from prefect_managed.metering import parse_docker_time
from prefect_managed.redact import redact_url_credentials

__all__ = [
    "CONTAINER_OUTPUT_LOGGER",
    "CappedOutput",
    "OutputLine",
    "PrefectRecords",
    "StreamTail",
    "batches",
    "log_entries",
    "merge",
    "record_message",
]

#: The logger name of every log entry that holds the container's own output.
CONTAINER_OUTPUT_LOGGER = "prefect_managed.container_output"
#: Characters per log entry: under Prefect Cloud's cap on one log (25,000) and far under
#: a server's default `PREFECT_LOGGING_TO_API_MAX_LOG_SIZE` (1,000,000).
ENTRY_MAX_CHARS = 20_000
#: Characters of messages per `create_logs` call (Prefect's own batches are at most
#: `PREFECT_LOGGING_TO_API_BATCH_SIZE`, 4,000,000 by default).
BATCH_MAX_CHARS = 1_000_000
#: Bytes of Prefect's last records kept per stream, to put back those the API never got.
RECENT_RECORDS_MAX_BYTES = 64 * 2**10
#: How a line of stderr is marked in the run's logs (stdout lines are not marked).
STDERR_PREFIX = "[stderr] "

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: A record of Prefect's console handler (its `standard` formatter) that the API has too.
_PREFECT_RECORD = re.compile(
    r"^\d{2}:\d{2}:\d{2}\.\d{3} \| [A-Za-z]+(?: \d+)? *\| "
    r"(?:Flow run (?:'.*?'|\".*?\")|Task run (?:'.*?'|\".*?\")|prefect\.(?:flow|task)_runs(?:\.\S+)?)"
    r" - "
)
#: The one record of Prefect's engine that it never sends to the API (`send_to_api` off:
#: "View at <UI URL>/runs/flow-run/<id>"), so never one the API lost.
_CONSOLE_ONLY = re.compile(r"^View at \S*/runs/flow-run/[0-9a-f-]{36}$")
_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = (
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
)
_GROUP_LINE = re.compile(r"^\s+[+|]")


class PrefectRecords:
    """Tells, line by line of one stream, whether a line belongs to a record of Prefect's
    console handler that also went to the API: its first line, then the traceback that
    follows it (frames, chained exceptions, the exception line)."""

    def __init__(self) -> None:
        self._state = "none"  # "header", "trace" or "after_exception" inside a record
        #: the last line was the first of a record
        self.started = False

    def is_prefect(self, line: str) -> bool:
        text = _ANSI.sub("", line).rstrip("\r")
        state = self._state
        self.started = False
        if state == "header" and text == _TRACEBACK:
            self._state = "trace"
            return True
        if state == "trace":
            if not text or text[0].isspace() or text == _TRACEBACK:
                return True
            self._state = "after_exception"  # the exception's own line ends the frames
            return True
        if state == "after_exception":
            if not text or text in _CHAINED or _GROUP_LINE.match(text):
                return True
            if text == _TRACEBACK:
                self._state = "trace"
                return True
        if _PREFECT_RECORD.match(text):
            self._state = "trace" if text.endswith(_TRACEBACK) else "header"
            self.started = True
            return True
        self._state = "none"
        return False


@dataclass(frozen=True)
class OutputLine:
    #: Docker's timestamp of the line (RFC 3339 with up to nanoseconds, UTC)
    timestamp: str
    stream: str  # "stdout" or "stderr"
    text: str
    #: the line's size in bytes, its line break included
    size: int


def record_message(line: OutputLine) -> str:
    """The message of a record of Prefect's console handler: its first line's text after
    the time, level and logger (the first line of the message the API holds)."""
    text = _ANSI.sub("", line.text).rstrip("\r")
    match = _PREFECT_RECORD.match(text)
    return text[match.end() :] if match else text


def _plain(text: str) -> str:
    return _ANSI.sub("", text).rstrip("\r")


def _order_key(timestamp: str) -> tuple[str, str]:
    """Docker's timestamps in time order (their fractions may have fewer digits)."""
    head, _, fraction = timestamp.rstrip("Z").partition(".")
    return head, fraction.ljust(9, "0")


def _order(line: OutputLine) -> tuple[str, str]:
    return _order_key(line.timestamp)


@dataclass
class StreamTail:
    """The last `max_bytes` of one stream of a container's output, Prefect's records
    left out, fed frame by frame from Docker's log stream with timestamps on."""

    stream: str
    max_bytes: int
    lines: deque[OutputLine] = field(default_factory=deque)
    size: int = 0
    dropped_bytes: int = 0
    dropped_lines: int = 0
    prefect_lines: int = 0
    #: the last of Prefect's records (at most `RECENT_RECORDS_MAX_BYTES`): those logged
    #: just before a hard crash never reached the API, and are put back
    records: deque[list[OutputLine]] = field(default_factory=deque)
    records_size: int = 0
    _pending: bytearray = field(default_factory=bytearray)
    _pending_timestamp: str = ""
    _records: PrefectRecords = field(default_factory=PrefectRecords)

    def feed(self, frame: bytes) -> None:
        """One frame: `<timestamp> <text>`, the text one line with its line break, or a
        piece of a longer line (Docker splits lines at 16 KiB)."""
        stamp, _, text = frame.partition(b" ")
        while text:
            if not self._pending:
                self._pending_timestamp = stamp.decode(errors="replace")
            head, newline, text = text.partition(b"\n")
            self._pending += head
            if len(self._pending) >= self.max_bytes:  # a line without end: keep its end
                cut = len(self._pending) - self.max_bytes + 1  # room for its line break
                del self._pending[:cut]
                self.dropped_bytes += cut
            if newline:
                self._add(bytes(self._pending))
                self._pending.clear()

    def close(self) -> None:
        """The stream ended: a last line without a line break counts too."""
        if self._pending:
            self._add(bytes(self._pending))
            self._pending.clear()

    def _add(self, raw: bytes) -> None:
        text = raw.decode(errors="replace")
        line = OutputLine(self._pending_timestamp, self.stream, text, len(raw) + 1)
        if self._records.is_prefect(text):
            self.prefect_lines += 1
            if self._records.started:
                self.records.append([])
            elif not self.records:
                return  # the rest of a record that is not kept
            self.records[-1].append(line)
            self.records_size += line.size
            limit = min(self.max_bytes, RECENT_RECORDS_MAX_BYTES)
            while self.records_size > limit and len(self.records) > 1:
                self.records_size -= sum(gone.size for gone in self.records.popleft())
            if self.records_size > limit:  # one record alone over the bound: no more of it
                self.records_size -= self.records[-1].pop().size
                if not self.records[-1]:
                    self.records.pop()
            return
        self.lines.append(line)
        self.size += line.size
        while self.size > self.max_bytes and len(self.lines) > 1:
            gone = self.lines.popleft()
            self.size -= gone.size
            self.dropped_bytes += gone.size
            self.dropped_lines += 1


@dataclass(frozen=True)
class CappedOutput:
    """A container's output in time order, at most `max_bytes` of it, and what was left out."""

    lines: list[OutputLine]
    max_bytes: int
    dropped_bytes: int = 0
    dropped_lines: int = 0
    prefect_lines: int = 0
    #: the last of Prefect's records, each a list of lines (see `StreamTail.records`)
    prefect_records: list[list[OutputLine]] = field(default_factory=list)

    @property
    def earliest_record(self) -> datetime | None:
        """When the first of `prefect_records` was written."""
        stamps = [record[0].timestamp for record in self.prefect_records]
        return (
            parse_docker_time(min(stamps, key=lambda stamp: _order_key(stamp))) if stamps else None
        )

    @property
    def earliest(self) -> datetime | None:
        """When the first of the lines or records kept was written."""
        stamps = [line.timestamp for line in self.lines]
        stamps += [record[0].timestamp for record in self.prefect_records]
        return parse_docker_time(min(stamps, key=_order_key)) if stamps else None

    def without_lines_in(self, logged: set[str]) -> CappedOutput:
        """This output without the lines the run's logs already hold as a later line of
        a multi-line message: what Prefect's console handler printed of a message after
        its first line (a block printed with `log_prints`, say), which is not in its
        console format and so was not recognised as Prefect's."""
        kept = [line for line in self.lines if _plain(line.text) not in logged]
        return dataclasses.replace(self, lines=kept)

    def with_records_not_in(self, sent: set[str]) -> CappedOutput:
        """This output with the records of `prefect_records` whose message is not among
        `sent` (the first lines of the run's logs) put back in time order, capped again:
        what Prefect logged just before a hard crash, which its API handler never sent.
        The record Prefect prints only to the console ("View at <URL>") is not one: put
        back, every run's logs would get it, and the worker a request more per run."""
        missing = [
            line
            for record in self.prefect_records
            if (message := record_message(record[0])) not in sent
            and not _CONSOLE_ONLY.match(message)
            for line in record
        ]
        if not missing:
            return dataclasses.replace(self, prefect_records=[])
        kept, dropped_bytes, dropped_lines = _keep_last(
            sorted([*self.lines, *missing], key=_order), self.max_bytes
        )
        return CappedOutput(
            kept,
            self.max_bytes,
            self.dropped_bytes + dropped_bytes,
            self.dropped_lines + dropped_lines,
            self.prefect_lines - len(missing),
        )


def _keep_last(lines: list[OutputLine], max_bytes: int) -> tuple[list[OutputLine], int, int]:
    """The last lines that fit in `max_bytes`, and the bytes and lines left out."""
    size, start = 0, len(lines)
    while start > 0 and size + lines[start - 1].size <= max_bytes:
        start -= 1
        size += lines[start].size
    return lines[start:], sum(line.size for line in lines[:start]), start


def merge(tails: Iterable[StreamTail], max_bytes: int) -> CappedOutput:
    """Both streams in time order, keeping the last `max_bytes` of them."""
    tails = list(tails)
    merged = list(heapq.merge(*(tail.lines for tail in tails), key=_order))
    kept, dropped_bytes, dropped_lines = _keep_last(merged, max_bytes)
    return CappedOutput(
        kept,
        max_bytes,
        dropped_bytes + sum(tail.dropped_bytes for tail in tails),
        dropped_lines + sum(tail.dropped_lines for tail in tails),
        sum(tail.prefect_lines for tail in tails),
        [record for tail in tails for record in tail.records],
    )


def _render(line: OutputLine) -> str:
    text = redact_url_credentials(line.text)
    return STDERR_PREFIX + text if line.stream == "stderr" else text


def _pieces(text: str, max_chars: int) -> list[str]:
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)] or [""]


def log_entries(
    output: CappedOutput,
    flow_run_id: UUID,
    worker_id: UUID | None,
    dropped_message: str | None = None,
    max_chars: int = ENTRY_MAX_CHARS,
) -> list[LogCreate]:
    """The output as log entries of at most `max_chars` characters each, in time order;
    consecutive lines share an entry (its time is its first line's). `dropped_message`,
    said first when lines were dropped, is an entry of its own at level WARNING."""

    def entry(level: int, message: str, timestamp: str | None) -> LogCreate:
        moment = (timestamp and parse_docker_time(timestamp)) or datetime.now(timezone.utc)
        return LogCreate(
            name=CONTAINER_OUTPUT_LOGGER,
            level=level,
            message=message,
            timestamp=moment,  # type: ignore[arg-type]
            flow_run_id=flow_run_id,
            worker_id=worker_id,
        )

    entries: list[LogCreate] = []
    first = output.lines[0].timestamp if output.lines else None
    if dropped_message and (output.dropped_bytes or output.dropped_lines):
        entries.append(entry(logging.WARNING, dropped_message, first))
    chunk: list[str] = []
    chunk_chars, chunk_timestamp = 0, ""
    for line in output.lines:
        for piece in _pieces(_render(line), max_chars):
            if chunk and chunk_chars + len(piece) + 1 > max_chars:
                entries.append(entry(logging.INFO, "\n".join(chunk), chunk_timestamp))
                chunk, chunk_chars = [], 0
            if not chunk:
                chunk_timestamp = line.timestamp
            chunk.append(piece)
            chunk_chars += len(piece) + 1
    if chunk:
        entries.append(entry(logging.INFO, "\n".join(chunk), chunk_timestamp))
    return entries


def batches(entries: list[LogCreate], max_chars: int = BATCH_MAX_CHARS) -> list[list[LogCreate]]:
    """The entries in groups of at most `max_chars` characters of messages (one call to
    `create_logs` each), in order."""
    groups: list[list[LogCreate]] = []
    size = 0
    for item in entries:
        if not groups or size + len(item.message) > max_chars:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item.message)
    return groups
