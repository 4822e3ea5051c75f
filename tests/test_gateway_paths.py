"""The run gateway's one reading of a request, driven as an attacker would: the whole ASGI
application, request paths generated in many encodings (dot segments, encoded slashes,
`#` and `?`, double escapes, control characters, case and convertor tricks), and the
upstream Prefect API replaced by a transport that records what the gateway sends.

The property: whatever is forwarded is one request on a route of the allow-list, and the
server, reading the forwarded path as it does (uvicorn decodes it, Starlette matches it
against Prefect's templates), finds the route and parameters the gateway decided on.
Anything else is refused without a byte reaching the API."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote
from uuid import uuid4

import anyio
import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.routing import compile_path

from prefect_managed.gateway.app import MAX_BODY_BYTES, Gateway, Ownership, RunStatus
from prefect_managed.gateway.reading import Reading, read_path
from prefect_managed.gateway.routes import ROUTES, match
from prefect_managed.gateway.tokens import run_token

KEY = b"k" * 32
RUN = uuid4()
OTHER = uuid4()
API = "http://127.0.0.1:4200/api"
TOKEN = run_token(KEY, RUN, 3600)
#: The server's reading: Starlette's compiled template per route of the allow-list.
SERVER_ROUTES = [(route, *compile_path(route.template)) for route in ROUTES]


class Recorder:
    """The upstream API: records each forwarded request, answers 200 (`answer`)."""

    def __init__(self, answer: Any = None) -> None:
        self.sent: list[httpx.Request] = []
        self.answer = {} if answer is None else answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return httpx.Response(200, json=self.answer)


async def _records(path: str) -> dict[str, Any] | None:
    """Ownership and status reads: the run is Running; nothing else exists."""
    if path == f"/flow_runs/{RUN}":
        return {"id": str(RUN), "state": {"type": "RUNNING", "timestamp": "2026-12-04T00:00:00Z"}}
    return None


def _gateway(recorder: Recorder) -> Gateway:
    gateway = Gateway(API, {"Authorization": "Basic worker"}, "worker", KEY, "api")
    gateway.ownership = Ownership(_records)
    gateway.status = RunStatus(_records)
    gateway._client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    return gateway


def call(
    method: str,
    raw_path: bytes,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    recorder: Recorder | None = None,
    gateway: Gateway | None = None,
) -> tuple[int, dict[str, Any], list[httpx.Request]]:
    """One request through the application, as uvicorn would hand it over."""
    recorder = recorder or Recorder()
    gateway = gateway or _gateway(recorder)
    raw, _, query = raw_path.partition(b"?")
    sent_headers = {"authorization": f"Bearer {TOKEN}", **(headers or {})}
    if body and "content-length" not in sent_headers:
        sent_headers["content-length"] = str(len(body))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw.decode("latin-1")),
        "raw_path": raw,
        "query_string": query,
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in sent_headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
    replies: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    anyio.run(gateway, scope, receive, send)
    status = next(m["status"] for m in replies if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    return status, json.loads(content or b"{}"), recorder.sent


def server_reading(method: str, raw_path: bytes) -> tuple[Any, dict[str, Any]] | None:
    """The route and parameters the Prefect server finds for a forwarded path."""
    path = unquote(raw_path.decode("ascii"))
    assert path.startswith("/api/")
    found = []
    for route, regex, _, convertors in SERVER_ROUTES:
        hit = regex.match(path[len("/api") :])
        if route.method == method and hit:
            params = {k: convertors[k].convert(v) for k, v in hit.groupdict().items()}
            found.append((route, params))
    found.sort(key=lambda item: -item[0].literals)
    return found[0] if found else None


PIECES = [
    "flow_runs", "task_runs", "deployments", "artifacts", "labels", "set_state", "filter",
    "v2", "concurrency_limits", "work_pools", "block_documents", "variables", "admin",
    "settings", "events", "latest", str(RUN), str(OTHER), str(RUN).upper(), "..", ".",
    "%2e%2e", "%2E%2e", ".%2e", "%2e", "%2f", "%2F", "%5c", "%5C", "%23", "%3f", "%3F",
    "%00", "%0a", "%25", "%252e%252e", "%ff", "%C0%AE", "a%20b", "", "~", ";", "@",
]  # fmt: skip
#: Bodies a rule accepts, so that writes are forwarded too (with the run's own ids).
GOOD_BODIES = {
    "/flow_runs/{id:uuid}/set_state": {"state": {"type": "RUNNING"}},
    "/flow_runs/{id:uuid}": {"name": "renamed"},
    "/flow_runs/{id:uuid}/labels": {"team": "a"},
    "/flows/": {"name": "child"},
    "/v2/concurrency_limits/increment": {"names": ["db"], "slots": 1},
    "/v2/concurrency_limits/increment-with-lease": {"names": ["db"], "slots": 1},
    "/v2/concurrency_limits/decrement": {"names": ["db"], "slots": 1},
    "/v2/concurrency_limits/decrement-with-lease": {"lease_id": str(OTHER)},
    "/v2/concurrency_limits/leases/{lease_id:uuid}/renew": {"lease_duration": 300},
    "/flow_runs/{id:uuid}/input": {"key": "k", "value": "v"},
    "/flow_runs/{id:uuid}/resume": {},
}
BODIES = [
    b"",
    b"{}",
    json.dumps({"state": {"type": "SCHEDULED"}, "force": True}).encode(),
    json.dumps({"infrastructure_pid": "x:victim"}).encode(),
    json.dumps({"names": ["prefect-managed-ws"], "slots": 1}).encode(),
]


def _encode_one(segment: str, index: int, upper: bool) -> str:
    """`segment` with its character at `index` %-escaped (a spelling of the same path)."""
    if not segment or segment[index % len(segment)] == "%":
        return segment
    at = index % len(segment)
    escape = "".join(f"%{byte:02{'X' if upper else 'x'}}" for byte in segment[at].encode())
    return segment[:at] + escape + segment[at + 1 :]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """A route of the allow-list, filled in, then mutated: segments inserted or replaced
    (dot segments, escapes, other ids), characters %-escaped, another method."""
    route = draw(st.sampled_from(ROUTES))
    uuids = st.sampled_from([str(RUN), str(OTHER), str(RUN).upper()])
    names = st.sampled_from(["my-pool", "a%20b", "prefect-managed-ws", str(RUN)])
    segments = [
        part if not part.startswith("{") else draw(uuids if ":uuid" in part else names)
        for part in route.parts
    ]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(segments)))
        kind = draw(st.sampled_from(["insert", "replace", "escape", "escape"]))
        if kind == "insert":
            segments.insert(at, draw(st.sampled_from(PIECES)))
        elif segments:
            at = min(at, len(segments) - 1)
            if kind == "replace":
                segments[at] = draw(st.sampled_from(PIECES))
            else:
                segments[at] = _encode_one(
                    segments[at], draw(st.integers(0, 40)), draw(st.booleans())
                )
    path = "/api/" + "/".join(segments)
    if draw(st.integers(0, 4)) == 0:
        path += draw(st.sampled_from(["/", "?force=true", "?include_secrets=true", "#x", "//"]))
    method = (
        route.method
        if draw(st.integers(0, 4))
        else draw(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"]))
    )
    good = GOOD_BODIES.get(route.template)
    body = (
        json.dumps(good).encode()
        if good is not None and draw(st.integers(0, 3))
        else draw(st.sampled_from(BODIES))
    )
    return method, path.encode(), body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
@example(
    (
        "PATCH",
        f"/api/flow_runs/{RUN}/labels/%2e%2e/%2e%2e/%2e%2e/deployments/{OTHER}".encode(),
        b"{}",
    )
)
@example(("PATCH", f"/api/flow_runs/{RUN}/labels/../../../deployments/{OTHER}".encode(), b"{}"))
@example(("POST", b"/api/deployments%23/filter", b"{}"))
@example(("POST", b"/api/variables%3f/filter", b"{}"))
@example(("POST", f"/api/flow_runs/{RUN}/set_state".encode(), BODIES[2]))
@example(("GET", f"/api/flow_runs/{OTHER}".encode(), b""))
def test_what_is_forwarded_is_what_was_decided(request):
    method, raw_path, body = request
    status, reply, sent = call(method, raw_path, body)
    if not 200 <= status < 300:
        assert sent == [], (status, reply)
        assert reply.get("detail"), reply
        return
    [forwarded] = sent
    assert forwarded.method == method
    ours_route, ours_params = match(
        Reading(method, read_path(raw_path.split(b"?")[0].split(b"#")[0]))
    )
    theirs = server_reading(method, forwarded.url.raw_path.split(b"?")[0])
    assert theirs is not None, forwarded.url
    assert theirs[0] is ours_route and theirs[1] == ours_params
    if ours_route.rule is not None:  # a write: its body is the one validated
        assert forwarded.url.query == b""


def test_a_refused_reading_never_reaches_the_api():
    for raw in (
        f"/api/flow_runs/{RUN}/labels/%2e%2e/%2e%2e/%2e%2e/deployments/{OTHER}",
        "/api/deployments%23/filter",
        f"/api/flow_runs/{RUN}/set_state/..",
    ):
        status, reply, sent = call("PATCH", raw.encode(), b"{}")
        assert status == 400 and sent == [], reply


def test_a_body_over_the_cap_is_refused_before_it_is_read():
    status, reply, sent = call(
        "POST",
        b"/api/logs/",
        b"[]",
        headers={"content-length": str(MAX_BODY_BYTES + 1)},
    )
    assert status == 413 and sent == [] and str(MAX_BODY_BYTES) in reply["detail"]
    # Sent without a length (chunked): read up to the cap, then refused.
    status, reply, sent = call(
        "POST",
        b"/api/logs/",
        b"[" + b" " * (MAX_BODY_BYTES + 10) + b"]",
        headers={"content-length": ""},
    )
    assert status in (400, 413) and sent == []


def test_no_token_an_expired_token_or_another_keys_token_is_refused():
    for token in ("", "worker", run_token(b"x" * 32, RUN, 3600), run_token(KEY, RUN, -1)):
        status, reply, sent = call(
            "GET", f"/api/flow_runs/{RUN}".encode(), headers={"authorization": f"Bearer {token}"}
        )
        assert status == 401 and sent == [], reply


def test_a_token_of_a_run_long_over_is_refused():
    recorder = Recorder()
    gateway = _gateway(recorder)

    async def over(path: str) -> dict[str, Any] | None:
        return {"state": {"type": "COMPLETED", "timestamp": "2026-01-01T00:00:00Z"}}

    gateway.status = RunStatus(over)
    assert anyio.run(gateway.status.over, RUN)

    async def just_ended(path: str) -> dict[str, Any] | None:
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc).isoformat()
        return {"state": {"type": "COMPLETED", "timestamp": now}}

    gateway.status = RunStatus(just_ended)
    assert not anyio.run(gateway.status.over, RUN)  # its last logs and events still pass


def test_a_run_renews_and_gives_back_only_the_leases_it_took():
    """A deployment's lease id is in its runs' states, readable by any run: a run may
    renew or release a lease only when it took it through the gateway."""
    taken, readable = uuid4(), uuid4()
    recorder = Recorder({"lease_id": str(taken), "limits": []})
    gateway = _gateway(recorder)
    renew = "/api/v2/concurrency_limits/leases/{}/renew"
    body = json.dumps({"lease_duration": 300}).encode()
    status, reply, _ = call("POST", renew.format(readable).encode(), body, gateway=gateway)
    assert status == 403 and "not taken by this flow run" in reply["detail"]
    take = json.dumps({"names": ["db"], "slots": 1}).encode()
    status, _, _ = call(
        "POST", b"/api/v2/concurrency_limits/increment-with-lease", take, gateway=gateway
    )
    assert status == 200
    status, _, _ = call("POST", renew.format(taken).encode(), body, gateway=gateway)
    assert status == 200
    release = json.dumps({"lease_id": str(taken)}).encode()
    path = b"/api/v2/concurrency_limits/decrement-with-lease"
    assert call("POST", path, release, gateway=gateway)[0] == 200
    # Given back: no longer its to renew.
    assert call("POST", renew.format(taken).encode(), body, gateway=gateway)[0] == 403
