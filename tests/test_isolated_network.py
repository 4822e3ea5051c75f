"""The isolated network, for real: a Prefect server that requires a credential, a worker
whose policy puts runs in `network_mode = "isolated"`, a git server and a package index
on loopback. A run's container has no network of its own: it clones its code, installs
its package and reports through the run gateway over the tunnel, while every other way
out (the server directly, another service of the host, the tunnel asked for a place its
grant does not list, a forged grant) gets nothing."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from pathlib import Path

import pytest
from conftest import OUTPUT, PROBE_MESSAGE
from faults import wait_for_records
from helpers import create_pool, session_workspace, wait_for_log, wait_for_settled_run
from prefect import flow
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from services import free_port, start_prefect_server, start_worker, write_policy

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows" / "isolated_flows.py"
AUTH = f"admin:{secrets.token_hex(8)}"


class Canary:
    """A service on the host's loopback that no run is allowed to reach: counts who
    connects."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\ncanary")
            conn.close()


@pytest.fixture(scope="module")
def isolated(git_server, runtime_image, package_index, tmp_path_factory):
    home = tmp_path_factory.mktemp("isolated-server")
    port = free_port()
    server = start_prefect_server(
        port, home, OUTPUT, {"PREFECT_SERVER_API_AUTH_STRING": AUTH}, name="isolated-server"
    )
    api = f"http://127.0.0.1:{port}/api"
    repo = git_server.publish("isolated", {"isolated_flows.py": FLOWS.read_text()})
    canary = Canary()
    workers = []
    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}):

        def start(name: str, prebuilt: bool):
            workspace = session_workspace(name)
            policy = write_policy(
                tmp_path_factory.mktemp(name) / "policy.toml",
                workspace={"name": workspace, "tier": "test"},
                tiers={"test": {"pool_limit": 100, "concurrency_limit": 2}},
                runtime={
                    "default_image": runtime_image,
                    "package_index_url": package_index.url,
                    "network_mode": "isolated",
                    "api_gateway_port": gateway_port,
                    "allowed_destinations": [f"127.0.0.1:{git_server.port}"],
                    "prebuilt_environments": prebuilt,
                },
            )
            env = {
                "PREFECT_API_URL": api,
                "PREFECT_API_AUTH_STRING": AUTH,
                "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            }
            pool = create_pool(f"{name}-pool")
            worker = start_worker(pool, OUTPUT, env, name=f"{name}-worker")
            workers.append(worker)
            return pool, worker

        gateway_port = free_port()

        def deploy(pool: str, name: str):
            return flow.from_source(
                source=repo, entrypoint="isolated_flows.py:isolated_probe", _sync=True
            ).deploy(
                name=name,
                work_pool_name=pool,
                job_variables={"pip_packages": ["managed-probe"]},
                print_next_steps=False,
                _sync=True,
            )

        yield {
            "start": start,
            "deploy": deploy,
            "server_port": port,
            "canary": canary,
            "workers": workers,
        }
        for worker in workers:
            worker.service.stop()
    server.stop()


def _results(flow_run_id) -> dict:
    line = next(
        line
        for line in wait_for_log(flow_run_id, "isolated results: ")
        if "isolated results: " in line
    )
    return json.loads(line.split("isolated results: ", 1)[1])


@pytest.mark.parametrize("prebuilt", [False, True], ids=["installed-in-run", "prebuilt"])
def test_an_isolated_run_reaches_what_it_was_given_and_nothing_else(
    isolated, docker_client, prebuilt
):
    name = "isolated-prebuilt" if prebuilt else "isolated-run"
    pool, worker = isolated["start"](name, prebuilt)
    canary = isolated["canary"]
    before = canary.connections
    seen = {each.service.log_path: len(each.service.log()) for each in isolated["workers"]}
    deployment = isolated["deploy"](pool, name)
    flow_run_id = run_deployment(
        deployment,
        parameters={"server_port": isolated["server_port"], "canary_port": canary.port},
        timeout=0,
    ).id
    done = wait_for_settled_run(docker_client, flow_run_id, 300)
    assert done.state.is_completed(), (done.state, worker.service.log()[-4000:])

    results = _results(flow_run_id)
    # What it was given: its package (from the index through the tunnel; for a
    # prebuilt environment, installed by the builder through it), its code (cloned from
    # the git server through it) and the API (through the gateway: the logs read here).
    assert results["package"] == PROBE_MESSAGE
    assert results["had_grant"], results
    # Its Prefect client, which reached the gateway over plain HTTP, made its TLS
    # contexts from one certificate (a run's start saves a dozen loads of a full bundle).
    assert results["api_ca_file"] == "/run/prefect-managed/no-tls-ca.pem", results
    assert results["api_ca_store"] == {"x509": 1, "crl": 0, "x509_ca": 0}, results
    # Nothing else: not the server, not another service of the host, directly or through
    # the tunnel, with its own grant or a forged one.
    assert results["server_direct"].startswith("nothing"), results
    assert results["canary_direct"].startswith("nothing"), results
    assert results["server_with_own_grant"].startswith("nothing"), results
    assert results["canary_with_own_grant"].startswith("nothing"), results
    assert results["server_with_forged_grant"].startswith("nothing"), results
    assert canary.connections == before
    # The refusals are logged by the worker process that serves the tunnel (the first
    # worker of the host holds the gateway's port; the others share it).
    logs = "".join(
        each.service.log()[seen.get(each.service.log_path, 0) :] for each in isolated["workers"]
    )
    assert f"Tunnel: refused flow run {flow_run_id}" in logs, logs[-3000:]
    assert "Tunnel: refused a connection with no valid grant" in logs, logs[-3000:]
    assert wait_for_records([flow_run_id]) == {flow_run_id: 1}
