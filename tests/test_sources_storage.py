"""Flow code from S3, GCS and Azure Blob Storage, run by the managed worker.

Each store is a real emulator on 127.0.0.1, started here: moto in server mode (S3),
gcp-storage-emulator (GCS, with Google's token endpoint emulated on loopback too) and
Azurite (Azure Blob). Deployments are made the two Prefect ways: `flow.from_source` with a
storage block, and `prefect deploy` of a prefect.yaml whose pull step is the collection's
(`pull_from_s3`, `pull_from_gcs`, `pull_from_azure_blob_storage`). The collection reaches
the container through `pip_packages`, installed from the loopback package index, whose
wheels are downloaded once into test-output/wheelhouse.
"""

from __future__ import annotations

import secrets
import subprocess
import textwrap
from pathlib import Path
from uuid import UUID

import prefect
import pytest
import yaml
from conftest import source_worker
from helpers import flow_run_logs, wait_for_final_state, wait_for_log
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from services import BIN
from source_services import (
    PREFECT_AWS,
    PREFECT_AZURE,
    PREFECT_GCP,
    STORAGE_WHEELS,
    TokenEndpoint,
    ensure_wheelhouse,
    fake_service_account,
    link_wheels,
    start_azurite,
    start_gcs_emulator,
    start_moto,
    wait_for_crash_message,
)

pytestmark = pytest.mark.docker

BUCKET = "flows"
FOLDER = "project"
GCP_PROJECT = "flows-project"


FLOW_FILE = textwrap.dedent(
    """\
    from prefect import flow, get_run_logger


    @flow
    def from_storage(store: str = "?") -> str:
        get_run_logger().info("flow code pulled from %s", store)
        return store
    """
)


# -- services and blocks -----------------------------------------------------------------


# The module's own pool and worker, started after its source services (s3, gcs, azure) so that
# its policy's isolated network reaches them (conftest.source_worker).
@pytest.fixture(scope="module")
def _sources(prefect_server, runtime_image, package_index, tmp_path_factory, s3, gcs, azure):
    yield from source_worker(
        "test-sources-storage-pool", runtime_image, package_index, tmp_path_factory
    )


@pytest.fixture(scope="module")
def managed_pool(_sources) -> str:
    return _sources[0]


@pytest.fixture(scope="module")
def managed_worker(_sources):
    return _sources[1]


@pytest.fixture(scope="module")
def official_sources(prefect_server, official_image, package_index, tmp_path_factory, s3):
    """A pool and worker as `_sources`, the worker's default image the official image's
    stand-in (tests/images/official)."""
    yield from source_worker(
        "test-sources-storage-official-pool", official_image, package_index, tmp_path_factory
    )


@pytest.fixture(scope="module")
def storage_wheels(package_index, wheelhouse):
    """prefect-aws, prefect-gcp and prefect-azure with all their dependencies, for the
    containers' Python, offered by the loopback index."""
    link_wheels(ensure_wheelhouse(wheelhouse, STORAGE_WHEELS), package_index.root)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The flow's project directory, as a user has it before uploading it."""
    root = tmp_path_factory.mktemp("storage-project")
    (root / "flows.py").write_text(FLOW_FILE)
    return root


@pytest.fixture(scope="module")
def s3(output_dir, prefect_server, project):
    from prefect_aws import AwsCredentials, S3Bucket

    moto = start_moto(output_dir)
    credentials = AwsCredentials(
        aws_access_key_id="flows-user",
        aws_secret_access_key=secrets.token_urlsafe(24),
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": moto.endpoint},
    )
    credentials.save("moto-credentials", overwrite=True)
    client = credentials.get_s3_client()
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(project / "flows.py"), BUCKET, f"{FOLDER}/flows.py")
    S3Bucket(bucket_name=BUCKET, bucket_folder=FOLDER, credentials=credentials).save(
        "moto-flows", overwrite=True
    )
    yield moto
    moto.stop()


@pytest.fixture(scope="module")
def gcs(output_dir, prefect_server, project, monkeypatch_module):
    from google.cloud import storage
    from prefect_gcp import GcpCredentials, GcsBucket

    emulator = start_gcs_emulator(output_dir)
    token = TokenEndpoint()
    # google-cloud-storage's own switch to an emulator; GcpCredentials has no endpoint field.
    monkeypatch_module.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    credentials = GcpCredentials(
        service_account_info=fake_service_account(GCP_PROJECT, token.url), project=GCP_PROJECT
    )
    credentials.save("gcs-credentials", overwrite=True)
    client = storage.Client(
        credentials=credentials.get_credentials_from_service_account(), project=GCP_PROJECT
    )
    client.create_bucket(BUCKET)
    client.bucket(BUCKET).blob(f"{FOLDER}/flows.py").upload_from_filename(project / "flows.py")
    GcsBucket(bucket=BUCKET, bucket_folder=FOLDER, gcp_credentials=credentials).save(
        "gcs-flows", overwrite=True
    )
    yield emulator
    token.stop()
    emulator.stop()


@pytest.fixture(scope="module")
def azure(output_dir, prefect_server, project, tmp_path_factory):
    from azure.storage.blob import BlobServiceClient
    from prefect_azure import AzureBlobStorageCredentials
    from prefect_azure.blob_storage import AzureBlobStorageContainer

    azurite = start_azurite(tmp_path_factory.mktemp("azurite"), output_dir)
    credentials = AzureBlobStorageCredentials(connection_string=azurite.connection_string)
    credentials.save("azurite-credentials", overwrite=True)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    service.create_container(BUCKET)
    service.get_blob_client(BUCKET, f"{FOLDER}/flows.py").upload_blob(
        (project / "flows.py").read_bytes()
    )
    AzureBlobStorageContainer(
        container_name=BUCKET, base_folder=FOLDER, credentials=credentials
    ).save("azurite-flows", overwrite=True)
    yield azurite
    azurite.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _job_variables(store: str, gcs_endpoint: str | None = None) -> dict:
    packages = {"s3": PREFECT_AWS, "gcs": PREFECT_GCP, "azure": PREFECT_AZURE}[store]
    env = {"AWS_EC2_METADATA_DISABLED": "true"}  # never ask an instance metadata service
    if gcs_endpoint:
        env["STORAGE_EMULATOR_HOST"] = gcs_endpoint
    return {"pip_packages": [packages], "env": env}


def run(deployment_id: UUID, parameters: dict | None = None) -> UUID:
    return run_deployment(deployment_id, parameters=parameters or {}, timeout=0).id


def assert_completed_from(flow_run_id: UUID, store: str) -> None:
    state = wait_for_final_state(flow_run_id, timeout=480).state
    assert state.is_completed(), (state, flow_run_logs(flow_run_id)[-5:])
    wait_for_log(flow_run_id, f"flow code pulled from {store}")


# -- flow.from_source with a storage block -----------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs", "azure"])
def test_from_source_with_a_storage_block_runs_to_completed(
    store, request, storage_wheels, managed_pool, managed_worker
):
    from prefect_aws import S3Bucket
    from prefect_azure.blob_storage import AzureBlobStorageContainer
    from prefect_gcp import GcsBucket

    emulator = request.getfixturevalue(store)
    block = {
        "s3": lambda: S3Bucket.load("moto-flows"),
        "gcs": lambda: GcsBucket.load("gcs-flows"),
        "azure": lambda: AzureBlobStorageContainer.load("azurite-flows"),
    }[store]()
    deployment_id = flow.from_source(source=block, entrypoint="flows.py:from_storage").deploy(
        name=f"from-source-{store}",
        work_pool_name=managed_pool,
        job_variables=_job_variables(store, emulator.endpoint if store == "gcs" else None),
        parameters={"store": f"{store} block"},
        print_next_steps=False,
    )
    flow_run_id = run(deployment_id)

    assert_completed_from(flow_run_id, f"{store} block")


def test_a_storage_block_source_runs_to_completed_on_the_official_image(
    storage_wheels, official_sources
):
    """prefect-aws, from pip_packages, is built into an environment of the official image
    as that image's own user; the run, as uid 1000, pulls its code from S3 with it."""
    from prefect_aws import S3Bucket

    pool, _ = official_sources
    deployment_id = flow.from_source(
        source=S3Bucket.load("moto-flows"), entrypoint="flows.py:from_storage"
    ).deploy(
        name="from-source-s3-official",
        work_pool_name=pool,
        job_variables=_job_variables("s3"),
        parameters={"store": "s3 block on the official image"},
        print_next_steps=False,
    )
    flow_run_id = run(deployment_id)

    assert_completed_from(flow_run_id, "s3 block on the official image")


# -- prefect.yaml pull steps ---------------------------------------------------------------


def _pull_step(store: str, bucket: str = BUCKET, folder: str = FOLDER) -> dict:
    if store == "s3":
        return {
            "prefect_aws.deployments.steps.pull_from_s3": {
                "bucket": bucket,
                "folder": folder,
                "credentials": "{{ prefect.blocks.aws-credentials.moto-credentials }}",
            }
        }
    if store == "gcs":
        return {
            "prefect_gcp.deployments.steps.pull_from_gcs": {
                "bucket": bucket,
                "folder": folder,
                "credentials": "{{ prefect.blocks.gcp-credentials.gcs-credentials }}",
            }
        }
    return {
        "prefect_azure.deployments.steps.pull_from_azure_blob_storage": {
            "container": bucket,
            "folder": folder,
            "credentials": "{{ prefect.blocks.azure-blob-storage-credentials.azurite-credentials }}",
        }
    }


#: name -> (store, bucket, folder): the deployments of the prefect.yaml
PULL_DEPLOYMENTS = {
    "pull-s3": ("s3", BUCKET, FOLDER),
    "pull-gcs": ("gcs", BUCKET, FOLDER),
    "pull-azure": ("azure", BUCKET, FOLDER),
    "pull-s3-missing-bucket": ("s3", "no-such-bucket", FOLDER),
    "pull-s3-missing-folder": ("s3", BUCKET, "no-such-folder"),
    "pull-gcs-missing-bucket": ("gcs", "no-such-bucket", FOLDER),
    "pull-azure-missing-container": ("azure", "no-such-container", FOLDER),
}


@pytest.fixture(scope="module")
def pull_deployments(s3, gcs, azure, managed_pool, managed_worker, project) -> dict[str, UUID]:
    """One prefect.yaml with a deployment per case, deployed with `prefect deploy --all`."""
    config = {
        "name": "storage-sources",
        "prefect-version": prefect.__version__,
        "deployments": [
            {
                "name": name,
                "entrypoint": "flows.py:from_storage",
                "parameters": {"store": f"{store} pull step"},
                "pull": [_pull_step(store, bucket, folder)],
                "work_pool": {
                    "name": managed_pool,
                    "job_variables": _job_variables(
                        store, gcs.endpoint if store == "gcs" else None
                    ),
                },
            }
            for name, (store, bucket, folder) in PULL_DEPLOYMENTS.items()
        ],
    }
    (project / "prefect.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        return {
            name: client.read_deployment_by_name(f"from-storage/{name}").id
            for name in PULL_DEPLOYMENTS
        }


@pytest.mark.parametrize("store", ["s3", "gcs", "azure"])
def test_prefect_yaml_pull_step_runs_to_completed(store, storage_wheels, pull_deployments):
    flow_run_id = run(pull_deployments[f"pull-{store}"])

    assert_completed_from(flow_run_id, f"{store} pull step")


def test_stored_deployments_keep_credentials_as_block_references(s3, gcs, azure, pull_deployments):
    from prefect_aws import AwsCredentials
    from prefect_azure import AzureBlobStorageCredentials

    secrets_ = [
        AwsCredentials.load("moto-credentials").aws_secret_access_key.get_secret_value(),
        AzureBlobStorageCredentials.load(
            "azurite-credentials"
        ).connection_string.get_secret_value(),
        azure.key,
    ]
    with get_client(sync_client=True) as client:
        stored = [
            client.read_deployment(id_).model_dump_json() for id_ in pull_deployments.values()
        ]
    for text in stored:
        assert "{{ prefect.blocks." in text
        for secret in secrets_:
            assert secret not in text


# -- a missing bucket or object: the run ends, its logs name the source and the reason ----


@pytest.mark.parametrize(
    ("name", "step", "source", "reason"),
    [
        ("pull-s3-missing-bucket", "pull_from_s3", f"s3://no-such-bucket/{FOLDER}", "NoSuchBucket"),
        ("pull-gcs-missing-bucket", "pull_from_gcs", f"gs://no-such-bucket/{FOLDER}", "NotFound"),
        (
            "pull-azure-missing-container",
            "pull_from_azure_blob_storage",
            "container 'no-such-container'",
            "The specified container does not exist",
        ),
    ],
)
def test_missing_bucket_crashes_the_run_naming_the_source_and_reason(
    name, step, source, reason, storage_wheels, pull_deployments, azure
):
    flow_run_id = run(pull_deployments[name])

    final = wait_for_final_state(flow_run_id, timeout=480)
    assert final.state.is_crashed(), final.state
    message = wait_for_crash_message(flow_run_id, f"pull step {step}", timeout=180)
    assert source in message
    assert reason in message
    logs = "\n".join(wait_for_log(flow_run_id, "Container output:"))
    assert azure.key not in logs


def test_missing_object_fails_the_run_naming_the_missing_file(storage_wheels, pull_deployments):
    flow_run_id = run(pull_deployments["pull-s3-missing-folder"])

    final = wait_for_final_state(flow_run_id, timeout=480)
    assert final.state.is_crashed(), final.state
    message = wait_for_crash_message(flow_run_id, "Loading the flow failed", timeout=180)
    assert f"s3://{BUCKET}/no-such-folder" in message
    assert "flows.py" in message
