"""Hostile flows, run for real: each tries a way out of its container and is contained,
and the run's final state says what happened. Running out of memory, running past the
maximum run time and the container's hardening flags are in tests/test_limits.py; this
file adds the fork bomb, the Docker socket, host files, privilege escalation and writes
outside the writable directories."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from conftest import OUTPUT
from helpers import flow_run_logs, usage_records, wait_for_log, wait_for_settled_run
from prefect import flow
from prefect.deployments import run_deployment

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows" / "hostile_flows.py"


@pytest.fixture(scope="module")
def hostile_repo(git_server) -> str:
    return git_server.publish("hostile", {"hostile_flows.py": FLOWS.read_text()})


@pytest.fixture
def deploy_hostile(hostile_repo, managed_pool, managed_worker):
    def _deploy(flow_name: str, name: str) -> object:
        return flow.from_source(
            source=hostile_repo, entrypoint=f"hostile_flows.py:{flow_name}"
        ).deploy(name=name, work_pool_name=managed_pool, print_next_steps=False)

    return _deploy


# attempt -> what the run's final message must say
ESCAPES = {
    "docker_socket": "FileNotFoundError: [Errno 2] No such file or directory",
    "host_file": "FileNotFoundError: the host's file is at none of 7 paths",
    "setuid": "PermissionError: [Errno 1] Operation not permitted",
    "setuid_binary": "su exited with code 1",
    "capability": "PermissionError: [Errno 1] Operation not permitted",
    "write_outside": "PermissionError: [Errno 13] Permission denied: '/usr/lib/escape.txt'",
}


def test_every_escape_attempt_fails_and_its_run_says_what_was_refused(
    deploy_hostile, docker_client
):
    # A secret of the worker host, readable by anyone on the host (the test output folder
    # is world-readable): a flow must not read it.
    secret = secrets.token_hex(16)
    host_file = OUTPUT / "host-secret.txt"
    host_file.write_text(secret)
    host_file.chmod(0o644)
    deployment = deploy_hostile("escape", "escape-attempts")
    runs = {
        attempt: run_deployment(
            deployment, parameters={"attempt": attempt, "target": str(host_file)}, timeout=0
        ).id
        for attempt in ESCAPES
    }
    for attempt, flow_run_id in runs.items():
        run = wait_for_settled_run(docker_client, flow_run_id, timeout=600)
        assert run.state.is_failed(), (attempt, run.state)
        assert ESCAPES[attempt] in run.state.message, (attempt, run.state.message)
        assert "succeeded" not in (run.state.message or "")
        assert len(usage_records(flow_run_id)) == 1
    logs = flow_run_logs(runs["host_file"])
    assert not any(secret in line for line in logs), logs


def test_a_flow_writes_in_its_home_workdir_and_tmp_and_nothing_survives_the_run(
    deploy_hostile, docker_client
):
    deployment = deploy_hostile("writable_dirs", "writable-dirs")
    flow_run_id = run_deployment(deployment, timeout=0).id
    run = wait_for_settled_run(docker_client, flow_run_id, timeout=600)
    assert run.state.is_completed(), run.state
    logs = wait_for_log(flow_run_id, "writable:")
    assert any("'/home/prefect': 'ok'" in log and "'/tmp': 'ok'" in log for log in logs)
    # The container, and every file it wrote, is gone with the run.
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"io.prefect.flow-run-id={flow_run_id}"}
        )
        == []
    )


def test_a_fork_bomb_is_stopped_at_the_pids_limit_and_the_run_says_so(
    deploy_hostile, docker_client
):
    deployment = deploy_hostile("fork_bomb", "fork-bomb")
    flow_run_id = run_deployment(deployment, timeout=0).id
    run = wait_for_settled_run(docker_client, flow_run_id, timeout=600)
    assert run.state.is_crashed(), run.state
    assert "reached the limit of 1024 processes and threads per container" in run.state.message
    assert len(usage_records(flow_run_id)) == 1
