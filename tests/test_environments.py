"""Prebuilt environments (`runtime.prebuilt_environments`), for real: a Prefect server,
`prefect worker start` processes, a Docker engine and the loopback package index.

What a user would check: a second run with the same packages starts from the built
environment and installs nothing (Docker's own events say which containers were made and
from which image); a run cannot change what the next run starts from; two first runs at
once build once; a build over the memory cap ends the run Crashed with the installer's
output in its logs and its compute recorded; eviction removes the least recently used
environment. Speed is measured by `python -m benchmarks`, never asserted here.
"""

from __future__ import annotations

import io
import secrets
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import worker_policy
from helpers import (
    container_creations,
    create_pool,
    flow_run_logs,
    wait_for_final_state,
    wait_for_log,
    wait_for_settled_run,
    wait_for_usage_record,
    worker,
)
from prefect import flow
from prefect.deployments import run_deployment
from services import build_wheel, wait_for, write_policy

from prefect_managed.environments import (
    BUILDER_PREFIX,
    ENVIRONMENT_REPOSITORY,
    ENVIRONMENT_WORKSPACE_LABEL,
)
from prefect_managed.usage import Outcome

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows"


@pytest.fixture(scope="module")
def env_flows(git_server, prefect_server) -> str:
    return git_server.publish("env-flows", {"env_flows.py": (FLOWS / "env_flows.py").read_text()})


@pytest.fixture
def env_workspace(runtime_image, package_index, tmp_path, docker_client):
    """A fresh workspace with prebuilt environments on; its images are removed after."""
    made: list[str] = []

    def _workspace(prefix: str, tier: dict | None = None, **runtime) -> tuple[str, Path]:
        import tomllib

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        policy = worker_policy(
            tmp_path / f"{name}.toml",
            runtime_image,
            package_index.url,
            name,
            concurrency_limit=4,
            **(tier or {}),
        )
        tables = tomllib.loads(policy.read_text())
        tables["runtime"].update({"prebuilt_environments": True, **runtime})
        write_policy(policy, **tables)
        return name, policy

    yield _workspace
    for name in made:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{ENVIRONMENT_WORKSPACE_LABEL}={name}"}
        ):
            container.remove(force=True)
        for image in environment_images(docker_client, name):
            docker_client.images.remove(image.id, force=True)


def environment_images(docker_client, workspace: str) -> list:
    return docker_client.images.list(
        filters={"label": f"{ENVIRONMENT_WORKSPACE_LABEL}={workspace}"}
    )


def publish(package_index, name: str, kib: int = 1) -> str:
    """A wheel of `name` whose module says MARK = 'pristine' (plus `kib` KiB of payload)."""
    module = name.replace("-", "_")
    payload = secrets.token_hex(kib * 512)
    build_wheel(
        package_index.root,
        name,
        "1.0",
        {f"{module}/__init__.py": f"MARK = 'pristine'\nPAYLOAD = {payload!r}\n"},
    )
    return module


def deploy(env_flows: str, pool: str, name: str, pip_packages: list[str]):
    return flow.from_source(source=env_flows, entrypoint="env_flows.py:use_environment").deploy(
        name=name,
        work_pool_name=pool,
        job_variables={"pip_packages": pip_packages},
        print_next_steps=False,
    )


def test_a_second_run_installs_nothing_and_cannot_change_the_environment(
    env_flows, package_index, env_workspace, docker_client
):
    module = publish(package_index, "env-reuse")
    name, policy = env_workspace("env-reuse")
    pool = create_pool(f"pool-{name}")
    deployment = deploy(env_flows, pool, "env-reuse", ["env-reuse==1.0"])
    with worker(pool, policy, f"worker-{name}"):
        first = run_deployment(deployment, parameters={"module": module, "tamper": True}, timeout=0)
        first_run = wait_for_settled_run(docker_client, first.id, 300)
        assert first_run.state.is_completed(), first_run.state
        wait_for_log(first.id, "Built the environment")
        wait_for_log(first.id, "rewrote ")
        with container_creations(docker_client, f"{ENVIRONMENT_WORKSPACE_LABEL}={name}") as made:
            second = run_deployment(deployment, parameters={"module": module}, timeout=0)
            second_run = wait_for_settled_run(docker_client, second.id, 300)
    assert second_run.state.is_completed(), second_run.state
    logs = flow_run_logs(second.id)
    # The first run's rewrite stayed in its own container.
    assert any("environment says: pristine" in line for line in logs), logs
    assert any("nothing to install" in line for line in logs), logs
    assert [a["name"].startswith(BUILDER_PREFIX) for a in made] == [False], made
    assert made[0]["image"].startswith(f"{ENVIRONMENT_REPOSITORY}:"), made
    first_record = wait_for_usage_record(first.id)
    second_record = wait_for_usage_record(second.id)
    assert first_record["build_seconds"] > 0
    assert second_record["build_seconds"] == 0
    assert len(environment_images(docker_client, name)) == 1


def test_two_first_runs_at_once_build_once(env_flows, package_index, env_workspace, docker_client):
    module = publish(package_index, "env-once")
    name, policy = env_workspace("env-once")
    pool = create_pool(f"pool-{name}")
    deployment = deploy(env_flows, pool, "env-once", ["env-once==1.0"])
    with (
        container_creations(docker_client, f"{ENVIRONMENT_WORKSPACE_LABEL}={name}") as made,
        worker(pool, policy, f"worker-{name}"),
    ):
        runs = [
            run_deployment(deployment, parameters={"module": module}, timeout=0) for _ in range(2)
        ]
        settled = [wait_for_settled_run(docker_client, run.id, 300) for run in runs]
    assert all(run.state.is_completed() for run in settled), [r.state for r in settled]
    builders = [a for a in made if a["name"].startswith(BUILDER_PREFIX)]
    assert len(builders) == 1, builders
    assert len(environment_images(docker_client, name)) == 1


def oom_sdist(package_index, name: str) -> None:
    """An sdist whose in-tree build backend allocates 2 GiB while building its wheel."""
    backend = (
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        "    print('allocating 2 GiB to build the wheel', flush=True)\n"
        "    hog = bytearray(2 * 1024 ** 3)\n"
        "    raise SystemExit('unreachable')\n"
    )
    pyproject = (
        "[build-system]\nrequires = []\nbuild-backend = 'backend'\nbackend-path = ['.']\n"
        f"[project]\nname = '{name}'\nversion = '1.0'\n"
    )
    files = {
        "pyproject.toml": pyproject,
        "backend.py": backend,
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    }
    archive = package_index.root / f"{name.replace('-', '_')}-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name.replace('-', '_')}-1.0/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_build_over_the_memory_cap_crashes_the_run_with_the_install_log(
    env_flows, package_index, env_workspace, docker_client
):
    oom_sdist(package_index, "env-hog")
    name, policy = env_workspace("env-hog", tier={"memory": "256m"})
    pool = create_pool(f"pool-{name}")
    deployment = deploy(env_flows, pool, "env-hog", ["env-hog==1.0"])
    with (
        container_creations(docker_client, f"{ENVIRONMENT_WORKSPACE_LABEL}={name}") as made,
        worker(pool, policy, f"worker-{name}"),
    ):
        run = run_deployment(deployment, parameters={"module": "env_hog"}, timeout=0)
        final = wait_for_final_state(run.id, 300)
        record = wait_for_usage_record(run.id)
    assert final.state.is_crashed(), final.state
    assert "ran out of memory" in final.state.message, final.state.message
    logs = wait_for_log(run.id, "Environment build output:")
    assert any("allocating 2 GiB" in line for line in logs), logs
    assert record["outcome"] == Outcome.OUT_OF_MEMORY.value and record["billable_minutes"] >= 1, (
        record
    )
    builders = [a for a in made if a["name"].startswith(BUILDER_PREFIX)]
    assert len(builders) == 1
    wait_for(
        lambda: (
            not docker_client.containers.list(
                all=True, filters={"label": f"{ENVIRONMENT_WORKSPACE_LABEL}={name}"}
            )
        ),
        30,
        "the builder removed",
    )
    assert environment_images(docker_client, name) == []


def test_eviction_removes_the_least_recently_used_environment(
    env_flows, package_index, env_workspace, docker_client
):
    old = publish(package_index, "env-old", kib=1024)
    new = publish(package_index, "env-new", kib=1024)
    name, policy = env_workspace("env-evict", environments_max_size="1500k")
    pool = create_pool(f"pool-{name}")
    old_deployment = deploy(env_flows, pool, "env-old", ["env-old==1.0"])
    new_deployment = deploy(env_flows, pool, "env-new", ["env-new==1.0"])
    with worker(pool, policy, f"worker-{name}"):
        for deployment, module in ((old_deployment, old), (new_deployment, new)):
            run = run_deployment(deployment, parameters={"module": module}, timeout=0)
            assert wait_for_settled_run(docker_client, run.id, 300).state.is_completed()
    built = next(
        line for line in wait_for_log(run.id, "Built the environment") if "Built the" in line
    )
    newest = next(word for word in built.split() if word.startswith(ENVIRONMENT_REPOSITORY))
    left = environment_images(docker_client, name)
    assert [image.tags for image in left] == [[newest]], (newest, left)
