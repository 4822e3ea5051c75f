"""A GPU tier: `gpus` becomes a Docker device request after templating, and a run on a
host without a GPU runtime ends Crashed saying so, with no container left. These
machines have no GPU: the device request is checked on a real container (created, not
started) and, through the worker, by Docker's own refusal of the GPU request the
worker's container made, quoted in the run's state; no flow ran on a GPU here."""

from __future__ import annotations

from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun

from prefect_managed.configuration import ManagedJobConfiguration
from prefect_managed.policy import Policy

pytestmark = pytest.mark.docker


def policy_with(gpus: int, runtime_image: str) -> Policy:
    return Policy.model_validate(
        {
            "workspace": {"tier": "gpu"},
            "tiers": {"gpu": {"gpus": gpus}},
            "runtime": {"default_image": runtime_image},
        }
    )


def configured(policy: Policy, runtime_image: str, **variables) -> ManagedJobConfiguration:
    config = ManagedJobConfiguration(image=runtime_image, **variables)
    config.apply_policy(policy, FlowRun(id=uuid4(), flow_id=uuid4(), name="gpu"))
    return config


def create(docker_client, config: ManagedJobConfiguration):
    return docker_client.containers.create(
        config.image, command="true", labels=config.labels, **config.container_create_kwargs
    )


def test_a_gpu_tier_gives_each_container_its_device_request(docker_client, runtime_image):
    config = configured(policy_with(2, runtime_image), runtime_image)
    container = create(docker_client, config)
    try:
        requests = container.attrs["HostConfig"]["DeviceRequests"]
    finally:
        container.remove(force=True)
    assert [(r["Count"], r["Capabilities"]) for r in requests] == [(2, [["gpu"]])]


def test_a_job_variable_can_neither_add_nor_raise_gpus(docker_client, runtime_image):
    hostile = {"device_requests": [{"count": -1, "capabilities": [["gpu"]]}], "privileged": True}
    none = configured(policy_with(0, runtime_image), runtime_image, container_create_kwargs=hostile)
    assert "device_requests" not in none.container_create_kwargs
    container = create(docker_client, none)
    try:
        assert not container.attrs["HostConfig"]["DeviceRequests"]
    finally:
        container.remove(force=True)
    one = configured(policy_with(1, runtime_image), runtime_image, container_create_kwargs=hostile)
    [request] = one.container_create_kwargs["device_requests"]
    assert request["Count"] == 1


def test_a_run_on_a_host_without_a_gpu_runtime_ends_crashed_naming_it(
    deploy, runtime_image, package_index, tmp_path, docker_client
):
    from conftest import worker_policy
    from helpers import create_pool, run_containers, wait_for_final_state, worker
    from prefect.deployments import run_deployment

    pool = create_pool("gpu-pool")
    policy = worker_policy(tmp_path / "gpu.toml", runtime_image, package_index.url, "gpu", gpus=1)
    deployment = deploy("hello", "hello-gpu", pool=pool)
    with worker(pool, policy, "gpu-worker") as running:
        flow_run_id = run_deployment(deployment, timeout=0).id
        run = wait_for_final_state(flow_run_id, 240)
        assert running.service.process.poll() is None, "the worker exited"
    assert run.state.is_crashed(), run.state
    assert "GpuNotAvailable: The test tier gives each flow run 1 GPU(s)" in run.state.message
    assert "NVIDIA container runtime" in run.state.message
    # Docker's own refusal, quoted: the worker's container asked it for GPUs.
    assert "could not select device driver" in run.state.message
    assert "capabilities: [[gpu]]" in run.state.message
    assert run_containers(docker_client, flow_run_id) == []
