"""Deploy a flow whose code is in a Google Cloud Storage bucket.

    GCP_SERVICE_ACCOUNT_FILE=key.json python gcs_bucket.py

Upload the project first (e.g. `gcloud storage cp -r . gs://my-flows/my-project`). The
service account is saved in a GcpCredentials block; `pip_packages` brings
prefect-gcp[cloud_storage] into the flow run's container. To use a GCS emulator, set
STORAGE_EMULATOR_HOST both here and in the deployment's `env` (GcpCredentials has no
endpoint field; google-cloud-storage reads that variable).
"""

import json
import os
from pathlib import Path

from prefect import flow
from prefect_gcp import GcpCredentials, GcsBucket

if __name__ == "__main__":
    info = json.loads(Path(os.environ["GCP_SERVICE_ACCOUNT_FILE"]).read_text())
    credentials = GcpCredentials(service_account_info=info, project=info["project_id"])
    credentials.save("my-gcp-credentials", overwrite=True)
    GcsBucket(bucket="my-flows", bucket_folder="my-project", gcp_credentials=credentials).save(
        "my-flows", overwrite=True
    )
    env = {}
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]

    flow.from_source(source=GcsBucket.load("my-flows"), entrypoint="flow.py:my_flow").deploy(
        name="from-gcs",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["prefect-gcp[cloud_storage]", "cowsay==6.1"], "env": env},
    )
