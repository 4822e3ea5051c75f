"""Every file in examples/, run for real the way its header says a user runs it.

Each example deploys `examples/flows/flow.py` (which imports cowsay, from pip_packages)
to `my-managed-pool`, the pool the quickstart creates with `prefect work-pool create
my-managed-pool --type prefect:managed`. The code lives where the example says: the
loopback git daemon, the HTTPS git server with a token, moto (S3), gcp-storage-emulator
(GCS) and Azurite (Azure Blob). The examples get their settings from the environment
variables their headers name, nothing else; then the test runs each deployment on a
managed worker and checks what a user checks: Completed, the cow, the memory cap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, worker_policy
from helpers import (
    create_pool_with_cli,
    flow_run_logs,
    run_containers,
    wait_for_final_state,
    wait_for_log,
    worker,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.deployments import run_deployment
from services import BIN, wait_for
from source_services import (
    STORAGE_WHEELS,
    Commit,
    TokenEndpoint,
    ensure_wheelhouse,
    fake_service_account,
    link_wheels,
    publish_repository,
    start_azurite,
    start_gcs_emulator,
    start_moto,
)

pytestmark = pytest.mark.docker

EXAMPLES = ROOT / "examples"
FLOW = EXAMPLES / "flows" / "flow.py"
POOL = "my-managed-pool"
#: Where the storage examples expect the project: bucket (container) and folder.
BUCKET, FOLDER = "my-flows", "my-project"
GCP_PROJECT = "examples-project"
REQUIREMENTS_TXT = "cowsay==6.1\n"

#: example file -> the deployments it makes (all of flow `my-flow`)
DEPLOYMENTS = {
    "managed-execution.py": ["test-managed-flow"],
    "sources/git_protocol.py": ["from-git-daemon"],
    "sources/git_private_https.py": ["from-private-git"],
    "sources/s3_bucket.py": ["from-s3"],
    "sources/gcs_bucket.py": ["from-gcs"],
    "sources/azure_blob.py": ["from-azure-blob"],
    "sources/prefect.yaml": [
        "from-private-git-with-requirements",
        "from-s3",
        "from-gcs",
        "from-azure-blob",
    ],
}


def test_every_example_file_is_run_by_this_module():
    files = {
        str(path.relative_to(EXAMPLES))
        for path in EXAMPLES.rglob("*")
        if path.is_file() and path != FLOW and "__pycache__" not in path.parts
    }
    assert files == set(DEPLOYMENTS)


# -- what the examples need: the code in every store, the pool, a worker ---------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory, output_dir, git_server, git_https, prefect_server):
    """The flow's project uploaded wherever an example expects it; the environment
    variables each example reads."""
    import boto3
    from azure.storage.blob import BlobServiceClient
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    flow_file = FLOW.read_text()
    git_url = git_server.publish("examples-flow", {"flow.py": flow_file})
    publish_repository(
        git_https.root / "private" / "examples.git",
        [Commit({"flow.py": flow_file, "requirements.txt": REQUIREMENTS_TXT})],
    )
    https_url = git_https.url("private/examples.git")

    moto = start_moto(output_dir)
    s3 = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id="examples",
        aws_secret_access_key="examples-secret",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}/flow.py", Body=flow_file.encode())

    gcs = start_gcs_emulator(output_dir)
    token = TokenEndpoint()
    key_file = tmp_path_factory.mktemp("gcp") / "key.json"
    key_file.write_text(json.dumps(fake_service_account(GCP_PROJECT, token.url)))
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint  # google-cloud-storage's switch
    try:
        bucket = storage.Client(
            credentials=AnonymousCredentials(), project=GCP_PROJECT
        ).create_bucket(BUCKET)
        bucket.blob(f"{FOLDER}/flow.py").upload_from_string(flow_file)
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST")

    azurite = start_azurite(tmp_path_factory.mktemp("azurite"), output_dir)
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    blobs.create_container(BUCKET)
    blobs.get_blob_client(BUCKET, f"{FOLDER}/flow.py").upload_blob(flow_file.encode())

    aws = {
        "AWS_ACCESS_KEY_ID": "examples",
        "AWS_SECRET_ACCESS_KEY": "examples-secret",
        "S3_ENDPOINT_URL": moto.endpoint,
    }
    gcp = {"GCP_SERVICE_ACCOUNT_FILE": str(key_file), "STORAGE_EMULATOR_HOST": gcs.endpoint}
    azure = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    https = {"FLOW_REPOSITORY": https_url, "GIT_TOKEN": git_https.token, "FLOW_BRANCH": "main"}
    env = {
        "managed-execution.py": {"FLOW_SOURCE": git_url},
        "sources/git_protocol.py": {"FLOW_REPOSITORY": git_url, "FLOW_REF": "main"},
        "sources/git_private_https.py": https,
        "sources/s3_bucket.py": aws,
        "sources/gcs_bucket.py": gcp,
        "sources/azure_blob.py": azure,
        # prefect.yaml refers to the blocks the Python examples save; all of them first.
        "sources/prefect.yaml": {**aws, **gcp, **azure, **https},
    }
    yield {"env": env, "gcs": gcs.endpoint}
    token.stop()
    for emulator in (moto, gcs, azurite):
        emulator.stop()


@pytest.fixture(scope="module")
def examples_pool(stores, prefect_server) -> str:
    """`my-managed-pool`, made as the quickstart makes it. Its default `env` keeps the
    containers on loopback: boto never asks an instance metadata service, and
    google-cloud-storage talks to the emulator (the prefect.yaml GCS deployment sets no
    env of its own)."""
    create_pool_with_cli(POOL)
    with get_client(sync_client=True) as client:
        template = client.read_work_pool(POOL).base_job_template
        template["variables"]["properties"]["env"]["default"] = {
            "AWS_EC2_METADATA_DISABLED": "true",
            "STORAGE_EMULATOR_HOST": stores["gcs"],
        }
        client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=template))
    return POOL


@pytest.fixture(scope="module")
def examples_worker(examples_pool, ca_image, package_index, wheelhouse, tmp_path_factory):
    """A managed worker for the pool. Its default image is the runtime image trusting the
    HTTPS git server's CA, as an operator's `image build --ca-bundle` would be."""
    link_wheels(
        ensure_wheelhouse(wheelhouse, [REQUIREMENTS_TXT.strip()]),
        package_index.root,
    )
    link_wheels(ensure_wheelhouse(wheelhouse, STORAGE_WHEELS), package_index.root)
    policy = worker_policy(
        tmp_path_factory.mktemp("examples") / "policy.toml",
        ca_image,
        package_index.url,
        "examples",
        concurrency_limit=4,
    )
    with worker(examples_pool, policy, "examples-worker") as running:
        yield running


def run_example(example: str, env: dict[str, str], tmp_path: Path) -> None:
    """Run the example as its header says, from a copy of the project's directory."""
    project = tmp_path / "project"
    project.mkdir(parents=True)
    shutil.copy(FLOW, project / "flow.py")
    (project / "requirements.txt").write_text(REQUIREMENTS_TXT)
    source = EXAMPLES / example
    if source.suffix == ".py":
        command = [str(BIN / "python"), str(source)]
    else:
        shutil.copy(source, project / "prefect.yaml")
        command = [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"]
    done = subprocess.run(
        command,
        cwd=project,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("example", list(DEPLOYMENTS))
def test_example_deploys_and_its_runs_complete_in_a_capped_container(
    example, stores, examples_worker, tmp_path, docker_client
):
    if example == "sources/prefect.yaml":
        # Its pull steps use the blocks the Python examples save.
        for saver in DEPLOYMENTS:
            if saver.startswith("sources/") and saver.endswith(".py"):
                run_example(saver, stores["env"][saver], tmp_path / saver.replace("/", "-"))
    run_example(example, stores["env"][example], tmp_path)

    runs = {name: run_deployment(f"my-flow/{name}", timeout=0).id for name in DEPLOYMENTS[example]}
    for name, flow_run_id in runs.items():
        state = wait_for_final_state(flow_run_id, timeout=480).state
        assert state.is_completed(), (name, state, flow_run_logs(flow_run_id)[-8:])
        wait_for_log(flow_run_id, "Hello from a Prefect Managed container!")
        wait_for_log(flow_run_id, "This container's memory limit: 2.0 GiB")
        # What the user does not see: the worker removed the container once it was done.
        wait_for(lambda run=flow_run_id: not run_containers(docker_client, run), 120, "removal")
