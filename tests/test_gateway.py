"""The run gateway, for real: a Prefect server that requires a credential, a worker whose
policy turns the gateway on, and flow runs whose containers hold a token for their own
run only. An ordinary flow (tasks, a subflow, logs, an artifact, an event) runs as it
would anywhere; a hostile flow tries the books through the API and around it, and every
attempt is refused while the run itself completes and is recorded once."""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path

import pytest
from conftest import OUTPUT
from faults import wait_for_records, wait_until_settled
from helpers import (
    create_pool,
    flow_run_logs,
    session_workspace,
    wait_for_log,
    wait_for_settled_run,
)
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from services import free_port, start_prefect_server, start_worker, wait_for, write_policy

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows" / "gateway_flows.py"
WORKSPACE = session_workspace("gateway")
AUTH = f"admin:{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def gated(git_server, runtime_image, package_index, tmp_path_factory):
    """A server requiring `AUTH`, a pool, and a worker with the gateway on; the test
    process talks to that server as the operator (with `AUTH`) for the module."""
    home = tmp_path_factory.mktemp("gateway-server")
    port = free_port()
    server = start_prefect_server(
        port, home, OUTPUT, {"PREFECT_SERVER_API_AUTH_STRING": AUTH}, name="gateway-server"
    )
    api = f"http://127.0.0.1:{port}/api"
    repo = git_server.publish("gateway", {"gateway_flows.py": FLOWS.read_text()})
    gateway_port = free_port()
    policy = write_policy(
        tmp_path_factory.mktemp("gateway") / "policy.toml",
        workspace={"name": WORKSPACE, "tier": "test"},
        tiers={"test": {"pool_limit": 100, "concurrency_limit": 2}},
        runtime={
            "default_image": runtime_image,
            "package_index_url": package_index.url,
            "api_gateway_port": gateway_port,
            # "Around the gateway": the server on the host's loopback is reachable only
            # under host networking; the default isolated network is tried by
            # tests/test_gateway_attacks.py.
            "network_mode": "host",
        },
    )
    env = {
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}):
        pool = create_pool("gateway-pool")
        worker = start_worker(pool, OUTPUT, env, name="gateway-worker")

        def deploy(flow_name: str, name: str, work_pool: str = pool):
            return flow.from_source(
                source=repo, entrypoint=f"gateway_flows.py:{flow_name}", _sync=True
            ).deploy(name=name, work_pool_name=work_pool, print_next_steps=False, _sync=True)

        yield {
            "api": api,
            "pool": pool,
            "deploy": deploy,
            "worker": worker,
            "gateway": f"http://127.0.0.1:{gateway_port}/api",
            "env": env,
            "runtime_image": runtime_image,
            "index": package_index.url,
        }
        worker.service.stop()
    server.stop()


def test_an_ordinary_flow_runs_through_the_gateway(gated, docker_client):
    deployment = gated["deploy"]("ordinary", "gateway-ordinary")
    flow_run_id = run_deployment(deployment, parameters={"value": 20}, timeout=0).id
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), (done.state, gated["worker"].service.log()[-3000:])
    assert any("ordinary total: 81" in line for line in wait_for_log(flow_run_id, "ordinary total"))
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        assert any(a.key == "gateway-total" and "81" in str(a.data) for a in artifact)
        # The subflow: created by the run through the gateway, completed.
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=False)
            )
        )
        children = [run for run in subflows if run.flow_id != done.flow_id]
        assert children and all(run.state.is_completed() for run in children), children
        # Task runs are recorded from the events the run sent through the gateway.
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        assert {run.name.split("-")[0] for run in task_runs} >= {"double", "child"}, task_runs
        assert all(run.state.is_completed() for run in task_runs), task_runs
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}


def test_results_persisted_as_the_engine_persists_them_pass_the_gateway(gated, docker_client):
    """The engine's result metadata (a saved result block, an expiration, a compressed
    JSON serializer) passes the gateway as sent: the run and its task complete, and
    their states read back with that metadata, as Prefect's client reads them."""
    from prefect.filesystems import LocalFileSystem

    block = LocalFileSystem(basepath="/tmp/prefect-managed-results")
    block_id = block.save("gateway-results", overwrite=True)
    deployment = gated["deploy"]("persists_results", "gateway-persists-results")
    flow_run_id = run_deployment(deployment, parameters={"value": 41}, timeout=0).id
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), (done.state, flow_run_logs(flow_run_id)[-20:])
    assert any("persisted: 42" in line for line in wait_for_log(flow_run_id, "persisted:"))
    with get_client(sync_client=True) as client:
        final = client.read_flow_run_states(flow_run_id)[-1]  # reads back: no error
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    for state in [final, *(run.state for run in task_runs)]:
        assert state is not None and state.is_completed(), state
        metadata = state.data
        assert metadata.storage_block_id == block_id, metadata
        assert metadata.serializer.type == "compressed/json", metadata
    assert task_runs[0].state.data.expiration is not None
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}


def test_a_hostile_flow_changes_nothing_through_or_around_the_gateway(gated, docker_client):
    with get_client(sync_client=True) as client:
        victim_deployment = gated["deploy"]("ordinary", "gateway-victim")
        # Kept out of the worker's hands: created scheduled far into the future (the
        # worker picks up a run due now as soon as it is created, and paused
        # deployments' runs are still picked up).
        from datetime import datetime, timedelta, timezone

        from prefect.states import Scheduled

        victim = client.create_flow_run_from_deployment(
            victim_deployment,
            state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=30)),
        )
    deployment = gated["deploy"]("attack", "gateway-attack")
    flow_run_id = run_deployment(
        deployment,
        parameters={
            "workspace": WORKSPACE,
            "pool": gated["pool"],
            "other": str(victim.id),
            "server_url": gated["api"],
        },
        timeout=0,
    ).id
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), (done.state, flow_run_logs(flow_run_id)[-20:])
    line = next(
        log for log in wait_for_log(flow_run_id, "gateway results:") if "gateway results:" in log
    )
    results = json.loads(line.split("gateway results:", 1)[1])
    refused = {
        key: results[key]
        for key in (
            "deactivate_limit",
            "raise_limit",
            "take_run_slot",
            "forge_usage",
            "other_run_state",
            "other_run_logs",
            "delete_other_run",
            "pause_pool",
            "set_variable",
        )
    }
    assert refused == dict.fromkeys(refused, 403), results
    assert all(code == 403 for code in results["erase_usage"]), results
    assert results["read_own_run"] == 200
    # Around the gateway: the server wants its own credential, which no container holds.
    assert results["server_without_credential"] == 401
    assert results["server_with_run_token"] == 401
    assert results["forged_token"] == 401
    assert results["api_url"] == gated["gateway"]
    assert "PREFECT_API_KEY" not in results["env_names"]
    assert "PREFECT_SERVER_API_AUTH_STRING" not in results["env_names"]

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(f"prefect-managed-{WORKSPACE}")
        assert limit.active and limit.limit == 2
        assert client.read_flow_run(victim.id).state.is_scheduled()
        pool = client.read_work_pool(gated["pool"])
        assert not pool.is_paused
    # The books: one true record for the attacking run; the worker still serves.
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    assert gated["worker"].service.process.poll() is None
    assert "Refused PATCH /api/v2/concurrency_limits" in gated["worker"].service.log()


def test_the_gateway_outlives_the_worker_that_served_it(gated, docker_client, tmp_path):
    """The worker holding the gateway's port is SIGKILLed mid-run: another worker process
    of the host that shared the port binds it, the run finishes through it, and the
    restarted worker takes the container over: Completed, one record, nothing left."""
    workspace = session_workspace("gateway-kill")
    port = free_port()
    policy = write_policy(
        tmp_path / "policy.toml",
        workspace={"name": workspace, "tier": "test"},
        tiers={"test": {"pool_limit": 100, "concurrency_limit": 2}},
        runtime={
            "default_image": gated["runtime_image"],
            "package_index_url": gated["index"],
            "api_gateway_port": port,
        },
    )
    env = {**gated["env"], "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)}
    pool, idle_pool = create_pool("gateway-kill-pool"), create_pool("gateway-share-pool")
    holder = start_worker(pool, OUTPUT, env, name="gateway-kill-worker")
    wait_for(lambda: "(served here)" in holder.service.log(), 60, "the holder binding the gateway")
    sharer = start_worker(idle_pool, OUTPUT, env, name="gateway-share-worker")
    restarted = None
    try:
        wait_for(
            lambda: "served by another worker process" in sharer.service.log(),
            60,
            "the second worker finding the gateway",
        )
        deployment = gated["deploy"]("sleep_then_finish", "gateway-kill", pool)
        flow_run_id = run_deployment(deployment, parameters={"seconds": 25}, timeout=0).id
        wait_for(lambda: "sleeping" in " ".join(flow_run_logs(flow_run_id)), 180, "the flow asleep")
        os.kill(holder.service.process.pid, signal.SIGKILL)
        holder.service.process.wait()
        wait_for(
            lambda: "previous holder is gone" in sharer.service.log(),
            30,
            "the second worker binding the gateway",
        )
        restarted = start_worker(pool, OUTPUT, env, name="gateway-kill-worker")
        runs = wait_until_settled(docker_client, workspace, [flow_run_id], 300)
        assert runs[0].state.is_completed(), runs[0].state
        assert any("finished after the sleep: 42" in line for line in flow_run_logs(flow_run_id))
        assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
    finally:
        for worker in (restarted, sharer):
            if worker is not None:
                worker.service.stop()
