"""Where the dependency cache is mounted is the policy's choice, never a deployment's.

Unit tests of `ManagedJobConfiguration.apply_policy`; the cache itself is tested with a
real worker and Docker engine in test_dependency_cache.py.
"""

from __future__ import annotations

from uuid import uuid4

from prefect.client.schemas.objects import FlowRun

from prefect_managed.configuration import ManagedJobConfiguration, api_label_value
from prefect_managed.dependencies import CACHE_MOUNT, cache_volume_name
from prefect_managed.gateway.port import run_gateway_port
from prefect_managed.gateway.tunnel import ISOLATED_MOUNT, tunnel_directory
from prefect_managed.policy import Policy

#: The other volume of a run on the default isolated network: the tunnel's directory.
TUNNEL = f"{tunnel_directory(run_gateway_port(Policy().runtime))}:{ISOLATED_MOUNT}:ro"

IMAGE = "prefect-managed-runtime:3.9.1"


def policy(workspace: str = "alpha", **runtime) -> Policy:
    return Policy.model_validate(
        {"workspace": {"name": workspace}, "runtime": {"default_image": IMAGE, **runtime}}
    )


def applied(the_policy: Policy, **values) -> ManagedJobConfiguration:
    config = ManagedJobConfiguration(image=IMAGE, **values)
    config.apply_policy(the_policy, FlowRun(id=uuid4(), flow_id=uuid4(), name="cache"))
    return config


def test_a_run_with_pip_packages_mounts_its_workspaces_named_volume():
    config = applied(policy("alpha", dependency_cache_max_size="1g"), pip_packages=["pandas"])
    volume = cache_volume_name("alpha", api_label_value())
    assert config.volumes == [f"{volume}:{CACHE_MOUNT}:rw", TUNNEL]
    assert not volume.startswith("/")  # a named volume, not a host path
    assert config.env["UV_CACHE_DIR"] == f"{CACHE_MOUNT}/uv"
    assert config.env["PREFECT_MANAGED_CACHE_MAX_BYTES"] == str(1024**3)


def test_workspaces_get_different_volumes():
    first = applied(policy("alpha"), pip_packages=["pandas"]).volumes
    second = applied(policy("beta"), pip_packages=["pandas"]).volumes
    assert first != second


def test_job_variables_cannot_choose_the_cache_volume_or_lift_its_bound():
    config = applied(
        policy("alpha"),
        pip_packages=["pandas"],
        volumes=["prefect-managed-cache-beta-000000000000:/opt/prefect/cache:rw"],
        env={"PREFECT_MANAGED_CACHE_MAX_BYTES": "999999999999999", "UV_CACHE_DIR": "/tmp/x"},
    )
    assert config.volumes == [
        f"{cache_volume_name('alpha', api_label_value())}:{CACHE_MOUNT}:rw",
        TUNNEL,
    ]
    assert config.env["PREFECT_MANAGED_CACHE_MAX_BYTES"] == str(5 * 1024**3)
    assert config.env["UV_CACHE_DIR"] == f"{CACHE_MOUNT}/uv"


def test_a_run_without_pip_packages_mounts_nothing():
    config = applied(policy("alpha"), volumes=["x:/opt/prefect/cache"])
    assert config.volumes == [TUNNEL]
    assert "UV_CACHE_DIR" not in config.env


def test_the_policy_can_turn_the_cache_off():
    config = applied(
        policy("alpha", dependency_cache=False),
        pip_packages=["pandas"],
        env={"UV_CACHE_DIR": "/opt/prefect/cache/uv", "PREFECT_MANAGED_CACHE_MAX_BYTES": "1"},
    )
    assert config.volumes == [TUNNEL]
    assert "UV_CACHE_DIR" not in config.env
    assert "PREFECT_MANAGED_CACHE_MAX_BYTES" not in config.env
