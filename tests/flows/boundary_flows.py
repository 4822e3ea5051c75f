"""Hostile flows against the managed layer's books: each uses the Prefect API credential its
container holds to forge usage, loosen the workspace's limit, read the worker's secrets or
fill the host's disk. None catches an error it is not meant to, so the run's final state
says what happened."""

import json
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate, GlobalConcurrencyLimitUpdate
from prefect.context import get_run_context


def _fake_record(flow_run_id: str, workspace: str, minutes: int) -> str:
    now = datetime.now(timezone.utc)
    return json.dumps(
        {
            "flow_run_id": flow_run_id,
            "flow_run_name": "forged",
            "workspace": workspace,
            "tier": "test",
            "pool": "forged",
            "image": "forged",
            "started_at": (now - timedelta(minutes=minutes)).isoformat(),
            "finished_at": now.isoformat(),
            "wall_seconds": minutes * 60.0,
            "billable_minutes": minutes,
            "outcome": "completed",
        }
    )


def _key(workspace: str, flow_run_id: str) -> str:
    month = datetime.now(timezone.utc).strftime("%Y%m")
    return f"usage-{workspace}-{month}-run-{flow_run_id}"


@flow
def forge_usage(attack: str, workspace: str, victim: str = "") -> str:
    """Write usage artifacts the worker did not write."""
    own = str(get_run_context().flow_run.id)
    artifacts = []
    if attack == "precreate":  # its own record, zero minutes, before the worker writes one
        artifacts.append((_key(workspace, own), {"usage_record": _fake_record(own, workspace, 0)}))
    elif attack == "erase":  # a newer record of an earlier run, zero minutes
        artifacts.append(
            (_key(workspace, victim), {"usage_record": _fake_record(victim, workspace, 0)})
        )
    elif attack == "inflate":  # records of runs that never were, a day each
        for _ in range(5):
            run = str(uuid.uuid4())
            artifacts.append(
                (_key(workspace, run), {"usage_record": _fake_record(run, workspace, 1440)})
            )
        run = str(uuid.uuid4())  # one naming another workspace under this one's key
        artifacts.append((_key(workspace, run), {"usage_record": _fake_record(run, "other", 1440)}))
    elif attack == "corrupt":  # not a record at all
        artifacts.append((_key(workspace, str(uuid.uuid4())), {"usage_record": "{not json"}))
        artifacts.append((_key(workspace, str(uuid.uuid4())), {"usage_record": '{"a": 1}'}))
    with get_client(sync_client=True) as client:
        for key, metadata in artifacts:
            client.create_artifact(
                ArtifactCreate(
                    key=key,
                    type="table",
                    data="[]",
                    metadata_={**metadata, "usage_signature": "0" * 64},
                )
            )
    get_run_logger().info("forged %d usage artifact(s)", len(artifacts))
    return attack


@flow
def loosen_limit(attack: str, workspace: str) -> str:
    """Change the workspace's concurrency limit through the API."""
    name = f"prefect-managed-{workspace}"
    change = {
        "deactivate": {"active": False},
        "raise": {"limit": 100},
        "decay": {"slot_decay_per_second": 5.0},
    }[attack]
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate.model_validate(change)
        )
        limit = client.read_global_concurrency_limit_by_name(name)
    get_run_logger().info(
        "limit now active=%s limit=%s decay=%s",
        limit.active,
        limit.limit,
        limit.slot_decay_per_second,
    )
    return attack


@flow
def read_env() -> list[str]:
    """Log every environment variable name the container holds, and whether any value
    holds a password of the worker's."""
    names = sorted(os.environ)
    get_run_logger().info("env names: %s", ", ".join(names))
    leaked = [name for name, value in os.environ.items() if "hunter2" in value]
    get_run_logger().info("env values with the worker's password: %s", leaked)
    return names


@flow
def sleep_then_exit(seconds: float) -> str:
    get_run_logger().info("sleeping %s s", seconds)
    time.sleep(seconds)
    return "slept"


@flow
def flood_output(megabytes: int, then_sleep: float) -> str:
    """Write `megabytes` MB to stdout (the container's log on the host), then wait."""
    line = "x" * 1023 + "\n"
    for _ in range(megabytes * 1024):
        sys.stdout.write(line)
    sys.stdout.flush()
    get_run_logger().info("flooded %d MB", megabytes)
    time.sleep(then_sleep)
    return "flooded"
