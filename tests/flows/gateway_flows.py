"""Flows run behind the run gateway: one does what ordinary flows do through the API
(tasks, a subflow, logs, an artifact, a custom event), one attacks the books with the
credential its container holds, and prints what the API answered to each attempt."""

import base64
import json
import os
import uuid
from datetime import datetime, timedelta, timezone

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.events import emit_event


@task
def double(value: int) -> int:
    return value * 2


@flow(log_prints=True)
def child(value: int) -> int:
    return double(value) + 1


@flow(log_prints=True)
def ordinary(value: int = 20) -> int:
    total = double(value) + child(value)
    create_markdown_artifact(markdown=f"total **{total}**", key="gateway-total")
    emit_event(
        event="gateway.test.custom",
        resource={"prefect.resource.id": f"gateway.test.{value}"},
    )
    print(f"ordinary total: {total}")
    return total


#: The saved block the persisting flow keeps its results in (the test saves it first).
RESULTS_BLOCK = "local-file-system/gateway-results"


@task(persist_result=True, result_serializer="compressed/json", cache_expiration=timedelta(hours=1))
def persisted(value: int) -> int:
    return value + 1


@flow(
    persist_result=True,
    result_serializer="compressed/json",
    result_storage=RESULTS_BLOCK,
    log_prints=True,
)
def persists_results(value: int = 41) -> int:
    """Results as Prefect's engine persists them: in a saved block (its id in each
    state's data), with an expiration, through a compressed JSON serializer."""
    total = persisted.with_options(result_storage=RESULTS_BLOCK)(value)
    print(f"persisted: {total}")
    return total


def _attempts(client: httpx.Client, run_id: str, workspace: str, pool: str, other: str) -> dict:
    month = datetime.now(timezone.utc).strftime("%Y%m")
    limit = f"prefect-managed-{workspace}"
    usage = client.post("/artifacts/filter", json={"limit": 50}).json()
    usage_ids = [a["id"] for a in usage if str(a.get("key") or "").startswith("usage-")]
    now = datetime.now(timezone.utc).isoformat()
    return {
        "deactivate_limit": client.patch(
            f"/v2/concurrency_limits/{limit}", json={"active": False}
        ).status_code,
        "raise_limit": client.patch(
            f"/v2/concurrency_limits/{limit}", json={"limit": 1000}
        ).status_code,
        "take_run_slot": client.post(
            "/v2/concurrency_limits/increment-with-lease",
            json={"names": [limit], "slots": 1, "mode": "concurrency", "lease_duration": 60},
        ).status_code,
        "forge_usage": client.post(
            "/artifacts/",
            json={
                "key": f"usage-{workspace}-{month}-run-{uuid.uuid4()}",
                "type": "table",
                "data": "[]",
                "flow_run_id": run_id,
            },
        ).status_code,
        "erase_usage": [client.delete(f"/artifacts/{a}").status_code for a in usage_ids[:1]],
        "other_run_state": client.post(
            f"/flow_runs/{other}/set_state",
            json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
        ).status_code,
        "other_run_logs": client.post(
            "/logs/",
            json=[
                {
                    "name": "x",
                    "level": 20,
                    "message": "forged",
                    "timestamp": now,
                    "flow_run_id": other,
                }
            ],
        ).status_code,
        "delete_other_run": client.delete(f"/flow_runs/{other}").status_code,
        "pause_pool": client.patch(f"/work_pools/{pool}", json={"is_paused": True}).status_code,
        "set_variable": client.post("/variables/", json={"name": "gw_x", "value": 1}).status_code,
        "read_own_run": client.get(f"/flow_runs/{run_id}").status_code,
    }


def _basic(token: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}


@flow
def attack(workspace: str, pool: str, other: str, server_url: str) -> None:
    logger = get_run_logger()
    run_id = str(get_run_context().flow_run.id)
    token = os.environ["PREFECT_API_AUTH_STRING"]
    api = os.environ["PREFECT_API_URL"]
    with httpx.Client(base_url=api, headers=_basic(token), timeout=30) as client:
        results = _attempts(client, run_id, workspace, pool, other)
    # Around the gateway: the server itself, with no credential and with the run's token.
    results["server_without_credential"] = httpx.get(f"{server_url}/admin/version").status_code
    results["server_with_run_token"] = httpx.get(
        f"{server_url}/admin/version", headers=_basic(token)
    ).status_code
    # A token for another run, made without the key.
    forged = f"pmr1.{other}.{'0' * 64}"
    results["forged_token"] = httpx.get(
        f"{api}/flow_runs/{other}", headers=_basic(forged)
    ).status_code
    results["env_names"] = sorted(
        key for key in os.environ if key.startswith(("PREFECT_API", "PREFECT_SERVER"))
    )
    results["api_url"] = api
    logger.info("gateway results: %s", json.dumps(results))


@flow(log_prints=True)
def sleep_then_finish(seconds: float = 20) -> int:
    import time

    print("sleeping")
    time.sleep(seconds)
    result = double(21)
    print(f"finished after the sleep: {result}")
    return result
