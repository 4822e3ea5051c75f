"""Pickup on events, against a real server: with Prefect's polling set far beyond the
test's reach, a run created ad hoc is still picked up (the pool's Scheduled event wakes
the worker)."""

from __future__ import annotations

import time

import pytest
from conftest import OUTPUT, worker_policy
from helpers import create_pool, session_workspace, wait_for_final_state
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
        run = wait_for_final_state(ad_hoc, timeout=300)
    finally:
        running.service.stop()
    assert run.state.is_completed(), (run.state.name, run.state.message)
