"""Compute usage: measured per run, stored as Prefect artifacts, the monthly quota, and
exactly one record per run across a worker killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timezone

import httpx
import pytest
from conftest import OUTPUT, worker_policy
from helpers import (
    api_auth,
    create_pool,
    prefect_cli,
    run_containers,
    summary_versions,
    usage_records,
    usage_report,
    wait_for_final_state,
    wait_for_log,
    wait_for_usage_record,
    wait_for_usage_records,
    worker,
)
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import BIN, start_worker, wait_for

from prefect_managed.usage import month_of, next_reset, summary_key

pytestmark = pytest.mark.docker


def start_run(deployment_id, **parameters):
    return run_deployment(deployment_id, parameters=parameters, timeout=0, _sync=True).id


def this_month() -> str:
    return month_of(datetime.now(timezone.utc))


def test_a_run_is_measured_from_container_start_to_finish(deploy):
    deployment = deploy("sleeper", "sleeper-measured")
    flow_run_id = start_run(deployment, seconds=20)
    run = wait_for_final_state(flow_run_id)
    assert run.state.is_completed(), run.state

    record = wait_for_usage_record(flow_run_id)
    # 20 s of sleep plus the engine's start and the git clone, all inside the container.
    assert 20 <= record["wall_seconds"] <= 50
    assert record["billable_minutes"] == 1
    assert record["outcome"] == "completed"
    assert record["workspace"] == "tests" and record["pool"] == "tests-managed-pool"
    assert record["deployment"] == "sleeper-measured"
    assert record["image"].startswith("prefect-managed-runtime:")
    assert record["peak_memory_bytes"] > 50 * 2**20
    assert record["cpu_seconds"] > 0.5


def test_the_monthly_summary_has_history_under_a_stable_key(deploy):
    key = summary_key("tests", this_month())
    deployment = deploy("hello", "hello-summary")
    wait_for_final_state(start_run(deployment))
    wait_for(lambda: len(summary_versions(key)) >= 1, 60, "a summary")
    before = len(summary_versions(key))
    flow_run_id = start_run(deployment)
    wait_for_final_state(flow_run_id)
    wait_for_usage_record(flow_run_id)
    # A version after the record that shows this deployment (at most every 5 s on a
    # busy workspace, an earlier record's version may come first).
    versions = wait_for(
        lambda: (
            found
            if len(found := summary_versions(key)) > before and "| hello-summary |" in found[0].data
            else None
        ),
        60,
        "a new summary version",
    )
    latest = versions[0].data
    assert f"Compute usage of workspace `tests` in {this_month()}" in latest
    assert "| work pool | hours |" in latest and "| tests-managed-pool |" in latest
    assert "| deployment | hours |" in latest and "| hello-summary |" in latest
    assert "quota (h)" in latest


def test_an_out_of_memory_run_is_recorded_with_that_outcome(
    deploy, tight_pool, small_memory_worker
):
    oom = start_run(deploy("allocate", "allocate-usage", pool=tight_pool), megabytes=1024)
    assert wait_for_usage_record(oom, timeout=240)["outcome"] == "out of memory"


def test_a_timed_out_run_is_recorded_with_that_outcome(deploy, tight_pool, short_run_worker):
    slow = start_run(deploy("sleeper", "sleeper-usage", pool=tight_pool), seconds=300)
    record = wait_for_usage_record(slow, timeout=240)
    assert record["outcome"] == "timed out"
    assert 15 <= record["wall_seconds"] <= 60


def test_an_exhausted_quota_stops_the_next_run_naming_hours_quota_and_reset(
    deploy, runtime_image, package_index, tmp_path, prefect_server
):
    pool = create_pool("quota-pool")
    # One billed minute is 0.0167 h: the first run uses the whole quota.
    policy = worker_policy(
        tmp_path / "quota.toml",
        runtime_image,
        package_index.url,
        "quota",
        compute_hours_per_month=0.01,
    )
    deployment = deploy("hello", "hello-quota", pool=pool)
    with worker(pool, policy, "quota-worker"):
        first = start_run(deployment)
        assert wait_for_final_state(first).state.is_completed()
        wait_for_usage_record(first)
        wait_for_log(first, "all of the test tier's 0.01 h quota")
        second = start_run(deployment)
        run = wait_for_final_state(second, timeout=120)
    assert run.state.is_failed() and run.state.name == "QuotaExhausted", run.state
    reset = next_reset(this_month()).date().isoformat()
    assert "has used 0.02 h of compute" in run.state.message
    assert "monthly quota is 0.01 h" in run.state.message
    assert f"resets on {reset} (UTC)" in run.state.message
    assert usage_records(second) == []

    def quota_warnings() -> set[int]:
        events = httpx.post(
            f"{prefect_server}/events/filter",
            auth=api_auth(),
            json={"filter": {"event": {"prefix": ["prefect-managed.quota.warning"]}}, "limit": 50},
        ).json()["events"]
        return {
            event["payload"]["threshold_percent"]
            for event in events
            if event["resource"]["prefect.resource.id"] == "prefect-managed.workspace.quota"
        }

    thresholds = wait_for(
        lambda: quota_warnings() == {80, 100} and quota_warnings(), 30, "both quota warning events"
    )
    assert thresholds == {80, 100}


def test_a_killed_worker_leaves_exactly_one_record_per_run_after_restart(
    deploy, docker_client, runtime_image, package_index, tmp_path
):
    pool = create_pool("reconcile-pool")
    policy = worker_policy(
        tmp_path / "reconcile.toml",
        runtime_image,
        package_index.url,
        "reconcile",
        concurrency_limit=4,
    )
    env = {
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    deployment = deploy("sleeper", "sleeper-reconcile", pool=pool)
    first = start_worker(pool, OUTPUT, env, name="reconcile-worker")
    runs = [start_run(deployment, seconds=15) for _ in range(2)]
    wait_for(
        lambda: (
            all(run_containers(docker_client, run) for run in runs)
            and all(
                c.status == "running" for run in runs for c in run_containers(docker_client, run)
            )
        ),
        180,
        "both runs' containers running",
    )
    os.kill(first.service.process.pid, signal.SIGKILL)
    first.service.process.wait()
    assert all(run_containers(docker_client, run) for run in runs)  # left behind

    with worker(pool, policy, "reconcile-worker"):  # the same worker, restarted
        for run in runs:
            wait_for(
                lambda run=run: not run_containers(docker_client, run), 180, "orphans finished"
            )
    with worker(pool, policy, "reconcile-worker"):  # and once more: nothing counted twice
        time.sleep(5)

    for run in runs:
        records = usage_records(run)
        assert len(records) == 1, records
        assert records[0]["outcome"] == "completed"
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run).state.is_completed()


def test_a_finished_run_run_again_is_recorded_again(main_policy, deploy):
    """`prefect flow-run retry` (and the UI's Retry) runs a finished flow run again in a
    new container. That execution is the run's next attempt, recorded beside the first:
    taken for the first one's record, its compute would count nowhere."""
    deployment = deploy("hello", "hello-run-again")
    flow_run_id = start_run(deployment)
    assert wait_for_final_state(flow_run_id).state.is_completed()
    assert wait_for_usage_record(flow_run_id)["attempt"] == 1
    prefect_cli("flow-run", "retry", str(flow_run_id))
    records = wait_for_usage_records(flow_run_id, 2)
    assert sorted(record["attempt"] for record in records) == [1, 2]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    assert run.state.is_completed() and run.run_count == 2, (run.state, run.run_count)
    # The operator's books count both executions.
    report = usage_report(main_policy)
    counted = [r for r in report["records"] if r["flow_run_id"] == str(flow_run_id)]
    assert sorted(r["attempt"] for r in counted) == [1, 2]


def test_a_run_that_makes_itself_due_again_is_recorded_per_container(
    main_policy, managed_pool, deploy, docker_client
):
    """Hostile: a flow turns its own retry into one a worker's poll returns (through the
    gateway, its own retry policy rewritten after a failure it proposed), and another
    worker of the pool starts a second container of the run while the first goes on.
    Each container is an attempt of its own and recorded: neither's compute is taken for
    the other's, and the first one's finish leaves the run's state to the second."""
    deployment = deploy("starts_itself_again", "starts-itself-again")
    with worker(managed_pool, main_policy, "second-host"):
        flow_run_id = start_run(deployment, seconds=25)
        wait_for_log(flow_run_id, "starts_itself_again: its run is now AwaitingRetry", 120)
        wait_for_log(flow_run_id, "starts_itself_again: run count 2", 120)
        records = wait_for_usage_records(flow_run_id, 2)
    assert sorted(record["attempt"] for record in records) == [1, 2]
    run = wait_for_final_state(flow_run_id)
    assert run.state.is_completed(), run.state
    wait_for(lambda: not run_containers(docker_client, flow_run_id), 60, "its containers gone")
    report = usage_report(main_policy)
    counted = [r for r in report["records"] if r["flow_run_id"] == str(flow_run_id)]
    assert sorted(r["attempt"] for r in counted) == [1, 2]


def test_a_run_whose_state_history_does_not_parse_is_still_recorded(deploy, docker_client):
    """In depth: a state Prefect's client cannot read back (data that claims to be a
    result's metadata and is not) in a run's history, stored with the API's own
    credential (the gateway refuses it from a flow: tests/test_gateway_attacks.py), does
    not keep the run's usage from being recorded nor its container from being removed."""
    from pydantic import ValidationError

    deployment = deploy("sleeper", "sleeper-unreadable-history")
    flow_run_id = start_run(deployment, seconds=15)

    def running() -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and state.is_running()

    wait_for(running, 120, "the run Running")
    with get_client(sync_client=True) as client:
        for data in ({"storage_key": 1}, None):  # then a readable one, the run's current
            answer = client._client.post(
                f"/flow_runs/{flow_run_id}/set_state",
                json={"state": {"type": "RUNNING", "data": data}, "force": True},
            )
            assert answer.status_code in (200, 201), answer.text
        with pytest.raises(ValidationError):
            client.read_flow_run_states(flow_run_id)
    run = wait_for_final_state(flow_run_id)
    assert run.state.is_completed(), run.state
    record = wait_for_usage_record(flow_run_id, 120)
    assert record["attempt"] == 1 and record["outcome"] == "completed"
    assert record["wall_seconds"] >= 15
    wait_for(lambda: not run_containers(docker_client, flow_run_id), 60, "its container gone")


def test_the_usage_command_prints_the_months_records(prefect_server, main_policy, deploy):
    deployment = deploy("hello", "hello-usage-cli")
    flow_run_id = start_run(deployment)
    wait_for_final_state(flow_run_id)
    record = wait_for_usage_record(flow_run_id)
    env = {**os.environ, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(main_policy)}
    done = subprocess.run(
        [str(BIN / "prefect-managed"), "usage", "--json"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["workspace"] == "tests" and report["month"] == this_month()
    assert any(r["flow_run_id"] == str(flow_run_id) for r in report["records"])
    assert report["billable_minutes"] >= record["billable_minutes"]
    table = subprocess.run(
        [str(BIN / "prefect-managed"), "usage"],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0 and "hello-usage-cli" in table.stdout
    bad = subprocess.run(
        [str(BIN / "prefect-managed"), "usage", "--month", "2026-13"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "--month '2026-13' is not a month" in bad.stderr
