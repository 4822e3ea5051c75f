"""Usage records on the worker host's disk until the ledger has them.

A container whose record is not stored yet is itself the record's keeper: the worker
removes it only after the record is stored. A container removed from outside keeps
nothing, so the record the worker makes of it would be lost if the worker stopped (or
the API failed) before storing it. `Spool` keeps each record in a file of its own under
PREFECT_HOME, written before the record is sent and deleted once the ledger has it; any
worker of the workspace and API on the host sends the files it finds
(`Accounting.send_spooled`, at start and at every reconciliation). Sending twice is
harmless: the ledger stores one record per run attempt.

A file being sent is locked (`flock`), so that two workers never send one record at
the same time. The records are the worker's: the directory is 0700, each file 0600.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from prefect.logging import get_logger
from prefect.settings import PREFECT_HOME
from pydantic import ValidationError

from prefect_managed.configuration import api_label_value
from prefect_managed.usage import UsageRecord

__all__ = ["SPOOL_DIRECTORY_NAME", "Spool", "spool_for"]

#: Where workers keep usage records until the ledger has them, in PREFECT_HOME.
SPOOL_DIRECTORY_NAME = "prefect-managed-spool"

logger = get_logger("managed.spool")


class Spool:
    """The records of one workspace and Prefect API not yet in the ledger."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, record: UsageRecord) -> Path:
        return self.directory / f"{record.flow_run_id}-{record.attempt}.json"

    @contextmanager
    def keeping(self, record: UsageRecord) -> Iterator[None]:
        """The record on disk (locked) while the block sends it; deleted if the block
        ends without an error, kept for a later send otherwise."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(record)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before its name is visible: nobody else has it
            os.write(fd, record.model_dump_json().encode())
            os.fsync(fd)
            os.replace(partial, path)
            yield
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            partial.unlink(missing_ok=True)

    @contextmanager
    def leftovers(self) -> Iterator[Iterator[tuple[UsageRecord, Path]]]:
        """The records left by a worker that did not send them, each locked while the
        caller sends it; the caller deletes the file once it is sent."""
        held: list[int] = []

        def found() -> Iterator[tuple[UsageRecord, Path]]:
            if not self.directory.is_dir():
                return
            for path in sorted(self.directory.glob("*.json")):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # sent meanwhile
                held.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being sent by its worker, or by another
                if os.fstat(fd).st_nlink == 0:
                    continue  # sent and deleted between the listing and the lock
                try:
                    record = UsageRecord.model_validate_json(path.read_bytes())
                except (OSError, ValidationError, ValueError):
                    logger.warning("Ignoring an unreadable spooled usage record %s", path)
                    continue
                yield record, path

        try:
            yield found()
        finally:
            for fd in held:
                with suppress(OSError):
                    os.close(fd)


def spool_for(workspace: str) -> Spool:
    """The spool of the workspace's usage records for this Prefect API, in PREFECT_HOME."""
    home = Path(PREFECT_HOME.value())
    return Spool(home / SPOOL_DIRECTORY_NAME / api_label_value() / workspace)
