"""The job configuration after the policy: no job variable lifts a cap or loosens hardening.

Unit tests of `ManagedJobConfiguration.apply_policy` on hostile values; the same
attempts are made against a real worker and Docker engine in test_limits.py.
"""

from __future__ import annotations

from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun

from prefect_managed.configuration import MANAGED_LABEL, ManagedJobConfiguration
from prefect_managed.exceptions import ImageNotAllowed, InvalidJobVariable, InvalidPipPackage
from prefect_managed.policy import Policy

POLICY = Policy.model_validate(
    {"runtime": {"default_image": "prefect-managed-runtime:3.9.1", "pids_limit": 256}}
)
TWO_GIB = 2 * 1024**3


def configuration(**values) -> ManagedJobConfiguration:
    values.setdefault("image", "prefect-managed-runtime:3.9.1")
    return ManagedJobConfiguration(**values)


def apply(config: ManagedJobConfiguration) -> FlowRun:
    flow_run = FlowRun(id=uuid4(), flow_id=uuid4(), name="hostile")
    config.apply_policy(POLICY, flow_run)
    return flow_run


def test_hostile_job_variables_are_overwritten():
    config = configuration(
        privileged=True,
        volumes=["/var/run/docker.sock:/var/run/docker.sock", "/:/host"],
        networks=["bridge"],
        network_mode="container:other",
        mem_limit="64g",
        memswap_limit="-1",
        auto_remove=True,
        registry_credentials=None,
        image_pull_policy="Always",
        container_create_kwargs={
            "privileged": True,
            "cap_add": ["ALL"],
            "user": "0",
            "mounts": ["x"],
        },
    )
    apply(config)
    assert config.privileged is False
    assert config.volumes == [] and config.networks == []
    assert config.network_mode == "host"
    assert (config.mem_limit, config.memswap_limit) == (str(TWO_GIB), str(TWO_GIB))
    assert config.auto_remove is False
    assert config.image_pull_policy == "IfNotPresent"
    assert config.container_create_kwargs == {
        "user": "1000:1000",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": 256,
        "nano_cpus": 1_000_000_000,
    }


def test_a_run_may_ask_for_less_memory_but_not_more():
    config = configuration(mem_limit="512m")
    apply(config)
    assert config.mem_limit == config.memswap_limit == str(512 * 1024**2)


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_memory_request_that_is_not_a_positive_size_is_refused(value):
    with pytest.raises(InvalidJobVariable, match=f"'mem_limit' has the value '{value}'"):
        apply(configuration(mem_limit=value))


def test_the_run_identity_labels_and_env_cannot_be_forged():
    config = configuration(
        env={"PREFECT__FLOW_RUN_ID": str(uuid4())},
        labels={"io.prefect.flow-run-id": "someone-else", MANAGED_LABEL: "false"},
    )
    flow_run = apply(config)
    assert config.env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert config.labels["io.prefect.flow-run-id"] == str(flow_run.id)
    assert config.labels[MANAGED_LABEL] == "true"


def test_the_workers_own_settings_do_not_reach_the_container(tmp_path):
    from prefect.settings import PREFECT_HOME, PREFECT_WORKER_QUERY_SECONDS, temporary_settings

    with temporary_settings(
        updates={PREFECT_HOME: str(tmp_path / "worker-home"), PREFECT_WORKER_QUERY_SECONDS: 1}
    ):
        config = configuration()
        # As Prefect's prepare_for_flow_run does: the worker's settings, then the run's env.
        config.env = {**config._base_environment(), "PREFECT_LOGGING_LEVEL": "DEBUG"}
        assert config.env["PREFECT_HOME"] == str(tmp_path / "worker-home")
        apply(config)

    assert "PREFECT_HOME" not in config.env
    assert "PREFECT_WORKER_QUERY_SECONDS" not in config.env
    assert config.env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
    assert "PREFECT_API_URL" in config.env


def test_extra_pip_packages_in_env_are_validated_too():
    with pytest.raises(InvalidPipPackage, match="'--index-url=http://127.0.0.1:1/'"):
        apply(configuration(env={"EXTRA_PIP_PACKAGES": "six --index-url=http://127.0.0.1:1/"}))


def test_pip_packages_reach_the_image_as_extra_pip_packages():
    config = configuration(pip_packages=["pandas >= 2.2"], env={"EXTRA_PIP_PACKAGES": "six"})
    apply(config)
    assert config.env["EXTRA_PIP_PACKAGES"] == "pandas>=2.2 six"


def test_an_image_outside_the_allow_list_is_refused():
    with pytest.raises(ImageNotAllowed, match="Image 'python:3.12' is not allowed"):
        apply(configuration(image="python:3.12"))
