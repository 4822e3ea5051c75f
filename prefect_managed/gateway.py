"""The run gateway: the Prefect API as a flow run's container sees it.

A reverse proxy on the worker's host (`127.0.0.1:<runtime.api_gateway_port>`) in front of
the worker's Prefect API. A run's container gets the gateway's URL and a run token
(`gateway_rules.run_token`) instead of the worker's credential; the gateway checks each
request against `gateway_rules.decide`, answers its ownership questions by reading the API
with the worker's credential, and forwards what is allowed with that credential. Events
(`/events/in`) are relayed one by one, only those about the run's own flow runs.

It protects only where a flow cannot go around it: the Prefect server must require a
credential the container does not hold (`PREFECT_SERVER_API_AUTH_STRING`); the worker
warns at start when it does not (see docs/security.md).

One gateway serves every worker of a host that shares the API and the ledger key: the
first worker process binds the port; the others find it there (`/__prefect_managed_gateway`
names the API it serves) and bind it themselves when it goes away, so a container keeps
its API through a worker's restart (`gateway_host`, which also serves the isolated
network's tunnel).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import anyio
import httpx
from prefect.logging import get_logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from prefect_managed.gateway_rules import (
    RESERVED_ARTIFACT_PREFIX,
    Check,
    decide,
    event_flow_runs,
    token_from_authorization,
    token_run,
)

__all__ = ["HEALTH_PATH", "Gateway", "Ownership"]

HEALTH_PATH = "/__prefect_managed_gateway"
#: The largest request body a run may send (Prefect batches logs well under this).
MAX_BODY_BYTES = 32 * 1024 * 1024
_HOP_BY_HOP = {
    "authorization",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "accept-encoding",
    "te",
    "trailer",
    "proxy-authorization",
}
_DEPTH = 16  # subflows of subflows: deeper than anything a run does
_CACHE_SIZE = 10_000
logger = get_logger("managed.gateway")


class Ownership:
    """Answers `Check`s for a run by reading the API, and remembers the answers (who
    owns a flow run, task run or artifact never changes)."""

    def __init__(self, get_json: Any) -> None:
        self._get_json = get_json  # async (path) -> dict | None (None: not found)
        self._known: OrderedDict[tuple[UUID, str, UUID], bool] = OrderedDict()

    async def owns(self, run: UUID, check: Check, depth: int = 0) -> bool:
        if check.kind == "flow_run" and check.id == run:
            return True
        key = (run, check.kind, check.id)
        if key in self._known:
            self._known.move_to_end(key)
            return self._known[key]
        answer = depth < _DEPTH and await self._ask(run, check, depth)
        self._known[key] = answer
        if len(self._known) > _CACHE_SIZE:
            self._known.popitem(last=False)
        return answer

    async def _ask(self, run: UUID, check: Check, depth: int) -> bool:
        record = await self._get_json(f"/{check.kind}s/{check.id}")
        if record is None:
            return False
        if check.kind == "flow_run":
            parent = _uuid(record.get("parent_task_run_id"))
            return parent is not None and await self.owns(run, Check("task_run", parent), depth + 1)
        if check.kind == "artifact" and str(record.get("key") or "").startswith(
            RESERVED_ARTIFACT_PREFIX
        ):
            return False
        flow_run = _uuid(record.get("flow_run_id"))
        return flow_run is not None and await self.owns(run, Check("flow_run", flow_run), depth + 1)


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _refusal(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class Gateway:
    """The ASGI application: `api_url` is the worker's Prefect API, `auth_headers` its
    credential, `key` the ledger key that signs run tokens."""

    def __init__(
        self,
        api_url: str,
        auth_headers: dict[str, str],
        auth_string: str | None,
        key: bytes,
        api_label: str,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._auth_headers = auth_headers
        self._auth_string = auth_string
        self.key = key
        self.api_label = api_label
        self._client: httpx.AsyncClient | None = None
        self.ownership = Ownership(self._get_json)
        self.app = Starlette(
            routes=[
                Route(HEALTH_PATH, self._health),
                WebSocketRoute("/api/{path:path}", self._websocket),
                Route(
                    "/api/{path:path}",
                    self._http,
                    methods=["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"],
                ),
            ],
        )

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(60.0), headers=self._auth_headers
            )
        return self._client

    async def _get_json(self, path: str) -> dict[str, Any] | None:
        response = await self.client.get(self.api_url + path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        return body if isinstance(body, dict) else None

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse({"gateway": "prefect-managed", "api": self.api_label})

    async def _http(self, request: Request) -> Response:
        run = token_run(self.key, token_from_authorization(request.headers.get("authorization")))
        if run is None:
            return _refusal(401, "a flow run's token is required (PREFECT_API_AUTH_STRING)")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _refusal(413, f"request body over {MAX_BODY_BYTES} bytes")
        path = request.path_params["path"]
        parsed: Any = None
        if body and request.method not in ("GET", "HEAD"):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        decision = decide(request.method, path, parsed)
        if decision.allowed:
            try:
                for check in decision.checks:
                    if not await self.ownership.owns(run, check):
                        return self._refuse(
                            run,
                            request.method,
                            path,
                            f"the {check.kind.replace('_', ' ')} {check.id} is not this "
                            f"flow run's: a flow run changes only its own run, its subflow "
                            "runs and their task runs, logs and artifacts",
                        )
            except httpx.HTTPError as exc:
                return _refusal(502, f"the Prefect API could not be read: {exc}")
        else:
            return self._refuse(run, request.method, path, decision.reason)
        headers = {
            key: value for key, value in request.headers.items() if key.lower() not in _HOP_BY_HOP
        }
        try:
            upstream = await self.client.request(
                request.method,
                f"{self.api_url}/{path}",
                params=request.url.query or None,
                content=body or None,
                headers=headers,
            )
        except httpx.HTTPError as exc:
            return _refusal(502, f"the Prefect API did not answer: {exc}")
        reply_headers = {
            key: value
            for key, value in upstream.headers.items()
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-encoding"
        }
        return Response(upstream.content, upstream.status_code, reply_headers)

    def _refuse(self, run: UUID, method: str, path: str, reason: str) -> JSONResponse:
        logger.warning("Refused %s /api/%s for flow run %s: %s", method, path, run, reason)
        return _refusal(403, reason)

    async def _websocket(self, websocket: WebSocket) -> None:
        protocols = [
            item.strip()
            for header in websocket.headers.getlist("sec-websocket-protocol")
            for item in header.split(",")
        ]
        if "prefect" not in protocols:
            await websocket.close(1008, "the 'prefect' subprotocol is required")
            return
        await websocket.accept(subprotocol="prefect")
        try:
            message = await websocket.receive_json()
        except (WebSocketDisconnect, ValueError):
            return
        run = token_run(self.key, message.get("token") if isinstance(message, dict) else None)
        if not isinstance(message, dict) or message.get("type") != "auth" or run is None:
            await websocket.close(1008, "Invalid token")
            return
        path = websocket.path_params["path"]
        query = websocket.url.query
        parts = urlsplit(f"{self.api_url}/{path}")
        url = urlunsplit(
            ("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path, query, "")
        )
        from prefect._internal.websockets import websocket_connect
        from websockets.typing import Subprotocol

        try:
            async with websocket_connect(
                url, subprotocols=[Subprotocol("prefect")], additional_headers=self._auth_headers
            ) as upstream:
                await upstream.send(json.dumps({"type": "auth", "token": self._auth_string}))
                reply = json.loads(await upstream.recv())
                if reply.get("type") != "auth_success":
                    await websocket.close(1011, "the gateway could not authenticate upstream")
                    return
                await websocket.send_json({"type": "auth_success"})
                await self._relay(websocket, upstream, run, filter_events=path == "events/in")
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("The Prefect API's websocket %s did not answer: %s", url, exc)
            await websocket.close(1011, "the Prefect API did not answer")

    async def _relay(
        self, websocket: WebSocket, upstream: Any, run: UUID, filter_events: bool
    ) -> None:
        from websockets.exceptions import ConnectionClosed

        async def inbound() -> None:
            try:
                while True:
                    text = await websocket.receive_text()
                    if filter_events and not await self._event_allowed(run, text):
                        continue
                    await upstream.send(text)
            except (WebSocketDisconnect, ConnectionClosed):
                pass
            tasks.cancel_scope.cancel()

        async def outbound() -> None:
            try:
                async for message in upstream:
                    if isinstance(message, bytes):
                        await websocket.send_bytes(message)
                    else:
                        await websocket.send_text(message)
            except (WebSocketDisconnect, ConnectionClosed, RuntimeError):
                pass
            tasks.cancel_scope.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(inbound)
            tasks.start_soon(outbound)
        try:
            await websocket.close()
        except (RuntimeError, WebSocketDisconnect):
            pass  # already closed by the client

    async def _event_allowed(self, run: UUID, text: str) -> bool:
        try:
            event = json.loads(text)
        except ValueError:
            return False
        for flow_run in event_flow_runs(event):
            try:
                if await self.ownership.owns(run, Check("flow_run", flow_run)):
                    return True
            except httpx.HTTPError:
                return False
        logger.warning(
            "Dropped event %r from flow run %s: it names none of the run's own flow runs",
            event.get("event") if isinstance(event, dict) else None,
            run,
        )
        return False
