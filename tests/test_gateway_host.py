"""Who may hold the run gateway's port, and what the worker stops, for real: gateways served
by uvicorn on loopback, a squatter that answers the health path as a gateway would but
cannot prove the ledger key, and containers of a real Docker engine that a run's
`infrastructure_pid` could name."""

from __future__ import annotations

import gzip
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from uuid import uuid4

import anyio
import httpx
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


class _FailingApi(BaseHTTPRequestHandler):
    """An API that fails the gateway as its `mode` says. Reads of a flow run are answered
    (the run is Running; anything else is not found), except in `garbled`, where they
    answer a page that is not JSON; a websocket handshake is closed before any answer
    (`dying`: an API process killed mid-handshake, as a proxy in front of it passes it
    on) or refused with 401 (`refusing`: the gateway's credential)."""

    protocol_version = "HTTP/1.1"
    mode = "dying"
    #: In `answering`, the Accept-Encoding of each request the API got.
    encodings: list[str | None] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        """`answering`: a run's logs read, answered with `LARGE_ANSWER_LINES` lines; a
        flow runs read answered gzip-compressed although the gateway asked for no
        encoding (small compressed, large once decompressed); a task runs read answered
        with no length (the connection's end ends it)."""
        self.encodings.append(self.headers.get("Accept-Encoding"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        lines = [{"message": f"line {i}", "level": 20} for i in range(LARGE_ANSWER_LINES)]
        if self.path == "/api/logs/filter":
            self._answer(200, lines)
        elif self.path == "/api/flow_runs/filter":
            data = gzip.compress(json.dumps([{"name": "x" * 1000}] * 1000).encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/api/task_runs/filter":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"[]")
            self.close_connection = True
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.encodings.append(self.headers.get("Accept-Encoding"))
        if self.headers.get("Upgrade", "").lower() == "websocket":
            if self.mode == "refusing":
                self._answer(401, {"detail": "Unauthorized"})
            self.close_connection = True
            return
        if self.path.startswith("/api/flow_runs/") and self.mode == "garbled":
            self._answer(200, None)  # not JSON: a proxy's error page, say
        elif self.path.startswith("/api/flow_runs/"):
            run = self.path.rsplit("/", 1)[-1]
            self._answer(200, {"id": run, "state": {"type": "RUNNING"}})
        else:
            self._answer(404, {"detail": "Not Found"})

    def _answer(self, status: int, body: dict | list | None) -> None:
        data = json.dumps(body).encode() if body is not None else b"<html>Bad gateway</html>"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


#: A logs read's answer of about 1.2 MB: more than a gateway sends on in one piece.
LARGE_ANSWER_LINES = 40_000


@contextmanager
def _gateway_before(mode: str | None):
    """A gateway in front of a `_FailingApi` in `mode`, or of no API at all (None:
    nothing listens on its port); the gateway's port."""
    api = None
    if mode is not None:
        handler = type("_Api", (_FailingApi,), {"mode": mode, "encodings": []})
        api = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=api.serve_forever, daemon=True).start()
    api_port = api.server_port if api is not None else free_port()
    port = free_port()
    gateway = RunGateway(
        port, Gateway(f"http://127.0.0.1:{api_port}/api", {}, None, KEY, "api-label")
    )
    assert gateway.ensure() == "bound"
    try:
        yield SimpleNamespace(port=port, api=api) if mode == "answering" else port
    finally:
        gateway.stop()
        if api is not None:
            api.shutdown()
            api.server_close()


@pytest.fixture(params=["dying", None], ids=["dying", "refused"])
def api_away_gateway(request):
    """A gateway whose API does not answer a run's websocket: one that dies in the
    handshake, or none at all (then the run's status cannot be read either)."""
    with _gateway_before(request.param) as port:
        yield port


def _websocket_close(port: int, path: str, token: str):
    """How the gateway closes a run's websocket after its auth message."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}{path}", subprotocols=["prefect"]) as websocket:
        websocket.send(json.dumps({"type": "auth", "token": token}))
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=30)
    return closed.value.rcvd


@pytest.mark.parametrize("path", ["/api/events/out", "/api/events/in"])
def test_a_websocket_whose_api_does_not_answer_is_closed_as_gone_away(api_away_gateway, path):
    """The API behind the gateway does not answer (its process killed while the gateway
    opens the run's websocket upstream, or not there at all): the run's websocket is
    closed as gone away (1001) with the reason, not as a refused token, and not left
    to the ASGI server as an unhandled error (which closes it without a close frame)."""
    from prefect_managed.gateway.tokens import run_token

    received = _websocket_close(api_away_gateway, path, run_token(KEY, uuid4(), 600))
    assert received is not None
    assert (received.code, received.reason) == (1001, "the Prefect API did not answer")


def test_a_runner_whose_events_websocket_cannot_reach_the_api_starts_anyway(api_away_gateway):
    """What the close means to Prefect: its events client connects again (the failure is
    one it retries) and, when the API stays away, the runner's event emitter goes on
    without events, as it does when it cannot reach the API itself. With an error close
    during the auth handshake, Prefect gives up at once and the runner exits before the
    flow starts ("An exception occurred.")."""
    from prefect.events.clients import RETRYABLE_EXCEPTIONS, PrefectEventsClient
    from prefect.runner._event_emitter import EventEmitter
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    from prefect_managed.gateway.tokens import run_token

    token = run_token(KEY, uuid4(), 600)
    api_url = f"http://127.0.0.1:{api_away_gateway}/api"

    def events_client() -> PrefectEventsClient:  # as the run's container has it
        return PrefectEventsClient(api_url=api_url, reconnection_attempts=1)

    async def connect() -> BaseException | None:
        try:
            async with events_client():
                return None
        except Exception as exc:
            return exc

    async def start_emitter() -> None:
        async with EventEmitter(
            runner_name="gateway-test", client=None, get_events_client=events_client
        ):
            pass

    with temporary_settings(updates={PREFECT_API_AUTH_STRING: token}):
        failure = anyio.run(connect)
        assert isinstance(failure, RETRYABLE_EXCEPTIONS), repr(failure)
        anyio.run(start_emitter)  # raises on a failure Prefect does not retry


def test_an_api_that_refuses_the_gateways_credential_on_a_websocket_is_said_so(caplog):
    """The API refuses the gateway's own credential on the websocket (a 401 to the
    handshake): not an outage to wait out. The run's websocket is closed with an error
    and the reason, and the worker's log says what to fix."""
    from prefect_managed.gateway.tokens import run_token

    with (
        _gateway_before("refusing") as port,
        caplog.at_level("ERROR", logger="prefect.managed.gateway"),
    ):
        received = _websocket_close(port, "/api/events/in", run_token(KEY, uuid4(), 600))
    assert received is not None
    assert (received.code, received.reason) == (
        1011,
        "the Prefect API refused the gateway's credential",
    )
    assert "refused the gateway's credential: server rejected WebSocket connection: HTTP 401" in (
        caplog.text
    )


def test_a_run_whose_status_reads_as_no_json_gets_a_502_it_retries():
    """The run's status read answers 200 with something that is not JSON (a proxy's
    page): the run's request gets 502, which Prefect's client retries, not a 500."""
    from prefect_managed.gateway.tokens import run_token

    run = uuid4()
    with _gateway_before("garbled") as port:
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/flow_runs/{run}",
            headers={"Authorization": f"Bearer {run_token(KEY, run, 600)}"},
            timeout=30,
        )
    assert response.status_code == 502, response.text
    assert "the Prefect API could not be read" in response.json()["detail"]


def test_answers_are_sent_on_whole_when_small_streamed_when_large_never_compressed():
    """What the gateway does with the API's answers: one of bounded size is read whole
    and sent in one piece (with its length); a large one (a run's logs), one compressed
    all the same (its length does not bound it once decompressed) and one of unknown
    length are streamed on (chunked); and the API is asked for answers it need not
    compress, the gateway need not decompress."""
    from prefect_managed.gateway.tokens import run_token

    run = uuid4()
    headers = {"Authorization": f"Bearer {run_token(KEY, run, 600)}"}
    with _gateway_before("answering") as gateway:
        base = f"http://127.0.0.1:{gateway.port}/api"
        small = httpx.get(f"{base}/flow_runs/{run}", headers=headers, timeout=30)
        large = httpx.post(f"{base}/logs/filter", json={"limit": 200}, headers=headers, timeout=30)
        compressed = httpx.post(f"{base}/flow_runs/filter", json={}, headers=headers, timeout=30)
        unknown = httpx.post(f"{base}/task_runs/filter", json={}, headers=headers, timeout=30)
        encodings = gateway.api.RequestHandlerClass.encodings
    assert small.status_code == 200, small.text
    assert small.json() == {"id": str(run), "state": {"type": "RUNNING"}}
    assert small.headers.get("content-length") == str(len(small.content))
    assert "transfer-encoding" not in small.headers
    assert large.status_code == 200, large.text[:300]
    assert len(large.content) > Gateway.inline_answer_bytes
    assert large.headers.get("transfer-encoding") == "chunked"
    assert len(large.json()) == LARGE_ANSWER_LINES
    # Compressed anyway (about 4 KB, a megabyte once decompressed): never held whole.
    assert compressed.status_code == 200, compressed.text[:300]
    assert compressed.headers.get("transfer-encoding") == "chunked"
    assert "content-encoding" not in compressed.headers
    assert len(compressed.json()) == 1000
    # Of unknown length: streamed.
    assert unknown.status_code == 200 and unknown.json() == []
    assert unknown.headers.get("transfer-encoding") == "chunked"
    # The status read and the run's four reads: none let the API compress.
    assert len(encodings) == 5 and set(encodings) == {"identity"}, encodings
