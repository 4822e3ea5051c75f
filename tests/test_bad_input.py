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
    #: What the message names, each an exact substring of it (of `expected` for a run
    #: case): the bad value the user gave, the limit (what is accepted) and the next step
    #: (the fix it tells). None where the message does not name it: `lacks` then holds
    #: "no value (why)", "no limit (why)" or "no next step (why)" for it.
    value: str | None = None
    limit: str | None = None
    next_step: str | None = None
    lacks: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.area} {self.name}".lower()).strip("-")

    def message(self) -> str:
        return self.message_of() if self.message_of else self.expected

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.value, self.limit, self.next_step) if name)


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

# What a message does not name, and why (see `Case.lacks`).
KEY_ONLY = "no value (the message names the key, not the value given)"
NO_NEXT_STEP = "no next step (it says what is wrong, not what to do)"
NO_FILE_LIMIT = "no limit (a file that is missing or unreadable breaks no limit)"
NOT_WHY = "no limit (it does not say why it failed; the run's logs do)"
ONE_STRING_VALUE = "no value (the documented part of the server's 422 names the field only)"
ONE_STRING_LIMIT = "no limit (it does not say that a list is expected)"
NO_CREDENTIAL_ECHO = "no value (a credential is never echoed)"

CASES: list[Case] = [
    # -- the policy file ----------------------------------------------------------------
    Case(
        "policy file",
        "missing file",
        "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE names no file",
        policy_path_message(lambda d: d / POLICY_NAME),
        value="'prefect-managed.toml'",
        next_step="prefect-managed policy check",
        lacks=(NO_FILE_LIMIT,),
        where=WORKER,
    ),
    Case(
        "policy file",
        "a directory, not a file",
        "the path is a directory",
        policy_path_message(lambda d: (d / POLICY_NAME).mkdir() or d / POLICY_NAME),
        value="'prefect-managed.toml'",
        next_step="prefect-managed policy check",
        lacks=(NO_FILE_LIMIT,),
        where=WORKER,
    ),
    Case(
        "policy file",
        "not TOML",
        "`workspace = [`",
        policy_message("workspace = ["),
        value="'prefect-managed.toml'",
        limit="not valid TOML",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "unknown setting",
        "`[runtime]` `privileged = true`",
        policy_message("[runtime]\nprivileged = true\n"),
        value="'runtime.privileged'",
        limit="not a known setting",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "misspelt table",
        "`[tier.free]`",
        policy_message("[tier.free]\nconcurrency_limit = 2\n"),
        value="'tier'",
        limit="not a known setting",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "unknown tier",
        '`[workspace]` `tier = "gold"`',
        policy_message('[workspace]\ntier = "gold"\n'),
        value="'gold'",
        limit="known tiers: free, pro, pro-2025",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "negative concurrency",
        "`[tiers.free]` `concurrency_limit = -1`",
        policy_message("[tiers.free]\nconcurrency_limit = -1\n"),
        limit="greater than or equal to 1",
        next_step="prefect-managed policy check",
        value="= -1:",
        where=WORKER,
    ),
    Case(
        "policy file",
        "memory not a size",
        '`[tiers.free]` `memory = "lots"`',
        policy_message('[tiers.free]\nmemory = "lots"\n'),
        value="'lots'",
        limit="512m or 2g",
        next_step="use Docker's units",
        where=WORKER,
    ),
    Case(
        "policy file",
        "zero memory",
        '`[tiers.free]` `memory = "0"`',
        policy_message('[tiers.free]\nmemory = "0"\n'),
        value="'0'",
        limit="must be more than zero",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "zero CPUs",
        "`[tiers.free]` `cpus = 0`",
        policy_message("[tiers.free]\ncpus = 0\n"),
        limit="greater than or equal to 0.01",
        next_step="prefect-managed policy check",
        value="'tiers.free.cpus' = 0:",
        where=WORKER,
    ),
    Case(
        "policy file",
        "run time as text",
        '`[tiers.free]` `max_run_seconds = "1h"`',
        policy_message('[tiers.free]\nmax_run_seconds = "1h"\n'),
        limit="a valid integer",
        next_step="prefect-managed policy check",
        value="= '1h'",
        where=WORKER,
    ),
    Case(
        "policy file",
        "a tier that is not a table",
        "`[tiers]` `team = 3`",
        policy_message("[tiers]\nteam = 3\n"),
        limit="a valid dictionary",
        next_step="prefect-managed policy check",
        value="'tiers.team' = 3",
        where=WORKER,
    ),
    Case(
        "policy file",
        "workspace name with capitals and spaces",
        '`name = "Data Team"`',
        policy_message('[workspace]\nname = "Data Team"\n'),
        limit="'^[a-z0-9][a-z0-9-]{0,62}$'",
        next_step="prefect-managed policy check",
        value="= 'Data Team'",
        where=WORKER,
    ),
    Case(
        "policy file",
        "containers as root",
        '`[runtime]` `user = "0"`',
        policy_message('[runtime]\nuser = "0"\n'),
        limit="'^[1-9][0-9]*(:[1-9][0-9]*)?$'",
        next_step="prefect-managed policy check",
        value="'runtime.user' = '0'",
        where=WORKER,
    ),
    Case(
        "policy file",
        "another container's network",
        '`network_mode = "container:db"`',
        policy_message('[runtime]\nnetwork_mode = "container:db"\n'),
        limit="'host', 'bridge', 'none' or 'isolated'",
        next_step="prefect-managed policy check",
        value="= 'container:db'",
        where=WORKER,
    ),
    Case(
        "policy file",
        "no processes allowed",
        "`[runtime]` `pids_limit = 0`",
        policy_message("[runtime]\npids_limit = 0\n"),
        limit="greater than or equal to 16",
        next_step="prefect-managed policy check",
        value="'runtime.pids_limit' = 0",
        where=WORKER,
    ),
    Case(
        "policy file",
        "CPUs too small to limit",
        "`[tiers.free]` `cpus = 1e-10`",
        policy_message("[tiers.free]\ncpus = 1e-10\n"),
        limit="greater than or equal to 0.01",
        next_step="prefect-managed policy check",
        value="= 1e-10",
        where=WORKER,
    ),
    Case(
        "policy file",
        "infinite CPUs",
        "`[tiers.free]` `cpus = inf`",
        policy_message("[tiers.free]\ncpus = inf\n"),
        limit="less than or equal to 1024",
        next_step="prefect-managed policy check",
        value="= inf",
        where=WORKER,
    ),
    Case(
        "policy file",
        "memory as a boolean",
        "`[tiers.free]` `memory = true`",
        policy_message("[tiers.free]\nmemory = true\n"),
        value="True is not a size",
        limit="512m or 2g",
        next_step="use Docker's units",
        where=WORKER,
    ),
    Case(
        "policy file",
        "concurrency as a boolean",
        "`[tiers.free]` `concurrency_limit = true`",
        policy_message("[tiers.free]\nconcurrency_limit = true\n"),
        value="true is not a number",
        limit="not a number",
        next_step="give a number",
        where=WORKER,
    ),
    Case(
        "policy file",
        "too many infrastructure retries",
        "`[tiers.free]` `infrastructure_retries = 10`",
        policy_message("[tiers.free]\ninfrastructure_retries = 10\n"),
        limit="less than or equal to 5",
        next_step="prefect-managed policy check",
        value="= 10:",
        where=WORKER,
    ),
    Case(
        "policy file",
        "container output cap negative",
        '`[tiers.free]` `container_output_max_size = "-1m"`',
        policy_message('[tiers.free]\ncontainer_output_max_size = "-1m"\n'),
        value="'-1m'",
        limit="0 (off) or more",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "container output cap not a size",
        '`[tiers.free]` `container_output_max_size = "all"`',
        policy_message('[tiers.free]\ncontainer_output_max_size = "all"\n'),
        value="'all'",
        limit="512m or 2g",
        next_step="use Docker's units",
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway on a privileged port",
        "`[runtime]` `api_gateway_port = 80`",
        policy_message("[runtime]\napi_gateway_port = 80\n"),
        value="api_gateway_port 80",
        limit="1024 to 65535, 'auto', or 0",
        next_step="choose one from",
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway without host networking",
        '`network_mode = "bridge"` with the run gateway on (its default)',
        policy_message('[runtime]\nnetwork_mode = "bridge"\n'),
        value="network_mode 'bridge'",
        limit="cannot reach the run gateway",
        next_step="use network_mode 'isolated' or 'host'",
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated network without the run gateway",
        "`api_gateway_port = 0` with the isolated network (its default)",
        policy_message("[runtime]\napi_gateway_port = 0\n"),
        value="network_mode 'isolated'",
        limit="needs the run gateway",
        next_step="set api_gateway_port to 'auto' or a free port",
        where=WORKER,
    ),
    Case(
        "policy file",
        "run gateway port as a word other than auto",
        '`api_gateway_port = "on"`',
        policy_message('[runtime]\napi_gateway_port = "on"\n'),
        value="'on'",
        limit="a port from 1024 to 65535",
        next_step='give "auto"',
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated destination by another machine's address",
        '`allowed_destinations = ["192.0.2.10:9000"]`',
        policy_message('[runtime]\nallowed_destinations = ["192.0.2.10:9000"]\n'),
        value="'192.0.2.10:9000'",
        limit="by its host name only",
        next_step="write the host name",
        where=WORKER,
    ),
    Case(
        "policy file",
        "isolated destination without a port",
        '`allowed_destinations = ["git.example.com"]`',
        policy_message('[runtime]\nallowed_destinations = ["git.example.com"]\n'),
        value="'git.example.com'",
        limit="is not host:port",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "allowed destinations without the isolated network",
        '`allowed_destinations = ["127.0.0.1:9418"]` with `network_mode = "host"`',
        policy_message(
            '[runtime]\nnetwork_mode = "host"\nallowed_destinations = ["127.0.0.1:9418"]\n'
        ),
        value="not 'host'",
        limit="is for network_mode 'isolated'",
        next_step="remove it, or set network_mode",
        where=WORKER,
    ),
    Case(
        "policy file",
        "a Prefect server that answers without a credential",
        "a worker pointed at a server started without `PREFECT_SERVER_API_AUTH_STRING`, "
        "and no `trusted_code_only = true`",
        lambda: str(ApiOpenWithoutCredential("http://127.0.0.1:4200/api", POLICY_NAME)),
        value="http://127.0.0.1:4200/api",
        limit="does not serve managed pools of such a server",
        next_step="Start the server with PREFECT_SERVER_API_AUTH_STRING",
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
        value="byte 0xe9",
        limit="not UTF-8 text",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "default image outside the allow-list",
        '`default_image = "python:3.12"`',
        policy_message('[runtime]\ndefault_image = "python:3.12"\n'),
        value="'python:3.12'",
        limit="not in allowed_images",
        next_step="prefect-managed policy check",
        where=WORKER,
    ),
    Case(
        "policy file",
        "in-run installs with the official default image",
        "`[runtime]` `prebuilt_environments = false` with the default image",
        policy_message("[runtime]\nprebuilt_environments = false\n"),
        value="default_image 'prefecthq/prefect:3-latest'",
        limit="only root may write",
        next_step="keep prebuilt_environments = true",
        where=WORKER,
    ),
    # -- job variables ------------------------------------------------------------------
    Case(
        "job variables",
        "mem_limit not a size",
        '`mem_limit: "lots"`',
        job_message(mem_limit="lots"),
        value="'lots'",
        limit="512m or 1g",
        next_step="use Docker's units",
        where=RUN,
    ),
    Case(
        "job variables",
        "mem_limit zero",
        '`mem_limit: "0"`',
        job_message(mem_limit="0"),
        value="'0'",
        limit="a positive amount",
        next_step="ask for a positive amount",
        where=RUN,
    ),
    Case(
        "job variables",
        "mem_limit negative",
        '`mem_limit: "-1g"`',
        job_message(mem_limit="-1g"),
        value="'-1g'",
        limit="a positive amount",
        next_step="ask for a positive amount",
        where=RUN,
    ),
    Case(
        "job variables",
        "pip_packages as one string",
        '`pip_packages: "pandas"`',
        expected="Validation failed for field 'pip_packages'",
        lacks=(ONE_STRING_VALUE, ONE_STRING_LIMIT, NO_NEXT_STEP),
        where="`deploy()` or `run_deployment()` is refused by the Prefect server "
        "(422); no flow run is created",
    ),
    # -- pip_packages -------------------------------------------------------------------
    Case(
        "pip_packages",
        "not a string",
        "`[123]`",
        pip_message(123),
        value="entry 123",
        limit="it is not a string",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "empty entry",
        '`[""]`',
        pip_message(""),
        value="entry ''",
        limit="it is empty",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "installer option",
        '`["--index-url=http://127.0.0.1:1/simple"]`',
        pip_message("--index-url=http://127.0.0.1:1/simple"),
        value="'--index-url=http://127.0.0.1:1/simple'",
        limit="installer options are not accepted",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "shell fragment",
        '`["pandas; rm -rf /"]`',
        pip_message("pandas; rm -rf /"),
        value="'pandas; rm -rf /'",
        limit="not a valid requirement",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "not a requirement",
        '`["pandas>>2"]`',
        pip_message("pandas>>2"),
        value="'pandas>>2'",
        limit="not a valid requirement",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "two packages in one entry",
        '`["pandas numpy"]`',
        pip_message("pandas numpy"),
        value="'pandas numpy'",
        limit="not a valid requirement",
        next_step="one per entry",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "direct URL (not allowed by the policy)",
        '`["x @ file:///etc/passwd"]`',
        pip_message("x @ file:///etc/passwd"),
        value="'x @ file:///etc/passwd'",
        limit="not allowed by this workspace's policy",
        next_step="name a package from the package index instead",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "environment marker",
        "`['pandas; python_version < \"3.8\"']`",
        pip_message('pandas; python_version < "3.8"'),
        value="'pandas; python_version < \"3.8\"'",
        limit="environment markers (after ';') are not supported",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "direct URL with a token (not allowed by the policy)",
        '`["probe @ git+https://bot:TOKEN@127.0.0.1/probe.git"]`',
        pip_message("probe @ git+https://bot:TOKEN@127.0.0.1/probe.git"),
        value="'probe @ git+https://***@127.0.0.1/probe.git'",
        limit="not allowed by this workspace's policy",
        next_step="name a package from the package index instead",
        where=RUN,
    ),
    Case(
        "pip_packages",
        "package not on the index",
        '`["no-such-package-xyz"]`',
        expected="Installing pip_packages no-such-package-xyz failed before the flow started",
        value="no-such-package-xyz",
        lacks=(NOT_WHY, NO_NEXT_STEP),
        where=RUN_LOGS,
    ),
    Case(
        "pip_packages",
        "version not on the index",
        '`["managed-probe==9.9.9"]`',
        expected="Installing pip_packages managed-probe==9.9.9 failed before the flow started",
        value="managed-probe==9.9.9",
        lacks=(NOT_WHY, NO_NEXT_STEP),
        where=RUN_LOGS,
    ),
    # -- code sources -------------------------------------------------------------------
    Case(
        "code source",
        "repository that does not exist",
        "`git://127.0.0.1:<port>/missing`",
        expected="Pulling the flow's code failed before the flow started: pull step git_clone "
        "from repository git://127.0.0.1:<port>/missing failed",
        value="git://127.0.0.1:<port>/missing",
        lacks=(NOT_WHY, NO_NEXT_STEP),
        where=RUN_LOGS,
    ),
    Case(
        "code source",
        "entrypoint names no flow",
        "`probe_flows.py:no_such_flow`",
        expected="Loading the flow failed after its code was pulled from repository "
        "git://127.0.0.1:<port>/flows: RuntimeError: Function with name 'no_such_flow' "
        "not found in",
        value="'no_such_flow'",
        limit="not found in",
        lacks=(NO_NEXT_STEP,),
        where="the flow run ends Crashed with this message",
    ),
    # -- images -------------------------------------------------------------------------
    Case(
        "image",
        "not in the allow-list",
        '`image: "python:3.12"`',
        job_message(image="python:3.12"),
        value="'python:3.12'",
        limit="allowed images: prefecthq/prefect:3*",
        next_step="ask the operator to allow the image",
        where=RUN,
    ),
    Case(
        "image",
        "Prefect 2 image",
        '`image: "prefecthq/prefect:2-latest"`',
        job_message(image="prefecthq/prefect:2-latest"),
        value="'prefecthq/prefect:2-latest'",
        limit="allowed images: prefecthq/prefect:3*",
        next_step="Remove 'image' from the deployment's job variables",
        where=RUN,
    ),
    Case(
        "image",
        "allowed but not on the Docker host",
        '`image: "prefect-managed-runtime:0-missing"`',
        expected="Image 'prefect-managed-runtime:0-missing' is not on this Docker host and "
        "could not be pulled",
        value="'prefect-managed-runtime:0-missing'",
        limit="is not on this Docker host",
        lacks=(NO_NEXT_STEP,),
        where="the flow run ends Crashed with this message; no container is created",
    ),
    # -- environment variables ----------------------------------------------------------
    Case(
        "env",
        "points the run at another Prefect API",
        '`env: {"PREFECT_API_URL": "http://127.0.0.1:1/api"}`',
        job_message(env={"PREFECT_API_URL": "http://127.0.0.1:1/api"}),
        value="'PREFECT_API_URL'",
        limit="is set by the worker",
        next_step="remove it from the deployment's env",
        where=RUN,
    ),
    Case(
        "env",
        "sets the API key",
        '`env: {"PREFECT_API_KEY": "..."}`',
        job_message(env={"PREFECT_API_KEY": "stolen"}),
        value="'PREFECT_API_KEY'",
        limit="is set by the worker",
        next_step="remove it from the deployment's env",
        where=RUN,
    ),
    Case(
        "env",
        "installer option through EXTRA_PIP_PACKAGES",
        '`env: {"EXTRA_PIP_PACKAGES": "--pre pandas"}`',
        job_message(env={"EXTRA_PIP_PACKAGES": "--pre pandas"}),
        value="'--pre'",
        limit="installer options are not accepted",
        next_step="Give each package as a PEP 508 requirement",
        where=RUN,
    ),
    Case(
        "env",
        "a worker-owned name in lower case",
        '`env: {"prefect_api_url": "..."}`',
        job_message(env={"prefect_api_url": "http://127.0.0.1:1/api"}),
        value="'prefect_api_url'",
        limit="is set by the worker",
        next_step="remove it from the deployment's env",
        where=RUN,
    ),
    Case(
        "env",
        "a key holding `=`",
        '`env: {"A=1 EXTRA_PIP_PACKAGES": "evil"}`',
        job_message(env={"A=1 EXTRA_PIP_PACKAGES": "evil"}),
        value="'A=1 EXTRA_PIP_PACKAGES'",
        limit="not an environment variable name",
        next_step="use letters, digits and underscores",
        where=RUN,
    ),
    Case(
        "env",
        "another package index",
        '`env: {"UV_INDEX": "http://127.0.0.1:1/simple"}`',
        job_message(env={"UV_INDEX": "http://127.0.0.1:1/simple"}),
        value="'UV_INDEX'",
        limit="the workspace's package index only",
        next_step="ask the operator if a package is missing",
        where=RUN,
    ),
    Case(
        "env",
        "an extra index for pip",
        '`env: {"PIP_EXTRA_INDEX_URL": "..."}`',
        job_message(env={"PIP_EXTRA_INDEX_URL": "http://127.0.0.1:1/simple"}),
        value="'PIP_EXTRA_INDEX_URL'",
        limit="the workspace's package index only",
        next_step="Remove it, and ask the operator",
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
        value="'%2e%2e'",
        limit="each segment written once",
        lacks=(NO_NEXT_STEP,),
        where=GATEWAY.format("`400`"),
    ),
    Case(
        "run gateway",
        "an encoded `#` in the path",
        "`POST /api/variables%23/filter`",
        gateway_message("POST", "/api/variables%23/filter", {}),
        value="'variables%23'",
        limit="'#', '?', '%' or a control character",
        lacks=(NO_NEXT_STEP,),
        where=GATEWAY.format("`400`"),
    ),
    Case(
        "run gateway",
        "a route not open to flow runs",
        "`PATCH /api/deployments/<id>`",
        lambda: gateway_message("PATCH", f"/api/deployments/{GATEWAY_OTHER}", {})().replace(
            str(GATEWAY_OTHER), "<id>"
        ),
        value="PATCH /api/deployments/<id>",
        limit="change only its own flow run",
        next_step="see the security page",
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "a field a run may not set",
        f'`PATCH {_OWN}` with `{{"infrastructure_pid": "..."}}`',
        gateway_message(
            "PATCH", f"/api/flow_runs/{GATEWAY_RUN}", {"infrastructure_pid": "unix:///x:victim"}
        ),
        value="infrastructure_pid",
        limit="it may set empirical_policy, flow_version",
        lacks=(NO_NEXT_STEP,),
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
        value="a SCHEDULED state",
        limit="it may propose CANCELLED",
        lacks=(NO_NEXT_STEP,),
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "another run's flow run",
        "`POST /api/flow_runs/<another run>/set_state`",
        gateway_ownership_message,
        value="the flow run <id>",
        limit="changes only its own run",
        lacks=(NO_NEXT_STEP,),
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
        value="'prefect-managed-ws'",
        limit="only workers and the server take",
        next_step="use a limit of another name",
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
        value="'usage-'",
        limit="the usage records the workers write",
        next_step="use another key",
        where=GATEWAY.format("`403`"),
    ),
    Case(
        "run gateway",
        "a token past its expiry",
        "a request with an expired run token, one signed with another key, or none",
        gateway_token_message,
        limit="past its expiry (the tier's maximum run time and two hours)",
        lacks=(NO_CREDENTIAL_ECHO, NO_NEXT_STEP),
        where=GATEWAY.format("`401`").split(", and the worker")[0],
    ),
    Case(
        "run gateway",
        "an event in the managed pool's namespace",
        "an event `prefect-managed.usage.recorded` sent through `/api/events/in`",
        gateway_event_message("prefect-managed.usage.recorded", f"prefect.flow-run.{GATEWAY_RUN}"),
        value="'prefect-managed.usage.recorded'",
        limit="the managed pool's namespaces",
        lacks=(NO_NEXT_STEP,),
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
def test_bad_input_gets_a_message_naming_the_value_the_limit_and_the_next_step(case):
    message = case.message()
    assert "Traceback" not in message
    for name in case.names:
        assert name in message, f"{name!r} is not in {message!r}"


@pytest.mark.parametrize("case", list(RUN_CASES.values()), ids=list(RUN_CASES))
def test_a_run_case_expects_a_message_naming_what_it_names(case):
    # the real-run tests below assert that the run's state message holds `expected`
    for name in case.names:
        assert name in case.expected, f"{name!r} is not in {case.expected!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_case_names_its_value_limit_and_next_step_or_says_why_not(case):
    for field, label in (("value", "value"), ("limit", "limit"), ("next_step", "next step")):
        name = getattr(case, field)
        said = [lack for lack in case.lacks if lack.startswith(f"no {label} (")]
        if name is None:
            assert len(said) == 1, f"{case.id}: no {field} and no `lacks` saying why"
        else:
            assert not said, f"{case.id}: {field} is named, yet `lacks` says it is not"
            # short but specific: not a common word
            assert len(name.strip()) >= 3 and name == name.strip(), name
    assert len(set(case.lacks)) == len(case.lacks)
    assert all(re.fullmatch(r"no (value|limit|next step) \(.+\)", lack) for lack in case.lacks), (
        case.lacks
    )


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
