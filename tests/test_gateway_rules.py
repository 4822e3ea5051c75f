"""The run gateway's rules and ownership answers, as pure logic (no server): what a run's
token may do, and which flow runs, task runs and artifacts are its own. tests/test_gateway.py
proves the same against a real server and engine."""

from __future__ import annotations

import base64
from uuid import UUID, uuid4

import anyio
import pytest

from prefect_managed.gateway import Ownership
from prefect_managed.gateway_host import auth_headers
from prefect_managed.gateway_rules import (
    Check,
    decide,
    event_flow_runs,
    run_token,
    token_from_authorization,
    token_run,
)

KEY = b"k" * 32
RUN = uuid4()
OTHER = uuid4()


def test_a_token_names_its_run_and_verifies_only_with_the_key():
    token = run_token(KEY, RUN)
    assert token_run(KEY, token) == RUN
    assert token_run(b"another key", token) is None
    forged = token.replace(str(RUN), str(OTHER))
    assert token_run(KEY, forged) is None
    for bad in (None, "", "pmr1", "pmr1.x.y", f"pmr1.{RUN}", token + "0", "Bearer " + token):
        assert token_run(KEY, bad) is None


def test_the_token_is_read_as_prefect_sends_it():
    token = run_token(KEY, RUN)
    assert token_from_authorization(auth_headers(token, None)["Authorization"]) == token
    assert token_from_authorization(f"Bearer {token}") == token
    assert token_from_authorization("Basic !!!") is None
    assert token_from_authorization(None) is None
    assert auth_headers(None, "key") == {"Authorization": "Bearer key"}
    assert (
        auth_headers("a:b", "key")["Authorization"] == "Basic " + base64.b64encode(b"a:b").decode()
    )


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "flow_runs/" + str(OTHER), None),
        ("GET", "block_documents/" + str(OTHER), None),
        ("POST", "flow_runs/filter", {}),
        ("POST", "artifacts/latest/filter", {}),
        ("POST", "ui/flow_runs/history", {}),
        ("POST", "events/filter", {}),
        ("POST", "flows/", {"name": "child"}),
        ("POST", "deployments/" + str(OTHER) + "/create_flow_run", {}),
        ("POST", "v2/concurrency_limits/increment-with-lease", {"names": ["db"], "slots": 1}),
        ("POST", "v2/concurrency_limits/decrement-with-lease", {"lease_id": str(uuid4())}),
        ("POST", f"v2/concurrency_limits/leases/{uuid4()}/renew", {}),
        ("POST", "concurrency_limits/increment", {"names": ["tag-a"]}),
    ],
)
def test_reads_and_harmless_writes_need_no_check(method, path, body):
    decision = decide(method, path, body)
    assert decision.allowed and decision.checks == (), decision


@pytest.mark.parametrize(
    "method, path, body, check",
    [
        ("POST", f"flow_runs/{RUN}/set_state", {}, Check("flow_run", RUN)),
        ("PATCH", f"flow_runs/{RUN}", {}, Check("flow_run", RUN)),
        ("PATCH", f"flow_runs/{RUN}/labels", {}, Check("flow_run", RUN)),
        ("DELETE", f"flow_runs/{RUN}/input/k", None, Check("flow_run", RUN)),
        ("POST", "flow_runs/", {"parent_task_run_id": str(OTHER)}, Check("task_run", OTHER)),
        ("POST", "task_runs/", {"flow_run_id": str(RUN)}, Check("flow_run", RUN)),
        ("POST", f"task_runs/{OTHER}/set_state", {}, Check("task_run", OTHER)),
        ("POST", "artifacts/", {"key": "report", "flow_run_id": str(RUN)}, Check("flow_run", RUN)),
        ("PATCH", f"artifacts/{OTHER}", {}, Check("artifact", OTHER)),
        (
            "POST",
            "logs/",
            [{"flow_run_id": str(RUN)}, {"flow_run_id": str(RUN)}],
            Check("flow_run", RUN),
        ),
    ],
)
def test_the_runs_own_writes_are_checked_for_ownership(method, path, body, check):
    decision = decide(method, path, body)
    assert decision.allowed and decision.checks == (check,), decision


@pytest.mark.parametrize(
    "method, path, body, words",
    [
        (
            "PATCH",
            "v2/concurrency_limits/prefect-managed-ws",
            {"active": False},
            "cannot call PATCH",
        ),
        ("DELETE", "v2/concurrency_limits/prefect-managed-ws", None, "cannot call DELETE"),
        ("POST", "v2/concurrency_limits/", {"name": "x", "limit": 1}, "cannot call POST"),
        ("POST", "v2/concurrency_limits/increment", {"names": ["prefect-managed-ws"]}, "run slots"),
        ("POST", "artifacts/", {"key": "usage-ws-202612-run-x", "flow_run_id": str(RUN)}, "usage"),
        ("POST", "artifacts/", {"key": "report"}, "flow_run_id"),
        ("DELETE", f"artifacts/{OTHER}", None, "cannot call DELETE"),
        ("DELETE", f"flow_runs/{OTHER}", None, "cannot call DELETE"),
        ("POST", "flow_runs/", {"flow_id": str(OTHER)}, "subflow runs"),
        ("POST", "flow_runs/bulk_set_state", {}, "cannot call POST"),
        ("POST", "logs/", [{"flow_run_id": None}], "flow_run_id"),
        ("POST", "logs/", [], "list of log entries"),
        ("PATCH", "work_pools/pool", {"is_paused": True}, "cannot call PATCH"),
        ("POST", "work_pools/pool/get_scheduled_flow_runs", {}, "cannot call POST"),
        ("POST", "deployments/", {}, "cannot call POST"),
        ("POST", "variables/", {"name": "x"}, "cannot call POST"),
        ("POST", "block_documents/", {}, "cannot call POST"),
        ("POST", "v2/other", {}, "not open"),
    ],
)
def test_everything_else_is_refused_with_a_reason(method, path, body, words):
    decision = decide(method, path, body)
    assert not decision.allowed
    assert words in decision.reason


def test_an_event_names_its_flow_runs():
    event = {
        "event": "prefect.task-run.Completed",
        "resource": {"prefect.resource.id": f"prefect.task-run.{OTHER}"},
        "related": [
            {"prefect.resource.id": f"prefect.flow-run.{RUN}", "prefect.resource.role": "flow-run"},
            {"prefect.resource.id": "prefect.flow-run.not-a-uuid"},
            "junk",
        ],
    }
    assert event_flow_runs(event) == {RUN}
    assert event_flow_runs({"resource": {"prefect.resource.id": "x"}}) == set()
    assert event_flow_runs("junk") == set()


class FakeApi:
    """Records the API would return: flow runs, task runs and artifacts by id."""

    def __init__(self, records: dict[str, dict]) -> None:
        self.records = records
        self.reads: list[str] = []

    async def get_json(self, path: str) -> dict | None:
        self.reads.append(path)
        return self.records.get(path)


def _owns(api: FakeApi, check: Check, run: UUID = RUN) -> bool:
    ownership = Ownership(api.get_json)

    async def both() -> tuple[bool, bool]:
        return await ownership.owns(run, check), await ownership.owns(run, check)

    first, second = anyio.run(both)
    assert first == second  # the second answer comes from the cache
    return first


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


def test_ownership_stops_on_a_cycle():
    a, b = uuid4(), uuid4()
    api = FakeApi(
        {
            f"/flow_runs/{a}": {"parent_task_run_id": str(b)},
            f"/task_runs/{b}": {"flow_run_id": str(a)},
        }
    )
    assert not _owns(api, Check("flow_run", a))
