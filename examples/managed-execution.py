"""Deploy a flow from git to a managed work pool, in the shape Prefect's docs give.

    python managed-execution.py

FLOW_SOURCE names the git repository holding flow.py (the demo serves one on
loopback); with Prefect Cloud this would be a GitHub, GitLab or Bitbucket URL.
"""

import os

from prefect import flow

if __name__ == "__main__":
    flow.from_source(
        source=os.environ.get("FLOW_SOURCE", "git://127.0.0.1:9418/demo"),
        entrypoint="flow.py:my_flow",
    ).deploy(
        name="test-managed-flow",
        work_pool_name="my-managed-pool",
        job_variables={"pip_packages": ["cowsay==6.1"]},
    )
