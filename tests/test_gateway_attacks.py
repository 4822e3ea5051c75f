"""Issue 24's attack classes, run for real as a hostile flow would: one flow run in a real
container, holding only its own environment (its run token and the gateway's URL), against
a real Prefect server that requires a credential, tries every class in several spellings
(tests/flows/gateway_attacks.py). The gateway's answers are checked, and then the books from
the operator's side: the other deployment's pull steps, the usage records, the Secret block,
the pool, the workspace's limit, the other run and its task run, the events the server
stored, no new runs, no variable, no automation; the worker still serving. Also: the
worker's credential in no environment the flow can read, and the server not reachable
around the gateway. Once with the policy's defaults (the gateway on its "auto" port, the
isolated network) and once under `network_mode = "host"`."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import httpx
import pytest
from conftest import OUTPUT
from faults import active_slots, wait_for_records
from helpers import (
    create_pool,
    flow_run_logs,
    session_workspace,
    usage_report,
    wait_for_log,
    wait_for_settled_run,
)
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterName,
)
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from services import free_port, start_prefect_server, start_worker, wait_for, write_policy

from prefect_managed.gateway.port import auto_gateway_port
from prefect_managed.retries import INFRASTRUCTURE_RETRY
from prefect_managed.run_states import AWAITING_SLOT, HOST_LOST, QUOTA_EXHAUSTED
from prefect_managed.settings import ledger_key

pytestmark = pytest.mark.docker

FLOWS = Path(__file__).parent / "flows"
AUTH = f"admin:{secrets.token_hex(8)}"
SECRET = "s3cret-" + secrets.token_hex(4)
#: The state names the worker gives a meaning to, as the flow spells them (casefolded).
WORKERS_NAMES = {
    n.casefold() for n in (AWAITING_SLOT, QUOTA_EXHAUSTED, HOST_LOST, INFRASTRUCTURE_RETRY)
}
#: The deployment run the attack flow tries to create already waiting for a slot.
WORKER_NAMED_RUN = "gw-attack-awaiting-slot"


@task
def victim_task() -> None:
    """The other run's task run (made by the operator, never run)."""


def _refused(status) -> bool:
    return isinstance(status, int) and 400 <= status < 500


@pytest.fixture(scope="module", params=["defaults", "host"])
def attacked(request, git_server, runtime_image, package_index, tmp_path_factory):
    """A server requiring `AUTH`, a managed pool served with the policy's defaults (the
    run gateway on its "auto" port, the isolated network) or with `network_mode = "host"`
    (the gateway still on), a plain Docker pool, another user's deployment, run, task run,
    Secret block and usage record; then the attacking run, settled."""
    mode = request.param
    home = tmp_path_factory.mktemp(f"attack-server-{mode}")
    port = free_port()
    server = start_prefect_server(
        port, home, OUTPUT, {"PREFECT_SERVER_API_AUTH_STRING": AUTH}, name=f"attack-server-{mode}"
    )
    api = f"http://127.0.0.1:{port}/api"
    repo = git_server.publish(
        f"attacks-{mode}",
        {
            "gateway_attacks.py": (FLOWS / "gateway_attacks.py").read_text(),
            "gateway_flows.py": (FLOWS / "gateway_flows.py").read_text(),
        },
    )
    workspace = session_workspace(f"attack-{mode}")
    # The policy's defaults, but for what any policy names: its image, its package index,
    # and (isolated) the git server the runs pull from.
    gateway_port = auto_gateway_port(api, ledger_key())
    runtime = {"default_image": runtime_image, "package_index_url": package_index.url}
    if mode == "host":
        runtime["network_mode"] = "host"
    else:
        runtime["allowed_destinations"] = [f"127.0.0.1:{git_server.port}"]
    policy = write_policy(
        tmp_path_factory.mktemp(f"attack-{mode}") / "policy.toml",
        workspace={"name": workspace, "tier": "test"},
        tiers={"test": {"pool_limit": 100, "concurrency_limit": 2}},
        runtime=runtime,
    )
    env = {
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}):
        pool = create_pool(f"attack-pool-{mode}")
        plain_pool = f"plain-pool-{mode}"
        from prefect.blocks.system import Secret
        from prefect_docker.worker import DockerWorker

        with get_client(sync_client=True) as client:
            client.create_work_pool(
                WorkPoolCreate(
                    name=plain_pool,
                    type="docker",
                    base_job_template=DockerWorker.get_default_base_job_template(),
                )
            )
        worker = start_worker(pool, OUTPUT, env, name=f"attack-worker-{mode}")

        def deploy(entrypoint: str, name: str, work_pool: str = pool, **kwargs):
            return flow.from_source(source=repo, entrypoint=entrypoint, _sync=True).deploy(
                name=name, work_pool_name=work_pool, print_next_steps=False, _sync=True, **kwargs
            )

        victim_deployment = deploy("gateway_flows.py:ordinary", f"victim-{mode}")
        plain_deployment = deploy(
            "gateway_flows.py:ordinary",
            f"plain-{mode}",
            plain_pool,
            image=runtime_image,
            build=False,
            push=False,
        )
        secret_id = Secret(value=SECRET).save(f"victim-secret-{mode}")
        # Another user's finished run: its signed usage record is what an eraser wants.
        noop = deploy("gateway_flows.py:sleep_then_finish", f"noop-{mode}")
        earlier = run_deployment(noop, parameters={"seconds": 0}, timeout=0).id
        with get_client(sync_client=True) as client:
            # Created for 30 days ahead: the worker picks up a run due now at once.
            victim = client.create_flow_run_from_deployment(
                victim_deployment,
                state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=30)),
            )
            victim_task_run = client.create_task_run(
                victim_task, flow_run_id=victim.id, dynamic_key="0"
            )
            before = {
                "pull_steps": client.read_deployment(victim_deployment).pull_steps,
                "victim_flow": victim.flow_id,
            }
        yield_value = SimpleNamespace(
            mode=mode,
            api=api,
            server_port=port,
            pool=pool,
            plain_pool=plain_pool,
            policy=policy,
            worker=worker,
            workspace=workspace,
            gateway_port=gateway_port,
            deploy=deploy,
            noop=noop,
            earlier=earlier,
            victim=victim,
            victim_task_run=victim_task_run,
            victim_deployment=victim_deployment,
            plain_deployment=plain_deployment,
            secret_id=secret_id,
            before=before,
            injected=uuid4(),
        )
        yield yield_value
        worker.service.stop()
    server.stop()


def _attack(attacked, docker_client) -> tuple[dict, object]:
    """The attacking run, once per module: its results and its settled flow run."""
    if getattr(attacked, "results", None) is None:
        earlier = wait_for_settled_run(docker_client, attacked.earlier, 300)
        assert earlier.state.is_completed(), earlier.state
        assert wait_for_records([attacked.earlier]) == {attacked.earlier: 1}
        with get_client(sync_client=True) as client:
            usage = [
                str(a.id) for a in client.read_artifacts() if str(a.key or "").startswith("usage-")
            ]
        attacked.usage_before = usage_report(attacked.policy, attacked.api, AUTH)
        victim = {
            "run": str(attacked.victim.id),
            "task_run": str(attacked.victim_task_run.id),
            "deployment": str(attacked.victim_deployment),
            "plain_deployment": str(attacked.plain_deployment),
            "plain_pool": attacked.plain_pool,
            "secret_block": str(attacked.secret_id),
            "pool": attacked.pool,
            "flow": str(attacked.before["victim_flow"]),
            "limit": f"prefect-managed-{attacked.workspace}",
            "usage_artifacts": usage,
            "injected_task_run": str(attacked.injected),
        }
        deployment = attacked.deploy("gateway_attacks.py:attack", f"attack-{attacked.mode}")
        run = run_deployment(
            deployment,
            parameters={
                "victim": victim,
                "gateway_port": attacked.gateway_port,
                "isolated": attacked.mode == "defaults",
                "server_port": attacked.server_port,
            },
            timeout=0,
        ).id
        done = wait_for_settled_run(docker_client, run, 400)
        assert done.state.is_completed(), (done.state, flow_run_logs(run)[-20:])
        line = next(log for log in wait_for_log(run, "attack results:") if "attack results:" in log)
        attacked.results = json.loads(line.split("attack results:", 1)[1])
        (OUTPUT / f"attack-results-{attacked.mode}.json").write_text(
            json.dumps(attacked.results, indent=1)
        )
        attacked.run = done
    return attacked.results, attacked.run


def test_paths_read_one_way_and_sent_another_are_refused(attacked, docker_client):
    results, _ = _attack(attacked, docker_client)
    for attempt in ("dot_segments", "hash_and_query", "control_characters"):
        assert all(_refused(status) for status in results[attempt]), (attempt, results[attempt])
    assert len(results["dot_segments"]) >= 10
    with get_client(sync_client=True) as client:
        assert (
            client.read_deployment(attacked.victim_deployment).pull_steps
            == (attacked.before["pull_steps"])
        )
        assert not client.read_work_pool(attacked.pool).is_paused
        assert client.read_variables() == []
        response = client._client.post("/automations/count", json={})
        assert response.json() == 0


def test_only_the_runs_own_event_websockets_open(attacked, docker_client):
    results, _ = _attack(attacked, docker_client)
    assert all(outcome != "open" for outcome in results["websockets"]), results["websockets"]
    held = results["websockets_held"]
    assert 1 <= held.count("auth_success") <= 8, held
    assert len(held) - held.count("auth_success") >= 4, held


def test_events_about_other_runs_never_reach_the_server(attacked, docker_client):
    results, _ = _attack(attacked, docker_client)
    assert results["events_sent"] == "open"
    assert _refused(results["events_over_http"])

    def stored(event_id: str) -> bool:
        with get_client(sync_client=True) as client:
            reply = client._client.post(
                "/events/filter", json={"filter": {"id": {"id": [event_id]}}, "limit": 5}
            )
        return bool(reply.json().get("events"))

    # The control event (about the run itself) arrives: then none of the forged ones did.
    wait_for(lambda: stored(results["control_event_id"]), 60, "the control event stored")
    forged = results["forged_event_ids"]
    assert {name for name, event_id in forged.items() if stored(event_id)} == set()
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(attacked.victim_task_run.id)
        assert task_run.flow_run_id == attacked.victim.id and task_run.name != "stolen"
        with pytest.raises(ObjectNotFound):
            client.read_task_run(attacked.injected)
        assert client.read_flow_run(attacked.victim.id).state.is_scheduled()


def test_bodies_that_reach_past_the_run_are_refused_and_the_books_hold(attacked, docker_client):
    results, run = _attack(attacked, docker_client)
    bodies = results["bodies"]
    many = ("delete_usage", "poisoned_state_data", "worker_named_states")
    refused = {name: status for name, status in bodies.items() if name not in many}
    assert all(_refused(status) for status in refused.values()), refused
    for name in many:
        assert bodies[name] and all(_refused(s) for s in bodies[name]), (name, bodies[name])
    with get_client(sync_client=True) as client:
        # No run of the plain pool's deployment, none of the victim's deployment but its own.
        for deployment, expected in (
            (attacked.plain_deployment, 0),
            (attacked.victim_deployment, 1),
        ):
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment])
                )
            )
            assert len(runs) == expected, runs
        assert (
            client.read_deployments(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[attacked.plain_deployment])
                )
            )[0].work_pool_name
            == attacked.plain_pool
        )
        # Its own run kept the worker's infrastructure_pid and never went back to Scheduled.
        attack_run = client.read_flow_run(run.id)
        assert "victim" not in str(attack_run.infrastructure_pid)
        # Its states read as Prefect reads them (none holds data that breaks the read), and
        # no artifact was made under its usage record's key but the record itself.
        kinds = [s.type.value for s in client.read_flow_run_states(run.id)]
        under_its_key = [
            a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=f"-run-{run.id}"))
            )
            if str(a.key).startswith("usage-")
        ]
        assert len(under_its_key) == 1, under_its_key
        assert under_its_key[0].metadata_, under_its_key  # the signed record, not a forgery
        assert "SCHEDULED" not in kinds[kinds.index("RUNNING") :], kinds
        # No state named as the worker names its own, on its run or on a run it made.
        names = {s.name.casefold().replace(" ", "") for s in client.read_flow_run_states(run.id)}
        assert not names & WORKERS_NAMES, names
        assert not client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[WORKER_NAMED_RUN]))
        )
        from prefect.blocks.system import Secret

        assert Secret.load(f"victim-secret-{attacked.mode}").get() == SECRET
        limit = client.read_global_concurrency_limit_by_name(
            f"prefect-managed-{attacked.workspace}"
        )
        assert limit.active and limit.limit == 2
    # The books: the earlier record still counts, the attack's own recorded once.
    assert wait_for_records([run.id]) == {run.id: 1}
    after = usage_report(attacked.policy, attacked.api, AUTH)
    earlier_ids = {r["flow_run_id"] for r in attacked.usage_before["records"]}
    assert earlier_ids <= {r["flow_run_id"] for r in after["records"]}
    assert after["billable_minutes"] >= attacked.usage_before["billable_minutes"]
    wait_for(lambda: active_slots(attacked.workspace) == 0, 60, "the slots given back")


def test_the_worker_process_is_not_starved(attacked, docker_client):
    results, _ = _attack(attacked, docker_client)
    assert results["huge_body"] == 413 and results["huge_body_seconds"] < 10, results
    # 1500 task runs named in one batch: read in a few filter requests, then refused.
    assert results["logs_naming_many"] == 403, results
    assert results["logs_naming_many_seconds"] < 20, results
    assert results["read_while_idle"] == 200
    assert results["idle_closed"] == results["idle_opened"], results
    assert results["read_own_run"] == 200
    if attacked.mode == "host":
        assert str(results["bind_gateway_port"]).startswith("refused"), results
    # Still serving: the next run completes and is recorded.
    after = run_deployment(attacked.noop, parameters={"seconds": 0}, timeout=0).id
    assert wait_for_settled_run(docker_client, after, 300).state.is_completed()
    assert wait_for_records([after]) == {after: 1}
    assert attacked.worker.service.process.poll() is None


def test_the_workers_credential_is_nowhere_and_the_server_not_reachable_around_the_gateway(
    attacked, docker_client
):
    results, _ = _attack(attacked, docker_client)
    environments = results["environments"]
    # The flow read its own environment and every process's it could.
    assert environments["os.environ"]["PREFECT_API_AUTH_STRING"].startswith("pmr2."), environments
    assert len(environments) >= 2, list(environments)
    password = AUTH.split(":", 1)[1]
    assert password not in json.dumps(environments)
    assert str(ledger_key().decode()) not in json.dumps(environments)
    direct = results["server_directly"]
    assert set(direct) == {"none", "run_token", "guess"}, direct
    if attacked.mode == "defaults":
        # The isolated network: no route to the server at all.
        assert all(str(outcome).startswith("unreachable") for outcome in direct.values()), direct
    else:
        # The host's loopback reaches the server, which answers nothing without its credential.
        assert all(outcome == 401 for outcome in direct.values()), direct


def test_a_token_past_its_expiry_or_for_another_key_is_refused(attacked):
    from prefect_managed.gateway.tokens import run_token
    from prefect_managed.settings import ledger_key

    url = f"http://127.0.0.1:{attacked.gateway_port}/api/flow_runs/{attacked.victim.id}"
    valid = run_token(ledger_key(), attacked.victim.id, 600)
    assert httpx.get(url, headers={"Authorization": f"Bearer {valid}"}).status_code == 200
    expired = run_token(ledger_key(), attacked.victim.id, -1)
    other_key = run_token(b"x" * 32, attacked.victim.id, 600)
    for token in (expired, other_key, AUTH):
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 401
