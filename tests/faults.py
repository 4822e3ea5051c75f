"""What a user checks after a fault: every run final, no container left, no slot held,
one usage record per run that had a container. Shared by tests/test_faults.py and the
soak (soak/__main__.py)."""

from __future__ import annotations

import time
from uuid import UUID

from helpers import usage_records
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

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
