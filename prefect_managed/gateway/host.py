"""The run gateway's place on the worker's host: one gateway per host and Prefect API.

The first worker process binds `127.0.0.1:<runtime.api_gateway_port>` and serves the
gateway (`app.Gateway`) there, with the isolated network's tunnel
(`tunnel.TunnelServer`); the others find it there and bind the port themselves as soon
as its process goes away, so a container keeps its API and its tunnel through a
worker's restart. A process on the port counts as a peer only when it proves it holds
the ledger key (it answers a fresh challenge on `HEALTH_PATH` with `app.peer_proof`):
under host networking a run's container could bind the port in the moment its holder is
gone, and a worker that took it for a peer would leave every run's token to it.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import secrets
import socket
import threading
from typing import Any

import httpx
from prefect.logging import get_logger

from prefect_managed.exceptions import ApiOpenWithoutCredential
from prefect_managed.gateway.app import (
    HEAD_SECONDS,
    HEALTH_PATH,
    MAX_CONNECTIONS,
    Gateway,
    GuardedH11,
    peer_proof,
)
from prefect_managed.gateway.port import run_gateway_port
from prefect_managed.gateway.tunnel import TunnelServer, tunnel_directory
from prefect_managed.policy_runtime import Runtime
from prefect_managed.runtime.forward import listener

__all__ = [
    "RunGateway",
    "api_open_without_credential",
    "auth_headers",
    "check_boundary",
    "serve_run_gateway",
    "start_run_gateway",
]

logger = get_logger("managed.gateway")


def auth_headers(auth_string: str | None, api_key: str | None) -> dict[str, str]:
    """The Authorization header Prefect's client sends for these settings."""
    if auth_string:
        return {"Authorization": f"Basic {base64.b64encode(auth_string.encode()).decode()}"}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


class RunGateway:
    """The gateway of this process, on `127.0.0.1:port`: bound by `ensure`, or found
    served by another worker process of the host."""

    def __init__(self, port: int, gateway: Gateway) -> None:
        self.port = port
        self.gateway = gateway
        self._thread: threading.Thread | None = None
        self._server: Any = None
        # Isolated runs' connections (gateway.tunnel): served with the port.
        self.tunnel = TunnelServer(tunnel_directory(port), gateway.key)
        # The peer checks' client, made once: a new client builds a TLS context (the CA
        # bundle read again), which was most of the CPU of a check every 2 s.
        self._peer_client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def keep(self, interval: float = 2.0) -> None:
        """While another process serves the port, watch it and bind the port as soon
        as that process is gone (a daemon thread)."""

        def watch() -> None:
            pause = threading.Event()
            while not self.serving:
                pause.wait(interval)
                try:
                    if self.ensure() == "bound":
                        logger.info(
                            "Run gateway bound on %s (its previous holder is gone)", self.url
                        )
                except OSError as exc:
                    logger.warning("Run gateway on %s: %s", self.url, exc)

        threading.Thread(target=watch, name="prefect-managed-gateway-watch", daemon=True).start()

    def ensure(self) -> str:
        """Make sure the port serves this API's gateway: bind it, or find another worker
        process's gateway there. Returns "bound" or "shared". Raises `OSError` when
        something else holds the port."""
        if self.serving:
            return "bound"
        try:
            sock = listener("127.0.0.1", self.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if self._peer_serves():
                return "shared"
            raise OSError(
                errno.EADDRINUSE,
                f"the run gateway's port {self.port} on 127.0.0.1 is held by something "
                "that does not prove it is a gateway of this Prefect API with this ledger key "
                "(another program, or a flow run's container that bound the port); stop it or "
                "set runtime.api_gateway_port to a free port (1024-65535) in the policy",
            ) from exc
        self._start(sock)
        return "bound"

    def _peer_serves(self) -> bool:
        """Whether the port's holder proves it holds the ledger key (a fresh challenge:
        an answer seen before is worth nothing)."""
        challenge = secrets.token_hex(16)
        label = self.gateway.api_label
        if self._peer_client is None:
            self._peer_client = httpx.Client(timeout=3, trust_env=False)  # loopback: no proxy
        try:
            reply = self._peer_client.get(
                f"http://127.0.0.1:{self.port}{HEALTH_PATH}", params={"challenge": challenge}
            ).json()
        except (httpx.HTTPError, ValueError):
            return False
        if not isinstance(reply, dict) or reply.get("api") != label:
            return False
        proof = reply.get("proof")
        return isinstance(proof, str) and hmac.compare_digest(
            proof, peer_proof(self.gateway.key, challenge, label)
        )

    def _start(self, sock: socket.socket) -> None:
        import uvicorn

        _raise_file_limit()
        config = uvicorn.Config(
            self.gateway,
            log_level="warning",
            lifespan="off",
            http=GuardedH11,
            ws="websockets-sansio",
            access_log=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=int(HEAD_SECONDS),
        )
        server = uvicorn.Server(config)
        self._server = server

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="prefect-managed-gateway", daemon=True)
        self._thread.start()
        pause = threading.Event()
        while not server.started and self._thread.is_alive():
            pause.wait(0.02)
        try:
            self.tunnel.start()
        except OSError as exc:
            logger.error("Isolated runs cannot reach anything: %s", exc)

    def stop(self) -> None:
        self.tunnel.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None


def _raise_file_limit() -> None:
    """The process's soft limit on open files up to its hard limit (a common soft limit of
    1024 is below what the gateway's connections, the tunnel's and the worker's Docker
    and Prefect clients need together)."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logger.debug("Could not raise the open files limit: %s", exc)


_process_gateway: RunGateway | None = None
_process_lock = threading.Lock()


def start_run_gateway(port: int, key: bytes) -> tuple[RunGateway, str]:
    """The gateway of this process for the worker's Prefect API, started once per
    process: ("bound", ...) or ("shared", ...) when another worker process of the host
    serves it (then this one takes the port over if that process goes away)."""
    global _process_gateway
    from prefect.settings import get_current_settings

    from prefect_managed.configuration import api_label_value

    with _process_lock:
        if _process_gateway is not None and _process_gateway.port == port:
            return _process_gateway, "bound" if _process_gateway.serving else "shared"
        api = get_current_settings().api
        auth_string = api.auth_string.get_secret_value() if api.auth_string else None
        api_key = api.key.get_secret_value() if api.key else None
        gateway = Gateway(
            str(api.url or ""),
            auth_headers(auth_string, api_key),
            auth_string,
            key,
            api_label_value(),
        )
        run_gateway = RunGateway(port, gateway)
        how = run_gateway.ensure()
        if how == "shared":
            run_gateway.keep()
        _process_gateway = run_gateway
        return run_gateway, how


def api_open_without_credential(api_url: str) -> bool:
    """Whether the Prefect API answers a request that carries no credential: then a flow
    run can reach it directly and the gateway protects nothing."""
    try:
        return httpx.get(f"{api_url.rstrip('/')}/admin/version", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def serve_run_gateway(runtime: Runtime, key: bytes, worker_logger: Any) -> RunGateway:
    """A worker's start with the run gateway on: the host's gateway served here or found
    served, said in the worker's log."""
    gateway, how = start_run_gateway(run_gateway_port(runtime), key)
    worker_logger.info(
        "Flow runs reach the Prefect API through the run gateway on %s (%s)",
        gateway.url,
        "served here" if how == "bound" else "served by another worker process of this host",
    )
    return gateway


#: What each opt-out of the boundary gives away, said at every start of a worker that
#: has it (docs/security.md has the same table).
GATEWAY_OFF = (
    "The run gateway is off (runtime.api_gateway_port = 0): each flow run's container "
    "holds this worker's Prefect credential, so a flow can delete usage records and "
    "change other runs, deployments, limits, blocks and variables"
)
NETWORK = {
    "host": (
        "Flow runs use the host's network (runtime.network_mode = 'host'): a flow reaches "
        "every service on this host's loopback and every address the host reaches"
    ),
    "bridge": (
        "Flow runs use Docker's bridge network (runtime.network_mode = 'bridge'): a flow "
        "reaches every address the host reaches"
    ),
}
TRUSTED_CODE_ONLY = (
    "The Prefect API %s answers without a credential and the policy says every flow is "
    "trusted (runtime.trusted_code_only): any flow run can reach the API directly and "
    "edit the workspace's books"
)


def check_boundary(runtime: Runtime, worker_logger: Any) -> None:
    """At a worker's start: refuse the Prefect API of this process's settings when it
    answers without a credential (unless the policy says every flow is trusted), and warn
    of each part of the boundary the policy turns off. Raises `ApiOpenWithoutCredential`
    naming the policy file."""
    from prefect.settings import PREFECT_API_URL

    from prefect_managed.settings import get_settings

    api_url = str(PREFECT_API_URL.value() or "")
    if api_open_without_credential(api_url):
        if not runtime.trusted_code_only:
            raise ApiOpenWithoutCredential(api_url, get_settings().resolved_policy_file())
        worker_logger.warning(TRUSTED_CODE_ONLY, api_url)
    if not runtime.gateway_on:
        worker_logger.warning(GATEWAY_OFF)
    if runtime.network_mode in NETWORK:
        worker_logger.warning(NETWORK[runtime.network_mode])
