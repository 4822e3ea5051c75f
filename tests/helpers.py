"""Reading what a user would check: flow run states, logs and containers."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from services import BIN, start_worker, wait_for

#: This test session's tag. Tests that count a workspace's containers by label give their
#: workspace a name ending with it: another session on the same Docker engine (or one
#: that ended and left containers behind) must not count as theirs.
SESSION = uuid.uuid4().hex[:6]


def session_workspace(name: str) -> str:
    return f"{name}-{SESSION}"


def wait_for_final_state(
    flow_run_id: UUID, timeout: float = 240, explain: Callable[[], str] | None = None
) -> FlowRun:
    """The run once final; else fail with its state and what `explain` adds (a log)."""
    with get_client(sync_client=True) as client:

        def final() -> FlowRun | None:
            run = client.read_flow_run(flow_run_id)
            return run if run.state is not None and run.state.is_final() else None

        try:
            return wait_for(final, timeout, f"flow run {flow_run_id} reaching a final state", 0.5)
        except TimeoutError:
            run = client.read_flow_run(flow_run_id)
            raise AssertionError(
                f"flow run {flow_run_id} is still {run.state.name if run.state else None} "
                f"after {timeout} s" + (f"\n{explain()}" if explain else "")
            ) from None


def summary_versions(key: str) -> list:
    """Every version of a month's summary artifact, the newest first."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
        )


def flow_run_logs(flow_run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def wait_for_log(flow_run_id: UUID, text: str, timeout: float = 30) -> list[str]:
    """The flow run's logs once one of them contains `text` (logs are sent in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = flow_run_logs(flow_run_id)
        if any(text in message for message in messages):
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"no log of flow run {flow_run_id} contains {text!r}: {messages}")
        time.sleep(0.5)


def run_containers(docker_client, flow_run_id: UUID) -> list:
    # ignore_removed: a container the worker removes while it is being listed is gone.
    return docker_client.containers.list(
        all=True, filters={"label": f"io.prefect.flow-run-id={flow_run_id}"}, ignore_removed=True
    )


@contextmanager
def container_creations(docker_client, label: str):
    """The labels of every container Docker creates with `label` ("key=value") meanwhile.

    Read live from Docker's event stream, subscribed before the block runs: the engine
    keeps only its last 256 events for later queries, fewer than a busy machine (or the
    suite's other process) makes during a test, so a query after the fact can miss a
    creation and find nothing.
    """
    created: list[dict] = []
    # From a second back: the engine answers before it subscribes the stream, and its
    # buffer covers that gap.
    events = docker_client.api.events(
        since=int(time.time()) - 1,
        filters={"type": "container", "event": "create", "label": label},
        decode=True,
    )

    def read() -> None:
        try:
            for event in events:
                created.append(event["Actor"]["Attributes"])
        except Exception:  # the stream is closed when the block ends
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield created
        time.sleep(1)  # let the last events arrive
        # A stream that broke ends like an empty one: never a silent "nothing created".
        assert reader.is_alive(), "Docker's event stream ended before the test did"
    finally:
        events.close()
        reader.join(10)


def wait_for_settled_run(docker_client, flow_run_id: UUID, timeout: float = 240) -> FlowRun:
    """The run once it is final and the worker has removed its container.

    The engine in a container may report a state before the worker has read the
    container (for example an out-of-memory kill); what the user finally sees is the
    state after the worker is done.
    """
    wait_for_final_state(flow_run_id, timeout)
    wait_for(lambda: not run_containers(docker_client, flow_run_id), 60, "the container removed")
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def usage_records(flow_run_id: UUID) -> list[dict]:
    """The usage records attached to a flow run that verify with the workers' ledger key
    (what the ledger counts: a record a flow forged is not among them)."""
    import re

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from prefect_managed.ledger import artifact_record
    from prefect_managed.settings import ledger_key
    from prefect_managed.usage import UsageRecord

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="-run-")),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    records = []
    for artifact in artifacts:
        found = re.fullmatch(r"usage-(.+)-(\d{4})(\d{2})-run-.+", artifact.key or "")
        if found is None:
            continue
        workspace, month = found[1], f"{found[2]}-{found[3]}"
        record = artifact_record(ledger_key(), workspace, month, artifact)
        if isinstance(record, UsageRecord):
            records.append(record.model_dump(mode="json"))
    return records


def flow_run_events(flow_run_id: UUID, name: str) -> list[dict]:
    """The events named `name` whose resource is the flow run, as the server stored them."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    return httpx.post(
        f"{PREFECT_API_URL.value()}/events/filter",
        auth=api_auth(),
        json={
            "filter": {
                "event": {"name": [name]},
                "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            },
            "limit": 50,
        },
    ).json()["events"]


def executed_status_code(flow_run_id: UUID, timeout: float = 60) -> str:
    """The exit code Prefect's "executed flow run" event gives the run's infrastructure
    (what the UI's event feed shows), once the worker has emitted it."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    def find() -> str | None:
        events = httpx.post(
            f"{PREFECT_API_URL.value()}/events/filter",
            auth=api_auth(),
            json={
                "filter": {
                    "event": {"name": ["prefect.worker.executed-flow-run"]},
                    "related": {
                        "resources_in_roles": [[f"prefect.flow-run.{flow_run_id}", "flow-run"]]
                    },
                },
                "limit": 5,
            },
        ).json()["events"]
        for event in events:
            for related in event["related"]:
                if related["prefect.resource.id"] == f"prefect.flow-run.{flow_run_id}":
                    return related.get("prefect.infrastructure.status-code")
        return None

    return wait_for(find, timeout, f"the executed event of flow run {flow_run_id}", 1)


def api_auth():
    """The test server's credential for a request made without Prefect's client."""
    import os

    import httpx

    user, _, password = os.environ["PREFECT_API_AUTH_STRING"].partition(":")
    return httpx.BasicAuth(user, password)


def usage_report(policy: Path, api: str | None = None, auth: str | None = None) -> dict:
    """`prefect-managed usage --json` as the operator runs it (with the workers' key)."""
    import json
    import os
    import subprocess

    from services import BIN

    env = {**os.environ, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)}
    if api is not None:
        env["PREFECT_API_URL"] = api
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    done = subprocess.run(
        [str(BIN / "prefect-managed"), "usage", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for_usage_record(flow_run_id: UUID, timeout: float = 60) -> dict:
    records = wait_for(
        lambda: usage_records(flow_run_id), timeout, f"a usage record of {flow_run_id}"
    )
    assert len(records) == 1, records
    return records[0]


def wait_for_usage_records(flow_run_id: UUID, count: int, timeout: float = 240) -> list[dict]:
    """The run's usage records once there are at least `count` of them."""

    def enough() -> list[dict] | None:
        records = usage_records(flow_run_id)
        return records if len(records) >= count else None

    return wait_for(enough, timeout, f"{count} usage records of {flow_run_id}")


def prefect_cli(*args: str) -> None:
    """Prefect's own CLI, as a user runs it; fails the test on a nonzero exit."""
    done = subprocess.run(
        [str(BIN / "prefect"), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def create_pool(name: str, base_job_template: dict | None = None) -> str:
    """A `prefect:managed` pool made through the API, with the given base job template."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from prefect_managed import ManagedWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=ManagedWorker.type,
                base_job_template=base_job_template
                or ManagedWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
    return name


def create_pool_with_cli(name: str) -> str:
    """`prefect work-pool create NAME --type prefect:managed`, as the quickstart says."""
    import subprocess

    from services import BIN

    done = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", name, "--type", "prefect:managed"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return name


@contextmanager
def worker(pool: str, policy: Path, name: str):
    """`prefect worker start --type prefect:managed` with a policy file, stopped on exit."""
    from conftest import OUTPUT

    running = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        name=name,
    )
    try:
        yield running
    finally:
        running.service.stop()
