"""The pre-fork executor against Prefect's own, differentially: the same probe flows run
through both (the runtime image's default, and `PREFECT_MANAGED_EXECUTOR=stock`) on a real
server and engine, and what the flow saw and how each run ended must be the same.

All runs of both executors are started at once (one worker, enough slots) and compared
pairwise afterwards; the flows are in tests/flows/executor_flows.py."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from uuid import UUID

import pytest
from conftest import FLOWS, OUTPUT, worker_policy
from helpers import (
    create_pool,
    flow_run_logs,
    run_containers,
    session_workspace,
    wait_for_final_state,
    wait_for_log,
)
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import run_deployment
from services import start_worker

pytestmark = pytest.mark.docker

EXECUTORS = {"prefork": {}, "stock": {"PREFECT_MANAGED_EXECUTOR": "stock"}}

#: Values that belong to one run, not to how it was started.
PER_RUN = {
    "PREFECT__FLOW_RUN_ID",
    "PREFECT__CONTROL_PORT",
    "PREFECT__CONTROL_TOKEN",
    "HOSTNAME",
    "PREFECT__DEPLOYMENT_ID",  # a deployment per executor
    "PREFECT_API_AUTH_STRING",  # the run's own credential for the run gateway
}
#: The switch itself, set on the stock side only.
SWITCH = "PREFECT_MANAGED_EXECUTOR"


@pytest.fixture(scope="module")
def executor_runs(
    prefect_server, git_server, runtime_image, package_index, docker_client, tmp_path_factory
):
    """Every scenario run through both executors; returns {(scenario, executor): run}."""
    repo = git_server.publish(
        "executor", {"executor_flows.py": (FLOWS / "executor_flows.py").read_text()}
    )
    pool = create_pool("executor-pool")
    policy = worker_policy(
        tmp_path_factory.mktemp("executor") / "executor.toml",
        runtime_image,
        package_index.url,
        session_workspace("executor"),
        concurrency_limit=14,
        memory="512m",
        max_run_seconds=90,
    )
    scenarios = {
        "ordinary": ("ordinary", {}),
        "failing": ("failing", {}),
        "asynchronous": ("asynchronous", {}),
        "parent": ("parent", {}),
        "retrying": ("retrying", {}),
        "cancel while running": ("waits", {"seconds": 300}),
        "docker stop": ("waits", {"seconds": 300}),
        "maximum run time": ("waits", {"seconds": 300}),
        "os._exit": ("exits", {"code": 3}),
        "SIGKILL": ("kills_itself", {}),
        "segfault": ("segfaults", {}),
        "out of memory": ("eats_memory", {"megabytes": 2048}),
    }
    deployments = {}
    for executor, env in EXECUTORS.items():
        for flow_name in {name for name, _ in scenarios.values()}:
            deployments[flow_name, executor] = flow.from_source(
                source=repo, entrypoint=f"executor_flows.py:{flow_name}", _sync=True
            ).deploy(
                name=f"{flow_name}-{executor}",
                work_pool_name=pool,
                job_variables={"env": env},
                print_next_steps=False,
                _sync=True,
            )
    running = start_worker(
        pool,
        OUTPUT,
        {"PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)},
        name="executor-worker",
    )
    try:
        runs = {}
        for scenario, (flow_name, parameters) in scenarios.items():
            for executor in EXECUTORS:
                runs[scenario, executor] = run_deployment(
                    deployments[flow_name, executor], parameters=parameters, timeout=0
                ).id
        for executor in EXECUTORS:
            wait_for_log(runs["cancel while running", executor], "WAITING", timeout=240)
            with get_client(sync_client=True) as client:
                from prefect.states import Cancelling

                client.set_flow_run_state(runs["cancel while running", executor], Cancelling())
            wait_for_log(runs["docker stop", executor], "WAITING", timeout=240)
            for container in run_containers(docker_client, runs["docker stop", executor]):
                container.stop(timeout=10)
        finals = {key: wait_for_final_state(run_id, timeout=300) for key, run_id in runs.items()}
        time.sleep(3)  # the last logs are sent in batches
        yield {key: (run, flow_run_logs(run.id)) for key, run in finals.items()}
    finally:
        running.service.stop()


def _state(run) -> tuple[str, str]:
    return run.state.type.value, run.state.name


def _hooks(logs: list[str]) -> Counter:
    return Counter(line for line in logs if line.startswith("HOOK "))


def _observed(run_id: UUID, logs: list[str]) -> dict:
    [line] = [line for line in logs if line.startswith("OBSERVED ")]
    text = line.removeprefix("OBSERVED ").replace(str(run_id), "<run>")
    text = re.sub(r"-(prefork|stock)\b", "-<executor>", text)  # the deployments' names
    text = re.sub(r"prefect-(flow-run|workspace-attempt)-[A-Za-z0-9_]+", r"prefect-\1-*", text)
    observed = json.loads(text)
    observed.pop("preloaded")
    observed["environment"].pop(SWITCH, None)
    for values in (observed["environment"], observed["settings"]):
        for key in PER_RUN & values.keys():
            values[key] = "<per run>"
    return observed


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("ordinary", ("COMPLETED", "Completed")),
        ("failing", ("FAILED", "Failed")),
        ("asynchronous", ("COMPLETED", "Completed")),
        ("parent", ("COMPLETED", "Completed")),
        ("retrying", ("COMPLETED", "Completed")),
        ("cancel while running", ("CANCELLED", "Cancelled")),
        ("os._exit", ("CRASHED", "Crashed")),
        ("SIGKILL", ("CRASHED", "Crashed")),
        ("segfault", ("CRASHED", "Crashed")),
        ("out of memory", ("CRASHED", "Crashed")),
    ],
)
def test_both_executors_end_a_run_alike(executor_runs, scenario, expected):
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    assert _state(stock) == expected, (stock.state.message, stock_logs[-5:])
    assert _state(prefork) == expected, (prefork.state.message, prefork_logs[-5:])
    assert _hooks(prefork_logs) == _hooks(stock_logs)
    assert all(count == 1 for count in _hooks(prefork_logs).values()), _hooks(prefork_logs)
    assert prefork.run_count == stock.run_count


@pytest.mark.parametrize("scenario", ["docker stop", "maximum run time"])
def test_both_executors_are_stopped_alike(executor_runs, scenario):
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    assert _state(prefork) == _state(stock), (prefork.state.message, stock.state.message)
    assert prefork.state.message == stock.state.message
    assert _hooks(prefork_logs) == _hooks(stock_logs)


@pytest.mark.parametrize("scenario", ["ordinary", "asynchronous", "parent", "failing"])
def test_the_flow_sees_the_same_process(executor_runs, scenario):
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    seen, expected = _observed(prefork.id, prefork_logs), _observed(stock.id, stock_logs)
    for key in expected:
        assert seen[key] == expected[key], key
    assert seen == expected


def test_the_subflow_ran_in_the_engine(executor_runs):
    for executor in EXECUTORS:
        parent, _ = executor_runs["parent", executor]
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
                )
            )
        assert [child.state.name for child in children] == ["Completed"], executor


def test_the_prefork_executor_started_the_runs(executor_runs):
    """The default is the pre-fork executor (the engine finds Prefect's CLI imported before
    the fork); the switch keeps Prefect's own (a new interpreter imports no CLI)."""
    for executor, preloaded in (("prefork", True), ("stock", False)):
        run, logs = executor_runs["ordinary", executor]
        [line] = [line for line in logs if line.startswith("OBSERVED ")]
        assert json.loads(line.removeprefix("OBSERVED "))["preloaded"] is preloaded, executor
