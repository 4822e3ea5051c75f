"""The run gateway's ASGI application: the Prefect API as a flow run's container sees it.

A reverse proxy on the worker's host in front of the worker's Prefect API. For each
request it: verifies the run token (`tokens`) and that its run has not been over for
long (`RunStatus`); reads the request once (`reading`); decides on that reading
(`routes.decide`); answers the decision's ownership questions by reading the API
(`Ownership`, nothing remembered: who owns a task run can change); and forwards exactly
the path, parameters and body it decided on, with the worker's credential. Websockets:
`/events/in`, each event checked (`events.check_event`) and forwarded as validated, and
`/events/out` (a read). Nothing else.

Bounds, so that one run cannot starve the worker process that hosts the gateway:
`Content-Length` is checked before a body is read and a body is read with a cap and a
deadline; each run has a bounded number of requests in flight and websockets open; a
connection must send a whole request head within `HEAD_SECONDS` (`GuardedH11`), and the
server takes at most `MAX_CONNECTIONS` at once.

It protects only where a flow cannot go around it: the Prefect server must require a
credential the container does not hold (`PREFECT_SERVER_API_AUTH_STRING`); the worker
warns at start when it does not (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter, OrderedDict
from contextlib import AsyncExitStack
from typing import Any
from uuid import UUID

import anyio
import httpx
from prefect.logging import get_logger
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from prefect_managed.gateway.events import ContextCheck, check_event
from prefect_managed.gateway.reading import (
    Reading,
    Unreadable,
    encode_segment,
    read_path,
    read_query,
)
from prefect_managed.gateway.routes import (
    LEASE_RELEASE_ROUTE,
    LEASE_ROUTE,
    RESERVED_ARTIFACT_PREFIX,
    WEBSOCKETS,
    Check,
    Decision,
    Refusal,
    decide,
)
from prefect_managed.gateway.tokens import Bearer, token_from_authorization, token_run

__all__ = ["HEALTH_PATH", "Gateway", "GuardedH11", "Ownership", "peer_proof"]

HEALTH_PATH = "/__prefect_managed_gateway"
#: The largest request body a run may send (Prefect batches logs well under this).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: A body must arrive within this; a request head within HEAD_SECONDS.
BODY_SECONDS = 60.0
HEAD_SECONDS = 10.0
#: Per run: requests in flight, websockets open.
MAX_REQUESTS_PER_RUN = 32
MAX_WEBSOCKETS_PER_RUN = 8
#: Connections the gateway's server takes at once (uvicorn's limit_concurrency).
MAX_CONNECTIONS = 1024
#: A run's token is refused once its flow run has been final for this long (its last
#: logs and events arrive after the final state).
FINAL_GRACE_SECONDS = 120.0
_STATUS_SECONDS = 5.0
_FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
_DEPTH = 16  # subflows of subflows: deeper than anything a run does
#: Distinct runs one request may name, and records read one by one to answer it.
MAX_NAMED = 2000
MAX_READS = 64
_INLINE_BODY_BYTES = 256 * 1024
#: How a run's websocket is closed when the API does not answer the gateway. 1001 (going
#: away), not an error code: the run's client is waiting for the answer to its auth
#: message, and Prefect's events clients take an error close there for a refused
#: credential and give up (a runner starting then exits before its flow starts), but
#: connect again after one that went away, as when the API itself cannot be reached.
_API_AWAY = (1001, "the Prefect API did not answer")
#: ... and when the API refuses the gateway's own credential (the worker's): an error
#: close, as the run's requests get the API's 401 (connecting again would not help).
_CREDENTIAL_REFUSED = "the Prefect API refused the gateway's credential"
_LEASES_PER_RUN = 1000
_FORWARDED_HEADERS = frozenset(
    {"accept", "user-agent", "x-prefect-api-version", "prefect-csrf-token", "prefect-csrf-client"}
)
_PEER_CONTEXT = b"prefect-managed gateway peer\0"
TOKEN_REFUSED = (
    "the request's credential is not a valid run token of this workspace "
    "(PREFECT_API_AUTH_STRING): it is missing, signed with another key, or past its expiry "
    "(the tier's maximum run time and two hours)"
)
logger = get_logger("managed.gateway")


def peer_proof(key: bytes, challenge: str, api_label: str) -> str:
    """What a gateway holding the ledger key answers to `challenge`: another worker
    process of the host trusts the port's holder only when it proves the key."""
    message = _PEER_CONTEXT + challenge.encode() + b"\0" + api_label.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value is not None else None
    except ValueError:
        return None


class Ownership:
    """Answers `Check`s for a run by reading the API at the time of the request.

    Nothing is remembered between requests: a task run's flow run is set by its events,
    so an answer given once may not hold later. Within one request each record is read
    at most once, the task runs it names in batches (`find_task_runs`, Prefect's filter),
    and at most `MAX_READS` records one by one: a request cannot make the gateway read
    the API without bound."""

    def __init__(self, get_json: Any, find_task_runs: Any = None) -> None:
        self._get_json = get_json  # async (path) -> dict | None (None: not found)
        # async (ids) -> {id: record} for the task runs found; one read per id without it
        self._find_task_runs = find_task_runs

    async def owns(self, run: UUID, check: Check) -> bool:
        return await self.unowned(run, (check,)) is None

    async def unowned(self, run: UUID, checks: tuple[Check, ...]) -> Check | None:
        """The first of `checks` the run does not pass, or None."""
        answers = _Answers(self._get_json, run)
        task_runs = {c.id for c in checks if c.kind in ("task_run", "new_or_own_task_run")}
        if len(task_runs) + len(checks) > MAX_NAMED:
            raise Refusal(
                403,
                f"a request may name at most {MAX_NAMED} flow runs and task runs (this one "
                f"names {len(task_runs) + len(checks)}); send them in smaller batches",
            )
        if self._find_task_runs is not None and len(task_runs) > 1:
            found = await self._find_task_runs(sorted(task_runs))
            for task_run in task_runs:
                answers.task_runs[task_run] = found.get(task_run)
        for check in checks:
            if not await answers.passes(check):
                return check
        return None


class _Answers:
    """One request's reads: every record read once, within `MAX_READS`."""

    def __init__(self, get_json: Any, run: UUID) -> None:
        self._get_json = get_json
        self.run = run
        self.reads = 0
        self.flow_runs: dict[UUID, bool] = {run: True}
        self.task_runs: dict[UUID, dict[str, Any] | None] = {}

    async def _read(self, path: str) -> dict[str, Any] | None:
        self.reads += 1
        if self.reads > MAX_READS:
            raise Refusal(
                403,
                f"answering this request would read more than {MAX_READS} records of the "
                "API; send it in smaller parts",
            )
        return await self._get_json(path)

    async def _task_run(self, task_run: UUID) -> dict[str, Any] | None:
        if task_run not in self.task_runs:
            self.task_runs[task_run] = await self._read(f"/task_runs/{task_run}")
        return self.task_runs[task_run]

    async def flow_run(self, flow_run: UUID, depth: int = 0) -> bool:
        if flow_run not in self.flow_runs:
            self.flow_runs[flow_run] = False  # a cycle answers no
            record = await self._read(f"/flow_runs/{flow_run}")
            parent = _uuid((record or {}).get("parent_task_run_id"))
            self.flow_runs[flow_run] = (
                parent is not None and depth < _DEPTH and await self.task_run(parent, depth + 1)
            )
        return self.flow_runs[flow_run]

    async def task_run(self, task_run: UUID, depth: int = 0) -> bool:
        record = await self._task_run(task_run)
        owner = _uuid((record or {}).get("flow_run_id"))
        return owner is not None and await self.flow_run(owner, depth)

    async def passes(self, check: Check) -> bool:
        if check.kind == "flow_run":
            return await self.flow_run(check.id)
        if check.kind == "task_run":
            return await self.task_run(check.id)
        if check.kind == "new_or_own_task_run":
            return await self._task_run(check.id) is None or await self.task_run(check.id)
        if check.kind == "artifact":
            record = await self._read(f"/artifacts/{check.id}")
            owner = _uuid((record or {}).get("flow_run_id"))
            key = str((record or {}).get("key") or "").lower()
            return (
                owner is not None
                and not key.startswith(RESERVED_ARTIFACT_PREFIX)
                and await self.flow_run(owner)
            )
        if check.kind == "inline_flow_run":  # the run's own subflow, with no deployment
            record = await self._read(f"/flow_runs/{check.id}")
            return (
                record is not None
                and record.get("deployment_id") is None
                and check.id != self.run
                and await self.flow_run(check.id)
            )
        if check.kind == "managed_deployment":
            deployment = await self._read(f"/deployments/{check.id}")
            pool = (deployment or {}).get("work_pool_name")
            if not isinstance(pool, str) or not pool:
                return False
            record = await self._read(f"/work_pools/{encode_segment(pool)}")
            return record is not None and record.get("type") == "prefect:managed"
        return False


class RunStatus:
    """Whether a run's flow run has been final for longer than the grace, read from the
    API at most every few seconds per run."""

    def __init__(self, get_json: Any) -> None:
        self._get_json = get_json
        self._seen: dict[UUID, tuple[float, dict[str, Any] | None]] = {}

    async def record(self, run: UUID) -> dict[str, Any] | None:
        now = time.monotonic()
        seen = self._seen.get(run)
        if seen is None or now - seen[0] > _STATUS_SECONDS:
            seen = (now, await self._get_json(f"/flow_runs/{run}"))
            self._seen[run] = seen
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= _STATUS_SECONDS}
        return seen[1]

    async def over(self, run: UUID) -> bool:
        record = await self.record(run)
        if record is None:
            return True  # deleted: nothing left to act for
        state = record.get("state") or {}
        if state.get("type") not in _FINAL:
            return False
        try:
            from datetime import datetime

            stamp = str(state.get("timestamp")).replace("Z", "+00:00")  # Python 3.10 too
            ended = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            return True
        return time.time() - ended > FINAL_GRACE_SECONDS


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head: a connection
    that sends nothing, or trickles a head byte by byte, is closed after
    `HEAD_SECONDS` (uvicorn's own keep-alive timer starts only after a response)."""

    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head(self) -> None:
        self._disarm_head()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_expired)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm_head()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head()
        super().connection_lost(exc)


def _refused_credential(exc: BaseException) -> bool:
    """Whether the API's websocket refused the gateway's credential: a 401 or 403 to the
    handshake, or Prefect's close 1008 to the auth message."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None) in (401, 403):
        return True
    received = getattr(exc, "rcvd", None)
    return received is not None and received.code == 1008


def _refusal(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class _TooLarge(Exception):
    pass


class Gateway:
    """The ASGI application: `api_url` is the worker's Prefect API, `auth_headers` its
    credential, `key` the ledger key that signs run tokens."""

    #: An uncompressed answer of the API up to this size (by its Content-Length) is read
    #: whole and sent on in one piece; a larger one, a compressed one or one of unknown
    #: length is streamed, so a run's logs never sit whole in the worker.
    inline_answer_bytes = 256 * 1024
    #: The encoding the gateway asks the API for (None: httpx's default, gzip and
    #: deflate). Uncompressed: a run's container gets its answers uncompressed anyway,
    #: and compressing each on the server only for the gateway to decompress it costs
    #: both of them CPU (`python -m benchmarks.gateway`).
    upstream_encoding: str | None = "identity"

    def __init__(
        self,
        api_url: str,
        auth_headers: dict[str, str],
        auth_string: str | None,
        key: bytes,
        api_label: str,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_path = httpx.URL(self.api_url).raw_path.rstrip(b"/")
        self._auth_headers = auth_headers
        self._auth_string = auth_string
        self.key = key
        self.api_label = api_label
        self._client: httpx.AsyncClient | None = None
        self.ownership = Ownership(self._get_json, self._find_task_runs)
        self.status = RunStatus(self._get_json)
        self._requests: Counter[UUID] = Counter()
        self._websockets: Counter[UUID] = Counter()
        #: The concurrency leases each run took through this gateway: the only ones it
        #: may renew or give back (lease ids can be read by anyone).
        self._leases: OrderedDict[UUID, set[UUID]] = OrderedDict()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = dict(self._auth_headers)
            if self.upstream_encoding is not None:
                headers["accept-encoding"] = self.upstream_encoding
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(60.0),
                headers=headers,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            )
        return self._client

    async def _get_json(self, path: str) -> dict[str, Any] | None:
        response = await self.client.get(self.api_url + path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        try:
            body = response.json()
        except ValueError as exc:  # read as the API not answering (a 502 to the run)
            raise httpx.DecodingError(str(exc), request=response.request) from exc
        return body if isinstance(body, dict) else None

    async def _find_task_runs(self, ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
        """The task runs of `ids` that exist, read 200 at a time with Prefect's filter."""
        found: dict[UUID, dict[str, Any]] = {}
        for start in range(0, len(ids), 200):
            chunk = [str(i) for i in ids[start : start + 200]]
            response = await self.client.post(
                self.api_url + "/task_runs/filter",
                json={"task_runs": {"id": {"any_": chunk}}, "limit": 200},
            )
            response.raise_for_status()
            for record in response.json():
                if (identifier := _uuid(record.get("id"))) is not None:
                    found[identifier] = record
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope.get("raw_path", b"").split(b"?")[0] == HEALTH_PATH.encode():
                await self._health(Request(scope))(scope, receive, send)
            else:
                await self._http(Request(scope, receive), scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(WebSocket(scope, receive, send))

    def _health(self, request: Request) -> JSONResponse:
        challenge = request.query_params.get("challenge", "")[:128]
        return JSONResponse(
            {
                "gateway": "prefect-managed",
                "api": self.api_label,
                "proof": peer_proof(self.key, challenge, self.api_label) if challenge else None,
            }
        )

    async def _bearer(self, authorization: str | None) -> Bearer | JSONResponse:
        bearer = token_run(self.key, token_from_authorization(authorization))
        if bearer is None:
            return _refusal(401, TOKEN_REFUSED)
        try:
            over = await self.status.over(bearer.run)
        except httpx.HTTPError as exc:
            return _refusal(502, f"the Prefect API could not be read: {exc}")
        if over:
            return _refusal(
                401,
                f"the flow run {bearer.run} is over, so its token no longer acts for it",
            )
        return bearer

    async def _http(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        bearer = await self._bearer(request.headers.get("authorization"))
        if isinstance(bearer, Response):
            await bearer(scope, receive, send)
            return
        run = bearer.run
        if self._requests[run] >= MAX_REQUESTS_PER_RUN:
            refusal = _refusal(
                429, f"flow run {run} has {MAX_REQUESTS_PER_RUN} requests in flight already"
            )
            await refusal(scope, receive, send)
            return
        # Counted until the answer has been sent (a streamed answer included).
        self._requests[run] += 1
        try:
            response = await self._decide_and_forward(request, run)
            await response(scope, receive, send)
        finally:
            self._requests[run] -= 1
            if self._requests[run] <= 0:
                del self._requests[run]

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(400, f"Content-Length {declared!r} is not a number")
            if int(declared) > MAX_BODY_BYTES:
                raise Refusal(
                    413,
                    f"a request body must be at most {MAX_BODY_BYTES} bytes (this one declares "
                    f"{declared}); send smaller batches",
                )
        chunks, size = [], 0
        try:
            with anyio.fail_after(BODY_SECONDS):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise _TooLarge
                    chunks.append(chunk)
        except _TooLarge:
            raise Refusal(
                413, f"a request body must be at most {MAX_BODY_BYTES} bytes; send smaller batches"
            ) from None
        except TimeoutError:
            raise Refusal(408, f"the request body took longer than {BODY_SECONDS:.0f} s") from None
        except ClientDisconnect:
            raise Refusal(400, "the client went away mid-body") from None
        return b"".join(chunks)

    async def _decide_and_forward(self, request: Request, run: UUID) -> Response:
        method = request.method
        try:
            reading = Reading(
                method,
                read_path(request.scope.get("raw_path") or request.scope["path"].encode()),
                read_query(request.scope.get("query_string", b"")),
            )
            body = await self._read_body(request)
            if len(body) > _INLINE_BODY_BYTES:  # validating a large batch takes a while
                decision = await anyio.to_thread.run_sync(decide, reading, run, body)
            else:
                decision = decide(reading, run, body)
            await self._check(run, decision.checks)
        except Unreadable as exc:
            return self._refuse(run, method, request.scope.get("raw_path"), 400, str(exc))
        except Refusal as exc:
            return self._refuse(run, method, request.scope.get("raw_path"), exc.status, exc.reason)
        except httpx.HTTPError as exc:
            return _refusal(502, f"the Prefect API could not be read: {exc}")
        return await self._forward(method, decision, request, run)

    async def _check(self, run: UUID, checks: tuple[Check, ...]) -> None:
        for lease in (c.id for c in checks if c.kind == "lease"):
            if lease not in self._leases.get(run, ()):
                raise Refusal(
                    403,
                    f"the concurrency lease {lease} was not taken by this flow run through "
                    "this gateway: a flow run renews and gives back only its own leases",
                )
        checks = tuple(c for c in checks if c.kind != "lease")
        if not checks:
            return
        check = await self.ownership.unowned(run, checks)
        if check is None:
            return
        if check.kind == "managed_deployment":
            raise Refusal(
                403,
                f"the deployment {check.id} is not in a managed work pool: a flow run may "
                "start runs of managed deployments only",
            )
        if check.kind == "inline_flow_run":
            raise Refusal(
                403,
                f"the flow run {check.id} is not a subflow this run runs in its own process: "
                "a flow run may move only those back to Scheduled or Pending (a deployment's "
                "run goes back to its pool's workers)",
            )
        what = check.kind.removeprefix("new_or_own_").replace("_", " ")
        raise Refusal(
            403,
            f"the {what} {check.id} is not this flow run's: a flow run changes only its own "
            "run, its subflow runs and their task runs, logs and artifacts",
        )

    async def _forward(
        self, method: str, decision: Decision, request: Request, run: UUID
    ) -> Response:
        url = httpx.URL(self.api_url + decision.path, params=list(decision.query))
        if url.raw_path.split(b"?")[0] != self._api_path + decision.path.encode():
            # The client would send another path than the one decided on: never forward.
            return _refusal(400, "the request's path does not survive forwarding unchanged")
        headers = {
            key: value
            for key, value in request.headers.items()
            if key.lower() in _FORWARDED_HEADERS
        }
        if decision.body is not None:
            headers["content-type"] = (
                request.headers.get("content-type", "application/json")
                if decision.read
                else "application/json"
            )
        try:
            upstream = await self.client.send(
                self.client.build_request(method, url, content=decision.body, headers=headers),
                stream=True,
            )
        except httpx.HTTPError as exc:
            return _refusal(502, f"the Prefect API did not answer: {exc}")
        reply_headers = {
            key: value
            for key, value in upstream.headers.items()
            if key.lower() in ("content-type", "location", "retry-after")
        }
        length = upstream.headers.get("content-length", "")
        lease = decision.route in (LEASE_ROUTE, LEASE_RELEASE_ROUTE)
        # Its length bounds what is held only when the answer is not compressed (an API,
        # or a proxy in front of it, may compress anyway): else it is streamed.
        plain = upstream.headers.get("content-encoding", "identity").strip().lower() == "identity"
        if lease or (plain and length.isdigit() and int(length) <= self.inline_answer_bytes):
            try:
                content = await upstream.aread()
            except httpx.HTTPError as exc:
                return _refusal(502, f"the Prefect API did not answer: {exc}")
            finally:
                await upstream.aclose()
            if lease:
                self._remember_lease(run, decision, upstream.status_code, content)
            return Response(content, upstream.status_code, reply_headers)
        # Streamed back: a large answer (a run's logs) never sits whole in the worker.
        return StreamingResponse(
            upstream.aiter_bytes(),
            upstream.status_code,
            reply_headers,
            background=BackgroundTask(upstream.aclose),
        )

    def _remember_lease(self, run: UUID, decision: Decision, status: int, content: bytes) -> None:
        if not 200 <= status < 300:
            return
        try:
            if decision.route == LEASE_ROUTE:
                lease = UUID(str(json.loads(content)["lease_id"]))
                leases = self._leases.setdefault(run, set())
                leases.add(lease)
                if len(leases) > _LEASES_PER_RUN:
                    leases.pop()
                self._leases.move_to_end(run)
                if len(self._leases) > 10_000:
                    self._leases.popitem(last=False)
            else:
                lease = UUID(str(json.loads(decision.body or b"{}")["lease_id"]))
                self._leases.get(run, set()).discard(lease)
        except (ValueError, KeyError, TypeError):
            logger.warning("Could not read the lease of flow run %s's %s", run, decision.route)

    def _refuse(self, run: UUID, method: str, raw: Any, status: int, reason: str) -> JSONResponse:
        path = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        logger.warning("Refused %s %s for flow run %s: %s", method, path[:300], run, reason)
        return _refusal(status, reason)

    # --- websockets ----------------------------------------------------------------

    async def _websocket(self, websocket: WebSocket) -> None:
        try:
            segments = read_path(websocket.scope.get("raw_path") or b"")
        except Unreadable:
            segments = ()
        path = "/" + "/".join(segments)
        protocols = [
            item.strip()
            for header in websocket.headers.getlist("sec-websocket-protocol")
            for item in header.split(",")
        ]
        if path not in WEBSOCKETS or "prefect" not in protocols:
            await websocket.close(1008, f"a flow run may open {', '.join(WEBSOCKETS)} only")
            return
        await websocket.accept(subprotocol="prefect")
        try:
            with anyio.fail_after(HEAD_SECONDS):
                message = await websocket.receive_json()
        except (WebSocketDisconnect, ValueError, RecursionError, TimeoutError, KeyError):
            await self._close(websocket, 1008, "authenticate first")
            return
        token = message.get("token") if isinstance(message, dict) else None
        bearer = await self._bearer(f"Bearer {token}" if isinstance(token, str) else None)
        if isinstance(bearer, JSONResponse) and bearer.status_code == 502:
            # The run's status could not be read: the API is away, the token not refused.
            await self._close(websocket, *_API_AWAY)
            return
        if (
            not isinstance(message, dict)
            or message.get("type") != "auth"
            or not isinstance(bearer, Bearer)
        ):
            await self._close(websocket, 1008, "Invalid token")
            return
        run = bearer.run
        if self._websockets[run] >= MAX_WEBSOCKETS_PER_RUN:
            await self._close(websocket, 1008, f"{MAX_WEBSOCKETS_PER_RUN} websockets open already")
            return
        self._websockets[run] += 1
        try:
            await self._upstream(websocket, path, run)
        finally:
            self._websockets[run] -= 1
            if self._websockets[run] <= 0:
                del self._websockets[run]

    async def _close(self, websocket: WebSocket, code: int, reason: str) -> None:
        try:
            await websocket.close(code, reason)
        except (RuntimeError, WebSocketDisconnect):
            pass

    async def _upstream(self, websocket: WebSocket, path: str, run: UUID) -> None:
        scheme = "wss" if self.api_url.startswith("https") else "ws"
        url = scheme + self.api_url.removeprefix("https").removeprefix("http") + path
        from prefect._internal.websockets import websocket_connect
        from websockets.exceptions import WebSocketException
        from websockets.typing import Subprotocol

        async with AsyncExitStack() as stack:
            try:
                upstream = await stack.enter_async_context(
                    websocket_connect(
                        url,
                        subprotocols=[Subprotocol("prefect")],
                        additional_headers=self._auth_headers,
                    )
                )
                await upstream.send(json.dumps({"type": "auth", "token": self._auth_string}))
                reply = json.loads(await upstream.recv())
            except (OSError, asyncio.TimeoutError, WebSocketException, ValueError) as exc:
                if not _refused_credential(exc):
                    # Refused, or closed mid-handshake (an API process killed behind a
                    # proxy), or an answer that is not Prefect's.
                    logger.warning("The Prefect API's websocket %s did not answer: %s", url, exc)
                    await self._close(websocket, *_API_AWAY)
                    return
                reply = str(exc)  # a 401 or 403, or Prefect's close for a bad token
            if not isinstance(reply, dict) or reply.get("type") != "auth_success":
                logger.error(
                    "The Prefect API's websocket %s refused the gateway's credential: %s",
                    url,
                    str(reply)[:300],
                )
                await self._close(websocket, 1011, _CREDENTIAL_REFUSED)
                return
            try:
                await websocket.send_json({"type": "auth_success"})
            except (WebSocketDisconnect, RuntimeError):
                return  # the run went away meanwhile
            await self._relay(websocket, upstream, run, events_in=path == "/events/in")

    async def _relay(self, websocket: WebSocket, upstream: Any, run: UUID, events_in: bool) -> None:
        from websockets.exceptions import ConnectionClosed

        async def inbound() -> None:
            try:
                while True:
                    text = await websocket.receive_text()
                    if events_in:
                        forwarded = await self._event(run, text)
                        if forwarded is None:
                            continue
                        text = forwarded
                    await upstream.send(text)
            except (WebSocketDisconnect, ConnectionClosed, KeyError):
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
        await self._close(websocket, 1000, "")

    async def _event(self, run: UUID, text: str) -> str | None:
        """The event to forward (as validated), or None when it is dropped."""
        try:
            event, checks, flow_runs, context = check_event(json.loads(text))
            await self._check(run, checks)
            await self._check_context(flow_runs, context)
        except (ValueError, RecursionError):
            reason = "not JSON"
        except Refusal as exc:
            reason = exc.reason
        except httpx.HTTPError as exc:
            reason = f"the Prefect API could not be read: {exc}"
        else:
            return event.model_dump_json()
        logger.warning("Dropped an event from flow run %s: %s", run, reason)
        return None

    async def _check_context(self, flow_runs: set[UUID], context: tuple[ContextCheck, ...]) -> None:
        if not context:
            return
        records = [await self.status.record(flow_run) for flow_run in sorted(flow_runs)]
        for claim in context:
            if not any(str((r or {}).get(claim.field)) == str(claim.value) for r in records):
                raise Refusal(
                    403,
                    f"the event names a {claim.field.removesuffix('_id')} {claim.value} of no "
                    "flow run of this run's",
                )
