"""Hostile flows against the managed layer's books, run for real: a flow holds a Prefect
API credential (Prefect OSS has no permissions), so it tries to forge, pre-create, erase,
inflate and corrupt usage records, to switch off or raise the workspace's concurrency
limit, to read the worker's secrets from its environment, to spoof the labels a
replacement worker adopts containers by, and to fill the host's disk with output. Each
ends with the books intact: one true record per run, the cap held, the worker running.
Bad env keys (lowercase worker-owned names, `=`, other package indexes) are refused
before a container exists: tests/test_bad_input.py runs those.

These are the books' own defences, behind the run gateway: the policy here opts out of
the gateway (`api_gateway_port = 0`, so `network_mode = "host"`), as an operator may, so
that each flow holds the worker's credential and its attacks reach the API. With the
policy's defaults the gateway refuses them first (tests/test_gateway_attacks.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import OUTPUT
from faults import wait_for_records, wait_until_settled
from helpers import (
    create_pool,
    run_containers,
    session_workspace,
    usage_records,
    usage_report,
    wait_for_log,
    wait_for_settled_run,
)
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import start_worker, wait_for, write_policy

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows" / "boundary_flows.py"
WORKSPACE = session_workspace("boundary")
#: What a worker started next to the Prefect server holds in its environment.
SERVER_SECRETS = {
    "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
        "postgresql+asyncpg://prefect:hunter2@127.0.0.1:1/prefect"
    ),
    "PREFECT_SERVER_API_AUTH_STRING": "admin:hunter2-server",
}


@pytest.fixture(scope="module")
def boundary(git_server, runtime_image, package_index, prefect_server, tmp_path_factory):
    """A workspace of its own with one concurrent run, its pool, and a worker whose
    environment holds the server's secrets."""
    repo = git_server.publish("boundary", {"boundary_flows.py": FLOWS.read_text()})
    pool = create_pool("boundary-pool")
    policy = write_policy(
        tmp_path_factory.mktemp("boundary") / "policy.toml",
        workspace={"name": WORKSPACE, "tier": "test"},
        tiers={"test": {"pool_limit": 100, "concurrency_limit": 1}},
        runtime={
            "default_image": runtime_image,
            "package_index_url": package_index.url,
            "log_max_size": "1m",
            "log_max_files": 2,
            # The old behaviour, on purpose: runs hold the worker's credential.
            "api_gateway_port": 0,
            "network_mode": "host",
        },
    )
    env = {
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        **SERVER_SECRETS,
    }
    state = {"worker": start_worker(pool, OUTPUT, env, name="boundary-worker")}

    def deploy(flow_name: str, name: str, job_variables: dict | None = None):
        return flow.from_source(
            source=repo, entrypoint=f"boundary_flows.py:{flow_name}", _sync=True
        ).deploy(
            name=name,
            work_pool_name=pool,
            job_variables=job_variables or {},
            print_next_steps=False,
            _sync=True,
        )

    yield {"deploy": deploy, "policy": policy, "env": env, "pool": pool, "state": state}
    state["worker"].service.stop()


def run(deployment, **parameters):
    return run_deployment(deployment, parameters=parameters, timeout=0).id


def skipped_lines(boundary) -> int:
    log = boundary["state"]["worker"].service.log()
    return sum("Skipped artifact" in line for line in log.splitlines())


def assert_worker_alive(boundary) -> None:
    process = boundary["state"]["worker"].service.process
    assert process.poll() is None, boundary["state"]["worker"].service.log()[-3000:]


def test_the_workers_server_secrets_never_reach_the_container(boundary, docker_client):
    flow_run_id = run(boundary["deploy"]("read_env", "read-env"))
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), done.state
    names = next(log for log in wait_for_log(flow_run_id, "env names:") if "env names:" in log)
    for secret in SERVER_SECRETS:
        assert secret not in names
    assert "PREFECT_API_URL" in names and "PREFECT__FLOW_RUN_ID" in names
    assert "PREFECT_INTEGRATIONS_MANAGED_" not in names
    assert any("worker's password: []" in log for log in wait_for_log(flow_run_id, "password"))


@pytest.mark.parametrize("attack", ["precreate", "inflate", "corrupt"])
def test_forged_usage_is_skipped_and_the_run_is_recorded_once(boundary, docker_client, attack):
    deployment = boundary["deploy"]("forge_usage", f"forge-{attack}")
    skipped_before = skipped_lines(boundary)
    flow_run_id = run(deployment, attack=attack, workspace=WORKSPACE)
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), done.state
    # The worker recorded the run although an artifact sat under its key (precreate).
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    # A later run is admitted and recorded: the worker still serves.
    after = run(boundary["deploy"]("sleep_then_exit", "after-forge"), seconds=0)
    assert wait_for_settled_run(docker_client, after, 300).state.is_completed()
    assert wait_for_records([after]) == {after: 1}
    assert_worker_alive(boundary)

    report = usage_report(boundary["policy"])
    true_minutes = sum(record["billable_minutes"] for record in report["records"])
    assert report["billable_minutes"] == true_minutes
    assert str(flow_run_id) in {record["flow_run_id"] for record in report["records"]}
    assert all(record["flow_run_name"] != "forged" for record in report["records"])
    # Reported, not silently dropped: in the operator's report and the worker's log.
    assert report["skipped_artifacts"], report
    forged = {"precreate": 1, "inflate": 6, "corrupt": 2}[attack]
    assert skipped_lines(boundary) - skipped_before == forged


def test_a_record_that_erases_an_earlier_run_is_skipped(boundary, docker_client):
    victim = run(boundary["deploy"]("sleep_then_exit", "victim"), seconds=61)
    assert wait_for_settled_run(docker_client, victim, 300).state.is_completed()
    [record] = usage_records(victim)
    assert record["billable_minutes"] == 2
    before = usage_report(boundary["policy"])["billable_minutes"]

    eraser = run(
        boundary["deploy"]("forge_usage", "forge-erase"),
        attack="erase",
        workspace=WORKSPACE,
        victim=str(victim),
    )
    assert wait_for_settled_run(docker_client, eraser, 300).state.is_completed()
    wait_for_records([eraser])
    report = usage_report(boundary["policy"])
    victims = [r for r in report["records"] if r["flow_run_id"] == str(victim)]
    assert [r["billable_minutes"] for r in victims] == [2]
    assert report["billable_minutes"] >= before  # the eraser's own minutes, never less


@pytest.mark.parametrize("attack", ["deactivate", "raise", "decay"])
def test_a_flow_that_loosens_the_workspace_limit_does_not_lift_the_cap(
    boundary, docker_client, attack
):
    name = f"prefect-managed-{WORKSPACE}"
    loosen = run(boundary["deploy"]("loosen_limit", "loosen"), attack=attack, workspace=WORKSPACE)
    assert wait_for_settled_run(docker_client, loosen, 300).state.is_completed()
    assert wait_for_log(loosen, "limit now")  # the change went through the API

    sleeper = boundary["deploy"]("sleep_then_exit", "cap-sleeper")
    burst = [run(sleeper, seconds=6) for _ in range(3)]
    most = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            running = sum(
                1
                for flow_run_id in burst
                for container in run_containers(docker_client, flow_run_id)
                if container.status == "running"
            )
            most = max(most, running)
            time.sleep(0.3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wait_until_settled(docker_client, WORKSPACE, burst, 300)
    finally:
        stop.set()
        sampler.join()
    assert most == 1
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.active, limit.limit, limit.slot_decay_per_second) == (True, 1, 0.0)
    assert "was changed from outside the workers" in boundary["state"]["worker"].service.log()
    assert wait_for_records(burst) == {flow_run_id: 1 for flow_run_id in burst}


def test_spoofed_prefect_labels_are_pinned_and_a_replacement_worker_adopts_the_run(
    boundary, docker_client
):
    deployment = boundary["deploy"](
        "sleep_then_exit",
        "spoofed-labels",
        job_variables={
            "labels": {
                "io.prefect.work-pool-name": "someone-elses-pool",
                "io.prefect.worker-name": "ghost",
                "io.prefect-managed.workspace": "other",
            }
        },
    )
    flow_run_id = run(deployment, seconds=25)
    wait_for(
        lambda: any(c.status == "running" for c in run_containers(docker_client, flow_run_id)),
        180,
        "the container running",
    )
    labels = run_containers(docker_client, flow_run_id)[0].labels
    assert labels["io.prefect.work-pool-name"] == boundary["pool"]
    assert labels["io.prefect.worker-name"] == "boundary-worker"
    assert labels["io.prefect-managed.workspace"] == WORKSPACE

    first = boundary["state"]["worker"]
    os.kill(first.service.process.pid, signal.SIGKILL)
    first.service.process.wait()
    boundary["state"]["worker"] = start_worker(
        boundary["pool"], OUTPUT, boundary["env"], name="boundary-worker"
    )
    [done] = wait_until_settled(docker_client, WORKSPACE, [flow_run_id], 300)
    assert done.state.is_completed(), done.state
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}


def test_a_flood_of_output_is_capped_on_the_hosts_disk(boundary, docker_client):
    worker_log = boundary["state"]["worker"].service.log_path
    worker_log_before = worker_log.stat().st_size
    flow_run_id = run(boundary["deploy"]("flood_output", "flood"), megabytes=30, then_sleep=8)
    wait_for_log(flow_run_id, "flooded 30 MB", timeout=240)
    [container] = run_containers(docker_client, flow_run_id)
    log_path = Path(container.attrs["LogPath"])
    kept = sum(path.stat().st_size for path in log_path.parent.glob(log_path.name + "*"))
    # json-file wraps each line, so 2 files of 1 MiB hold well under 30 MB of output.
    assert kept <= 2 * 2**20 + 64 * 1024, kept
    assert container.attrs["HostConfig"]["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-file": "2", "max-size": str(2**20)},
    }
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), done.state
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    # Nor does it reach the operator's logs: the worker does not copy the container's
    # output to its own (the run's logs get the capped tail).
    grown = worker_log.stat().st_size - worker_log_before
    assert grown < 2**20, f"the worker's log grew by {grown} bytes during the flood"
    assert_worker_alive(boundary)
