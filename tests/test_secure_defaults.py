"""Secure by default, as an operator meets it: a worker refuses a Prefect server that
answers without a credential, each opt-out of the boundary is warned at start, `policy
check` shows the boundary, and a run whose image has no python3 falls back to the host's
network with a warning instead of failing.

The hostile flows against a worker with the policy's defaults are in
tests/test_gateway_attacks.py (its `defaults` mode)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import OUTPUT
from helpers import flow_run_logs, run_containers, session_workspace, wait_for_settled_run
from prefect.deployments import run_deployment
from services import (
    BIN,
    free_port,
    start_git_server,
    start_prefect_server,
    start_worker,
    wait_for,
    write_policy,
)

from prefect_managed.gateway.host import GATEWAY_OFF, NETWORK, TRUSTED_CODE_ONLY

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A Prefect server started without PREFECT_SERVER_API_AUTH_STRING."""
    port = free_port()
    server = start_prefect_server(
        port, tmp_path_factory.mktemp("open-server"), OUTPUT, name="open-server"
    )
    yield f"http://127.0.0.1:{port}/api"
    server.stop()


def _policy(path: Path, runtime_image: str, **runtime) -> Path:
    return write_policy(
        path,
        workspace={"name": session_workspace("open"), "tier": "test"},
        tiers={"test": {"pool_limit": 100, "concurrency_limit": 1}},
        runtime={"default_image": runtime_image, **runtime},
    )


def _worker_env(api: str, policy: Path) -> dict[str, str]:
    return {
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": "",
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }


def test_a_worker_refuses_a_server_that_answers_without_a_credential(
    open_server, runtime_image, tmp_path
):
    policy = _policy(tmp_path / "policy.toml", runtime_image)
    worker = start_worker("open-pool", OUTPUT, _worker_env(open_server, policy), "open-refused")
    try:
        code = worker.service.process.wait(120)
    finally:
        worker.service.stop()
    log = worker.service.log()
    assert code == 1, log[-3000:]
    assert f"The Prefect API {open_server} answers requests that carry no credential" in log
    assert "PREFECT_SERVER_API_AUTH_STRING" in log and "PREFECT_API_AUTH_STRING" in log
    assert f"`trusted_code_only = true` under [runtime] in '{policy}'" in log
    assert "Traceback" not in log


def test_prefect_managed_serve_refuses_it_too_with_one_line(open_server, runtime_image, tmp_path):
    policy = _policy(tmp_path / "policy.toml", runtime_image)
    done = subprocess.run(
        [str(BIN / "prefect-managed"), "serve", "--name", "open-serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **_worker_env(open_server, policy)},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert f"The Prefect API {open_server} answers requests that carry no credential" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_each_opt_out_is_warned_at_start(open_server, runtime_image, tmp_path):
    policy = _policy(
        tmp_path / "policy.toml",
        runtime_image,
        trusted_code_only=True,
        api_gateway_port=0,
        network_mode="host",
    )
    worker = start_worker("open-pool", OUTPUT, _worker_env(open_server, policy), "open-opted-out")
    try:
        wait_for(
            lambda: "Workspace '" in worker.service.log() or worker.service.process.poll(),
            120,
            "the worker's start",
        )
        log = worker.service.log()
        assert worker.service.process.poll() is None, log[-3000:]
    finally:
        worker.service.stop()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    for text in (TRUSTED_CODE_ONLY % open_server, GATEWAY_OFF, NETWORK["host"]):
        assert any(text in line for line in warnings), (text, warnings)
    assert "through the run gateway" not in log


def test_policy_check_marks_each_opt_out(runtime_image, tmp_path):
    def check(policy: Path) -> list[str]:
        done = subprocess.run(
            [str(BIN / "prefect-managed"), "policy", "check", str(policy)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    defaults = check(_policy(tmp_path / "defaults.toml", runtime_image))
    opted = check(
        _policy(
            tmp_path / "opted.toml",
            runtime_image,
            trusted_code_only=True,
            api_gateway_port=0,
            network_mode="host",
        )
    )
    assert not [line for line in defaults if "OPTED OUT" in line], defaults
    for setting, value in (
        ("api_gateway_port", "0"),
        ("network_mode", '"host"'),
        ("trusted_code_only", "true"),
    ):
        row = next(line for line in opted if line.startswith(f"│ {setting} "))
        assert f"│ {value} (OPTED OUT) " in row, row
    assert "Run gateway: OFF (runs hold the worker's Prefect credential)" in opted


@pytest.fixture(scope="module")
def image_without_python3(docker_client, runtime_image):
    """The runtime image with no `python3` or `python` on its PATH; Prefect still runs
    (its script's interpreter under another name)."""
    tag = f"prefect-managed-runtime:no-python3-{session_workspace('t')}"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "Dockerfile").write_text(
            f"FROM {runtime_image}\n"
            "USER root\n"
            "RUN set -e; real=$(readlink -f /opt/prefect/venv/bin/python3); "
            "rm -f /opt/prefect/venv/bin/python /opt/prefect/venv/bin/python3 "
            "/opt/prefect/venv/bin/python3.* /usr/bin/python3 /usr/bin/python "
            "/usr/local/bin/python3 /usr/local/bin/python; "
            'ln -s "$real" /opt/prefect/venv/bin/interpreter; '
            "sed -i '1s|.*|#!/opt/prefect/venv/bin/interpreter|' /opt/prefect/venv/bin/prefect; "
            "! command -v python3 && ! command -v python\n"
            "USER prefect\n"
        )
        docker_client.images.build(path=folder, tag=tag, rm=True, network_mode="none")
    yield tag
    docker_client.images.remove(tag, force=True)


def test_a_run_whose_image_has_no_python3_falls_back_to_the_hosts_network_with_a_warning(
    deploy, docker_client, managed_worker, image_without_python3
):
    deployment = deploy("hello", "no-python3", {"image": image_without_python3})
    run = run_deployment(deployment, timeout=0).id
    done = wait_for_settled_run(docker_client, run)
    logs = flow_run_logs(run)
    assert done.state.is_completed(), (done.state, logs[-20:])
    warning = f"The image {image_without_python3!r} has no python3 for the isolated network"
    assert any(warning in message for message in logs), logs
    assert "set runtime.network_mode = 'host'" in next(m for m in logs if warning in m)
    assert warning in managed_worker.service.log()
    # The image's probe left no container behind.
    leftover = docker_client.containers.list(all=True, filters={"ancestor": image_without_python3})
    assert leftover == [] and run_containers(docker_client, run) == []


@pytest.fixture(scope="module")
def unlisted_git(managed_worker, tmp_path_factory):
    """A git server started after the main worker's policy was written, so not among its
    allowed_destinations."""
    server = start_git_server(tmp_path_factory.mktemp("unlisted-git"), OUTPUT)
    yield server
    server.service.stop()


def test_a_repository_the_isolated_network_does_not_reach_fails_naming_what_to_ask(
    unlisted_git, managed_pool, docker_client
):
    from prefect import flow

    flows = (Path(__file__).parent / "flows" / "probe_flows.py").read_text()
    repo = unlisted_git.publish("unlisted", {"probe_flows.py": flows})
    deployment = flow.from_source(
        source=repo, entrypoint="probe_flows.py:hello", _sync=True
    ).deploy(
        name="unlisted-source", work_pool_name=managed_pool, print_next_steps=False, _sync=True
    )
    run = run_deployment(deployment, timeout=0).id
    done = wait_for_settled_run(docker_client, run)
    destination = f"127.0.0.1:{unlisted_git.port}"
    assert done.state.is_crashed(), done.state
    assert f"pull step git_clone from repository {repo}" in done.state.message
    assert (
        f"and {destination} is not among them: if it is the workspace's git server, ask the "
        f"operator to add '{destination}' to "
        "allowed_destinations" in done.state.message
    ), done.state.message
