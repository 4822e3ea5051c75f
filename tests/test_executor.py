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
    flow_run_events,
    flow_run_logs,
    run_containers,
    session_workspace,
    wait_for_final_state,
    wait_for_usage_record,
)
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from services import start_worker, wait_for

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
#: The event Prefect's engine sends for a running flow run.
HEARTBEAT = "prefect.flow-run.heartbeat"

#: The switch itself, set on the stock side only.
SWITCH = "PREFECT_MANAGED_EXECUTOR"


#: A pull step that sets a variable in the environment the engine gets.
EDIT_ENVIRONMENT = {
    "os:environ.update": {"EXECUTOR_PROBE_EDIT": "set by a pull step", "TMPDIR": "/opt/prefect"}
}
SLOW_PULL_STEP = {"prefect.deployments.steps.run_shell_script": {"script": "sleep 300"}}
INSTALL_REQUIREMENTS = {
    "prefect.deployments.steps.pip_install_requirements": {
        "directory": "{{ directory }}",
        "requirements_file": "requirements.txt",
    }
}

#: scenario: (repository, flow, parameters, pull steps after the clone, env)
SCENARIOS = {
    "ordinary": ("flows", "ordinary", {}, [], {}),
    "failing": ("flows", "failing", {}, [], {}),
    "asynchronous": ("flows", "asynchronous", {}, [], {}),
    "parent": ("flows", "parent", {}, [], {}),
    "retrying": ("flows", "retrying", {}, [], {}),
    "cancel while running": ("flows", "waits", {"seconds": 300}, [], {}),
    "cancel during a slow pull step": ("flows", "waits", {}, [SLOW_PULL_STEP], {}),
    "docker stop": ("flows", "waits", {"seconds": 300}, [], {}),
    "maximum run time": ("flows", "waits", {"seconds": 300}, [], {}),
    "os._exit": ("flows", "exits", {"code": 3}, [], {}),
    "SIGKILL": ("flows", "kills_itself", {}, [], {}),
    "segfault": ("flows", "segfaults", {}, [], {}),
    "out of memory": ("flows", "eats_memory", {"megabytes": 2048}, [], {}),
    "pull step edits the environment": (
        "flows",
        "ordinary",
        {},
        [EDIT_ENVIRONMENT],
        {"PREFECT_LOGGING_EXTRA_LOGGERS": "probe_extra"},
    ),
    "cancel with a process left behind": ("flows", "leaves_a_child", {}, [], {}),
    # The fallbacks: Prefect's own supervisor or engine command, started by the executor.
    "shadowed module": ("shadowing", "imports_webbrowser", {}, [], {}),
    "pull step installs a package": ("packages", "ordinary", {}, [INSTALL_REQUIREMENTS], {}),
    "uv project": (
        "uv project",
        "ordinary",
        {},
        [],
        {"PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "true"},
    ),
}

#: What the executor says when it starts Prefect's own command instead, per scenario.
FALLBACKS = {
    "shadowed module": "a module the executor has already imported",
    "pull step installs a package": "the pull steps installed or removed packages",
    "uv project": "the workspace runs its own command",
}


def _repositories(git_server) -> dict[str, str]:
    flows = {"executor_flows.py": (FLOWS / "executor_flows.py").read_text()}
    return {
        "flows": git_server.publish("executor", flows),
        # A module of the standard library's, imported by the executor before the fork.
        "shadowing": git_server.publish(
            "executor-shadowing", {**flows, "webbrowser.py": 'SHADOW = "the repository\'s"\n'}
        ),
        "packages": git_server.publish(
            "executor-packages", {**flows, "requirements.txt": "managed-probe\n"}
        ),
        # Prefect's runner starts the engine with `uv run` for a project declaring prefect.
        "uv project": git_server.publish(
            "executor-uv",
            {
                **flows,
                "pyproject.toml": '[project]\nname = "probe"\nversion = "1"\n'
                'requires-python = ">=3.11"\ndependencies = ["prefect"]\n',
            },
        ),
    }


@pytest.fixture(scope="module")
def executor_runs(
    prefect_server, git_server, runtime_image, package_index, docker_client, tmp_path_factory
):
    """Every scenario run through both executors; returns {(scenario, executor): run}."""
    repositories = _repositories(git_server)
    pool = create_pool("executor-pool")
    policy = worker_policy(
        tmp_path_factory.mktemp("executor") / "executor.toml",
        runtime_image,
        package_index.url,
        session_workspace("executor"),
        concurrency_limit=2 * len(SCENARIOS),
        memory="512m",
        # Long enough for the cancels on a loaded machine, short enough for this test.
        max_run_seconds=150,
    )
    deployments = {}
    with get_client(sync_client=True) as client:
        for scenario, (repository, flow_name, _, steps, env) in SCENARIOS.items():
            for executor, switch in EXECUTORS.items():
                deployment_id = flow.from_source(
                    source=repositories[repository],
                    entrypoint=f"executor_flows.py:{flow_name}",
                    _sync=True,
                ).deploy(
                    name=f"{scenario.replace(' ', '_')}-{executor}",
                    work_pool_name=pool,
                    job_variables={"env": {**env, **switch}},
                    print_next_steps=False,
                    _sync=True,
                )
                if steps:
                    clone = client.read_deployment(deployment_id).pull_steps
                    client.update_deployment(
                        deployment_id, DeploymentUpdate(pull_steps=[*clone, *steps])
                    )
                deployments[scenario, executor] = deployment_id
    running = start_worker(
        pool,
        OUTPUT,
        {"PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)},
        name="executor-worker",
    )
    try:
        runs = {
            (scenario, executor): run_deployment(
                deployments[scenario, executor], parameters=SCENARIOS[scenario][2], timeout=0
            ).id
            for scenario in SCENARIOS
            for executor in EXECUTORS
        }

        def stop(flow_run_id: UUID) -> None:
            for container in run_containers(docker_client, flow_run_id):
                container.stop(timeout=10)

        # Each as soon as its run is far enough, both executors' alike.
        _act_when_logged(
            {
                runs[scenario, executor]: (text, action)
                for executor in EXECUTORS
                for scenario, text, action in (
                    ("cancel while running", "WAITING", _cancel),
                    ("cancel with a process left behind", "WAITING", _cancel),
                    (
                        "cancel during a slow pull step",
                        "Executing deployment step: run_shell_script",
                        _cancel,
                    ),
                    ("docker stop", "WAITING", stop),
                )
            }
        )
        finals = {key: wait_for_final_state(run_id, timeout=300) for key, run_id in runs.items()}
        time.sleep(3)  # the last logs are sent in batches
        yield {key: (run, _run_logs(run.id)) for key, run in finals.items()}
    finally:
        running.service.stop()


def _run_logs(flow_run_id: UUID) -> list[str]:
    """The run's log messages, an entry of its container's own output (which the worker
    forwards) marked as such: the probes' hooks print their line too, and a printed line
    is not the hook's log record."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from prefect_managed.container_output import CONTAINER_OUTPUT_LOGGER

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [
        f"[container output] {log.message}" if log.name == CONTAINER_OUTPUT_LOGGER else log.message
        for log in logs
    ]


def _act_when_logged(actions: dict, timeout: float = 240) -> None:
    """Call each action once its run's logs hold its text."""
    deadline = time.monotonic() + timeout
    while actions:
        for flow_run_id, (text, action) in list(actions.items()):
            if any(text in line for line in flow_run_logs(flow_run_id)):
                action(flow_run_id)
                del actions[flow_run_id]
        assert time.monotonic() < deadline, f"runs never logged what they wait for: {actions}"
        time.sleep(0.5)


def _cancel(flow_run_id: UUID) -> None:
    """As the UI's Cancel does."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling())


def _state(run) -> tuple[str, str]:
    return run.state.type.value, run.state.name


def _message(run) -> str:
    """The final state's message, without what names the run or its container."""
    message = (run.state.message or "").replace(str(run.id), "<run>")
    return re.sub(r"\b[0-9a-f]{12,64}\b", "<id>", message)


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
        ("cancel with a process left behind", ("CANCELLED", "Cancelled")),
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
    assert _message(prefork) == _message(stock)
    assert _hooks(prefork_logs) == _hooks(stock_logs)
    assert all(count == 1 for count in _hooks(prefork_logs).values()), _hooks(prefork_logs)
    assert prefork.run_count == stock.run_count


@pytest.mark.parametrize(
    "scenario", ["docker stop", "maximum run time", "cancel during a slow pull step", "uv project"]
)
def test_both_executors_are_stopped_alike(executor_runs, scenario):
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    assert _state(prefork) == _state(stock), (prefork.state.message, stock.state.message)
    assert _message(prefork) == _message(stock)
    assert _hooks(prefork_logs) == _hooks(stock_logs)


@pytest.mark.parametrize(
    "scenario",
    [
        "ordinary",
        "asynchronous",
        "parent",
        "failing",
        "pull step edits the environment",
        "shadowed module",
        "pull step installs a package",
    ],
)
def test_the_flow_sees_the_same_process(executor_runs, scenario):
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    seen, expected = _observed(prefork.id, prefork_logs), _observed(stock.id, stock_logs)
    for key in expected:
        assert seen[key] == expected[key], key
    assert seen == expected


@pytest.mark.parametrize("scenario", ["ordinary", "failing", "asynchronous", "parent", "retrying"])
def test_both_executors_send_the_same_heartbeats(executor_runs, scenario):
    """Prefect's engine sends the run's heartbeat event when the flow starts (and every
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY after). The pre-fork executor's heartbeat thread
    waits on its stop event rather than sleeping out its second: the server gets the
    same heartbeats from both."""
    runs = {executor: executor_runs[scenario, executor][0] for executor in EXECUTORS}

    def counts() -> dict[str, int]:
        return {executor: len(flow_run_events(run.id, HEARTBEAT)) for executor, run in runs.items()}

    try:  # the server stores events a little after it gets them
        wait_for(lambda: (c := counts())["prefork"] == c["stock"] >= 1, 30, "the heartbeats", 1)
    except TimeoutError:
        pass
    found = counts()
    assert found["prefork"] == found["stock"] >= 1, found


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


def test_a_pull_step_edits_the_engines_environment(executor_runs):
    for executor in EXECUTORS:
        run, logs = executor_runs["pull step edits the environment", executor]
        assert run.state.is_completed(), executor
        observed = _observed(run.id, logs)
        assert observed["environment"]["EXECUTOR_PROBE_EDIT"] == "set by a pull step", executor
        assert observed["tempdir"] == "/opt/prefect", executor
        assert observed["logging"]["probe_extra"]["handlers"] == ["APILogHandler"], executor


def test_a_cancel_during_a_pull_step_ends_the_run_cancelled(executor_runs):
    for executor in EXECUTORS:
        run, logs = executor_runs["cancel during a slow pull step", executor]
        assert _state(run) == ("CANCELLED", "Cancelled"), (executor, run.state.message)
        assert not any(line.startswith("WAITING") for line in logs), executor


@pytest.mark.parametrize("scenario", sorted(FALLBACKS))
def test_the_executor_falls_back_to_prefects_commands(executor_runs, scenario):
    """Where a forked engine would not see what a new one sees, the executor starts
    Prefect's own command, and says so in the run's logs."""
    (prefork, prefork_logs), (stock, stock_logs) = (
        executor_runs[scenario, "prefork"],
        executor_runs[scenario, "stock"],
    )
    assert _state(prefork) == _state(stock), (prefork.state.message, stock.state.message)
    assert any(FALLBACKS[scenario] in line for line in prefork_logs), prefork_logs
    assert not any("prefect-managed:" in line for line in stock_logs), stock_logs
    observed = [line for line in prefork_logs if line.startswith("OBSERVED ")]
    for line in observed:  # a flow that ran: in an engine of its own
        assert json.loads(line.removeprefix("OBSERVED "))["preloaded"] is False


def test_the_repositorys_module_wins_as_with_prefects_command(executor_runs):
    for executor in EXECUTORS:
        run, logs = executor_runs["shadowed module", executor]
        assert run.state.is_completed(), (executor, run.state.message)
        assert "WEBBROWSER the repository's" in logs, (executor, logs)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_books_agree(executor_runs, scenario):
    """The operator's side: each run's usage record says the same of how its container
    ended (a container held up by a process the flow left behind would end in the
    maximum run time)."""
    prefork, stock = (executor_runs[scenario, executor][0] for executor in EXECUTORS)
    records = [wait_for_usage_record(run.id, timeout=120) for run in (prefork, stock)]
    ended = [(record["outcome"], record["exit_code"]) for record in records]
    assert ended[0] == ended[1], records
