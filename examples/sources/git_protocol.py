"""Deploy a flow from a `git://` repository (a `git daemon`), at a tag.

    python git_protocol.py

`git://` has no authentication: use it for public code on a network you trust.
"""

import os

from prefect import flow
from prefect.runner.storage import GitRepository

if __name__ == "__main__":
    flow.from_source(
        source=GitRepository(
            url=os.environ.get("FLOW_REPOSITORY", "git://127.0.0.1:9418/demo"),
            branch=os.environ.get("FLOW_REF", "main"),
        ),
        entrypoint="flow.py:my_flow",
    ).deploy(
        name="from-git-daemon",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["cowsay==6.1"]},
    )
