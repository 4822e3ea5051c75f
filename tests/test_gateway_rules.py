"""The run gateway's reading, rules and ownership answers, as pure logic (no server): how a
request path is read, what a run's token may do, what it may say in an event, and which
flow runs, task runs and artifacts are its own. tests/test_gateway_paths.py drives the
whole gateway application with generated paths; tests/test_gateway.py and
tests/test_gateway_attacks.py prove the same against a real server and engine."""

from __future__ import annotations

import base64
import json
import sys
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

import anyio
import pytest

from prefect_managed.gateway.app import Ownership, peer_proof
from prefect_managed.gateway.events import ContextCheck, check_event
from prefect_managed.gateway.host import auth_headers
from prefect_managed.gateway.reading import Reading, Unreadable, read_path, read_query
from prefect_managed.gateway.routes import ROUTES, Check, Refusal, decide
from prefect_managed.gateway.tokens import run_token, token_from_authorization, token_run

KEY = b"k" * 32
# Fixed ids: they are in parametrized tests' ids, which every pytest-xdist process must
# collect alike.
RUN = uuid5(NAMESPACE_URL, "prefect-managed:tests:run")
OTHER = uuid5(NAMESPACE_URL, "prefect-managed:tests:other")
NOW = 1_800_000_000.0


def _decide(method: str, path: str, body=None):
    raw = ("/api/" + path).encode()
    reading = Reading(method, read_path(raw.split(b"?")[0]), read_query(raw.partition(b"?")[2]))
    sent = b"" if body is None else json.dumps(body).encode()
    return decide(reading, RUN, sent)


def _refusal(method: str, path: str, body=None) -> Refusal:
    with pytest.raises(Refusal) as refused:
        _decide(method, path, body)
    return refused.value


# --- tokens ---------------------------------------------------------------------------


def test_a_token_names_its_run_and_verifies_only_with_the_key():
    token = run_token(KEY, RUN, 3600, now=NOW)
    assert token_run(KEY, token, now=NOW).run == RUN
    assert token_run(b"another key", token, now=NOW) is None
    assert token_run(KEY, token.replace(str(RUN), str(OTHER)), now=NOW) is None
    for bad in (None, "", "pmr2", "pmr2.x.y.z", f"pmr2.{RUN}", token + "0", "Bearer " + token):
        assert token_run(KEY, bad, now=NOW) is None
    # Another spelling of the same run id is another token, not the same one.
    assert token_run(KEY, token.replace(str(RUN), str(RUN).upper()), now=NOW) is None


def test_a_token_expires_and_its_expiry_cannot_be_moved():
    token = run_token(KEY, RUN, 3600, now=NOW)
    assert token_run(KEY, token, now=NOW + 3599) is not None
    assert token_run(KEY, token, now=NOW + 3600) is None
    prefix, run, expires, mac = token.split(".")
    later = f"{prefix}.{run}.{int(expires) + 86400}.{mac}"
    assert token_run(KEY, later, now=NOW) is None


def test_the_token_is_read_as_prefect_sends_it():
    token = run_token(KEY, RUN, 60)
    assert token_from_authorization(auth_headers(token, None)["Authorization"]) == token
    assert token_from_authorization(f"Bearer {token}") == token
    assert token_from_authorization("Basic !!!") is None
    assert token_from_authorization(None) is None
    assert auth_headers(None, "key") == {"Authorization": "Bearer key"}
    assert (
        auth_headers("a:b", "key")["Authorization"] == "Basic " + base64.b64encode(b"a:b").decode()
    )


def test_a_peer_proves_the_key_for_each_challenge():
    proof = peer_proof(KEY, "c1", "api")
    assert proof == peer_proof(KEY, "c1", "api")
    assert proof != peer_proof(KEY, "c2", "api")
    assert proof != peer_proof(b"another key", "c1", "api")
    assert proof != peer_proof(KEY, "c1", "another api")


# --- reading ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        f"/api/flow_runs/{RUN}/labels/../../../deployments/{OTHER}",
        f"/api/flow_runs/{RUN}/labels/%2e%2e/%2e%2e/%2e%2e/deployments/{OTHER}",
        f"/api/flow_runs/{RUN}/labels/%2E%2E/%2e./.%2E/deployments/{OTHER}",
        f"/api/flow_runs/{RUN}/./set_state",
        f"/api/flow_runs/{RUN}/%2e/set_state",
        f"/api/flow_runs/{RUN}/%252e%252e/set_state",
        "/api/deployments%23/filter",
        "/api/deployments%3f/filter",
        "/api/deployments%2Ffilter",
        "/api/deployments%5cfilter",
        "/api/deployments\\filter",
        "/api/deployments#/filter",
        "/api/flow_runs//filter",
        "/api//flow_runs/filter",
        "/api/flow_runs/filter%00",
        "/api/flow_runs/filter%0a",
        "/api/flow_runs/%e2%80%aefilter",
        "/api/flow_runs/%ff",
        "/api/flow_runs/%zz",
        "/api/flow_runs/%2",
        "/api/flow_runs/fil ter",
        "/api/flow_runs/\u00e9",
        "/flow_runs/filter",
        "/api",
        "/api/",
        "/api/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q",
    ],
)
def test_a_path_two_readers_could_read_two_ways_is_not_read(raw):
    with pytest.raises(Unreadable):
        read_path(raw.encode("utf-8"))


def test_a_path_reads_as_the_segments_the_server_sees():
    assert read_path(b"/api/flow_runs/filter") == ("flow_runs", "filter")
    assert read_path(b"/api/flow_runs/") == ("flow_runs", "")
    assert read_path(b"/api/deployments/name/my%20flow/my%3Adeployment") == (
        "deployments",
        "name",
        "my flow",
        "my:deployment",
    )
    assert Reading("GET", ("deployments", "name", "my flow", "d")).path == (
        "/deployments/name/my%20flow/d"
    )


def test_a_query_is_read_once_into_fields():
    assert read_query(b"include_secrets=true&x=") == (("include_secrets", "true"), ("x", ""))
    for bad in (b"a=%ff", b"a", b"a=%00", "a=\u00e9".encode()):
        with pytest.raises(Unreadable):
            read_query(bad)


# --- routes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", f"flow_runs/{OTHER}", None),
        ("GET", f"block_documents/{OTHER}?include_secrets=true", None),
        ("GET", "deployments/name/my%20flow/prod", None),
        ("POST", "flow_runs/filter", {}),
        ("POST", "artifacts/latest/filter", {}),
        ("POST", "ui/flow_runs/history", {}),
        ("POST", "events/filter", {}),
        ("POST", "flows/", {"name": "child"}),
        ("POST", "v2/concurrency_limits/increment-with-lease", {"names": ["db"], "slots": 1}),
        ("POST", "v2/concurrency_limits/increment", {"names": ["tag-a"], "slots": 1}),
    ],
)
def test_reads_and_harmless_writes_need_no_check(method, path, body):
    decision = _decide(method, path, body)
    assert decision.checks == (), decision


@pytest.mark.parametrize(
    "method, path, body, checks",
    [
        ("POST", f"flow_runs/{RUN}/set_state", {"state": {"type": "RUNNING"}}, [("flow_run", RUN)]),
        ("PATCH", f"flow_runs/{RUN}", {"name": "renamed"}, [("flow_run", RUN)]),
        ("PATCH", f"flow_runs/{RUN}/labels", {"team": "a"}, [("flow_run", RUN)]),
        ("DELETE", f"flow_runs/{RUN}/input/k", None, [("flow_run", RUN)]),
        (
            "POST",
            "flow_runs/",
            {"flow_id": str(OTHER), "parent_task_run_id": str(OTHER)},
            [("task_run", OTHER)],
        ),
        (
            "POST",
            "task_runs/",
            {"flow_run_id": str(RUN), "task_key": "k", "dynamic_key": "0"},
            [("flow_run", RUN)],
        ),
        (
            "POST",
            f"task_runs/{OTHER}/set_state",
            {"state": {"type": "COMPLETED"}},
            [("task_run", OTHER)],
        ),
        (
            "POST",
            "artifacts/",
            {"key": "report", "flow_run_id": str(RUN), "task_run_id": str(OTHER)},
            [("flow_run", RUN), ("task_run", OTHER)],
        ),
        ("PATCH", f"artifacts/{OTHER}", {"description": "d"}, [("artifact", OTHER)]),
        (
            "POST",
            "logs/",
            [
                {
                    "name": "n",
                    "level": 20,
                    "message": "m",
                    "timestamp": "2026-12-04T00:00:00Z",
                    "flow_run_id": str(RUN),
                },
                {
                    "name": "n",
                    "level": 20,
                    "message": "m",
                    "timestamp": "2026-12-04T00:00:00Z",
                    "flow_run_id": str(RUN),
                    "task_run_id": str(OTHER),
                },
            ],
            [("flow_run", RUN), ("task_run", OTHER)],
        ),
        (
            "POST",
            f"deployments/{OTHER}/create_flow_run",
            {"parameters": {"x": 1}, "job_variables": {"pip_packages": ["six"]}},
            [("managed_deployment", OTHER)],
        ),
        (
            "POST",
            f"flow_runs/{OTHER}/set_state",
            {"state": {"type": "SCHEDULED"}},
            [("flow_run", OTHER), ("inline_flow_run", OTHER)],
        ),
        (
            "POST",
            "v2/concurrency_limits/decrement-with-lease",
            {"lease_id": str(OTHER)},
            [("lease", OTHER)],
        ),
        (
            "POST",
            f"v2/concurrency_limits/leases/{OTHER}/renew",
            {"lease_duration": 300},
            [("lease", OTHER)],
        ),
    ],
)
def test_the_runs_own_writes_are_checked_for_ownership(method, path, body, checks):
    decision = _decide(method, path, body)
    assert decision.checks == tuple(Check(kind, id) for kind, id in checks), decision


def test_the_body_forwarded_is_the_body_checked():
    decision = _decide(
        "POST",
        "flow_runs/",
        {"flow_id": str(OTHER), "parent_task_run_id": "{" + str(OTHER).upper() + "}"},
    )
    # Read once (braces, upper case), checked as that id and sent as that id.
    assert decision.checks == (Check("task_run", OTHER),)
    assert json.loads(decision.body)["parent_task_run_id"] == str(OTHER)


@pytest.mark.parametrize(
    "method, path, body, words",
    [
        (
            "PATCH",
            "v2/concurrency_limits/prefect-managed-ws",
            {"active": False},
            "not open to flow runs",
        ),
        ("DELETE", "v2/concurrency_limits/prefect-managed-ws", None, "not open to flow runs"),
        ("POST", "v2/concurrency_limits/", {"name": "x", "limit": 1}, "not open to flow runs"),
        (
            "POST",
            "v2/concurrency_limits/increment-with-lease",
            {"names": ["prefect-managed-ws"], "slots": 1},
            "run slots",
        ),
        (
            "POST",
            "v2/concurrency_limits/increment",
            {"names": [" Prefect-Managed-ws"], "slots": 1},
            "run slots",
        ),
        (
            "POST",
            "v2/concurrency_limits/increment",
            {"names": [f"deployment:{OTHER}"], "slots": 1},
            "deployment",
        ),
        ("POST", "artifacts/", {"key": "usage-ws-202612-run-x", "flow_run_id": str(RUN)}, "usage"),
        ("POST", "artifacts/", {"key": "report"}, "flow_run_id"),
        ("DELETE", f"artifacts/{OTHER}", None, "not open to flow runs"),
        ("DELETE", f"flow_runs/{OTHER}", None, "not open to flow runs"),
        ("POST", "flow_runs/", {"flow_id": str(OTHER)}, "subflow runs"),
        (
            "POST",
            "flow_runs/",
            {"flow_id": str(OTHER), "parent_task_run_id": str(OTHER), "work_pool_name": "docker"},
            "work_pool_name",
        ),
        (
            "POST",
            "flow_runs/",
            {"flow_id": str(OTHER), "parent_task_run_id": str(OTHER), "deployment_id": str(OTHER)},
            "deployment_id",
        ),
        ("PATCH", f"flow_runs/{RUN}", {"infrastructure_pid": "x:victim"}, "infrastructure_pid"),
        ("PATCH", f"flow_runs/{RUN}", {"job_variables": {"privileged": True}}, "job_variables"),
        (
            "POST",
            f"flow_runs/{RUN}/set_state",
            {"state": {"type": "SCHEDULED"}, "force": True},
            "SCHEDULED",
        ),
        ("POST", f"flow_runs/{RUN}/set_state", {"state": {"type": "PENDING"}}, "PENDING"),
        (
            "POST",
            f"flow_runs/{RUN}/set_state",
            {"state": {"type": "PAUSED", "state_details": {"pause_reschedule": True}}},
            "suspend",
        ),
        (
            "POST",
            f"flow_runs/{RUN}/set_state",
            {
                "state": {
                    "type": "COMPLETED",
                    "state_details": {"deployment_concurrency_lease_id": str(OTHER)},
                }
            },
            "deployment_concurrency_lease_id",
        ),
        (
            "POST",
            f"task_runs/{OTHER}/set_state",
            {
                "state": {
                    "type": "RUNNING",
                    "state_details": {"deployment_concurrency_lease_id": str(OTHER)},
                }
            },
            "deployment_concurrency_lease_id",
        ),
        ("POST", f"flow_runs/{RUN}/set_state", {"state": {"type": "RUNNING"}, "x": 1}, "x"),
        ("POST", f"flow_runs/{RUN}/set_state", {"state": {"type": "NOPE"}}, "state.type"),
        ("PATCH", f"flow_runs/{RUN}/labels", {"prefect.worker.name": "x"}, "prefect."),
        (
            "POST",
            f"deployments/{OTHER}/create_flow_run",
            {"work_queue_name": "elsewhere"},
            "work_queue_name",
        ),
        (
            "POST",
            f"deployments/{OTHER}/create_flow_run",
            {"state": {"type": "RUNNING"}},
            "RUNNING",
        ),
        ("POST", "logs/", [{"flow_run_id": None}], "log entry"),
        ("POST", "logs/", [], "non-empty list"),
        ("POST", "task_runs/", {"task_key": "k", "dynamic_key": "0"}, "flow_run_id"),
        ("PATCH", "work_pools/pool", {"is_paused": True}, "not open to flow runs"),
        ("POST", "work_pools/pool/get_scheduled_flow_runs", {}, "not open to flow runs"),
        ("POST", "deployments/", {}, "not open to flow runs"),
        ("PATCH", f"deployments/{OTHER}", {"pull_steps": []}, "not open to flow runs"),
        ("POST", "variables/", {"name": "x"}, "not open to flow runs"),
        ("POST", "block_documents/", {}, "not open to flow runs"),
        ("PATCH", f"block_documents/{OTHER}", {}, "not open to flow runs"),
        ("POST", "automations/", {}, "not open to flow runs"),
        ("POST", "events", [], "not open to flow runs"),
        ("GET", "admin/settings", None, "not open to flow runs"),
        ("GET", "collections/views/aggregate-worker-metadata", None, "not open to flow runs"),
        ("HEAD", f"flow_runs/{RUN}", None, "not open to flow runs"),
        ("POST", f"flow_runs/{RUN}/set_state?force=true", {"state": {"type": "RUNNING"}}, "query"),
        ("POST", "v2/other", {}, "not open to flow runs"),
        ("POST", f"flow_runs/{RUN}/set_state", "not an object", "state"),
    ],
)
def test_everything_else_is_refused_with_a_reason(method, path, body, words):
    assert words in _refusal(method, path, body).reason


#: A module that says when it is imported (on `sys.path` for these tests only).
PROBE = "prefect_managed_gateway_probe_module"
NESTED: dict = {}
for _ in range(300):
    NESTED = {"a": NESTED}

#: State `data` no Prefect engine sends: Prefect's client reads a dict with a
#: `storage_key` back as a result record's metadata, and one that does not parse breaks
#: every read of the run's states (the worker's finish, which records the run's usage,
#: among them); the server makes an artifact of any data, under its `artifact_key`.
POISONED_DATA = [
    ("COMPLETED", {"storage_key": 1}),
    # A list or an object where the check looks a name up (it raised TypeError, a 500).
    (["COMPLETED"], {"storage_key": "k"}),
    ({"COMPLETED": 1}, {"storage_key": "k"}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": ["pickle"]}}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "pickle", "picklelib": ["pickle"]}}),
    (
        "FAILED",
        {
            "storage_key": "k",
            "serializer": {"type": "compressed", "serializer": "json", "compressionlib": {"a": 1}},
        },
    ),
    ("COMPLETED", {"storage_key": None, "serializer": "not a serializer"}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "compressed", "serializer": 5}}),
    ("COMPLETED", {"storage_key": "k", "expiration": "not a date"}),
    ("FAILED", {"storage_key": "k", "storage_block_id": "not a uuid"}),
    ("COMPLETED", {"storage_key": "k", "artifact_key": "usage-ws-202612-run-x"}),
    ("CRASHED", {"artifact_key": "usage-ws-202612-run-x", "artifact_type": "table"}),
    ("COMPLETED", "usage-ws-202612-summary"),
    ("COMPLETED", 42),
    ("COMPLETED", ["storage_key"]),
    ("RUNNING", {"storage_key": "k"}),  # well-formed, on a state that has no result
    ("SCHEDULED", {"storage_key": "k"}),
    # Data the server stores and then cannot answer with: every read of the run fails.
    ("COMPLETED", {"storage_key": "\ud800"}),
    ("COMPLETED", {"storage_key": "k", "prefect_version": "3.9.1\udfff"}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "json", "dumps_kwargs": NESTED}}),
    ("COMPLETED", {"storage_key": "k" * 20_000}),
    # Serializers that name modules to import in the worker's process, or are not Prefect's.
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "pickle", "picklelib": PROBE}}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "pickle", "picklelib": "this"}}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "pickle", "picklelib": "dill"}}),
    (
        "COMPLETED",
        {"storage_key": "k", "serializer": {"type": "compressed/json", "compressionlib": PROBE}},
    ),
    (
        "COMPLETED",
        {
            "storage_key": "k",
            "serializer": {
                "type": "compressed",
                "serializer": {"type": "pickle", "picklelib": PROBE},
            },
        },
    ),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "json", "jsonlib": PROBE}}),
    (
        "COMPLETED",
        {"storage_key": "k", "serializer": {"type": "json", "object_decoder": "os.system"}},
    ),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "__unknown__", "x": PROBE}}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "pickle", "extra": 1}}),
    ("COMPLETED", {"storage_key": "k", "serializer": {"type": "json", "loads_kwargs": {"a": {}}}}),
    ("COMPLETED", {"storage_key": "k", "serializer": "pickle"}),
]


def _with_state(body: dict, kind: str, data) -> dict:
    return {**body, "state": {"type": kind, "data": data}}


STATE_CARRIERS = [
    (f"flow_runs/{RUN}/set_state", {}),
    (f"flow_runs/{OTHER}/set_state", {}),
    (f"task_runs/{OTHER}/set_state", {}),
    ("task_runs/", {"flow_run_id": str(RUN), "task_key": "k", "dynamic_key": "1"}),
    ("flow_runs/", {"flow_id": str(OTHER), "parent_task_run_id": str(OTHER)}),
    (f"deployments/{OTHER}/create_flow_run", {}),
]


@pytest.mark.parametrize("kind, data", POISONED_DATA, ids=repr)
@pytest.mark.parametrize("path, body", STATE_CARRIERS, ids=lambda v: str(v)[:24])
def test_state_data_other_than_a_results_metadata_is_refused(
    path, body, kind, data, tmp_path, monkeypatch
):
    (tmp_path / f"{PROBE}.py").write_text("raise SystemExit('imported by the gateway')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = "this" in sys.modules
    refused = _refusal("POST", path, _with_state(body, kind, data))
    assert refused.status in (403, 413, 422)
    assert "data" in refused.reason or "state" in refused.reason
    assert PROBE not in sys.modules  # nothing the data names was imported
    assert ("this" in sys.modules) == imported


WORKERS_NAMES = [
    "AwaitingConcurrencySlot",
    "awaitingconcurrencyslot",
    " Awaiting Concurrency Slot ",
    "QuotaExhausted",
    "HOSTLOST",
    "AwaitingInfrastructureRetry",
    "awaiting\tinfrastructure\nretry",
]


@pytest.mark.parametrize("name", WORKERS_NAMES)
@pytest.mark.parametrize("kind", ["SCHEDULED", "FAILED", "CRASHED", "COMPLETED"])
@pytest.mark.parametrize("path, body", STATE_CARRIERS, ids=lambda v: str(v)[:24])
def test_a_state_named_as_the_worker_names_its_own_is_refused(path, body, kind, name):
    """A deployment run a flow creates Scheduled under `AwaitingConcurrencySlot` would be
    taken for one already marked waiting; a final state of its own named
    `AwaitingInfrastructureRetry` would count against its run's retries."""
    state = {"type": kind, "name": name}
    refused = _refusal("POST", path, {**body, "state": state})
    assert refused.status == 403
    assert f"named {name!r} is the managed worker's to set" in refused.reason


def test_a_state_name_of_prefects_own_passes():
    for path, body, kind, name in [
        (f"flow_runs/{RUN}/set_state", {}, "FAILED", "TimedOut"),
        (f"flow_runs/{RUN}/set_state", {}, "RUNNING", "Retrying"),
        (f"deployments/{OTHER}/create_flow_run", {}, "SCHEDULED", "Scheduled"),
        (f"flow_runs/{RUN}/set_state", {}, "COMPLETED", "AwaitingConcurrencySlots"),
    ]:
        forwarded = json.loads(
            _decide("POST", path, {**body, "state": {"type": kind, "name": name}}).body
        )
        assert forwarded["state"]["name"] == name


def _engine_metadata() -> dict:
    """A result's metadata as Prefect's engine sends it (`to_state_create`, dumped as its
    client dumps a request): a result block, an expiration, a compressed JSON serializer."""
    from datetime import datetime, timezone

    from prefect.results import ResultRecordMetadata
    from prefect.serializers import CompressedSerializer

    metadata = ResultRecordMetadata(
        storage_key="/results/abc",
        expiration=datetime(2027, 1, 1, tzinfo=timezone.utc),
        storage_block_id=uuid4(),
        serializer=CompressedSerializer(serializer="json"),
    )
    return json.loads(metadata.model_dump_json(serialize_as_any=True))


@pytest.mark.parametrize("kind", ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"])
def test_a_results_metadata_is_forwarded_exactly_as_sent_and_reads_back(kind):
    from prefect.client.schemas.objects import State

    metadata = _engine_metadata()
    for path, body in STATE_CARRIERS:
        if "create_flow_run" in path or (path == "flow_runs/" and kind == "SCHEDULED"):
            continue  # a deployment's run is created Scheduled, with no result
        forwarded = json.loads(_decide("POST", path, _with_state(body, kind, metadata)).body)
        assert forwarded["state"]["data"] == metadata, path
        State.model_validate({**forwarded["state"], "id": str(uuid4())})  # no error
        none = json.loads(_decide("POST", path, _with_state(body, kind, None)).body)
        assert none["state"].get("data") is None, path


def test_a_uuid_parameter_is_read_in_the_servers_one_form():
    for spelling in (str(RUN).upper(), str(RUN).replace("-", ""), "{" + str(RUN) + "}"):
        if len(spelling) == 36:
            assert _decide("GET", f"flow_runs/{spelling}").path == f"/flow_runs/{RUN}"
        else:
            with pytest.raises((Refusal, Unreadable)):
                _decide("GET", f"flow_runs/{spelling}")


def test_every_route_of_the_allow_list_is_one_of_prefects():
    """The allow-list names routes as the installed Prefect server does (method and
    template, convertors aside), so the gateway decides on the route the server runs."""
    from fastapi.routing import APIRoute
    from prefect.server.api.server import API_ROUTERS

    def bare(template: str) -> str:
        return template.replace(":uuid}", "}").replace(":str}", "}")

    prefect = {("GET", "/health"), ("GET", "/version")}
    for router in API_ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute):
                prefect |= {(method, bare(route.path)) for method in route.methods}
    ours = {(route.method, bare(route.template)) for route in ROUTES}
    assert ours <= prefect, sorted(ours - prefect)
    assert len(ours) == len(ROUTES)  # no route listed twice


def test_the_server_runs_the_route_the_gateway_decided_on():
    """For every route of the allow-list, with parameters that look like other routes'
    words, the first of the server's routes (in its own order) that matches the path is
    that route: no route outside the allow-list shadows one inside it."""
    from fastapi.routing import APIRoute
    from prefect.server.api.server import API_ROUTERS
    from starlette.routing import Match

    from prefect_managed.gateway.routes import _PARAM

    server = [r for router in API_ROUTERS for r in router.routes if isinstance(r, APIRoute)]

    def bare(template: str) -> str:
        return template.replace(":uuid}", "}").replace(":str}", "}")

    for route in ROUTES:
        if route.template in ("/health", "/version"):  # the app's own, not a router's
            continue
        for word in ("x", "filter", "count", "latest", "name", "paginate", str(uuid4())):
            parts = [
                part
                if (param := _PARAM.match(part)) is None
                else (str(uuid4()) if param.group(2) == "uuid" else word)
                for part in route.parts
            ]
            scope = {"type": "http", "path": "/" + "/".join(parts), "method": route.method}
            first = next((r for r in server if r.matches(scope)[0] == Match.FULL), None)
            assert first is not None and bare(first.path) == bare(route.template), (
                route.method,
                scope["path"],
                first and first.path,
            )


# --- events ---------------------------------------------------------------------------


def _event(name: str, resource: str, related=(), payload=None) -> dict:
    return {
        "occurred": "2026-12-04T00:00:00Z",
        "event": name,
        "resource": {"prefect.resource.id": resource},
        "related": [
            {"prefect.resource.id": r, "prefect.resource.role": role} for r, role in related
        ],
        "payload": payload or {},
        "id": str(uuid4()),
    }


def test_a_task_run_event_is_checked_against_the_task_run_and_its_flow_run():
    task = uuid4()
    data = _event(
        "prefect.task-run.Completed",
        f"prefect.task-run.{task}",
        [(f"prefect.flow-run.{RUN}", "flow-run"), (f"prefect.deployment.{OTHER}", "deployment")],
        {"task_run": {"flow_run_id": str(RUN), "name": "t"}},
    )
    event, checks, flow_runs, context = check_event(data)
    assert set(checks) == {Check("flow_run", RUN), Check("new_or_own_task_run", task)}
    assert flow_runs == {RUN}
    assert context == (ContextCheck("deployment_id", OTHER),)
    assert event.event == "prefect.task-run.Completed"


def test_the_payloads_flow_run_is_the_one_checked():
    """The recorder takes the payload's flow_run_id over the related flow run."""
    task = uuid4()
    data = _event(
        "prefect.task-run.Running",
        f"prefect.task-run.{task}",
        [(f"prefect.flow-run.{RUN}", "flow-run")],
        {"task_run": {"flow_run_id": str(OTHER)}},
    )
    _, checks, flow_runs, _ = check_event(data)
    assert Check("flow_run", OTHER) in checks and flow_runs == {RUN, OTHER}


@pytest.mark.parametrize(
    "name, resource, related, payload, words",
    [
        ("prefect-managed.usage.recorded", f"prefect.flow-run.{RUN}", [], {}, "managed pool"),
        (
            "prefect-managed.workspace.slot-released",
            "prefect-managed.workspace.tests",
            [(f"prefect.flow-run.{RUN}", "flow-run")],
            {},
            "managed pool",
        ),
        ("prefect.flow-run.Completed", f"prefect.flow-run.{RUN}", [], {}, "server's"),
        ("prefect.flow-run.Cancelling", f"prefect.flow-run.{RUN}", [], {}, "server's"),
        ("prefect.work-pool.paused", f"prefect.work-pool.{OTHER}", [], {}, "server's"),
        (
            "my.event",
            f"prefect.deployment.{OTHER}",
            [(f"prefect.flow-run.{RUN}", "flow-run")],
            {},
            "events about",
        ),
        ("my.event", "my.thing", [], {}, "names none"),
        ("my.event", "my.thing", [("prefect-managed.worker.x", "worker")], {}, "may name"),
        (
            "prefect.task-run.Completed",
            f"prefect.task-run.{uuid5(NAMESPACE_URL, 'task-1')}",
            [(f"prefect.flow-run.{RUN}", "flow-run")],
            {},
            "carry its task_run",
        ),
        (
            "prefect.task-run.Completed",
            f"prefect.task-run.{uuid5(NAMESPACE_URL, 'task-2')}",
            [(f"prefect.flow-run.{RUN}", "flow-run")],
            {"task_run": {"id": str(OTHER)}},
            "not the event's resource",
        ),
        (
            "prefect.task-run.Completed",
            f"prefect.task-run.{uuid5(NAMESPACE_URL, 'task-3')}",
            [],
            {"task_run": {"name": "t"}},
            "task run's flow run",
        ),
        ("prefect.task-run.Completed", f"prefect.flow-run.{RUN}", [], {}, "about a flow run"),
        (
            "prefect.task-run.Completed",
            "my.thing",
            [(f"prefect.flow-run.{RUN}", "flow-run")],
            {},
            "must be about",
        ),
    ],
)
def test_an_event_not_about_the_run_is_dropped(name, resource, related, payload, words):
    with pytest.raises(Refusal) as refused:
        check_event(_event(name, resource, related, payload))
    assert words in refused.value.reason


def test_a_users_own_event_names_its_run():
    data = _event("my.event", "my.thing", [(f"prefect.flow-run.{RUN}", "flow-run")])
    _, checks, flow_runs, _ = check_event(data)
    assert checks == (Check("flow_run", RUN),) and flow_runs == {RUN}


# --- ownership ------------------------------------------------------------------------


class FakeApi:
    """Records the API would return: flow runs, task runs, artifacts, deployments, pools."""

    def __init__(self, records: dict[str, dict]) -> None:
        self.records = records
        self.reads: list[str] = []

    async def get_json(self, path: str) -> dict | None:
        self.reads.append(path)
        return self.records.get(path)


def _owns(api: FakeApi, check: Check, run: UUID = RUN) -> bool:
    return anyio.run(Ownership(api.get_json).owns, run, check)


def test_ownership_follows_subflows_to_the_run():
    parent_task, child, child_task, artifact = uuid4(), uuid4(), uuid4(), uuid4()
    api = FakeApi(
        {
            f"/task_runs/{parent_task}": {"flow_run_id": str(RUN)},
            f"/flow_runs/{child}": {"parent_task_run_id": str(parent_task)},
            f"/task_runs/{child_task}": {"flow_run_id": str(child)},
            f"/artifacts/{artifact}": {"key": "report", "flow_run_id": str(child)},
        }
    )
    assert _owns(api, Check("flow_run", RUN))
    assert api.reads == []  # its own run needs no read
    assert _owns(api, Check("flow_run", child))
    assert _owns(api, Check("task_run", child_task))
    assert _owns(api, Check("artifact", artifact))


def test_ownership_is_read_again_each_time():
    """A task run moved to another flow run is no longer the run's: nothing is cached."""
    task = uuid4()
    api = FakeApi({f"/task_runs/{task}": {"flow_run_id": str(RUN)}})
    ownership = Ownership(api.get_json)
    assert anyio.run(ownership.owns, RUN, Check("task_run", task))
    api.records[f"/task_runs/{task}"] = {"flow_run_id": str(OTHER)}
    assert not anyio.run(ownership.owns, RUN, Check("task_run", task))


def test_a_new_task_run_is_the_runs_and_an_existing_one_must_be():
    new, others = uuid4(), uuid4()
    api = FakeApi({f"/task_runs/{others}": {"flow_run_id": str(OTHER)}})
    assert _owns(api, Check("new_or_own_task_run", new))
    assert not _owns(api, Check("new_or_own_task_run", others))
    assert not _owns(api, Check("task_run", new))  # to change one, it must exist


def test_only_deployments_of_managed_pools_may_be_run():
    managed, docker = uuid4(), uuid4()
    api = FakeApi(
        {
            f"/deployments/{managed}": {"work_pool_name": "my managed"},
            "/work_pools/my%20managed": {"type": "prefect:managed"},
            f"/deployments/{docker}": {"work_pool_name": "docker"},
            "/work_pools/docker": {"type": "docker"},
        }
    )
    assert _owns(api, Check("managed_deployment", managed))
    assert not _owns(api, Check("managed_deployment", docker))
    assert not _owns(api, Check("managed_deployment", uuid4()))


def test_ownership_refuses_other_runs_usage_records_and_unknown_ids():
    other_task, usage = uuid4(), uuid4()
    api = FakeApi(
        {
            f"/flow_runs/{OTHER}": {"parent_task_run_id": None},
            f"/task_runs/{other_task}": {"flow_run_id": str(OTHER)},
            f"/artifacts/{usage}": {"key": "usage-ws-202612-run-x", "flow_run_id": str(RUN)},
        }
    )
    assert not _owns(api, Check("flow_run", OTHER))
    assert not _owns(api, Check("task_run", other_task))
    assert not _owns(api, Check("artifact", usage))
    assert not _owns(api, Check("task_run", uuid4()))  # not found


def test_one_request_reads_each_record_once_and_within_a_budget():
    from prefect_managed.gateway.app import MAX_READS

    parent_task, child = uuid4(), uuid4()
    tasks = [uuid4() for _ in range(MAX_READS * 2)]
    records = {
        f"/task_runs/{parent_task}": {"flow_run_id": str(RUN)},
        f"/flow_runs/{child}": {"parent_task_run_id": str(parent_task)},
    }
    records |= {f"/task_runs/{t}": {"flow_run_id": str(child)} for t in tasks}
    api = FakeApi(records)
    few = tuple(Check("task_run", t) for t in tasks[:10])
    assert anyio.run(Ownership(api.get_json).unowned, RUN, few) is None
    # Ten task runs of one subflow: ten task-run reads, the subflow and its parent once.
    assert len(api.reads) == 12 and len(set(api.reads)) == 12
    many = tuple(Check("task_run", t) for t in tasks)
    with pytest.raises(Refusal, match="more than"):
        anyio.run(Ownership(api.get_json).unowned, RUN, many)

    async def find(ids):  # Prefect's filter: every task run in one read
        return {i: api.records[f"/task_runs/{i}"] for i in ids if f"/task_runs/{i}" in api.records}

    api.reads.clear()
    assert anyio.run(Ownership(api.get_json, find).unowned, RUN, many) is None
    assert len(api.reads) == 2, api.reads  # the subflow and its parent task run


def test_ownership_stops_on_a_cycle():
    a, b = uuid4(), uuid4()
    api = FakeApi(
        {
            f"/flow_runs/{a}": {"parent_task_run_id": str(b)},
            f"/task_runs/{b}": {"flow_run_id": str(a)},
        }
    )
    assert not _owns(api, Check("flow_run", a))


@pytest.mark.parametrize(
    "related, words",
    [
        ((f"prefect.automation.{OTHER}", "automation"), "not one a flow run's event may name"),
        ((f"prefect.block-document.{OTHER}", "block"), "not one a flow run's event may name"),
        (("prefect-managed.worker.x", "worker"), "not one a flow run's event may name"),
    ],
)
def test_an_event_names_no_other_resource_of_prefects(related, words):
    data = _event("my.event", "my.thing", [(f"prefect.flow-run.{RUN}", "flow-run"), related])
    with pytest.raises(Refusal, match=words):
        check_event(data)
    fine = _event(
        "my.event", "my.thing", [(f"prefect.flow-run.{RUN}", "flow-run"), ("prefect.tag.a", "tag")]
    )
    assert check_event(fine)[2] == {RUN}


def test_an_event_from_the_future_is_dropped():
    """The task-run recorder keeps the latest view of a task run: an event dated ahead
    would outlast the true run's later events."""
    data = _event(
        "prefect.task-run.Completed",
        f"prefect.task-run.{uuid4()}",
        [(f"prefect.flow-run.{RUN}", "flow-run")],
        {"task_run": {"flow_run_id": str(RUN)}},
    )
    data["occurred"] = "2099-01-01T00:00:00Z"
    with pytest.raises(Refusal, match="ahead"):
        check_event(data)
