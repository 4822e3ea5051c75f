"""Deploy a flow whose code is in an Azure Blob Storage container.

    AZURE_STORAGE_CONNECTION_STRING=... python azure_blob.py

Upload the project first (e.g. `az storage blob upload-batch -d my-flows
--destination-path my-project -s .`). The connection string is saved in an
AzureBlobStorageCredentials block; its BlobEndpoint may point at Azurite.
`pip_packages` brings prefect-azure[blob_storage] into the flow run's container.
"""

import os

from prefect import flow
from prefect_azure import AzureBlobStorageCredentials
from prefect_azure.blob_storage import AzureBlobStorageContainer

if __name__ == "__main__":
    credentials = AzureBlobStorageCredentials(
        connection_string=os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    )
    credentials.save("my-azure-credentials", overwrite=True)
    AzureBlobStorageContainer(
        container_name="my-flows", base_folder="my-project", credentials=credentials
    ).save("my-flows", overwrite=True)

    flow.from_source(
        source=AzureBlobStorageContainer.load("my-flows"), entrypoint="flow.py:my_flow"
    ).deploy(
        name="from-azure-blob",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["prefect-azure[blob_storage]", "cowsay==6.1"]},
    )
