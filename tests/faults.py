"""What a user checks after a fault: every run final, no container left, no slot held,
one usage record per run that had a container; and the Docker engine's restart, a fault
itself. Shared by tests/test_faults.py and the soak (soak/__main__.py), which must not
import conftest (it sets the test session's PREFECT_API_URL and PREFECT_HOME)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import closing
from pathlib import Path
from uuid import UUID

import docker
from helpers import usage_records
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from services import wait_for

from prefect_managed.configuration import WORKSPACE_LABEL

UNSETTLED = ("RUNNING", "PENDING", "CANCELLING", "SCHEDULED")


def workspace_containers(docker_client, workspace: str) -> list:
    return docker_client.containers.list(
        all=True, filters={"label": f"{WORKSPACE_LABEL}={workspace}"}, ignore_removed=True
    )


def active_slots(workspace: str) -> int:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(f"prefect-managed-{workspace}")
    return limit.active_slots


def read_runs(flow_run_ids: list[UUID]) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return [client.read_flow_run(run_id) for run_id in flow_run_ids]


def wait_until_settled(
    docker_client, workspace: str, flow_run_ids: list[UUID], timeout: float = 300
) -> list[FlowRun]:
    """Wait until every run is final, the workspace has no container and no slot is held.

    Raises AssertionError naming what is still unsettled after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(flow_run_ids)
        unsettled = [
            f"{run.id} {run.state.name if run.state else None}"
            for run in runs
            if run.state is None or not run.state.is_final()
        ]
        containers = [c.name for c in workspace_containers(docker_client, workspace)]
        slots = active_slots(workspace)
        if not unsettled and not containers and slots == 0:
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {timeout} s: runs not final {unsettled}, containers left "
                f"{containers}, active slots {slots}"
            )
        time.sleep(1)


def records_per_run(flow_run_ids: list[UUID]) -> dict[UUID, int]:
    return {run_id: len(usage_records(run_id)) for run_id in flow_run_ids}


def wait_for_records(flow_run_ids: list[UUID], timeout: float = 60) -> dict[UUID, int]:
    """Each run's count of usage records, once every run has at least one (or at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = records_per_run(flow_run_ids)
        if all(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(1)


DOCKERD_LOG = Path("/var/log/prefect-managed-dockerd.log")


def serving_dockerd() -> int:
    """The pid of the dockerd that serves the engine: its pid file, else the one live
    `dockerd` (a dockerd killed by an earlier restart may linger as a zombie, with no
    command line, where nothing reaps it)."""
    pidfile = Path("/var/run/docker.pid")
    candidates = [pidfile.read_text().strip()] if pidfile.exists() else []
    candidates += subprocess.run(
        ["pidof", "dockerd"], capture_output=True, text=True
    ).stdout.split()
    for candidate in candidates:
        proc = Path(f"/proc/{candidate}")
        try:
            alive = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and proc.joinpath("cmdline").read_bytes().strip(b"\0"):
                return int(candidate)
        except (OSError, IndexError):
            continue
    raise RuntimeError(f"no live dockerd among {candidates}")


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie, which nothing may reap here, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


#: How long dockerd may take to stop its containers and exit (it stops each one first).
DOCKERD_STOP_SECONDS = 240


def restart_docker_daemon() -> None:
    """Stop the running dockerd (SIGTERM, by its pid) and start it again with the same
    command line, the way scripts/setup.sh started it. Whatever happens, an engine runs
    afterwards: a dockerd that does not exit within DOCKERD_STOP_SECONDS is killed, and
    it is started again even if stopping it failed half-way."""
    pid = serving_dockerd()
    command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    try:
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not _running(pid), DOCKERD_STOP_SECONDS, "dockerd exiting", 0.5)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not _running(pid), 30, "dockerd killed", 0.5)
            # Its pid file names a pid that may linger as a zombie: the new one must not
            # take it for a running daemon.
            Path("/var/run/docker.pid").unlink(missing_ok=True)
    finally:
        if not _running(pid):
            with DOCKERD_LOG.open("ab") as log:
                subprocess.Popen(
                    [part.decode() for part in command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def answers() -> bool:
        try:
            with closing(docker.from_env()) as client:
                return client.ping()
        except docker.errors.DockerException:
            return False

    wait_for(answers, 120, "dockerd answering again", 1)
