"""Pickup on events, against a real server: with Prefect's polling set far beyond the
test's reach, a run created ad hoc is still picked up (the pool's Scheduled event wakes
the worker), and so is a run that waited for the workspace's only slot (the worker's
released-slot event wakes it)."""

from __future__ import annotations

import time

import pytest
from conftest import OUTPUT, worker_policy
from helpers import create_pool, session_workspace, wait_for_final_state
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import start_worker, wait_for

# serial: its workers poll hourly, so a run the engine has no room for when its event
# comes (room counts every managed container on the engine) would wait an hour.
pytestmark = [pytest.mark.docker, pytest.mark.serial]

#: Prefect's poll interval for these workers: no run is found by polling during the test.
QUERY_SECONDS = 3600


def test_runs_are_picked_up_on_events_not_by_the_poll(
    deploy, runtime_image, package_index, tmp_path
):
    pool = create_pool("pickup-pool")
    policy = worker_policy(
        tmp_path / "pickup.toml",
        runtime_image,
        package_index.url,
        session_workspace("pickup"),
        concurrency_limit=1,
    )
    hello = deploy("hello", "hello-pickup", pool=pool)
    running = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": str(QUERY_SECONDS),
        },
        name="pickup-worker",
    )
    try:
        start = len(running.service.log())
        wait_for(
            lambda: "Following the pool's events" in running.service.log()[start:],
            120,
            "the worker following its pool's events",
        )
        # The loop's first poll and the subscription's own are over (each takes well
        # under a second here): from here on only a wake finds a run.
        time.sleep(5)
        ad_hoc = run_deployment(hello, timeout=0).id
        # The workspace has one slot: the second run waits for the first's, and only the
        # event of its release can wake the worker for it.
        second = run_deployment(hello, timeout=0).id
        runs = [wait_for_final_state(run_id, timeout=300) for run_id in (ad_hoc, second)]
    finally:
        running.service.stop()
    for run in runs:
        assert run.state.is_completed(), (run.state.name, run.state.message)
    with get_client(sync_client=True) as client:
        names = [[s.name for s in client.read_flow_run_states(run.id)] for run in runs]
    assert any("AwaitingConcurrencySlot" in history for history in names), names
