"""Bad input, case by case: the policy file, job variables, pip_packages, code sources,
images, environment variables and what a flow run sends the run gateway. Each case is tried here (a unit test where the logic is
pure, a real run where the user meets it as a run's state) and gets a clear message; a
run with bad input ends in a final state, never stuck, and its worker goes on serving.

docs/bad-input.md lists every case with its message; it is generated from CASES
(`python tests/test_bad_input.py`) and a test fails when it drifts.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest

from prefect_managed.configuration import ManagedJobConfiguration
from prefect_managed.dependencies import normalize_pip_packages
from prefect_managed.exceptions import ApiOpenWithoutCredential, ManagedError
from prefect_managed.policy import Policy, load_policy

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"
POLICY_NAME = "prefect-managed.toml"
RUNTIME_IMAGE = "prefect-managed-runtime:3.9.1"


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    given: str
    #: unit cases: returns the message the user sees; run cases: None
    message_of: Callable[[], str] | None = None
    #: run cases: what the run's final state message (or the refusal) says
    expected: str = ""
    #: how the user meets it
    where: str = ""

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.area} {self.name}".lower()).strip("-")

    def message(self) -> str:
        return self.message_of() if self.message_of else self.expected


def policy_message(text: str) -> Callable[[], str]:
    def _message() -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / POLICY_NAME
            path.write_text(text)
            try:
                load_policy(path)
            except ManagedError as exc:
                return str(exc).replace(str(path), POLICY_NAME)
        raise AssertionError(f"the policy was accepted: {text!r}")

    return _message


def policy_path_message(make: Callable[[Path], Path]) -> Callable[[], str]:
    def _message() -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = make(Path(folder))
            try:
                load_policy(path)
            except ManagedError as exc:
                return str(exc).replace(str(path), POLICY_NAME)
        raise AssertionError("the policy was accepted")

    return _message


POLICY = Policy.model_validate({"runtime": {"default_image": RUNTIME_IMAGE}})


def job_message(**variables) -> Callable[[], str]:
    def _message() -> str:
        from prefect.client.schemas.objects import FlowRun

        variables.setdefault("image", RUNTIME_IMAGE)
        configuration = ManagedJobConfiguration(**variables)
        try:
            configuration.apply_policy(POLICY, FlowRun(id=uuid4(), flow_id=uuid4(), name="x"))
        except ManagedError as exc:
            return str(exc)
        raise AssertionError(f"the job variables were accepted: {variables!r}")

    return _message


def pip_message(entry: object) -> Callable[[], str]:
    def _message() -> str:
        try:
            normalize_pip_packages([entry])
        except ManagedError as exc:
            return str(exc)
        raise AssertionError(f"the entry was accepted: {entry!r}")

    return _message


GATEWAY_RUN = uuid4()
GATEWAY_OTHER = uuid4()


def gateway_message(method: str, raw_path: str, body: object = None) -> Callable[[], str]:
    """What the run gateway answers a run's request (its `detail`)."""

    def _message() -> str:
        import json

        from prefect_managed.gateway.reading import Reading, Unreadable, read_path, read_query
        from prefect_managed.gateway.routes import Refusal, decide

        path, _, query = raw_path.partition("?")
        sent = b"" if body is None else json.dumps(body).encode()
        try:
            reading = Reading(method, read_path(path.encode()), read_query(query.encode()))
            decide(reading, GATEWAY_RUN, sent)
        except (Unreadable, Refusal) as exc:
            return getattr(exc, "reason", str(exc))
        raise AssertionError(f"the gateway allowed {method} {raw_path}")

    return _message


def gateway_ownership_message() -> str:
    """What the gateway answers a write to another run's flow run."""
    import anyio

    from prefect_managed.gateway.app import Gateway, Ownership
    from prefect_managed.gateway.routes import Check, Refusal

    async def nothing(path: str) -> None:
        return None

    gateway = Gateway("http://127.0.0.1:1/api", {}, None, b"k" * 32, "api")
    gateway.ownership = Ownership(nothing)
    try:
        anyio.run(gateway._check, GATEWAY_RUN, (Check("flow_run", GATEWAY_OTHER),))
    except Refusal as exc:
        return exc.reason.replace(str(GATEWAY_OTHER), "<id>")
    raise AssertionError("the gateway allowed another run's flow run")


def gateway_event_message(name: str, resource: str) -> Callable[[], str]:
    def _message() -> str:
        from prefect_managed.gateway.events import check_event
        from prefect_managed.gateway.routes import Refusal

        event = {"event": name, "resource": {"prefect.resource.id": resource}, "id": str(uuid4())}
        try:
            check_event(event)
        except Refusal as exc:
            return exc.reason
        raise AssertionError(f"the gateway allowed the event {name}")

    return _message


def gateway_token_message() -> str:
    from prefect_managed.gateway.app import TOKEN_REFUSED

    return TOKEN_REFUSED


WORKER = "the worker exits 1 at start, printing `Error: <message>`"
RUN = "the flow run ends Crashed with this message; no container is created"
RUN_LOGS = "the flow run ends Crashed with this message; the container's output is in its logs"

CASES: list[Case] = [
    # -- the policy file ----------------------------------------------------------------
    Case(
        "policy file",
        "missing file",
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE names no file",
        policy_path_message(lambda d: d / POLICY_NAME),
        where=WORKER,
    ),
    Case(
        "policy file",
        "a directory, not a file",
        "the path is a directory",
        policy_path_message(lambda d: (d / POLICY_NAME).mkdir() or d / POLICY_NAME),
        where=WORKER,
    ),
    Case(
        "policy file", "not TOML", "`workspace = [`", policy_message("workspace = ["), where=WORKER
    ),
    Case(
        "policy file",
        "unknown setting",
        "`[runtime]` `privileged = true`",
        policy_message("[runtime]\nprivileged = true\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "misspelt table",
        "`[tier.free]`",
        policy_message("[tier.free]\nconcurrency_limit = 2\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "unknown tier",
        '`[workspace]` `tier = "gold"`',
        policy_message('[workspace]\ntier = "gold"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "negative concurrency",
        "`[tiers.free]` `concurrency_limit = -1`",
        policy_message("[tiers.free]\nconcurrency_limit = -1\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "memory not a size",
        '`[tiers.free]` `memory = "lots"`',
        policy_message('[tiers.free]\nmemory = "lots"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "zero memory",
        '`[tiers.free]` `memory = "0"`',
        policy_message('[tiers.free]\nmemory = "0"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "zero CPUs",
        "`[tiers.free]` `cpus = 0`",
        policy_message("[tiers.free]\ncpus = 0\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "run time as text",
        '`[tiers.free]` `max_run_seconds = "1h"`',
        policy_message('[tiers.free]\nmax_run_seconds = "1h"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "a tier that is not a table",
        "`[tiers]` `team = 3`",
        policy_message("[tiers]\nteam = 3\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "workspace name with capitals and spaces",
        '`name = "Data Team"`',
        policy_message('[workspace]\nname = "Data Team"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "containers as root",
        '`[runtime]` `user = "0"`',
        policy_message('[runtime]\nuser = "0"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "another container's network",
        '`network_mode = "container:db"`',
        policy_message('[runtime]\nnetwork_mode = "container:db"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "no processes allowed",
        "`[runtime]` `pids_limit = 0`",
        policy_message("[runtime]\npids_limit = 0\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "CPUs too small to limit",
        "`[tiers.free]` `cpus = 1e-10`",
        policy_message("[tiers.free]\ncpus = 1e-10\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "infinite CPUs",
        "`[tiers.free]` `cpus = inf`",
        policy_message("[tiers.free]\ncpus = inf\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "memory as a boolean",
        "`[tiers.free]` `memory = true`",
        policy_message("[tiers.free]\nmemory = true\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "concurrency as a boolean",
        "`[tiers.free]` `concurrency_limit = true`",
        policy_message("[tiers.free]\nconcurrency_limit = true\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "too many infrastructure retries",
        "`[tiers.free]` `infrastructure_retries = 10`",
        policy_message("[tiers.free]\ninfrastructure_retries = 10\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "container output cap negative",
        '`[tiers.free]` `container_output_max_size = "-1m"`',
        policy_message('[tiers.free]\ncontainer_output_max_size = "-1m"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "container output cap not a size",
        '`[tiers.free]` `container_output_max_size = "all"`',
        policy_message('[tiers.free]\ncontainer_output_max_size = "all"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway on a privileged port",
        "`[runtime]` `api_gateway_port = 80`",
        policy_message("[runtime]\napi_gateway_port = 80\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway without host networking",
        '`network_mode = "bridge"` with the run gateway on (its default)',
        policy_message('[runtime]\nnetwork_mode = "bridge"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated network without the run gateway",
        "`api_gateway_port = 0` with the isolated network (its default)",
        policy_message("[runtime]\napi_gateway_port = 0\n"),
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway port as a word other than auto",
        '`api_gateway_port = "on"`',
        policy_message('[runtime]\napi_gateway_port = "on"\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated destination by another machine's address",
        '`allowed_destinations = ["192.0.2.10:9000"]`',
        policy_message('[runtime]\nallowed_destinations = ["192.0.2.10:9000"]\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated destination without a port",
        '`allowed_destinations = ["git.example.com"]`',
        policy_message('[runtime]\nallowed_destinations = ["git.example.com"]\n'),
        where=WORKER,
    ),
    Case(
        "policy file",
        "allowed destinations without the isolated network",
        '`allowed_destinations = ["127.0.0.1:9418"]` with `network_mode = "host"`',
        policy_message(
            '[runtime]\nnetwork_mode = "host"\nallowed_destinations = ["127.0.0.1:9418"]\n'
        ),
        where=WORKER,
    ),
    Case(
        "policy file",
        "a Prefect server that answers without a credential",
        "a worker pointed at a server started without `PREFECT_SERVER_API_AUTH_STRING`, "
        "and no `trusted_code_only = true`",
        lambda: str(ApiOpenWithoutCredential("http://127.0.0.1:4200/api", POLICY_NAME)),
        where=WORKER,
    ),
    Case(
        "policy file",
        "not UTF-8",
        "a file with the byte 0xe9 (Latin-1 `é`)",
        policy_path_message(
            lambda d: (
                (d / POLICY_NAME).write_bytes(b'[workspace]\nname = "caf\xe9"\n')
                and d / POLICY_NAME
            )
        ),
        where=WORKER,
    ),
    Case(
        "policy file",
        "default image outside the allow-list",
        '`default_image = "python:3.12"`',
        policy_message('[runtime]\ndefault_image = "python:3.12"\n'),
        where=WORKER,
    ),
    # -- job variables ------------------------------------------------------------------
    Case(
        "job variables",
        "mem_limit not a size",
        '`mem_limit: "lots"`',
        job_message(mem_limit="lots"),
        where=RUN,
    ),
    Case(
        "job variables", "mem_limit zero", '`mem_limit: "0"`', job_message(mem_limit="0"), where=RUN
    ),
    Case(
        "job variables",
        "mem_limit negative",
        '`mem_limit: "-1g"`',
        job_message(mem_limit="-1g"),
        where=RUN,
    ),
    Case(
        "job variables",
        "pip_packages as one string",
        '`pip_packages: "pandas"`',
        expected="Validation failed for field 'pip_packages'",
        where="`deploy()` or `run_deployment()` is refused by the Prefect server "
        "(422); no flow run is created",
    ),
    # -- pip_packages -------------------------------------------------------------------
    Case("pip_packages", "not a string", "`[123]`", pip_message(123), where=RUN),
    Case("pip_packages", "empty entry", '`[""]`', pip_message(""), where=RUN),
    Case(
        "pip_packages",
        "installer option",
        '`["--index-url=http://127.0.0.1:1/simple"]`',
        pip_message("--index-url=http://127.0.0.1:1/simple"),
        where=RUN,
    ),
    Case(
        "pip_packages",
        "shell fragment",
        '`["pandas; rm -rf /"]`',
        pip_message("pandas; rm -rf /"),
        where=RUN,
    ),
    Case(
        "pip_packages", "not a requirement", '`["pandas>>2"]`', pip_message("pandas>>2"), where=RUN
    ),
    Case(
        "pip_packages",
        "two packages in one entry",
        '`["pandas numpy"]`',
        pip_message("pandas numpy"),
        where=RUN,
    ),
    Case(
        "pip_packages",
        "direct URL (not allowed by the policy)",
        '`["x @ file:///etc/passwd"]`',
        pip_message("x @ file:///etc/passwd"),
        where=RUN,
    ),
    Case(
        "pip_packages",
        "environment marker",
        "`['pandas; python_version < \"3.8\"']`",
        pip_message('pandas; python_version < "3.8"'),
        where=RUN,
    ),
    Case(
        "pip_packages",
        "direct URL with a token (not allowed by the policy)",
        '`["probe @ git+https://bot:TOKEN@127.0.0.1/probe.git"]`',
        pip_message("probe @ git+https://bot:TOKEN@127.0.0.1/probe.git"),
        where=RUN,
    ),
    Case(
        "pip_packages",
        "package not on the index",
        '`["no-such-package-xyz"]`',
        expected="Installing pip_packages no-such-package-xyz failed before the flow started",
        where=RUN_LOGS,
    ),
    Case(
        "pip_packages",
        "version not on the index",
        '`["managed-probe==9.9.9"]`',
        expected="Installing pip_packages managed-probe==9.9.9 failed before the flow started",
        where=RUN_LOGS,
    ),
    # -- code sources -------------------------------------------------------------------
    Case(
        "code source",
        "repository that does not exist",
        "`git://127.0.0.1:<port>/missing`",
        expected="Pulling the flow's code failed before the flow started: pull step git_clone "
        "from repository git://127.0.0.1:<port>/missing failed",
        where=RUN_LOGS,
    ),
    Case(
        "code source",
        "entrypoint names no flow",
        "`probe_flows.py:no_such_flow`",
        expected="Loading the flow failed after its code was pulled from repository "
        "git://127.0.0.1:<port>/flows: RuntimeError: Function with name 'no_such_flow' "
        "not found in",
        where="the flow run ends Crashed with this message",
    ),
    # -- images -------------------------------------------------------------------------
    Case(
        "image",
        "not in the allow-list",
        '`image: "python:3.12"`',
        job_message(image="python:3.12"),
        where=RUN,
    ),
    Case(
        "image",
        "Prefect 2 image",
        '`image: "prefecthq/prefect:2-latest"`',
        job_message(image="prefecthq/prefect:2-latest"),
        where=RUN,
    ),
    Case(
        "image",
        "allowed but not on the Docker host",
        '`image: "prefect-managed-runtime:0-missing"`',
        expected="Image 'prefect-managed-runtime:0-missing' is not on this Docker host and "
        "could not be pulled",
        where="the flow run ends Crashed with this message; no container is created",
    ),
    # -- environment variables ----------------------------------------------------------
    Case(
        "env",
        "points the run at another Prefect API",
        '`env: {"PREFECT_API_URL": "http://127.0.0.1:1/api"}`',
        job_message(env={"PREFECT_API_URL": "http://127.0.0.1:1/api"}),
        where=RUN,
    ),
    Case(
        "env",
        "sets the API key",
        '`env: {"PREFECT_API_KEY": "..."}`',
        job_message(env={"PREFECT_API_KEY": "stolen"}),
        where=RUN,
    ),
    Case(
        "env",
        "installer option through EXTRA_PIP_PACKAGES",
        '`env: {"EXTRA_PIP_PACKAGES": "--pre pandas"}`',
        job_message(env={"EXTRA_PIP_PACKAGES": "--pre pandas"}),
        where=RUN,
    ),
    Case(
        "env",
        "a worker-owned name in lower case",
        '`env: {"prefect_api_url": "..."}`',
        job_message(env={"prefect_api_url": "http://127.0.0.1:1/api"}),
        where=RUN,
    ),
    Case(
        "env",
        "a key holding `=`",
        '`env: {"A=1 EXTRA_PIP_PACKAGES": "evil"}`',
        job_message(env={"A=1 EXTRA_PIP_PACKAGES": "evil"}),
        where=RUN,
    ),
    Case(
        "env",
        "another package index",
        '`env: {"UV_INDEX": "http://127.0.0.1:1/simple"}`',
        job_message(env={"UV_INDEX": "http://127.0.0.1:1/simple"}),
        where=RUN,
    ),
    Case(
        "env",
        "an extra index for pip",
        '`env: {"PIP_EXTRA_INDEX_URL": "..."}`',
        job_message(env={"PIP_EXTRA_INDEX_URL": "http://127.0.0.1:1/simple"}),
        where=RUN,
    ),
]

_OWN = "/api/flow_runs/<own run>"
GATEWAY = "the request answers {} with this message as its `detail`, and the worker logs `Refused <method> <path> for flow run <id>: <message>`"
CASES += [
    Case(
        "run gateway",
        "a dot segment, encoded",
        f"`PATCH {_OWN}/labels/%2e%2e/%2e%2e/%2e%2e/deployments/<id>`",
        gateway_message(
            "PATCH",
            f"/api/flow_runs/{GATEWAY_RUN}/labels/%2e%2e/%2e%2e/%2e%2e/deployments/{GATEWAY_OTHER}",
            {},
        ),
        where=GATEWAY.format("`400`"),
    ),
    Case(
        "run gateway",
        "an encoded `#` in the path",
        "`POST /api/variables%23/filter`",
        gateway_message("POST", "/api/variables%23/filter", {}),
        where=GATEWAY.format("`400`"),
    ),
    Case(
        "run gateway",
        "a route not open to flow runs",
        "`PATCH /api/deployments/<id>`",
        lambda: gateway_message("PATCH", f"/api/deployments/{GATEWAY_OTHER}", {})().replace(
            str(GATEWAY_OTHER), "<id>"
        ),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "a field a run may not set",
        f'`PATCH {_OWN}` with `{{"infrastructure_pid": "..."}}`',
        gateway_message(
            "PATCH", f"/api/flow_runs/{GATEWAY_RUN}", {"infrastructure_pid": "unix:///x:victim"}
        ),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "its own run back to Scheduled",
        f"`POST {_OWN}/set_state` with a `SCHEDULED` state",
        gateway_message(
            "POST",
            f"/api/flow_runs/{GATEWAY_RUN}/set_state",
            {"state": {"type": "SCHEDULED"}, "force": True},
        ),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "another run's flow run",
        "`POST /api/flow_runs/<another run>/set_state`",
        gateway_ownership_message,
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "the workspace's run slots",
        '`POST /api/v2/concurrency_limits/increment-with-lease` naming `"prefect-managed-ws"`',
        gateway_message(
            "POST",
            "/api/v2/concurrency_limits/increment-with-lease",
            {"names": ["prefect-managed-ws"], "slots": 1},
        ),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "an artifact under the usage keys",
        '`POST /api/artifacts/` with `"key": "usage-..."`',
        gateway_message(
            "POST",
            "/api/artifacts/",
            {"key": "usage-ws-202612-run-x", "flow_run_id": str(GATEWAY_RUN)},
        ),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "a token past its expiry",
        "a request with an expired run token, one signed with another key, or none",
        gateway_token_message,
        where=GATEWAY.format("`401`").split(", and the worker")[0],
    ),
    Case(
        "run gateway",
        "an event in the managed pool's namespace",
        "an event `prefect-managed.usage.recorded` sent through `/api/events/in`",
        gateway_event_message("prefect-managed.usage.recorded", f"prefect.flow-run.{GATEWAY_RUN}"),
        where="the event is dropped, and the worker logs `Dropped an event from flow run <id>: <message>`",
    ),
]

UNIT_CASES = [case for case in CASES if case.message_of is not None]
RUN_CASES = {case.id: case for case in CASES if case.message_of is None}


def render_page() -> str:
    lines = [
        "# Bad input and what you see",
        "",
        "Every case below is tried by `tests/test_bad_input.py`, and this page is generated",
        "from it (`python tests/test_bad_input.py`), so it says what the code says. A flow run",
        "with bad input always ends in a final state with the message shown; nothing is left",
        "running, no concurrency slot is kept, and the worker goes on serving the pool.",
        "",
        f"{len(CASES)} cases.",
        "",
    ]
    for area in dict.fromkeys(case.area for case in CASES):
        lines += [f"## {area[0].upper()}{area[1:]}", ""]
        for case in (c for c in CASES if c.area == area):
            lines += [
                f"### {case.name[0].upper()}{case.name[1:]}",
                "",
                f"Given {case.given}: {case.where}.",
                "",
                "```text",
                case.message(),
                "```",
                "",
            ]
    return "\n".join(lines)


# -- unit cases -----------------------------------------------------------------------


@pytest.mark.parametrize("case", UNIT_CASES, ids=[case.id for case in UNIT_CASES])
def test_bad_input_gets_a_message_naming_the_value_and_what_to_do(case):
    message = case.message()
    assert len(message) > 40
    assert "Traceback" not in message
    # It names what was wrong and says what to do (or what is accepted) next.
    lowered = message.lower()
    assert any(
        word in lowered
        for word in (
            "use ",
            "remove",
            "give ",
            "ask ",
            "name a ",
            "must ",
            "should ",
            "known",
            "allowed",
            "set by the worker",
            "exist",
            "not a ",
            "is not",
            "valid",
        )
    ), message


def test_there_are_at_least_30_cases_across_every_area():
    assert len(CASES) >= 30
    assert {case.area for case in CASES} == {
        "policy file",
        "job variables",
        "pip_packages",
        "code source",
        "image",
        "env",
        "run gateway",
    }


def test_the_docs_page_lists_every_case_with_its_current_message():
    assert DOCS_PAGE.read_text() == render_page(), (
        "docs/bad-input.md is stale: run `python tests/test_bad_input.py`"
    )


# -- real runs: what the user sees on the run's page ----------------------------------


def start_run(deployment_id, **parameters):
    from prefect.deployments import run_deployment

    return run_deployment(deployment_id, parameters=parameters, timeout=0).id


def update_deployment(deployment_id, **changes) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        client.update_deployment(deployment_id, DeploymentUpdate(**changes))


def assert_crashed_and_settled(docker_client, flow_run_id, expected: str, records: int):
    """Crashed with the message, its container gone, and `records` usage records (one for
    a run that had a container, none for a run refused before)."""
    from helpers import usage_records, wait_for_settled_run

    run = wait_for_settled_run(docker_client, flow_run_id, timeout=600)
    assert run.state.is_crashed(), run.state
    assert expected in run.state.message, run.state.message
    assert len(usage_records(flow_run_id)) == records
    return run


@pytest.mark.docker
@pytest.mark.parametrize(
    ("case_id", "flow_name", "job_variables", "records"),
    [
        (
            "pip-packages-package-not-on-the-index",
            "hello",
            {"pip_packages": ["no-such-package-xyz"]},
            1,
        ),
        (
            "pip-packages-version-not-on-the-index",
            "hello",
            {"pip_packages": ["managed-probe==9.9.9"]},
            1,
        ),
        ("code-source-entrypoint-names-no-flow", "probe_flows.py:no_such_flow", {}, 1),
        (
            "image-allowed-but-not-on-the-docker-host",
            "hello",
            {"image": "prefect-managed-runtime:0-missing"},
            0,
        ),
    ],
)
def test_a_run_with_bad_input_ends_crashed_with_the_documented_message(
    deploy, flows_repo, docker_client, case_id, flow_name, job_variables, records
):
    case = RUN_CASES[case_id]
    if ":" in flow_name:  # an entrypoint deploy() would refuse: set on the deployment
        deployment = deploy("hello", f"bad-{case_id}", job_variables)
        update_deployment(deployment, entrypoint=flow_name)
    else:
        deployment = deploy(flow_name, f"bad-{case_id}", job_variables)
    flow_run_id = start_run(deployment)
    expected = case.expected.replace("git://127.0.0.1:<port>/flows", flows_repo)
    assert_crashed_and_settled(docker_client, flow_run_id, expected, records)


@pytest.mark.docker
def test_a_repository_that_does_not_exist_ends_the_run_naming_it(deploy, git_server, docker_client):
    from prefect.client.orchestration import get_client

    case = RUN_CASES["code-source-repository-that-does-not-exist"]
    deployment = deploy("hello", "bad-missing-repository")
    missing = git_server.url("missing")
    with get_client(sync_client=True) as client:
        steps = client.read_deployment(deployment).pull_steps
    (step,) = [s for s in steps if any(k.endswith("git_clone") for k in s)]
    next(iter(step.values()))["repository"] = missing
    update_deployment(deployment, pull_steps=steps)
    flow_run_id = start_run(deployment)
    expected = case.expected.replace("git://127.0.0.1:<port>/missing", missing)
    assert_crashed_and_settled(docker_client, flow_run_id, expected, records=1)


@pytest.mark.docker
@pytest.mark.parametrize(
    ("case_id", "job_variables"),
    [
        ("job-variables-mem-limit-not-a-size", {"mem_limit": "lots"}),
        (
            "pip-packages-installer-option",
            {"pip_packages": ["--index-url=http://127.0.0.1:1/simple"]},
        ),
        (
            "env-points-the-run-at-another-prefect-api",
            {"env": {"PREFECT_API_URL": "http://127.0.0.1:1/api"}},
        ),
        ("image-not-in-the-allow-list", {"image": "python:3.12"}),
        (
            "env-a-worker-owned-name-in-lower-case",
            {"env": {"prefect_api_url": "http://127.0.0.1:1/api"}},
        ),
        ("env-a-key-holding", {"env": {"A=1 EXTRA_PIP_PACKAGES": "evil"}}),
        ("env-another-package-index", {"env": {"UV_INDEX": "http://127.0.0.1:1/simple"}}),
    ],
)
def test_a_run_refused_by_the_policy_ends_crashed_with_the_documented_message(
    deploy, docker_client, case_id, job_variables
):
    case = next(c for c in CASES if c.id == case_id)
    deployment = deploy("hello", f"bad-{case_id}", job_variables)
    flow_run_id = start_run(deployment)
    assert_crashed_and_settled(docker_client, flow_run_id, case.message(), records=0)
    # the worker goes on serving: the next good run completes
    good = start_run(deploy("hello", "good-after-bad"))
    from helpers import wait_for_final_state

    assert wait_for_final_state(good).state.is_completed()


@pytest.mark.docker
def test_pip_packages_as_one_string_is_refused_before_a_run_exists(deploy):
    case = RUN_CASES["job-variables-pip-packages-as-one-string"]
    with pytest.raises(Exception) as refused:
        deployment = deploy("hello", "bad-pip-string")
        from prefect.deployments import run_deployment

        run_deployment(deployment, job_variables={"pip_packages": "pandas"}, timeout=0)
    assert case.expected in str(refused.value)


if __name__ == "__main__":
    DOCS_PAGE.write_text(render_page())
    print(f"wrote {DOCS_PAGE} ({len(CASES)} cases)", file=sys.stderr)
