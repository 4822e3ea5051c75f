"""Past one machine, on Prefect's own HA topology (tests/topology.py): PostgreSQL, Redis
through prefect-redis, two API processes with --no-services behind a round-robin proxy,
one process of background services; and two hosts, each a `prefect-managed serve` on
its own Docker engine (host-a on this machine's engine, host-b on a second dockerd of its
own: tests/engines.py), both reaching the API through the proxy.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime

import pytest
from conftest import AUTH, OUTPUT
from engines import start_engine
from helpers import (
    container_creations,
    create_pool,
    flow_run_logs,
    run_containers,
    session_workspace,
    usage_records,
    usage_report,
    wait_for_final_state,
)
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from services import wait_for
from test_serve import serving, start_run, start_serve, wait_for_log_line
from topology import start_topology

from prefect_managed import ManagedWorker
from prefect_managed.configuration import WORKSPACE_LABEL

# serial: its `[host]` room counts every managed container on the engine.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500), pytest.mark.serial]


@pytest.fixture(scope="module")
def topology():
    up = start_topology(OUTPUT, auth=AUTH)
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def api(topology):
    """This process's Prefect client through the proxy; the test's pools deleted after."""
    updates = {PREFECT_API_URL: topology.api_url, PREFECT_API_AUTH_STRING: AUTH}
    with temporary_settings(updates=updates):
        yield topology.api_url
        with get_client(sync_client=True) as client:
            for pool in client.read_work_pools():
                if pool.type == ManagedWorker.type:
                    client.delete_work_pool(pool.name)


@pytest.fixture
def policy_for(runtime_image, package_index, tmp_path):
    from conftest import worker_policy

    def _policy(name: str, host: dict | None = None, file: str = "", **tier):
        return worker_policy(
            tmp_path / f"{file or name}.toml",
            runtime_image,
            package_index.url,
            session_workspace(name),
            host=host,
            **tier,
        )

    return _policy


@pytest.fixture
def deploy_to(flows_repo, api):
    from prefect import flow

    def _deploy(pool: str, flow_name: str = "sleeper"):
        return flow.from_source(source=flows_repo, entrypoint=f"probe_flows.py:{flow_name}").deploy(
            name=f"{flow_name}-{pool}", work_pool_name=pool, print_next_steps=False
        )

    return _deploy


@pytest.fixture(scope="module")
def second_engine(runtime_image):
    engine = start_engine(OUTPUT)
    try:
        engine.load(runtime_image)
        yield engine
    finally:
        engine.remove()


def running_of(client, workspace: str) -> list:
    return client.containers.list(
        filters={"label": f"{WORKSPACE_LABEL}={workspace}", "status": "running"},
        ignore_removed=True,
    )


def records_of(runs: list, second_engine) -> dict:
    """Each run's usage records, waited for up to 180 s; else what the runs without one
    went through, and whether the second engine still answers."""
    try:
        return {run: wait_for(lambda run=run: usage_records(run), 180, "a record") for run in runs}
    except TimeoutError:
        missing = [run for run in runs if not usage_records(run)]
        raise AssertionError(
            f"no usage record for {len(missing)} of {len(runs)} runs:\n"
            + "\n".join(run_story(run) for run in missing)
            + "\n"
            + engine_story(second_engine)
        ) from None


def run_story(run) -> str:
    with get_client(sync_client=True) as client:
        states = [state.name for state in client.read_flow_run_states(run)]
    return f"flow run {run}: {' → '.join(states)}\n  " + "\n  ".join(flow_run_logs(run)[-40:])


def engine_story(engine) -> str:
    """Whether the second dockerd runs and answers, and the end of its log."""
    try:
        answers = engine.client().ping()
    except Exception as exc:  # what the failure's message says
        answers = repr(exc)
    log = engine.log_path.read_text(errors="replace")[-3000:] if engine.log_path.exists() else ""
    return f"second engine: exit status {engine.process.poll()}, ping {answers}\n{log}"


CAP = 3
RUNS = 8
_TOLD = ("submitting flow run", "WARNING", "ERROR", "started!", "Waiting for")


def test_the_cap_holds_across_hosts_and_api_processes_and_one_api_process_killed_loses_nothing(
    api, topology, deploy_to, policy_for, docker_client, second_engine
):
    """Two hosts on two engines, a cap of 3, 8 runs; API process 0 is SIGKILLed once both
    hosts run runs and started again 20 s later. Each host has room for 2 runs, so the cap
    is reached only with both hosts running at once. (Which host takes a freed slot is a
    race, and a host whose poll met the killed process waits out Prefect's client
    retries: in CI one host took all 8 runs, once either host.)"""
    workspace = session_workspace("ha-cap")
    engine_b = second_engine.client()
    policy_a, policy_b = (
        policy_for(
            "ha-cap",
            file=f"ha-cap-{host}",
            concurrency_limit=CAP,
            memory="1g",
            host={"reserve_memory": room_for(engine, 1024**3, runs=2)},
        )
        for host, engine in (("a", docker_client), ("b", engine_b))
    )
    pool = create_pool("ha-cap")
    deployment = deploy_to(pool)
    before = dict(topology.proxy.connections)
    with (
        container_creations(docker_client, f"{WORKSPACE_LABEL}={workspace}") as on_a,
        container_creations(engine_b, f"{WORKSPACE_LABEL}={workspace}") as on_b,
        serving(api, policy_a, "ha-a", env=topology.env) as host_a,
        serving(
            api, policy_b, "ha-b", env={**topology.env, "DOCKER_HOST": second_engine.host}
        ) as host_b,
    ):
        for service in (host_a, host_b):
            wait_for_log_line(service, f"Serving work pool {pool!r}")
        runs = [start_run(deployment, seconds=6) for _ in range(RUNS)]
        most, killed_at, restarted = 0, None, False
        deadline = time.monotonic() + 1200
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                running = len(running_of(docker_client, workspace)) + len(
                    running_of(engine_b, workspace)
                )
                most = max(most, running)
                if killed_at is None and running >= 2 and on_a and on_b:
                    topology.kill_api(0)
                    killed_at = time.monotonic()
                if killed_at and not restarted and time.monotonic() - killed_at > 20:
                    topology.start_api(0)
                    restarted = True
                if (restarted or killed_at is None) and all(
                    client.read_flow_run(r).state.is_final() for r in runs
                ):
                    break  # (never killed: the assertions below say so)
                time.sleep(0.2)
            states = [client.read_flow_run(run).state for run in runs]
            # a run that did not complete, or had more than one container: what it and its
            # containers said, for the message
            created = Counter(labels["io.prefect.flow-run-id"] for labels in [*on_a, *on_b])
            unfinished = "\n".join(
                f"flow run {run} ({state.name}, {created[str(run)]} containers):\n  "
                + "\n  ".join(flow_run_logs(run)[-60:])
                for run, state in zip(runs, states, strict=True)
                if not state.is_completed() or created[str(run)] != 1
            )
        assert [state.type.value for state in states] == ["COMPLETED"] * RUNS, (
            unfinished + "\n" + engine_story(second_engine)
        )
        records = records_of(runs, second_engine)
        for run in runs:
            wait_for(lambda run=run: not run_containers(docker_client, run), 300, "removed")
            wait_for(lambda run=run: not run_containers(engine_b, run), 300, "removed")
        usage = usage_report(policy_a, api)
        # The quota is shared: with a quota of exactly the minutes both hosts used, the
        # next run is refused, whichever host polls first (each counts the other's records).
        told = {}  # what each host said, for a failure's message
        for service in (host_a, host_b):
            service.stop(timeout=60)
            lines = service.log().splitlines()
            told[service.name] = [line[:200] for line in lines if any(w in line for w in _TOLD)][
                -15:
            ]
        used_up = policy_for(
            "ha-cap",
            concurrency_limit=CAP,
            compute_hours_per_month=usage["billable_minutes"] / 60,
        )
        with (
            serving(api, used_up, "ha-a", env=topology.env) as host_a,
            serving(api, used_up, "ha-b", env={"DOCKER_HOST": second_engine.host}) as host_b,
        ):
            refused = wait_for_final_state(start_run(deployment, seconds=1), 600).state
    engine_b.close()
    through = {
        port: topology.proxy.connections[port] - before.get(port, 0) for port in topology.api_ports
    }

    assert killed_at is not None and restarted, (len(on_a), len(on_b), told)
    assert most == CAP, (most, len(on_a), len(on_b), told)
    per_run = Counter(labels["io.prefect.flow-run-id"] for labels in [*on_a, *on_b])
    assert per_run == Counter({str(run): 1 for run in runs}), unfinished
    assert on_a and on_b, (len(on_a), len(on_b))  # both hosts ran runs
    assert all(len(found) == 1 for found in records.values()), records
    assert all(count > 0 for count in through.values()), through  # both API processes served
    assert usage["runs"] == RUNS
    assert usage["billable_minutes"] == sum(
        found[0]["billable_minutes"] for found in records.values()
    )
    assert refused.is_failed() and refused.name == "QuotaExhausted", refused


# -- a full host, a lost host ------------------------------------------------------------

HEARTBEAT = "5"  # PREFECT_WORKER_HEARTBEAT_SECONDS of these services
LOST_AFTER = 30  # [host] lost_after_seconds


def room_for(docker_client, memory: int, runs: int = 1) -> int:
    """A `[host]` reserve_memory that leaves room for `runs` runs of `memory` bytes."""
    return docker_client.info()["MemTotal"] - runs * memory - memory // 2


@pytest.mark.timeout(1500)
def test_a_full_host_leaves_runs_to_the_other_host(
    api, deploy_to, policy_for, docker_client, second_engine
):
    workspace = session_workspace("serve-full")
    policy = policy_for(
        "serve-full",
        concurrency_limit=4,
        memory="1g",
        host={"reserve_memory": room_for(docker_client, 1024**3)},
    )
    pool = create_pool("full-host")
    deployment = deploy_to(pool, "sleeper")
    engine_b = second_engine.client()
    with (
        container_creations(docker_client, f"{WORKSPACE_LABEL}={workspace}") as on_a,
        container_creations(engine_b, f"{WORKSPACE_LABEL}={workspace}") as on_b,
        serving(api, policy, "full-a") as host_a,
        serving(api, policy, "full-b", env={"DOCKER_HOST": second_engine.host}) as host_b,
    ):
        for service in (host_a, host_b):
            wait_for_log_line(service, f"Serving work pool {pool!r}")
        runs = [start_run(deployment, seconds=4) for _ in range(4)]
        most = {"a": 0, "b": 0}
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                most["a"] = max(most["a"], len(running_of(docker_client, workspace)))
                most["b"] = max(most["b"], len(running_of(engine_b, workspace)))
                if all(client.read_flow_run(run).state.is_final() for run in runs):
                    break
                time.sleep(0.2)
            states = [client.read_flow_run(run).state for run in runs]
        assert [state.type.value for state in states] == ["COMPLETED"] * 4, "\n".join(
            [*(run_story(run) for run in runs), engine_story(second_engine)]
        )
        records = records_of(runs, second_engine)
    engine_b.close()

    assert most == {"a": 1, "b": 1}, most
    ran = Counter(labels["io.prefect.worker-name"] for labels in [*on_a, *on_b])
    assert ran["full-a-full-host"] >= 1 and ran["full-b-full-host"] >= 1, ran
    assert sum(ran.values()) == 4, ran
    assert all(len(found) == 1 for found in records.values()), records


@pytest.mark.timeout(1500)
def test_a_lost_host_s_run_ends_crashed_with_one_record_and_its_return_counts_it_once(
    api, deploy_to, policy_for, docker_client, second_engine
):
    """host-b runs the only slot's run; its service is SIGKILLed and its engine stopped.
    host-a ends the run Crashed (HostLost) within the documented time, records it once
    (outcome lost), and then runs the next run on the slot that came back. host-b's
    return (engine and service) finishes the dead container: its own record replaces the
    lost one, and the month counts the run once."""
    policy = policy_for("serve-lost", concurrency_limit=1, host={"lost_after_seconds": LOST_AFTER})
    pool = create_pool("lost-host")
    deployment = deploy_to(pool, "sleeper")
    beat = {"PREFECT_WORKER_HEARTBEAT_SECONDS": HEARTBEAT}
    on_b = {**beat, "DOCKER_HOST": second_engine.host}
    host_a = host_b = None
    try:
        host_b = start_serve(api, policy, "lost-b", env=on_b)
        wait_for_log_line(host_b, f"Serving work pool {pool!r}")
        lost = start_run(deployment, seconds=900)
        with get_client(sync_client=True) as client:
            try:
                wait_for(lambda: client.read_flow_run(lost).state.is_running(), 600, "run Running")
            except TimeoutError:
                raise AssertionError(
                    run_story(lost)
                    + "\n"
                    + host_b.log()[-3000:]
                    + "\n"
                    + engine_story(second_engine)
                ) from None
        host_a = start_serve(api, policy, "lost-a", env=beat)
        wait_for_log_line(host_a, f"Serving work pool {pool!r}")
        time.sleep(LOST_AFTER)  # host-a watches the pool for as long as it takes to judge

        host_b.process.kill()
        host_b.process.wait(30)
        second_engine.stop()
        gone_at = time.monotonic()
        with get_client(sync_client=True) as client:
            ended = wait_for(
                lambda: (state := client.read_flow_run(lost).state).is_final() and state,
                300,
                "the lost run final",
            )
        took = time.monotonic() - gone_at
        records = wait_for(lambda: usage_records(lost), 120, "the lost run's record")
        # The slot comes back (its lease expires): the next run starts on host-a.
        after = start_run(deployment, seconds=1)
        next_run = wait_for_final_state(after, 600, lambda: host_a.log()[-4000:])

        second_engine.start()
        host_b = start_serve(api, policy, "lost-b", env=on_b)
        engine_b = second_engine.client()
        wait_for(lambda: not run_containers(engine_b, lost), 300, "the dead container finished")
        engine_b.close()
        records_after_return = wait_for(
            lambda: len(found := usage_records(lost)) == 2 and found, 120, "the container's record"
        )
        usage = usage_report(policy, api)
        with get_client(sync_client=True) as client:
            state_after_return = client.read_flow_run(lost).state
    finally:
        for service in (host_a, host_b):
            if service is not None:
                service.stop(timeout=60)

    assert ended.is_crashed() and ended.name == "HostLost", ended
    assert "'lost-b-lost-host'" in ended.message and "lost_after_seconds" in ended.message
    # Documented bound: lost_after_seconds + lost_after_seconds / 4 + the heartbeat.
    assert took <= LOST_AFTER + LOST_AFTER / 4 + int(HEARTBEAT) + 15, took
    assert len(records) == 1 and records[0]["outcome"] == "lost", records
    assert records[0]["cpu_seconds"] is None and records[0]["billable_minutes"] >= 1
    assert next_run.state.is_completed(), next_run.state
    assert "Waiting for a concurrency slot" not in str(next_run.state.message)
    container_record = next(r for r in records_after_return if r["outcome"] != "lost")
    # The lost record spans the run's last Pending state to host-b's last heartbeat: it
    # began before the container started and ended before the container did (its wall
    # time may still be the longer one, by the container's start).
    span = {
        key: {edge: datetime.fromisoformat(str(r[edge])) for edge in ("started_at", "finished_at")}
        for key, r in (("lost", records[0]), ("container", container_record))
    }
    assert span["lost"]["started_at"] <= span["container"]["started_at"], records_after_return
    assert span["lost"]["finished_at"] <= span["container"]["finished_at"], records_after_return
    assert usage["runs"] == 2  # the lost run once, and the next run
    assert usage["billable_minutes"] == (
        container_record["billable_minutes"] + usage_records(after)[0]["billable_minutes"]
    )
    assert state_after_return.is_crashed(), state_after_return
