"""The core paths on the official image's layout.

`prefecthq/prefect:3-latest` is the built-in default image, but no registry is reachable
here: tests/images/official/Dockerfile builds a stand-in from its published contract
(Prefect in the system interpreter's root-owned site-packages, a root-owned
/opt/prefect, no non-root user, UV_SYSTEM_PYTHON=1, tini and an entrypoint that runs
`uv pip install --system $EXTRA_PIP_PACKAGES`). Runs are forced to uid 1000, which has no
home and cannot write where that image installs packages. The test here runs the paths
peculiar to that image (no packages, pip_packages built into an environment and a
requirements.txt pull step, under a tier of 1 GiB) through a worker whose default image
is the stand-in, from git as users deploy; the core end-to-end tests
(tests/test_end_to_end.py) and a storage source (tests/test_sources_storage.py) run on it
too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import worker_policy
from helpers import create_pool, wait_for_log, wait_for_settled_run, worker
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.deployments import run_deployment

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def official_1g_pool(prefect_server) -> str:
    """A pool of its own: its worker runs on a tier of 1 GiB (the session's
    `official_pool` has the default tier)."""
    return create_pool("official-1g-pool")


def _policy(tmp_path: Path, image: str, index_url: str, **runtime) -> Path:
    return worker_policy(
        tmp_path / "official.toml",
        image,
        index_url,
        "tests",
        runtime,
        concurrency_limit=4,
        memory="1g",
    )


def _requirements_deployment(git_server, pool: str) -> object:
    """A deployment whose pull steps clone a repository and install its requirements.txt
    (Prefect's `pip_install_requirements`, with the image's pip), as prefect.yaml has it."""
    from prefect import flow

    repo = git_server.publish(
        "official-requirements",
        {
            "probe_flows.py": (Path(__file__).parent / "flows" / "probe_flows.py").read_text(),
            "requirements.txt": "managed-probe==1.0.0\n",
        },
    )
    deployment_id = flow.from_source(
        source=repo, entrypoint="probe_flows.py:probe", _sync=True
    ).deploy(name="official-requirements", work_pool_name=pool, print_next_steps=False, _sync=True)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        (clone,) = deployment.pull_steps
        clone_step = next(iter(clone.values()))
        clone_step["id"] = "clone"
        client.update_deployment(
            deployment_id,
            DeploymentUpdate(
                pull_steps=[
                    clone,
                    {
                        "prefect.deployments.steps.pip_install_requirements": {
                            "directory": "{{ clone.directory }}",
                            "requirements_file": "requirements.txt",
                        }
                    },
                ]
            ),
        )
    return deployment_id


def test_the_official_image_runs_flows_as_uid_1000_with_and_without_pip_packages(
    official_image, official_1g_pool, deploy, package_index, git_server, docker_client, tmp_path
):
    """Without packages, with pip_packages (built once into an environment: as the image's
    own user, as `docker build` would) and with a requirements.txt pull step (pip's user
    installation, in the HOME a root image's run is given), each run as uid 1000 with
    every capability dropped and under the tier's memory."""
    policy = _policy(tmp_path, official_image, package_index.url)
    plain = deploy("inspect_self", "official-inspect", pool=official_1g_pool)
    packages = deploy(
        "probe",
        "official-probe",
        {"pip_packages": ["managed-probe==1.0.0"]},
        pool=official_1g_pool,
    )
    requirements = _requirements_deployment(git_server, official_1g_pool)
    with worker(official_1g_pool, policy, "official-1g-worker"):
        runs = {
            "plain": run_deployment(plain, timeout=0).id,
            "packages": run_deployment(packages, timeout=0).id,
            "requirements": run_deployment(requirements, timeout=0).id,
        }
        settled = {
            name: wait_for_settled_run(docker_client, run, timeout=600)
            for name, run in runs.items()
        }
    for name, run in settled.items():
        assert run.state.is_completed(), (name, run.state.name, run.state.message)
    logs = wait_for_log(runs["plain"], "inspect_self:")
    seen = next(line for line in logs if "inspect_self:" in line)
    assert "'uid': 1000" in seen and "'cap_eff': '0000000000000000'" in seen, seen
    # The image carries no executor of ours: the worker gives the run one through its
    # command, so the engine was forked by the executor, not started by Prefect's runner.
    parent = ast.literal_eval(seen.split("inspect_self:", 1)[1].strip())["parent"]
    assert parent[1:] == ["-I", "-S"], parent
    assert not any("Prefect's own executor" in line for line in logs), logs
    for name in ("packages", "requirements"):
        logs = wait_for_log(runs[name], "probe says:")
        assert any("cgroup memory limit: 1073741824" in line for line in logs), logs
