"""A deployment from git with pip_packages, run by the managed worker in a capped container.

Everything here is real: a Prefect server, `prefect worker start --type prefect:managed`,
a Docker engine, a git daemon and a package index on loopback. The runs' core paths run
twice: on the project's runtime image and on the official image's stand-in
(tests/images/official), the built-in default image, whose Python belongs to root.
"""

from __future__ import annotations

import pytest
from conftest import PROBE_MESSAGE, PROBE_VERSION
from helpers import (
    container_creations,
    create_pool_with_cli,
    executed_status_code,
    run_containers,
    wait_for_final_state,
    wait_for_log,
)
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import wait_for

pytestmark = pytest.mark.docker

TWO_GIB = 2 * 1024**3


@pytest.fixture(params=["runtime-image", "official-image"])
def deploy_on(request, deploy):
    """`deploy` to the pool whose worker's default image is the runtime image, or to the
    one whose worker's default image is the official image's stand-in."""
    if request.param == "runtime-image":
        return deploy
    pool = request.getfixturevalue("official_pool")
    request.getfixturevalue("official_worker")

    def _deploy(flow_name: str, name: str, job_variables: dict | None = None):
        return deploy(flow_name, f"{name}-official", job_variables, pool=pool)

    return _deploy


def start_run(deployment_id, parameters=None):
    return run_deployment(deployment_id, parameters=parameters or {}, timeout=0).id


def test_pool_created_with_prefect_cli_offers_the_managed_form(prefect_server):
    name = "cli-created-pool"
    create_pool_with_cli(name)
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
    assert pool.type == "prefect:managed"
    properties = pool.base_job_template["variables"]["properties"]
    for variable in ("image", "pip_packages", "env", "name", "labels", "command"):
        assert variable in properties, variable
    assert properties["pip_packages"]["title"] == "Pip Packages"
    assert "PEP 508" in properties["pip_packages"]["description"]
    assert properties["image"]["title"] == "Image"


def test_git_deployment_installs_pip_packages_and_completes(deploy_on, docker_client):
    deployment_id = deploy_on(
        "probe", "probe-with-packages", {"pip_packages": [f"managed-probe=={PROBE_VERSION}"]}
    )
    # The filter the "no container" checks below use, seen to match a run's container.
    with container_creations(docker_client, f"io.prefect.deployment-id={deployment_id}") as made:
        flow_run_id = start_run(deployment_id)
        run = wait_for_final_state(flow_run_id)

    assert run.state.is_completed(), run.state
    assert [labels["io.prefect.flow-run-id"] for labels in made] == [str(flow_run_id)]
    wait_for_log(flow_run_id, f"probe says: {PROBE_MESSAGE}")
    wait_for(lambda: not run_containers(docker_client, flow_run_id), 30, "the container removed")


def test_a_killed_container_s_exit_code_is_in_the_executed_event(deploy_on, docker_client):
    """The exit code in Prefect's "executed flow run" event is the container's, read
    after it exited (prefect-docker's result, not read again after its wait, says 0)."""
    flow_run_id = start_run(deploy_on("sleeper", "sleeper-exit-code"), {"seconds": 120})
    container = wait_for(
        lambda: next(iter(run_containers(docker_client, flow_run_id)), None),
        120,
        "the run's container appearing",
    )
    wait_for_log(flow_run_id, "Beginning flow run", timeout=120)
    container.kill("SIGKILL")

    run = wait_for_final_state(flow_run_id)

    assert run.state.is_crashed(), run.state
    assert "exited with code 137" in run.state.message, run.state.message
    assert executed_status_code(flow_run_id) == "137"


def test_container_memory_is_capped_at_two_gib_without_swap(deploy_on, docker_client):
    deployment_id = deploy_on("probe", "probe-memory", {"pip_packages": ["managed-probe"]})
    flow_run_id = start_run(deployment_id, {"sleep_seconds": 15})

    container = wait_for(
        lambda: next(iter(run_containers(docker_client, flow_run_id)), None),
        120,
        "the run's container appearing",
    )
    host_config = docker_client.api.inspect_container(container.id)["HostConfig"]
    assert host_config["Memory"] == TWO_GIB
    assert host_config["MemorySwap"] == TWO_GIB
    run = wait_for_final_state(flow_run_id)
    assert run.state.is_completed(), run.state
    wait_for_log(flow_run_id, f"cgroup memory limit: {TWO_GIB}")


def test_failed_install_crashes_the_run_with_the_installer_output_in_its_logs(
    deploy_on, docker_client
):
    deployment_id = deploy_on(
        "hello", "hello-missing-package", {"pip_packages": ["managed-probe-missing==9.9.9"]}
    )
    flow_run_id = start_run(deployment_id)

    run = wait_for_final_state(flow_run_id)

    assert run.state.is_crashed(), run.state
    assert "Installing pip_packages managed-probe-missing==9.9.9 failed" in run.state.message
    # The installer's output, from the environment's builder (or, with
    # prebuilt_environments off, from the run's own container).
    logs = wait_for_log(flow_run_id, "+uv pip install managed-probe-missing==9.9.9")
    installer_output = next(log for log in logs if "+uv pip install" in log)
    assert "No solution found" in installer_output.split("+uv pip install", 1)[1]
    assert "hello from a managed container" not in "\n".join(logs)
    assert not any("Infrastructure returned without reporting" in log for log in logs), logs
    wait_for(lambda: not run_containers(docker_client, flow_run_id), 30, "the container removed")


@pytest.mark.parametrize(
    "entry", ["pandas; rm -rf /", "../evil", "", "evil @ https://example.invalid/evil.whl"]
)
def test_invalid_pip_package_is_rejected_before_any_container_starts(deploy, docker_client, entry):
    deployment_id = deploy("hello", "hello-invalid-package", {"pip_packages": ["six", entry]})
    with container_creations(docker_client, f"io.prefect.deployment-id={deployment_id}") as made:
        flow_run_id = start_run(deployment_id)
        run = wait_for_final_state(flow_run_id)

    assert run.state.is_crashed(), run.state
    assert f"pip_packages entry {entry!r} was rejected" in run.state.message
    assert made == []
