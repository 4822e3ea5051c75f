"""Who may hold the run gateway's port, and what the worker stops, for real: gateways served
by uvicorn on loopback, a squatter that answers the health path as a gateway would but
cannot prove the ledger key, and containers of a real Docker engine that a run's
`infrastructure_pid` could name."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from uuid import uuid4

import anyio
import pytest
from prefect.exceptions import InfrastructureNotFound
from services import free_port

import prefect_managed.worker as worker_module
from prefect_managed.configuration import API_LABEL, MANAGED_LABEL, api_label_value
from prefect_managed.gateway.app import HEALTH_PATH, Gateway
from prefect_managed.gateway.host import RunGateway
from prefect_managed.policy import Policy
from prefect_managed.worker import ManagedWorker

KEY = b"k" * 32


def _gateway(port: int, key: bytes = KEY, label: str = "api-label") -> RunGateway:
    return RunGateway(port, Gateway("http://127.0.0.1:1/api", {}, None, key, label))


def test_a_peer_gateway_with_the_key_is_shared_and_one_without_is_not():
    port = free_port()
    holder = _gateway(port)
    assert holder.ensure() == "bound"
    try:
        assert _gateway(port).ensure() == "shared"
        with pytest.raises(OSError, match="does not prove"):
            _gateway(port, key=b"x" * 32).ensure()
        with pytest.raises(OSError, match="does not prove"):
            _gateway(port, label="another api").ensure()
    finally:
        holder.stop()


class _Squatter(BaseHTTPRequestHandler):
    """What a run's container could serve on the port: the health path's public answer
    (the label is in every container's environment), without the proof it cannot make."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"gateway": "prefect-managed", "api": "api-label"}).encode()
        self.send_response(200 if self.path.startswith(HEALTH_PATH) else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_squatter_that_answers_as_a_gateway_is_not_taken_for_one():
    port = free_port()
    squatter = ThreadingHTTPServer(("127.0.0.1", port), _Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        with pytest.raises(OSError, match="does not prove"):
            _gateway(port).ensure()
    finally:
        squatter.shutdown()
        squatter.server_close()


@pytest.mark.docker
def test_the_worker_stops_only_the_runs_own_managed_container(
    docker_client, runtime_image, monkeypatch
):
    """A run's infrastructure_pid is the flow run's field: the worker checks the
    container's run and managed labels before it stops anything."""
    monkeypatch.setattr(worker_module, "get_policy", Policy)
    worker = ManagedWorker(work_pool_name="unit-pool", name="unit-worker")
    run = str(uuid4())
    managed = {"io.prefect.flow-run-id": run, MANAGED_LABEL: "true", API_LABEL: api_label_value()}
    containers = {
        name: docker_client.containers.run(
            runtime_image, ["sleep", "300"], entrypoint=[], detach=True, labels=labels
        )
        for name, labels in (
            ("plain", {}),
            ("other_run", {**managed, "io.prefect.flow-run-id": str(uuid4())}),
            ("unmanaged", {**managed, MANAGED_LABEL: "false"}),
            ("other_api", {**managed, API_LABEL: "elsewhere"}),
            ("own", managed),
        )
    }
    configuration = SimpleNamespace(labels={"io.prefect.flow-run-id": run})
    base = docker_client.api.base_url
    try:
        for name in ("plain", "other_run", "unmanaged", "other_api"):
            with pytest.raises(InfrastructureNotFound):
                anyio.run(
                    worker.kill_infrastructure, f"{base}:{containers[name].id}", configuration, 1
                )
            containers[name].reload()
            assert containers[name].status == "running", name
        anyio.run(worker.kill_infrastructure, f"{base}:{containers['own'].id}", configuration, 1)
        containers["own"].reload()
        assert containers["own"].status == "exited"
    finally:
        for container in containers.values():
            container.remove(force=True)
