"""Faults injected for real while runs are in flight, and what a user checks after each:
every run in the right final state, no container left, no concurrency slot held, and
exactly one usage record for each run that had a container.

Each test has a workspace, pool and worker of its own, so its slots and containers are
its own. The Docker daemon restart kills every container of the engine, other test
sessions' included: it is marked `docker_restart` so it can be deselected
(`-m "not docker_restart"`) on a shared machine; CI runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import docker
import pytest
from conftest import OUTPUT, restart_prefect_server, worker_policy
from faults import (
    read_runs,
    restart_docker_daemon,
    wait_for_records,
    wait_until_settled,
    workspace_containers,
)
from helpers import (
    create_pool,
    prefect_cli,
    run_containers,
    session_workspace,
    usage_records,
    usage_report,
    wait_for_log,
)
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Pending
from services import start_worker, wait_for

from prefect_managed.retries import INFRASTRUCTURE_RETRY

# serial: it restarts the Docker daemon and counts a workspace's containers on the engine.
pytestmark = [pytest.mark.docker, pytest.mark.serial]


def start_run(deployment_id, **parameters):
    return run_deployment(deployment_id, parameters=parameters, timeout=0).id


@pytest.fixture
def fault_setup(deploy, runtime_image, package_index, tmp_path):
    """A pool, a policy (workspace of its own, 3 concurrent runs unless `tier` says
    otherwise) and a sleeper deployment."""

    def _setup(
        name: str, runtime: dict | None = None, **tier
    ) -> tuple[str, dict[str, str], object]:
        pool = create_pool(f"{name}-pool")
        policy = worker_policy(
            tmp_path / f"{name}.toml",
            runtime_image,
            package_index.url,
            session_workspace(name),
            runtime,
            **{"concurrency_limit": 3, **tier},
        )
        env = {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        return pool, env, deploy("sleeper", f"sleeper-{name}", pool=pool)

    return _setup


def running_containers(docker_client, runs) -> bool:
    return all(
        run_containers(docker_client, run)
        and all(c.status == "running" for c in run_containers(docker_client, run))
        for run in runs
    )


def test_a_worker_killed_with_sigkill_and_restarted_loses_nothing(docker_client, fault_setup):
    pool, env, deployment = fault_setup("fault-kill")
    first = start_worker(pool, OUTPUT, env, name="fault-kill-worker")
    in_flight = [start_run(deployment, seconds=20) for _ in range(2)]
    wait_for(lambda: running_containers(docker_client, in_flight), 180, "both containers running")
    os.kill(first.service.process.pid, signal.SIGKILL)
    first.service.process.wait()
    queued = start_run(deployment, seconds=1)  # submitted while no worker runs

    restarted = start_worker(pool, OUTPUT, env, name="fault-kill-worker")
    try:
        runs = wait_until_settled(
            docker_client, session_workspace("fault-kill"), [*in_flight, queued], 300
        )
    finally:
        restarted.service.stop()
    assert [run.state.type.value for run in runs] == ["COMPLETED"] * 3
    assert wait_for_records([*in_flight, queued]) == {run: 1 for run in [*in_flight, queued]}


def test_a_container_removed_from_outside_crashes_its_run_and_is_recorded_once(
    docker_client, fault_setup
):
    pool, env, deployment = fault_setup("fault-rm")
    running = start_worker(pool, OUTPUT, env, name="fault-rm-worker")
    try:
        victim = start_run(deployment, seconds=120)
        bystander = start_run(deployment, seconds=15)
        wait_for(lambda: running_containers(docker_client, [victim]), 180, "the container running")
        time.sleep(3)
        subprocess.run(
            ["docker", "rm", "-f", run_containers(docker_client, victim)[0].id],
            check=True,
            capture_output=True,
        )
        runs = wait_until_settled(
            docker_client, session_workspace("fault-rm"), [victim, bystander], 240
        )
    finally:
        running.service.stop()
    removed, finished = runs
    assert removed.state.is_crashed(), removed.state
    assert "container was removed" in removed.state.message
    assert "docker rm" in removed.state.message
    assert finished.state.is_completed(), finished.state
    assert wait_for_records([victim, bystander]) == {victim: 1, bystander: 1}
    # infrastructure_retries is 0 (the default): it stays Crashed, never scheduled again.
    assert INFRASTRUCTURE_RETRY not in state_names(victim)
    assert read_runs([victim])[0].state.is_crashed()


def state_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def test_a_removed_container_is_retried_once_and_completes_but_a_flows_failure_never(
    docker_client, fault_setup, deploy
):
    """With infrastructure_retries = 1: the run whose container is removed from outside is
    scheduled again once (a log line says why and which attempt), its second attempt
    completes, and each attempt has its own usage record; a flow that raises stays Failed."""
    pool, env, _ = fault_setup("retry-rm", infrastructure_retries=1)
    workspace = session_workspace("retry-rm")
    slow = deploy("slow_first_attempt", "slow-first-retry-rm", pool=pool)
    failing = deploy("fails", "fails-retry-rm", pool=pool)
    running = start_worker(pool, OUTPUT, env, name="retry-rm-worker")
    try:
        victim = start_run(slow, seconds=300)
        failed = start_run(failing)
        wait_for(lambda: running_containers(docker_client, [victim]), 180, "the container running")
        wait_for_log(victim, "slow_first_attempt: run count 1", timeout=120)
        subprocess.run(
            ["docker", "rm", "-f", run_containers(docker_client, victim)[0].id],
            check=True,
            capture_output=True,
        )
        wait_for(
            lambda: INFRASTRUCTURE_RETRY in state_names(victim), 120, "the run scheduled again"
        )
        runs = wait_until_settled(docker_client, workspace, [victim, failed], 300)
    finally:
        running.service.stop()
    retried, raised = runs
    assert retried.state.is_completed(), (retried.state.name, retried.state.message)
    assert retried.run_count == 2
    assert state_names(victim).count(INFRASTRUCTURE_RETRY) == 1
    logs = wait_for_log(victim, "slow_first_attempt: run count 2", timeout=60)
    said = [line for line in logs if "infrastructure reason" in line]
    assert said and "its container was removed from outside the worker" in said[0], logs
    assert "attempt 2 of at most 2" in said[0]
    assert raised.state.is_failed(), raised.state
    assert INFRASTRUCTURE_RETRY not in state_names(failed)
    assert wait_for_records([victim, failed], timeout=120)[failed] == 1
    records = wait_for(
        lambda: len(usage_records(victim)) == 2 and usage_records(victim),
        60,
        "a usage record of each attempt",
    )
    assert sorted((r["attempt"], r["outcome"]) for r in records) == [
        (1, "crashed"),
        (2, "completed"),
    ]
    report = usage_report(Path(env["PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE"]))
    assert (report["runs"], report["attempts"]) == (2, 3)
    assert report["billable_minutes"] == sum(r["billable_minutes"] for r in report["records"])


def test_a_cancelled_run_stops_within_30_s_and_ends_cancelled(docker_client, fault_setup):
    pool, env, deployment = fault_setup("fault-cancel")
    running = start_worker(pool, OUTPUT, env, name="fault-cancel-worker")
    try:
        flow_run_id = start_run(deployment, seconds=300)
        wait_for(
            lambda: running_containers(docker_client, [flow_run_id]), 180, "the container running"
        )
        wait_for_log(flow_run_id, "Beginning flow run", timeout=120)
        prefect_cli("flow-run", "cancel", str(flow_run_id))
        cancelled_at = time.monotonic()
        wait_for(
            lambda: (
                not any(c.status == "running" for c in run_containers(docker_client, flow_run_id))
            ),
            30,
            "the container stopping",
        )
        assert time.monotonic() - cancelled_at <= 30
        (run,) = wait_until_settled(
            docker_client, session_workspace("fault-cancel"), [flow_run_id], 120
        )
    finally:
        running.service.stop()
    assert run.state.is_cancelled(), run.state
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    assert [record["outcome"] for record in usage_records(flow_run_id)] == ["cancelled"]


def test_a_cancel_the_container_does_not_carry_out_is_carried_out_by_the_worker(
    docker_client, fault_setup, deploy
):
    """A flow that ignores SIGTERM, and one that stops Prefect's runner in its container:
    cancelled, each container is stopped by the worker once the policy's grace is over,
    and each run ends Cancelled with one usage record whose outcome is `cancelled`."""
    grace = 10
    pool, env, _ = fault_setup("cancel-stuck", runtime={"cancel_grace_seconds": grace})
    flows = ("ignores_sigterm", "stops_its_runner")
    deployments = [deploy(name, f"{name}-cancel-stuck", pool=pool) for name in flows]
    running = start_worker(pool, OUTPUT, env, name="cancel-stuck-worker")
    try:
        runs = [start_run(deployment, seconds=600) for deployment in deployments]
        for run, name in zip(runs, flows, strict=True):
            wait_for_log(run, f"{name}: ", timeout=180)
        time.sleep(3)  # the runner stopped
        for run in runs:
            prefect_cli("flow-run", "cancel", str(run))
        cancelled_at = time.monotonic()
        # Still running after Prefect's own stop had its chance: the worker's to do.
        time.sleep(grace / 2)
        assert running_containers(docker_client, runs), "a container stopped without the worker"
        wait_for(
            lambda: (
                not any(
                    c.status == "running"
                    for run in runs
                    for c in run_containers(docker_client, run)
                )
            ),
            grace + 60,
            "the worker stopping both containers",
        )
        stopped_after = time.monotonic() - cancelled_at
        settled = wait_until_settled(docker_client, session_workspace("cancel-stuck"), runs, 120)
    finally:
        running.service.stop()
    assert stopped_after >= grace
    for run in settled:
        assert run.state.is_cancelled(), (run.state.name, run.state.message)
        logs = wait_for_log(run.id, "the worker stops the container", timeout=60)
        assert any("runtime.cancel_grace_seconds" in line for line in logs), logs
    assert wait_for_records(runs) == {run: 1 for run in runs}
    for run in runs:
        assert [record["outcome"] for record in usage_records(run)] == ["cancelled"]


def test_the_prefect_server_down_for_30_s_loses_nothing(docker_client, fault_setup):
    """Two runs go on while the server is down; a third run's container, removed from
    outside meanwhile, is recorded once and its run ends Crashed saying why."""
    pool, env, deployment = fault_setup("fault-server")
    running = start_worker(pool, OUTPUT, env, name="fault-server-worker")
    try:
        runs = [start_run(deployment, seconds=40) for _ in range(2)]
        victim = start_run(deployment, seconds=300)
        wait_for(
            lambda: running_containers(docker_client, [*runs, victim]),
            180,
            "three containers running",
        )
        for run in [*runs, victim]:
            wait_for_log(run, "Beginning flow run", timeout=120)
        down = threading.Thread(target=restart_prefect_server, kwargs={"down_seconds": 30})
        down.start()
        time.sleep(5)
        subprocess.run(
            ["docker", "rm", "-f", run_containers(docker_client, victim)[0].id],
            check=True,
            capture_output=True,
        )
        down.join()
        (removed,) = wait_until_settled(
            docker_client, session_workspace("fault-server"), [victim], 300
        )
        settled = wait_until_settled(docker_client, session_workspace("fault-server"), runs, 300)
        assert running.service.process.poll() is None, "the worker exited"
        after = start_run(deployment, seconds=1)  # the worker still serves the pool
        settled += wait_until_settled(
            docker_client, session_workspace("fault-server"), [after], 180
        )
    finally:
        running.service.stop()
    assert [run.state.type.value for run in settled] == ["COMPLETED"] * 3, [
        (run.state.name, run.state.message) for run in settled
    ]
    assert wait_for_records([*runs, after]) == {run: 1 for run in [*runs, after]}
    assert removed.state.is_crashed(), (removed.state.name, removed.state.message)
    assert "container was removed" in removed.state.message
    assert wait_for_records([victim], timeout=120) == {victim: 1}
    assert [record["outcome"] for record in usage_records(victim)] == ["crashed"]


def test_a_container_its_stopped_worker_left_is_finished_by_a_worker_of_another_pool(
    docker_client, fault_setup
):
    """A worker killed while its run goes on leaves the run's container once the run
    completes; its pool has no worker any more. A worker of another pool of the same
    workspace records and removes it once Prefect shows the first worker offline."""
    pool, env, deployment = fault_setup("left-behind")
    other_pool = create_pool("left-behind-other-pool")
    first = start_worker(
        pool, OUTPUT, {**env, "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}, name="left-first"
    )
    flow_run_id = start_run(deployment, seconds=10)
    wait_for(lambda: running_containers(docker_client, [flow_run_id]), 180, "the container running")
    os.kill(first.service.process.pid, signal.SIGKILL)
    first.service.process.wait()
    wait_for(
        lambda: (
            read_runs([flow_run_id])[0].state.is_completed()
            and all(c.status == "exited" for c in run_containers(docker_client, flow_run_id))
        ),
        120,
        "the run completed and its container exited",
    )

    def first_offline() -> bool:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool(pool)
        return all(w.status.value != "ONLINE" for w in workers if w.name == "left-first")

    wait_for(first_offline, 120, "Prefect showing the killed worker offline")
    assert run_containers(docker_client, flow_run_id), "nobody should have removed it yet"
    second = start_worker(other_pool, OUTPUT, env, name="left-second")
    try:
        (run,) = wait_until_settled(
            docker_client, session_workspace("left-behind"), [flow_run_id], 120
        )
    finally:
        second.service.stop()
    assert run.state.is_completed(), run.state
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    assert [record["outcome"] for record in usage_records(flow_run_id)] == ["completed"]


def test_the_prefect_server_down_at_the_maximum_run_time_leaves_nothing_behind(
    docker_client, fault_setup
):
    """The run-time stop meets an unreachable API: the container is stopped anyway, and
    once the server is back the run ends Crashed saying why, with one usage record, no
    container and no slot left."""
    pool, env, deployment = fault_setup("fault-runtime", concurrency_limit=2, max_run_seconds=20)
    workspace = session_workspace("fault-runtime")
    running = start_worker(pool, OUTPUT, env, name="fault-runtime-worker")
    try:
        flow_run_id = start_run(deployment, seconds=120)
        wait_for(lambda: running_containers(docker_client, [flow_run_id]), 180, "running")
        wait_for_log(flow_run_id, "Beginning flow run", timeout=120)
        started = run_containers(docker_client, flow_run_id)[0].attrs["State"]["StartedAt"]
        # Down from before the 20 s limit until well after it.
        from prefect_managed.metering import parse_docker_time

        from_start = (datetime.now(timezone.utc) - parse_docker_time(started)).total_seconds()
        time.sleep(max(0.0, 14 - from_start))
        restart_prefect_server(down_seconds=25)
        (run,) = wait_until_settled(docker_client, workspace, [flow_run_id], 300)
        assert running.service.process.poll() is None, "the worker exited"
    finally:
        running.service.stop()
    assert run.state.is_crashed(), run.state
    assert "maximum run time of 20 s" in run.state.message, run.state.message
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}


def test_after_a_sigkill_the_cap_holds_while_the_restarted_worker_takes_over(
    docker_client, fault_setup
):
    """Two runs in flight at a cap of 2, the worker killed, three more queued: the
    restarted worker takes the two containers over with a slot each, so the running
    count never goes over 2 (sampled all along), and every run completes once."""
    pool, env, deployment = fault_setup("fault-cap", concurrency_limit=2)
    workspace = session_workspace("fault-cap")
    most, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            running = [
                c for c in workspace_containers(docker_client, workspace) if c.status == "running"
            ]
            most = max(most, len(running))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = start_worker(pool, OUTPUT, env, name="fault-cap-worker")
    restarted = None
    try:
        in_flight = [start_run(deployment, seconds=75) for _ in range(2)]
        wait_for(lambda: running_containers(docker_client, in_flight), 180, "both running")
        os.kill(first.service.process.pid, signal.SIGKILL)
        first.service.process.wait()
        queued = [start_run(deployment, seconds=3) for _ in range(3)]
        restarted = start_worker(pool, OUTPUT, env, name="fault-cap-worker")
        runs = wait_until_settled(docker_client, workspace, [*in_flight, *queued], 420)
    finally:
        stop.set()
        sampler.join()
        if restarted is not None:
            restarted.service.stop()
    assert most == 2
    assert [run.state.type.value for run in runs] == ["COMPLETED"] * 5
    assert wait_for_records([*in_flight, *queued]) == {run: 1 for run in [*in_flight, *queued]}


@pytest.mark.timeout(1200)  # two reconciliations and a lease expiry, after the setup
def test_the_prefect_server_down_while_a_taken_over_container_ends_leaves_nothing_behind(
    docker_client, fault_setup
):
    """A worker killed, its successor takes the run's container over, then the Prefect
    server goes down until after the container has exited. Finishing it meets the
    unreachable API: Prefect's client retries, and when those run out the failure is
    logged and the next reconciliation finishes it (which of the two happens depends on
    timing). Either way the worker keeps serving and the books end intact: the run final,
    one usage record, no container and no slot left (the lease the server may have let
    run out meanwhile is not given back twice)."""
    pool, env, deployment = fault_setup("fault-adopt")
    workspace = session_workspace("fault-adopt")
    first = start_worker(pool, OUTPUT, env, name="fault-adopt-worker")
    restarted = None
    try:
        flow_run_id = start_run(deployment, seconds=30)
        wait_for(lambda: running_containers(docker_client, [flow_run_id]), 180, "running")
        wait_for_log(flow_run_id, "Beginning flow run", timeout=120)
        os.kill(first.service.process.pid, signal.SIGKILL)
        first.service.process.wait()
        restarted = start_worker(pool, OUTPUT, env, name="fault-adopt-worker")
        wait_for(
            lambda: f"of flow run {flow_run_id}, left by worker" in restarted.service.log(),
            180,
            "the container taken over",
        )
        restart_prefect_server(down_seconds=45)  # the flow's 30 s end within it
        (run,) = wait_until_settled(docker_client, workspace, [flow_run_id], 300)
        assert restarted.service.process.poll() is None, "the worker exited"
        log = restarted.service.log()
    finally:
        if restarted is not None:
            restarted.service.stop()
    # The flow itself completes within the outage: its engine reports Completed once the
    # server answers again, or, its client's retries spent, the container exits without
    # a final state and the worker says so. Nothing else is right.
    message = run.state.message or ""
    assert run.state.is_completed() or (
        run.state.is_crashed() and "without the flow run reporting a final state" in message
    ), (run.state.name, message, log[-3000:])
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    (record,) = usage_records(flow_run_id)
    assert record["outcome"] == run.state.type.value.lower()


# -- the Docker daemon -------------------------------------------------------------------


@pytest.mark.docker_restart
def test_a_docker_daemon_restart_crashes_the_runs_it_killed_and_loses_nothing(fault_setup):
    pool, env, deployment = fault_setup("fault-dockerd")
    running = start_worker(pool, OUTPUT, env, name="fault-dockerd-worker")
    try:
        with closing(docker.from_env()) as client:
            runs = [start_run(deployment, seconds=60) for _ in range(2)]
            wait_for(lambda: running_containers(client, runs), 180, "both containers running")
        restart_docker_daemon()
        with closing(docker.from_env()) as client:
            settled = wait_until_settled(client, session_workspace("fault-dockerd"), runs, 300)
            assert running.service.process.poll() is None, "the worker exited"
            after = start_run(deployment, seconds=1)  # the worker still serves the pool
            (later,) = wait_until_settled(client, session_workspace("fault-dockerd"), [after], 180)
            assert workspace_containers(client, session_workspace("fault-dockerd")) == []
    finally:
        running.service.stop()
    for run in settled:
        assert run.state.is_crashed(), run.state
        assert "Docker engine" in run.state.message, run.state.message
    assert later.state.is_completed(), later.state
    assert wait_for_records([*runs, after]) == {run: 1 for run in [*runs, after]}


def test_a_worker_stopped_with_sigterm_while_runs_go_on_exits_and_loses_nothing(
    docker_client, fault_setup
):
    """`systemctl stop` or `docker stop` of a busy worker, once its first run's container
    runs and while it is still submitting the others: the worker exits by itself (not
    killed at the end of the stop timeout), the running container goes on, and the
    worker started next finishes every run and records each once."""
    pool, env, deployment = fault_setup("fault-term")
    first = start_worker(pool, OUTPUT, env, name="fault-term-worker")
    in_flight = [start_run(deployment, seconds=20) for _ in range(3)]
    running = wait_for(
        lambda: next((run for run in in_flight if running_containers(docker_client, [run])), None),
        180,
        "a container running",
    )
    first.service.process.terminate()
    try:
        returncode = first.service.process.wait(15)
    except subprocess.TimeoutExpired:
        first.service.stop(timeout=0)
        returncode = None
    assert returncode is not None, "the worker was still running 15 s after SIGTERM"
    assert returncode >= 0, returncode
    assert running_containers(docker_client, [running]), "its run's container should go on"

    restarted = start_worker(pool, OUTPUT, env, name="fault-term-worker")
    try:
        runs = wait_until_settled(docker_client, session_workspace("fault-term"), in_flight, 300)
    finally:
        restarted.service.stop()
    assert [run.state.type.value for run in runs] == ["COMPLETED"] * 3
    assert wait_for_records(in_flight) == {run: 1 for run in in_flight}


def test_a_run_a_killed_worker_left_pending_without_a_container_is_started_again(
    docker_client, fault_setup
):
    """A worker killed after setting a run Pending and before making its container
    leaves the run Pending with its name on it (Prefect's `prefect.worker.name` label),
    and nothing would ever start it. The next worker of that name schedules it again at
    start, says so in the run's logs, and the run completes, recorded once."""
    pool, env, deployment = fault_setup("fault-pending")
    flow_run_id = start_run(deployment, seconds=1)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Pending())
        client.update_flow_run_labels(flow_run_id, {"prefect.worker.name": "fault-pending-worker"})
    log = OUTPUT / "fault-pending-worker.log"  # appended to by each session
    starts = log.read_text().count("started!") if log.exists() else 0
    worker = start_worker(pool, OUTPUT, env, name="fault-pending-worker")
    try:
        wait_for(lambda: worker.service.log().count("started!") > starts, 120, "the worker started")
        (run,) = wait_until_settled(
            docker_client, session_workspace("fault-pending"), [flow_run_id], 180
        )
    finally:
        worker.service.stop()
    assert run.state.is_completed(), run.state
    wait_for_log(flow_run_id, "stopped before this flow run's container started")
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
