"""The per-workspace dependency cache, for real: a Prefect server, `prefect worker start`
processes with their own policies, a Docker engine and the loopback package index.

Correctness only (isolation, concurrent use, eviction); its speed is measured by
`python -m benchmarks`, never asserted here.
"""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import pytest
from conftest import OUTPUT, worker_policy
from helpers import create_pool, wait_for_final_state, wait_for_log, worker
from prefect import flow
from prefect.deployments import run_deployment
from services import build_wheel, start_worker

from prefect_managed.configuration import WORKSPACE_LABEL

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows"


@pytest.fixture(scope="module")
def cache_flows(git_server, prefect_server) -> str:
    return git_server.publish(
        "cache-flows", {"cache_flows.py": (FLOWS / "cache_flows.py").read_text()}
    )


@pytest.fixture
def publish_wheel(package_index):
    """Put a wheel of `name` with `kib` KiB of incompressible payload on the index."""

    def _publish(name: str, kib: int = 4) -> None:
        module = name.replace("-", "_")
        payload = secrets.token_hex(kib * 512)
        build_wheel(
            package_index.root, name, "1.0", {f"{module}/__init__.py": f"P = {payload!r}\n"}
        )

    return _publish


@pytest.fixture
def workspace(runtime_image, package_index, tmp_path, docker_client):
    """A fresh workspace name and its policy file; its cache volume is removed after."""
    made: list[str] = []

    def _workspace(prefix: str, **runtime) -> tuple[str, Path]:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        policy = worker_policy(
            tmp_path / f"{name}.toml", runtime_image, package_index.url, name, concurrency_limit=4
        )
        import tomllib
        from services import write_policy

        # The cache as runs that install in their own container use it.
        tables = tomllib.loads(policy.read_text())
        tables["runtime"].update({"prebuilt_environments": False, **runtime})
        write_policy(policy, **tables)
        return name, policy

    yield _workspace
    for name in made:
        # A worker stopped right after its runs ended may not have removed their containers.
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{WORKSPACE_LABEL}={name}"}
        ):
            container.remove(force=True)
        for volume in docker_client.volumes.list(
            filters={"name": f"prefect-managed-cache-{name}-"}
        ):
            volume.remove(force=True)


def deploy(cache_flows: str, pool: str, name: str, pip_packages: list[str]):
    return flow.from_source(source=cache_flows, entrypoint="cache_flows.py:cache_contents").deploy(
        name=name,
        work_pool_name=pool,
        job_variables={"pip_packages": pip_packages},
        print_next_steps=False,
    )


def run_and_read_cache(deployment_id, module: str) -> str:
    """Run the flow to Completed; return what it logged its cache holds."""
    flow_run_id = run_deployment(deployment_id, parameters={"module": module}, timeout=0).id
    run = wait_for_final_state(flow_run_id, timeout=300)
    assert run.state.is_completed(), run.state
    return cache_line(flow_run_id)


def cache_line(flow_run_id) -> str:
    logs = wait_for_log(flow_run_id, "cache holds:")
    return next(line for line in logs if line.startswith("cache holds:"))


def test_a_workspaces_run_cannot_see_another_workspaces_cache(
    cache_flows, publish_wheel, workspace, docker_client
):
    publish_wheel("cache-iso-a")
    publish_wheel("cache-iso-b")
    name_a, policy_a = workspace("iso-a")
    name_b, policy_b = workspace("iso-b")
    pool_a, pool_b = create_pool(f"pool-{name_a}"), create_pool(f"pool-{name_b}")
    deployment_a = deploy(cache_flows, pool_a, "cache-iso-a", ["cache-iso-a==1.0"])
    deployment_b = deploy(cache_flows, pool_b, "cache-iso-b", ["cache-iso-b==1.0"])
    with worker(pool_a, policy_a, f"worker-{name_a}"), worker(pool_b, policy_b, f"worker-{name_b}"):
        seen_a = run_and_read_cache(deployment_a, "cache_iso_a")
        seen_b = run_and_read_cache(deployment_b, "cache_iso_b")
        seen_a_again = run_and_read_cache(deployment_a, "cache_iso_a")
    assert seen_a == "cache holds: [cache_iso_a]"
    assert seen_b == "cache holds: [cache_iso_b]"
    assert seen_a_again == "cache holds: [cache_iso_a]"
    volumes = {
        name: [
            v.name
            for v in docker_client.volumes.list(filters={"name": f"prefect-managed-cache-{name}-"})
        ]
        for name in (name_a, name_b)
    }
    assert len(volumes[name_a]) == 1 and len(volumes[name_b]) == 1, volumes


def test_two_runs_with_the_same_packages_starting_at_once_both_complete(
    cache_flows, publish_wheel, workspace
):
    publish_wheel("cache-shared", kib=4096)
    name, policy = workspace("shared")
    pool = create_pool(f"pool-{name}")
    deployment = deploy(cache_flows, pool, "cache-shared", ["cache-shared==1.0"])
    # Both runs are scheduled before the worker starts, so its first poll submits both
    # and their containers install into the empty cache at the same moment.
    runs = [
        run_deployment(deployment, parameters={"module": "cache_shared"}, timeout=0).id
        for _ in range(2)
    ]
    running = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        name=f"worker-{name}",
    )
    try:
        states = [wait_for_final_state(run, timeout=300).state for run in runs]
    finally:
        running.service.stop()
    assert [state.type.value for state in states] == ["COMPLETED", "COMPLETED"], states
    assert [cache_line(run) for run in runs] == ["cache holds: [cache_shared]"] * 2


def test_a_cache_over_its_bound_evicts_the_least_recently_used_packages(
    cache_flows, publish_wheel, workspace
):
    publish_wheel("cache-old", kib=400)
    publish_wheel("cache-new", kib=400)
    # Room for one of the two 400 KiB packages, not both.
    name, policy = workspace("evict", dependency_cache_max_size="600k")
    pool = create_pool(f"pool-{name}")
    old = deploy(cache_flows, pool, "cache-old", ["cache-old==1.0"])
    new = deploy(cache_flows, pool, "cache-new", ["cache-new==1.0"])
    with worker(pool, policy, f"worker-{name}"):
        first = run_and_read_cache(old, "cache_old")
        second = run_and_read_cache(new, "cache_new")
        # The evicted package is simply installed (and cached) again.
        third = run_and_read_cache(old, "cache_old")
    assert first == "cache holds: [cache_old]"
    assert second == "cache holds: [cache_new]"
    assert third == "cache holds: [cache_old]"
