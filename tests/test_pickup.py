"""Pickup on events, against a real server: with Prefect's polling set far beyond the
test's reach, a run created ad hoc is still picked up (the pool's Scheduled event wakes
the worker), and so is a run that waited for the workspace's only slot, or for the
host's room for one run (the released-slot event of the run before it wakes the
worker)."""

from __future__ import annotations

import time

import pytest
from conftest import OUTPUT, worker_policy
from helpers import create_pool, session_workspace, wait_for_final_state
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter
from prefect.deployments import run_deployment
from services import start_worker, wait_for

from prefect_managed.configuration import MANAGED_LABEL

# serial: its workers poll hourly, so a run the engine has no room for when its event
# comes (room counts every managed container on the engine) would wait an hour.
pytestmark = [pytest.mark.docker, pytest.mark.serial]

#: Prefect's poll interval for these workers: no run is found by polling during the test.
QUERY_SECONDS = 3600


@pytest.mark.parametrize("waits_for", ["slot", "room"])
def test_runs_are_picked_up_on_events_not_by_the_poll(
    waits_for, deploy, runtime_image, package_index, docker_client, tmp_path
):
    if waits_for == "slot":
        # The workspace has one slot: the second run waits for the first's.
        limits: dict = {"concurrency_limit": 1}
    else:
        # Two slots, but the engine has room for one run of 1 GiB (the host's reserve
        # is set so): the second run waits for the first's container to be gone.
        tier_memory = 1024**3
        reserve = docker_client.info()["MemTotal"] - tier_memory - tier_memory // 2
        # Room counts every managed container on the engine: none may run now.
        assert not docker_client.containers.list(filters={"label": f"{MANAGED_LABEL}=true"})
        limits = {"concurrency_limit": 2, "memory": "1g", "host": {"reserve_memory": reserve}}
    pool = create_pool(f"pickup-{waits_for}")
    policy = worker_policy(
        tmp_path / "pickup.toml",
        runtime_image,
        package_index.url,
        session_workspace(f"pickup-{waits_for}"),
        **limits,
    )
    sleeper = deploy("sleeper", f"sleeper-pickup-{waits_for}", pool=pool)
    hello = deploy("hello", f"hello-pickup-{waits_for}", pool=pool)
    running = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": str(QUERY_SECONDS),
        },
        name=f"pickup-{waits_for}-worker",
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
        ad_hoc = run_deployment(sleeper, parameters={"seconds": 15}, timeout=0).id
        with get_client(sync_client=True) as client:
            wait_for(lambda: client.read_flow_run(ad_hoc).state.is_running(), 120, "the first run")
        # It holds the slot (and the room) for 15 s: the second run waits for it, and
        # only the event of its release can wake the worker for it.
        second = run_deployment(hello, timeout=0).id
        runs = [wait_for_final_state(run_id, timeout=240) for run_id in (ad_hoc, second)]
    finally:
        running.service.stop()
    for run in runs:
        assert run.state.is_completed(), (run.state.name, run.state.message)
    with get_client(sync_client=True) as client:
        names = [[s.name for s in client.read_flow_run_states(run.id)] for run in runs]
        logs = [
            log.message
            for log in client.read_logs(LogFilter(flow_run_id={"any_": [run.id for run in runs]}))
        ]
    awaited_slot = any("AwaitingConcurrencySlot" in history for history in names)
    awaited_room = any("Waiting for room" in message for message in logs)
    assert (awaited_slot, awaited_room) == (waits_for == "slot", waits_for == "room"), (
        names,
        logs,
    )
