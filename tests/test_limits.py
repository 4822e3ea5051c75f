"""Each tier limit, enforced for real: a Prefect server, `prefect worker start` processes
and a Docker engine. Workers with other policies serve pools of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import OUTPUT, worker_policy
from helpers import (
    container_creations,
    create_pool,
    run_containers,
    wait_for_final_state,
    wait_for_log,
    wait_for_settled_run,
    worker,
)
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import BIN, start_worker, wait_for, write_policy

from prefect_managed import ManagedWorker
from prefect_managed.configuration import WORKSPACE_LABEL
from prefect_managed.gateway.port import run_gateway_port
from prefect_managed.gateway.tunnel import ISOLATED_MOUNT, tunnel_directory
from prefect_managed.policy import load_policy

pytestmark = pytest.mark.docker

TWO_GIB = 2 * 1024**3


def start_run(deployment_id, **parameters):
    return run_deployment(deployment_id, parameters=parameters, timeout=0).id


@pytest.fixture
def policy_for(runtime_image, package_index, tmp_path):
    def _policy(workspace: str, **tier) -> Path:
        return worker_policy(
            tmp_path / f"{workspace}.toml", runtime_image, package_index.url, workspace, **tier
        )

    return _policy


def state_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def test_workspace_cap_holds_across_pools_and_worker_processes(deploy, docker_client, policy_for):
    policy = policy_for("capped", concurrency_limit=1)
    pools = [create_pool("capped-a"), create_pool("capped-b")]
    deployments = [deploy("sleeper", f"sleeper-{pool}", pool=pool) for pool in pools]
    with worker(pools[0], policy, "capped-worker-a"), worker(pools[1], policy, "capped-worker-b"):
        runs = [start_run(d, seconds=3) for d in deployments for _ in range(2)]
        most_running = 0
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                running = docker_client.containers.list(
                    filters={"label": f"{WORKSPACE_LABEL}=capped", "status": "running"}
                )
                most_running = max(most_running, len(running))
                states = [client.read_flow_run(run).state for run in runs]
                if all(state.is_final() for state in states):
                    break
                time.sleep(0.2)
    assert [state.type.value for state in states] == ["COMPLETED"] * 4
    assert most_running == 1
    assert any("AwaitingConcurrencySlot" in state_names(run) for run in runs)


def test_a_killed_workers_slot_comes_back_when_its_lease_expires(deploy, docker_client, policy_for):
    policy = policy_for("lease", concurrency_limit=1)
    pool = create_pool("lease-pool")
    deployment = deploy("sleeper", "sleeper-lease", pool=pool)
    first = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        name="lease-worker-killed",
    )
    held = start_run(deployment, seconds=600)
    container = wait_for(
        lambda: next(iter(run_containers(docker_client, held)), None),
        120,
        "the first run's container",
    )
    os.kill(first.service.process.pid, signal.SIGKILL)
    first.service.process.wait()
    container.remove(force=True)  # the host is gone with its worker

    with worker(pool, policy, "lease-worker-restarted"):
        waiting = start_run(deployment, seconds=1)
        run = wait_for_final_state(waiting, timeout=240)
    assert run.state.is_completed(), run.state
    assert "AwaitingConcurrencySlot" in state_names(waiting)


def test_pools_beyond_the_tiers_count_are_not_served_and_their_runs_wait(deploy, policy_for):
    pool = create_pool("pool-over-limit")
    with get_client(sync_client=True) as client:
        managed = [p for p in client.read_work_pools() if p.type == ManagedWorker.type]
    deployment = deploy("hello", "hello-over-limit", pool=pool)
    tight = policy_for("pools", pool_limit=len(managed) - 1)
    with worker(pool, tight, "pool-limit-worker") as refused:
        flow_run_id = start_run(deployment)
        wait_for(
            lambda: "Work pool 'pool-over-limit' is not served" in refused.service.log(),
            60,
            "the worker saying the pool is not served",
        )
        time.sleep(5)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(flow_run_id).state.is_scheduled()
    log = refused.service.log()
    assert "test tier, which allows" in log and "Delete a managed pool" in log

    with worker(pool, policy_for("pools-more", pool_limit=100), "pool-limit-worker-2"):
        run = wait_for_final_state(flow_run_id)
    assert run.state.is_completed(), run.state


def test_running_out_of_a_requested_memory_limit_crashes_the_run_naming_it(deploy, docker_client):
    deployment = deploy("allocate", "allocate-less-memory", {"mem_limit": "300m"})
    flow_run_id = start_run(deployment, megabytes=1024)
    run = wait_for_settled_run(docker_client, flow_run_id)
    assert run.state.is_crashed(), run.state
    assert "ran out of memory" in run.state.message
    assert (
        "300 MiB its deployment asked for (mem_limit; the test tier allows 2 GiB)"
        in run.state.message
    )


def test_running_out_of_the_tiers_memory_crashes_the_run_naming_the_limit(
    deploy, tight_pool, small_memory_worker, docker_client
):
    deployment = deploy("allocate", "allocate-tight", pool=tight_pool)
    flow_run_id = start_run(deployment, megabytes=1024)
    run = wait_for_settled_run(docker_client, flow_run_id)
    assert run.state.is_crashed(), run.state
    assert "the test tier's memory limit of 512 MiB" in run.state.message


def test_a_run_past_the_maximum_run_time_is_stopped_and_crashed(
    deploy, tight_pool, short_run_worker, docker_client
):
    deployment = deploy("sleeper", "sleeper-tight", pool=tight_pool)
    started = time.monotonic()
    flow_run_id = start_run(deployment, seconds=300)
    run = wait_for_settled_run(docker_client, flow_run_id, timeout=120)
    assert run.state.is_crashed(), run.state
    assert "maximum run time of 15 s (15 s, counted from container start)" in run.state.message
    assert time.monotonic() - started < 90


def test_an_image_outside_the_allow_list_is_refused_before_a_container_starts(
    deploy, docker_client
):
    deployment = deploy("hello", "hello-foreign-image", {"image": "python:3.12"})
    with container_creations(docker_client, f"io.prefect.deployment-id={deployment}") as made:
        flow_run_id = start_run(deployment)
        run = wait_for_final_state(flow_run_id)
    assert run.state.is_crashed(), run.state
    assert "Image 'python:3.12' is not allowed in this workspace" in run.state.message
    assert made == []


HOSTILE = {
    "privileged": True,
    "volumes": ["/var/run/docker.sock:/var/run/docker.sock", "/:/host"],
    "network_mode": "bridge",
    "networks": [],
    "mem_limit": "16g",
    "memswap_limit": "-1",
    "auto_remove": True,
    "container_create_kwargs": {
        "privileged": True,
        "cap_add": ["ALL"],
        "user": "0",
        "security_opt": ["seccomp=unconfined"],
        "pids_limit": -1,
        "nano_cpus": 0,
    },
}


def test_an_edited_base_job_template_and_hidden_job_variables_cannot_escape(
    deploy, docker_client, main_policy
):
    template = ManagedWorker.get_default_base_job_template()
    for key, value in HOSTILE.items():
        template["job_configuration"][key] = "{{ " + key + " }}"
        template["variables"]["properties"][key] = {"default": value}
    pool = create_pool("escape-pool", template)
    deployment = deploy("inspect_self", "inspect-self-escape", HOSTILE, pool=pool)
    with worker(pool, main_policy, "escape-worker"):
        flow_run_id = start_run(deployment, sleep_seconds=10)
        container = wait_for(
            lambda: next(iter(run_containers(docker_client, flow_run_id)), None),
            120,
            "the container",
        )
        host = docker_client.api.inspect_container(container.id)["HostConfig"]
        mounts = docker_client.api.inspect_container(container.id)["Mounts"]
        user = docker_client.api.inspect_container(container.id)["Config"]["User"]
        run = wait_for_final_state(flow_run_id)
    assert host["Privileged"] is False
    # The one host directory: the isolated network's tunnel, read-only (no socket of the
    # Docker engine, no host root).
    tunnel = f"{tunnel_directory(run_gateway_port(load_policy(main_policy).runtime))}"
    assert host["Binds"] == [f"{tunnel}:{ISOLATED_MOUNT}:ro"], host["Binds"]
    assert [(m["Source"], m["Destination"], m["RW"]) for m in mounts] == [
        (tunnel, ISOLATED_MOUNT, False)
    ]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host["Memory"] == TWO_GIB and host["MemorySwap"] == TWO_GIB
    assert host["NetworkMode"] == "none"  # the default isolated network
    assert user == "1000:1000"
    assert run.state.is_completed(), run.state
    logs = wait_for_log(flow_run_id, "inspect_self:")
    line = next(log for log in logs if log.startswith("inspect_self:"))
    assert "'uid': 1000" in line
    assert "'cap_eff': '0000000000000000'" in line
    assert "'docker_socket': False" in line
    assert "'no_new_privs': '1'" in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[workspace]\ntier = "gold"\n', "workspace.tier 'gold' is not a tier"),
        ("[tiers.free]\nconcurrency_limit = -1\n", "key 'tiers.free.concurrency_limit'"),
        ("[runtime]\nprivileged = true\n", "key 'runtime.privileged' is not a known setting"),
        ("not toml at all [", "it is not valid TOML"),
    ],
)
def test_the_worker_refuses_to_start_with_a_bad_policy_file(
    prefect_server, managed_pool, tmp_path, text, expected
):
    policy = write_policy(tmp_path / "bad.toml")
    policy.write_text(text)
    done = subprocess.run(
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            managed_pool,
            "--type",
            "prefect:managed",
        ],
        env={**os.environ, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"Error: Policy file {str(policy)!r} is not usable:" in done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
