"""Deploy a flow from a private git repository over HTTPS, with a token.

    GIT_TOKEN=... python git_private_https.py

The token is saved once as a Secret block; the deployment stores only a reference to it
(`{{ prefect.blocks.secret.git-token }}`), which is resolved inside the flow run's
container when the code is cloned. It never appears in the deployment, in the
container's environment or in the run's logs.

Pick one of `branch` (a branch or a tag) or `commit_sha`. A GitHubCredentials,
GitLabCredentials or BitBucketCredentials block (prefect-github, prefect-gitlab,
prefect-bitbucket) can stand in for the dictionary, e.g.
`credentials=GitHubCredentials.load("github")`.
"""

import os

from prefect import flow
from prefect.blocks.system import Secret
from prefect.runner.storage import GitRepository

REPOSITORY = os.environ.get("FLOW_REPOSITORY", "https://git.example.com/my-org/private-flows.git")

if __name__ == "__main__":
    if "GIT_TOKEN" in os.environ:
        Secret(value=os.environ["GIT_TOKEN"]).save("git-token", overwrite=True)

    source = GitRepository(
        url=REPOSITORY,
        credentials={"access_token": Secret.load("git-token")},
        branch=os.environ.get("FLOW_BRANCH", "main"),  # a branch or a tag, e.g. "v1.0"
        # commit_sha="4f3e120f65d1c7f09ff5528264e3a7b95ba25edb",  # instead of branch
    )
    flow.from_source(source=source, entrypoint="flow.py:my_flow").deploy(
        name="from-private-git",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["cowsay==6.1"]},
    )
