"""Deploy a flow whose code is in an S3 bucket (or any S3-compatible store).

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... python s3_bucket.py

Upload the project first (e.g. `aws s3 sync . s3://my-flows/my-project`). The
credentials are saved as an AwsCredentials block; the deployment refers to the saved
S3Bucket block by name. `pip_packages` brings prefect-aws into the flow run's
container, where the block downloads the code. For an S3-compatible store (MinIO, Ceph,
moto), set S3_ENDPOINT_URL; the endpoint is kept in the credentials block.
"""

import os

from prefect import flow
from prefect_aws import AwsCredentials, S3Bucket

if __name__ == "__main__":
    client_parameters = {}
    if os.environ.get("S3_ENDPOINT_URL"):
        client_parameters["endpoint_url"] = os.environ["S3_ENDPOINT_URL"]
    credentials = AwsCredentials(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_client_parameters=client_parameters,
    )
    credentials.save("my-aws-credentials", overwrite=True)
    S3Bucket(bucket_name="my-flows", bucket_folder="my-project", credentials=credentials).save(
        "my-flows", overwrite=True
    )

    flow.from_source(source=S3Bucket.load("my-flows"), entrypoint="flow.py:my_flow").deploy(
        name="from-s3",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["prefect-aws", "cowsay==6.1"]},
    )
