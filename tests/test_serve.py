"""`prefect-managed serve` and scale-out, for real: a Prefect server on PostgreSQL (a
throwaway cluster of Debian's postgresql), `prefect-managed serve` processes each standing
in for a Docker host, and the Docker engine.

This module's Prefect server is its own (not the session's SQLite one), so the pools it
creates are the only managed pools the services see.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import AUTH, OUTPUT, worker_policy
from helpers import (
    container_creations,
    create_pool,
    run_containers,
    session_workspace,
    usage_records,
    wait_for_final_state,
)
from postgres import start_postgres
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import LogFilter
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prometheus_client.parser import text_string_to_metric_families
from services import BIN, FILE_LEASES, Service, free_port, start, wait_for

from prefect_managed import ManagedWorker
from prefect_managed.configuration import WORKSPACE_LABEL

# Generous time limits: the runs share a 2-core machine with other test sessions.
# serial: its `[host]` room counts every managed container on the engine.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200), pytest.mark.serial]

POLL_SECONDS = "2"


@pytest.fixture(scope="module")
def postgres_api():
    """A Prefect server whose database is PostgreSQL, on loopback; its API URL."""
    database = start_postgres(OUTPUT)
    home = Path(tempfile.mkdtemp(prefix="prefect-managed-pg-server-"))
    port = free_port()
    server = start(
        "prefect-server-postgres",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        OUTPUT,
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": database.create_database("prefect"),
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILE_LEASES,
            # As the session's server: every client and worker sends this credential.
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        },
    )

    def healthy() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{server.log()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 180, "the PostgreSQL-backed Prefect server answering /api/health")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.stop()
        database.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def api(postgres_api):
    """Point this process's Prefect client at the PostgreSQL-backed server; delete the
    test's pools afterwards so that each test sees only its own."""
    with temporary_settings(updates={PREFECT_API_URL: postgres_api}):
        yield postgres_api
        with get_client(sync_client=True) as client:
            for pool in client.read_work_pools():
                if pool.type == ManagedWorker.type:
                    client.delete_work_pool(pool.name)


@pytest.fixture
def policy_for(runtime_image, package_index, tmp_path):
    def _policy(name: str, **tier) -> Path:
        return worker_policy(
            tmp_path / f"{name}.toml",
            runtime_image,
            package_index.url,
            session_workspace(name),
            **tier,
        )

    return _policy


@pytest.fixture
def deploy_to(flows_repo, api):
    from prefect import flow

    def _deploy(pool: str, flow_name: str = "hello"):
        return flow.from_source(source=flows_repo, entrypoint=f"probe_flows.py:{flow_name}").deploy(
            name=f"{flow_name}-{pool}", work_pool_name=pool, print_next_steps=False
        )

    return _deploy


def start_serve(
    api: str, policy: Path, name: str, *options: str, env: dict[str, str] | None = None
) -> Service:
    return start(
        f"serve-{name}",
        [
            str(BIN / "prefect-managed"),
            "serve",
            "--name",
            name,
            "--poll-seconds",
            POLL_SECONDS,
            *options,
        ],
        OUTPUT,
        {
            "PREFECT_API_URL": api,
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            **(env or {}),
        },
    )


@contextmanager
def serving(api: str, policy: Path, name: str, env: dict[str, str] | None = None):
    service = start_serve(api, policy, name, env=env)
    try:
        yield service
    finally:
        service.stop(timeout=60)


def start_run(deployment_id, **parameters):
    return run_deployment(deployment_id, parameters=parameters, timeout=0).id


def wait_for_log_line(service: Service, text: str, timeout: float = 180) -> None:
    wait_for(lambda: text in service.log(), timeout, f"{text!r} in the log of {service.name}")


def test_serve_runs_flows_of_every_managed_pool_including_one_created_after_it_started(
    api, deploy_to, policy_for, docker_client
):
    early = create_pool("serve-early")
    with (
        container_creations(
            docker_client, f"{WORKSPACE_LABEL}={session_workspace('serve-all')}"
        ) as creations,
        serving(api, policy_for("serve-all"), "svc") as service,
    ):
        wait_for_log_line(service, "Serving work pool 'serve-early' with worker 'svc-serve-early'")
        late = create_pool("serve-late")
        wait_for_log_line(service, "Serving work pool 'serve-late' with worker 'svc-serve-late'")
        runs = {pool: start_run(deploy_to(pool)) for pool in (early, late)}
        states = {pool: wait_for_final_state(run, 600).state for pool, run in runs.items()}
        for run in runs.values():
            wait_for(lambda run=run: not run_containers(docker_client, run), 300, "removed")
    assert all(state.is_completed() for state in states.values()), states
    created = {
        labels["io.prefect.flow-run-id"]: labels["io.prefect.worker-name"] for labels in creations
    }
    assert created == {str(runs[early]): "svc-serve-early", str(runs[late]): "svc-serve-late"}


def test_serve_serves_only_the_oldest_pools_of_the_tier_and_follows_deletion(
    api, deploy_to, policy_for, docker_client
):
    first, second, third = (create_pool(f"count-{n}") for n in (1, 2, 3))
    deployment = deploy_to(third)
    with serving(api, policy_for("serve-count", pool_limit=2), "count") as service:
        wait_for_log_line(service, "Serving work pool 'count-2'")
        wait_for_log_line(service, "Not serving work pools 'count-3'")
        waiting = start_run(deployment)
        time.sleep(8)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(waiting).state.is_scheduled()
            client.delete_work_pool(first)
        wait_for_log_line(service, "Stopped serving work pool 'count-1': it was deleted")
        wait_for_log_line(service, "Serving work pool 'count-3' with worker 'count-count-3'")
        run = wait_for_final_state(waiting, 600, lambda: service.log()[-6000:])
        wait_for(lambda: not run_containers(docker_client, waiting), 300, "container removed")
        time.sleep(2 * float(POLL_SECONDS))
        with get_client(sync_client=True) as client:
            pools = {pool.name for pool in client.read_work_pools()}
    assert run.state.is_completed(), run.state
    assert first not in pools, "a worker of the service made the deleted pool again"
    assert service.log().count("Serving work pool 'count-1'") == 1


def test_serve_stops_serving_a_paused_pool_and_serves_it_again_when_resumed(
    api, deploy_to, policy_for, docker_client
):
    pool = create_pool("pausable")
    deployment = deploy_to(pool)
    with serving(api, policy_for("serve-pause"), "pause") as service:
        wait_for_log_line(service, "Serving work pool 'pausable'")
        with get_client(sync_client=True) as client:
            client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
        wait_for_log_line(service, "Stopped serving work pool 'pausable': it is paused")
        waiting = start_run(deployment)
        time.sleep(5)
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(waiting).state.is_scheduled()
            client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))
        run = wait_for_final_state(waiting, 600, lambda: service.log()[-6000:])
        wait_for(lambda: not run_containers(docker_client, waiting), 300, "container removed")
    assert run.state.is_completed(), run.state
    assert service.log().count("Serving work pool 'pausable'") == 2


def test_sigterm_leaves_running_containers_and_the_next_start_finishes_them(
    api, deploy_to, policy_for, docker_client
):
    pool = create_pool("graceful")
    policy = policy_for("serve-term")
    deployment = deploy_to(pool, "sleeper")
    first = start_serve(api, policy, "term")
    try:
        flow_run_id = start_run(deployment, seconds=45)
        container = wait_for(
            lambda: next(iter(run_containers(docker_client, flow_run_id)), None),
            600,
            "the run's container",
        )
        with get_client(sync_client=True) as client:
            wait_for(
                lambda: client.read_flow_run(flow_run_id).state.is_running(), 600, "run Running"
            )
        first.process.send_signal(signal.SIGTERM)
        exit_code = first.process.wait(timeout=60)
    finally:
        first.stop()
    container.reload()
    assert exit_code == 0, first.log()[-3000:]
    assert "claiming no new runs" in first.log()
    assert container.status == "running"

    with serving(api, policy, "term") as second:
        run = wait_for_final_state(flow_run_id, timeout=600)
        wait_for(lambda: not run_containers(docker_client, flow_run_id), 300, "container removed")
        records = wait_for(lambda: usage_records(flow_run_id), 300, "the usage record")
    assert run.state.is_completed(), run.state
    assert f"Taking over container {container.name} of flow run {flow_run_id}" in second.log()
    assert len(records) == 1, records


# -- drain, health and metrics, room on the host ---------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The service's /metrics as Prometheus reads it: (sample name, labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(port: int) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    return response.status_code, response.json()


def answered(port: int) -> tuple[int, dict] | None:
    try:
        found = health(port)
    except httpx.TransportError:  # not listening yet
        return None
    return found if found[0] == 200 else None


def test_drain_finishes_the_running_run_takes_no_new_one_then_exits_and_says_so(
    api, deploy_to, policy_for, docker_client
):
    pool = create_pool("drained")
    deployment = deploy_to(pool, "sleeper")
    port = free_port()
    workspace = session_workspace("serve-drain")
    with container_creations(docker_client, f"{WORKSPACE_LABEL}={workspace}") as created:
        service = start_serve(
            api, policy_for("serve-drain", concurrency_limit=2), "drain", "--http-port", str(port)
        )
        try:
            wait_for_log_line(service, f"Serving work pool {pool!r}")
            before = wait_for(lambda: answered(port), 120, "/health answering 200")
            running = start_run(deployment, seconds=20)
            with get_client(sync_client=True) as client:
                wait_for(
                    lambda: client.read_flow_run(running).state.is_running(), 600, "run Running"
                )
            during = scrape(port)
            service.process.send_signal(signal.SIGUSR1)
            wait_for_log_line(service, "draining")
            late = start_run(deployment, seconds=1)
            draining = health(port)
            drained_metrics = scrape(port)
            exit_code = service.process.wait(timeout=600)
        finally:
            service.stop(timeout=60)
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(running).state
        left = client.read_flow_run(late).state
    records = usage_records(running)

    assert before[1]["status"] == "serving" and before[1]["pools"] == [pool], before
    labels = (("pool", pool),)
    assert during[("prefect_managed_runs_admitted_total", labels)] == 1, during
    assert during[("prefect_managed_runs_running", labels)] == 1
    assert during[("prefect_managed_slots_held", labels)] == 1
    assert during[("prefect_managed_start_latency_seconds_count", labels)] == 1
    assert during[("prefect_managed_draining", ())] == 0
    assert during[("prefect_managed_quota_hours", (("workspace", workspace),))] == 10
    assert draining == (200, {**draining[1], "status": "draining"}), draining
    assert drained_metrics[("prefect_managed_draining", ())] == 1

    assert exit_code == 0, service.log()[-3000:]
    assert "Service 'drain' drained" in service.log()
    assert finished.is_completed(), finished
    assert len(records) == 1, records
    assert not run_containers(docker_client, running)
    assert left.is_scheduled(), left
    assert [labels["io.prefect.flow-run-id"] for labels in created] == [str(running)]


def test_a_host_without_room_leaves_runs_waiting_and_says_why(
    api, deploy_to, policy_for, docker_client
):
    """A host whose engine has room for one run of the tier (its reserve is set so) runs
    three runs one at a time, though the workspace's cap is 3; the waiting runs' logs say
    why."""
    total = docker_client.info()["MemTotal"]
    tier_memory = 1024**3
    reserve = total - tier_memory - tier_memory // 2  # room for one run of 1 GiB
    workspace = session_workspace("serve-room")
    policy = policy_for(
        "serve-room", concurrency_limit=3, memory="1g", host={"reserve_memory": reserve}
    )
    pool = create_pool("roomy")
    deployment = deploy_to(pool, "sleeper")
    with serving(api, policy, "room") as service:
        wait_for_log_line(service, f"Serving work pool {pool!r}")
        runs = [start_run(deployment, seconds=4) for _ in range(3)]
        most_running = 0
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                found = docker_client.containers.list(
                    filters={"label": f"{WORKSPACE_LABEL}={workspace}", "status": "running"}
                )
                most_running = max(most_running, len(found))
                if all(client.read_flow_run(run).state.is_final() for run in runs):
                    break
                time.sleep(0.2)
            states = [client.read_flow_run(run).state for run in runs]
            for run in runs:
                wait_for(lambda run=run: not run_containers(docker_client, run), 300, "removed")
            told = [
                [log.message for log in client.read_logs(LogFilter(flow_run_id={"any_": [run]}))]
                for run in runs
            ]
    waited = [messages for messages in told if any("Waiting for room" in m for m in messages)]

    assert [state.type.value for state in states] == ["COMPLETED"] * 3
    assert most_running == 1
    assert waited, told
    message = next(m for m in waited[0] if "Waiting for room" in m)
    assert re.search(r"room for [0-2] more of [1-3] waiting flow runs of 1 GiB", message), message
    assert "[host] reserves" in message and "another host" in message, message
