"""The job configuration after the policy: no job variable lifts a cap or loosens hardening.

Unit tests of `ManagedJobConfiguration.apply_policy` on hostile values; the same
attempts are made against a real worker and Docker engine in test_limits.py.
"""

from __future__ import annotations

import ssl
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun

from prefect_managed.configuration import MANAGED_LABEL, ManagedJobConfiguration
from prefect_managed.exceptions import ImageNotAllowed, InvalidJobVariable, InvalidPipPackage
from prefect_managed.gateway.port import run_gateway_port
from prefect_managed.gateway.tunnel import NO_TLS_CA, NO_TLS_CA_SOURCE, granted, tunnel_directory
from prefect_managed.policy import Policy
from prefect_managed.settings import ledger_key

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
    flow_run = apply(config)
    assert config.privileged is False
    # The default isolated network: Docker's `none`, and only the tunnel's directory.
    port = run_gateway_port(POLICY.runtime)
    assert config.volumes == [f"{tunnel_directory(port)}:/run/prefect-managed:ro"]
    assert config.networks == [] and config.network_mode == "none"
    assert (config.mem_limit, config.memswap_limit) == (str(TWO_GIB), str(TWO_GIB))
    assert config.auto_remove is False
    assert config.image_pull_policy == "IfNotPresent"
    create = dict(config.container_create_kwargs)
    assert create.pop("extra_hosts") == {}
    assert create.pop("sysctls") == {"net.ipv4.ip_unprivileged_port_start": "0"}
    entrypoint = create.pop("entrypoint")
    assert entrypoint[:2] == ["/bin/sh", "/run/prefect-managed/isolate.sh"]
    assert granted(ledger_key(), entrypoint[2]) == (
        flow_run.id,
        {f"127.0.0.1:{port}"},
    )
    assert create == {
        "user": "1000:1000",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": 256,
        "nano_cpus": 1_000_000_000,
        "log_config": {
            "type": "json-file",
            "config": {"max-size": str(10 * 1024**2), "max-file": "3"},
        },
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


def test_the_workers_server_secrets_and_other_settings_stay_out_of_the_container():
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_SERVER_API_AUTH_STRING,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    secret_url = "postgresql+asyncpg://prefect:hunter2@127.0.0.1:5432/prefect"
    with temporary_settings(
        updates={
            PREFECT_SERVER_DATABASE_CONNECTION_URL: secret_url,
            PREFECT_SERVER_API_AUTH_STRING: "admin:server-secret",
            PREFECT_API_AUTH_STRING: "admin:server-secret",
        }
    ):
        config = configuration()
        config.env = {**config._base_environment(), "MY_SETTING": "1"}
        assert config.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == secret_url
        apply(config)

    assert not [key for key in config.env if key.startswith("PREFECT_SERVER_")]
    assert "hunter2" not in repr(config.env)
    assert config.env["MY_SETTING"] == "1"
    # The run's own credential to reach the API is the one thing it gets: a token for its
    # own run, through the run gateway.
    assert "server-secret" not in repr(config.env)
    assert config.env["PREFECT_API_AUTH_STRING"].startswith("pmr2.")
    assert config.env["PREFECT_API_URL"] == (
        f"http://127.0.0.1:{run_gateway_port(POLICY.runtime)}/api"
    )


@pytest.mark.parametrize(
    "env",
    [
        {"prefect_api_url": "http://127.0.0.1:1/api"},
        {"Prefect_Api_Key": "stolen"},
        {"PREFECT_API_AUTH_STRING": "admin:guess"},
    ],
)
def test_worker_owned_names_are_refused_in_any_case(env):
    with pytest.raises(InvalidJobVariable, match="is set by the worker"):
        apply(configuration(env=env))


@pytest.mark.parametrize(
    "key", ["A=B", "EXTRA_PIP_PACKAGES=evil\nX", "1ABC", "WITH SPACE", "", "X-Y"]
)
def test_env_keys_that_are_not_plain_names_are_refused(key):
    with pytest.raises(InvalidJobVariable, match="is not an environment variable name"):
        apply(configuration(env={key: "x"}))


@pytest.mark.parametrize(
    "key",
    [
        "UV_INDEX",
        "UV_EXTRA_INDEX_URL",
        "UV_FIND_LINKS",
        "uv_index_url",
        "PIP_EXTRA_INDEX_URL",
        "PIP_INDEX_URL",
        "PIP_FIND_LINKS",
        "UV_DEFAULT_INDEX",
    ],
)
def test_installer_index_settings_are_refused(key):
    with pytest.raises(InvalidJobVariable, match="another index than the operator's"):
        apply(configuration(env={key: "http://127.0.0.1:1/simple"}))


def test_prefect_and_managed_labels_are_pinned_after_templating():
    config = configuration(
        labels={
            "io.prefect.work-pool-name": "someone-elses-pool",
            "io.prefect.worker-name": "ghost",
            "IO.PREFECT.flow-run-id": "x",
            "io.prefect-managed.workspace": "other",
            "prefect.io/flow-run-id": "x",
            "team": "analytics",
        }
    )
    flow_run = FlowRun(id=uuid4(), flow_id=uuid4(), name="hostile")
    prefect_labels = {
        "io.prefect.work-pool-name": "managed-pool",
        "io.prefect.worker-name": "worker-1",
    }
    config.apply_policy(POLICY, flow_run, prefect_labels)
    assert config.labels["io.prefect.work-pool-name"] == "managed-pool"
    assert config.labels["io.prefect.worker-name"] == "worker-1"
    assert config.labels["io.prefect.flow-run-id"] == str(flow_run.id)
    assert config.labels["io.prefect-managed.workspace"] == "default"
    assert config.labels["team"] == "analytics"
    assert "IO.PREFECT.flow-run-id" not in config.labels
    assert "prefect.io/flow-run-id" not in config.labels


def test_the_writable_layer_is_limited_when_the_policy_says_so():
    policy = Policy.model_validate(
        {
            "runtime": {"default_image": "prefect-managed-runtime:3.9.1"},
            "tiers": {"free": {"disk": "20g"}},
        }
    )
    config = configuration(container_create_kwargs={"storage_opt": {"size": "1t"}})
    config.apply_policy(policy, FlowRun(id=uuid4(), flow_id=uuid4(), name="disk"))
    assert config.container_create_kwargs["storage_opt"] == {"size": str(20 * 1024**3)}


def test_which_storage_drivers_can_limit_the_writable_layer():
    from prefect_managed.configuration import disk_limit_unsupported

    assert disk_limit_unsupported("overlay2", [["Backing Filesystem", "xfs"]]) is None
    assert disk_limit_unsupported("btrfs", []) is None
    why = disk_limit_unsupported("overlay2", [["Backing Filesystem", "extfs"]])
    assert why is not None and "'overlay2' on a 'extfs' file system" in why


@pytest.fixture
def tunnel_holding_the_ca(tmp_path, monkeypatch):
    """The tunnel's directory as a gateway's holder leaves it: with the CA file."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    directory = tunnel_directory(run_gateway_port(POLICY.runtime))
    directory.mkdir()
    (directory / NO_TLS_CA).write_bytes(NO_TLS_CA_SOURCE.read_bytes())
    return directory


def test_an_isolated_runs_prefect_client_loads_one_certificate_not_the_workers_bundle(
    tunnel_holding_the_ca,
):
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, temporary_settings

    with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: "/etc/worker/ca.pem"}):
        config = configuration()
        config.env = config._base_environment()
        apply(config)
    assert config.env["PREFECT_API_SSL_CERT_FILE"] == f"/run/prefect-managed/{NO_TLS_CA}"
    assert config.env["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    # One certificate, not a CA's, whose key was never kept: a TLS context from it trusts
    # no server.
    context = ssl.create_default_context(cafile=str(tunnel_holding_the_ca / NO_TLS_CA))
    assert context.cert_store_stats() == {"x509": 1, "crl": 0, "x509_ca": 0}

    # Off the isolated network (an image without python3), the mount and the file go.
    config.leave_isolation()
    assert "PREFECT_API_SSL_CERT_FILE" not in config.env


@pytest.mark.parametrize("key", ["PREFECT_API_SSL_CERT_FILE", "prefect_api_ssl_cert_file"])
@pytest.mark.parametrize("value", ["/etc/ssl/certs/mine.pem", ""])
def test_a_deployments_own_ca_file_is_kept(tunnel_holding_the_ca, key, value):
    # "" is Prefect's default (certifi's bundle): a flow that opens a client to an https
    # API of its own asks for it so.
    config = configuration(env={key: value})
    apply(config)
    assert [(k, v) for k, v in config.env.items() if k.upper() == "PREFECT_API_SSL_CERT_FILE"] == [
        (key, value)
    ]


def test_no_ca_file_is_named_that_the_tunnels_directory_does_not_hold(tmp_path, monkeypatch):
    # A gateway holder of an earlier version copied no CA file: Prefect's default stays.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = configuration()
    apply(config)
    assert "PREFECT_API_SSL_CERT_FILE" not in config.env


def test_a_run_on_the_hosts_network_keeps_prefects_default(tunnel_holding_the_ca):
    policy = Policy.model_validate(
        {"runtime": {"default_image": "prefect-managed-runtime:3.9.1", "network_mode": "host"}}
    )
    config = configuration()
    config.apply_policy(policy, FlowRun(id=uuid4(), flow_id=uuid4(), name="host"))
    assert "PREFECT_API_SSL_CERT_FILE" not in config.env
