"""The demo: one flow run from a git source with pip_packages, in a capped container.

Run it through scripts/demo.sh, which sets up the machine first. Everything it starts
listens on 127.0.0.1 and is stopped at the end; state lives in .demo/ and is made anew
on each run, so the demo can be run again and again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback services the tests use, too

from services import (  # noqa: E402
    BIN,
    free_port,
    start_git_server,
    start_package_index,
    start_prefect_server,
    start_worker,
    write_policy,
)

DEMO = ROOT / ".demo"
RUN = DEMO / "run"
WHEELS = DEMO / "wheels"
POOL = "my-managed-pool"
DEPLOYMENT = "my-flow/test-managed-flow"
PIP_PACKAGES = ["cowsay==6.1"]


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def prefect(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], env={**os.environ, **env}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def print_usage_artifact(flow_run_id: str) -> None:
    """The usage record's table artifact on the run (the worker stores it once it has
    read the container, just after the run's final state)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="usage-")),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            )
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    if not found:
        raise SystemExit("the worker stored no usage record for the run within 60 s")
    artifact = found[0]
    print(f"    artifact {artifact.key} ({artifact.type}): {artifact.description}")
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    width = max(len(str(row.get("metric", ""))) for row in rows) if rows else 0
    for row in rows:
        print(f"    {str(row.get('metric', '')).ljust(width)}  {row.get('value', '')}")


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    WHEELS.mkdir(parents=True, exist_ok=True)

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # The server requires a credential that only the operator's side holds (the CLI, the
    # worker); flow runs get a token for their own run, through the run gateway.
    auth = f"demo:{secrets.token_hex(16)}"
    env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": auth,
        "PREFECT_HOME": str(RUN / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    os.environ.update(env)
    from prefect.client.orchestration import get_client

    from prefect_managed.runtime.builder import default_runtime_tag

    services = []
    try:
        say(f"Starting a Prefect server on SQLite at {api_url}, requiring a credential")
        services.append(
            start_prefect_server(
                port, RUN / "server-home", RUN, {"PREFECT_SERVER_API_AUTH_STRING": auth}
            )
        )

        say("Starting a git server holding examples/flows")
        git = start_git_server(RUN / "git", RUN)
        services.append(git.service)
        source = git.publish("demo", {"flow.py": (ROOT / "examples/flows/flow.py").read_text()})
        print(f"    {source}")

        say(f"Starting a package index on loopback with {', '.join(PIP_PACKAGES)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "-d", str(WHEELS), *PIP_PACKAGES],
            check=True,
        )
        index = start_package_index(WHEELS, RUN)
        services.append(index.service)

        say(f"prefect work-pool create {POOL} --type prefect:managed")
        print(prefect("work-pool", "create", POOL, "--type", "prefect:managed", env=env).strip())

        say("python examples/managed-execution.py")
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples/managed-execution.py")],
            env={**os.environ, "FLOW_SOURCE": source},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"deploying failed:\n{done.stdout}{done.stderr}")
        print(done.stdout.strip())

        policy = write_policy(
            RUN / "prefect-managed.toml",
            workspace={"name": "demo", "tier": "free"},
            # The secure defaults: the run gateway on ("auto") and the isolated network,
            # which reaches the gateway, the package index and the git server only.
            runtime={
                "default_image": default_runtime_tag(),
                "package_index_url": index.url,
                "allowed_destinations": [f"127.0.0.1:{git.port}"],
            },
        )
        say(f"prefect-managed policy check {policy.relative_to(ROOT)}")
        subprocess.run([str(BIN / "prefect-managed"), "policy", "check", str(policy)], check=True)

        say(f"prefect worker start --pool {POOL} --type prefect:managed")
        worker = start_worker(
            POOL,
            RUN,
            {
                "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            },
        )
        services.append(worker.service)
        print(f"    worker log: {worker.service.log_path.relative_to(ROOT)}")

        say(f"prefect deployment run '{DEPLOYMENT}'")
        run_started = time.monotonic()
        output = prefect("deployment", "run", DEPLOYMENT, env=env)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        if match is None:
            raise SystemExit(f"no flow run id in the output of prefect deployment run:\n{output}")
        flow_run_id = match.group(1)
        print(f"    flow run {flow_run_id}")

        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    break
                if time.monotonic() - run_started > 600:
                    raise SystemExit("the flow run did not finish within 10 minutes")
                time.sleep(0.5)
        run_seconds = time.monotonic() - run_started

        time.sleep(1)  # the last log batch
        say(f"prefect flow-run logs {flow_run_id}")
        print(prefect("flow-run", "logs", flow_run_id, env=env).rstrip())

        say("Result")
        print(f"    final state:                      {run.state.name} ({run.state.type.value})")
        if run.state.message:
            print(f"    message:                          {run.state.message}")
        print(f"    prefect deployment run -> final:  {run_seconds:.1f} s")

        say("The run's usage, as the flow run's Artifacts tab shows it")
        print_usage_artifact(flow_run_id)
        say("prefect-managed usage")
        subprocess.run(
            [str(BIN / "prefect-managed"), "usage"],
            env={**os.environ, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)},
            check=True,
        )
        print(f"    demo wall time:                   {time.monotonic() - started:.1f} s")
        return 0 if run.state.is_completed() else 1
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
