"""Fixtures: real services on loopback for the integration tests.

The Prefect API URL is chosen and exported before Prefect is imported, so every client
in this process (and every worker and container started from it) talks to the test
server.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from services import free_port

ROOT = Path(__file__).resolve().parent.parent
#: What the tests leave for a reader (service logs, screenshots) and the wheels they download
#: once (`SHARED_OUTPUT / "wheelhouse"`, shared by concurrent test processes).
SHARED_OUTPUT = Path(os.environ.get("PREFECT_MANAGED_TEST_OUTPUT", ROOT / "test-output"))
#: This process's part: each pytest-xdist worker (scripts/test.sh runs two) starts its own
#: services, under names that would collide in one directory.
OUTPUT = SHARED_OUTPUT / os.environ.get("PYTEST_XDIST_WORKER", "")
OUTPUT.mkdir(parents=True, exist_ok=True)
# Each service appends to its log (a worker restarted under its name goes on in the same
# file), and tests count lines in them: a run starts from no logs, as a clean clone does.
for _old_log in OUTPUT.glob("*.log"):
    _old_log.unlink(missing_ok=True)
_HOME = Path(tempfile.mkdtemp(prefix="prefect-managed-tests-"))
_PORT = free_port()
os.environ["PREFECT_HOME"] = str(_HOME / "client-home")
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.5"
# The server answers only with this credential (as docs/security.md asks, and as workers
# insist by default); every client, worker and CLI command of the tests sends it.
AUTH = f"admin:{secrets.token_hex(16)}"
os.environ["PREFECT_API_AUTH_STRING"] = AUTH
# The workers' usage-record signing key: the test process and every worker it starts
# share it (as the workers of one workspace do); no flow run's container gets it.
os.environ["PREFECT_INTEGRATIONS_MANAGED_LEDGER_KEY"] = secrets.token_hex(32)

import docker  # noqa: E402
import pytest  # noqa: E402
from services import (  # noqa: E402
    GitServer,
    PackageIndex,
    build_wheel,
    start_git_server,
    start_package_index,
    start_prefect_server,
)
from source_services import GitHttpServer, build_image_trusting, make_test_ca  # noqa: E402

RUNTIME_IMAGE = os.environ.get("PREFECT_MANAGED_TEST_IMAGE", "")

#: Seconds spent in each test file (setup, call and teardown), for the suite's time budget.
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """The 20 slowest test files, before pytest's slowest tests: where the time goes."""
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.section(f"slowest 20 test files (of {total:.0f} s in tests)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1])[:20]:
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")


@pytest.fixture(scope="session")
def output_dir() -> Path:
    return OUTPUT


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Where `source_services.ensure_wheelhouse` keeps downloaded wheels, for every test
    process of a run (and the runs after it)."""
    return SHARED_OUTPUT / "wheelhouse"


@pytest.fixture(scope="session")
def docker_client():
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"No Docker engine answers ({exc}); run scripts/setup.sh first.")
    yield client
    client.close()


@pytest.fixture(scope="session")
def runtime_image(docker_client) -> str:
    """The local runtime image; built here if it is missing."""
    from prefect_managed.runtime.builder import build_runtime_image, default_runtime_tag

    tag = RUNTIME_IMAGE or default_runtime_tag()
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        ca = os.environ.get("SSL_CERT_FILE")
        build_runtime_image(tag=tag, extra_ca_bundle=Path(ca) if ca else None)
    return tag


#: The official image's stand-in (tests/images/official); its tag matches the policy's
#: default allowed_images ('prefecthq/prefect:3*'), as the official image's does.
OFFICIAL_STANDIN = "prefecthq/prefect:3-managed-standin"


@pytest.fixture(scope="session")
def official_image(docker_client, runtime_image) -> str:
    """A stand-in of the official image, built once from its published contract (Prefect
    in the system interpreter's root-owned site-packages, a root-owned /opt/prefect, no
    non-root user, UV_SYSTEM_PYTHON=1, tini and the `uv pip install --system` entrypoint;
    uv and the CA bundle taken from the runtime image, Prefect at the worker's version):
    no registry is reachable here to pull the real one."""
    import prefect

    from prefect_managed.runtime.builder import BASE_IMAGE

    try:
        docker_client.images.get(OFFICIAL_STANDIN)
    except docker.errors.ImageNotFound:
        docker_client.images.build(
            path=str(Path(__file__).parent / "images" / "official"),
            tag=OFFICIAL_STANDIN,
            network_mode="host",
            rm=True,
            buildargs={
                "BASE_IMAGE": BASE_IMAGE,
                "RUNTIME_IMAGE": runtime_image,
                "PREFECT_VERSION": prefect.__version__,
            },
        )
    return OFFICIAL_STANDIN


SERVER_ENV = {"PREFECT_SERVER_API_AUTH_STRING": AUTH}

#: The running Prefect server; a fault test may stop it and start it again
#: (`restart_prefect_server`), so teardown stops whichever one runs last.
SERVER: dict = {}


def restart_prefect_server(down_seconds: float) -> None:
    """Stop the Prefect server, keep it down, then start it on the same port and database."""
    import time

    SERVER["service"].stop()
    time.sleep(down_seconds)
    SERVER["service"] = start_prefect_server(_PORT, _HOME / "server-home", OUTPUT, SERVER_ENV)


@pytest.fixture(scope="session")
def prefect_server():
    SERVER["service"] = start_prefect_server(_PORT, _HOME / "server-home", OUTPUT, SERVER_ENV)
    yield os.environ["PREFECT_API_URL"]
    SERVER["service"].stop()


@pytest.fixture(scope="session")
def git_server(tmp_path_factory) -> GitServer:
    server = start_git_server(tmp_path_factory.mktemp("git"), OUTPUT)
    yield server
    server.service.stop()


PROBE_VERSION = "1.0.0"
PROBE_MESSAGE = "managed-probe imported from the loopback index"


@pytest.fixture(scope="session")
def package_index(tmp_path_factory) -> PackageIndex:
    """pypiserver on loopback serving `managed-probe`, a wheel built here."""
    root = tmp_path_factory.mktemp("index")
    build_wheel(
        root,
        "managed-probe",
        PROBE_VERSION,
        {"managed_probe/__init__.py": f"MESSAGE = {PROBE_MESSAGE!r}\n"},
    )
    index = start_package_index(root, OUTPUT)
    yield index
    index.service.stop()


FLOWS = Path(__file__).parent / "flows"


@pytest.fixture(scope="session")
def flows_repo(git_server: GitServer) -> str:
    """A git repository on the loopback git daemon holding the test flows."""
    return git_server.publish("flows", {"probe_flows.py": (FLOWS / "probe_flows.py").read_text()})


@pytest.fixture(scope="session")
def managed_pool(prefect_server) -> str:
    """A `prefect:managed` pool, created with Prefect's own CLI."""
    from helpers import create_pool_with_cli

    return create_pool_with_cli("tests-managed-pool")


def worker_policy(
    path: Path,
    runtime_image: str,
    index_url: str,
    workspace: str,
    runtime: dict | None = None,
    host: dict | None = None,
    **tier,
) -> Path:
    """A policy file for a test worker: a tier named `test` with the given numbers,
    `runtime` settings besides the image and the package index, and a `[host]` table."""
    from services import write_policy

    tables = {"host": host} if host else {}
    return write_policy(
        path,
        workspace={"name": workspace, "tier": "test"},
        tiers={"test": {"pool_limit": 100, **tier}},
        runtime={"default_image": runtime_image, "package_index_url": index_url, **(runtime or {})},
        **tables,
    )


@pytest.fixture(scope="session")
def main_policy(runtime_image, package_index, git_server, tmp_path_factory) -> Path:
    return worker_policy(
        tmp_path_factory.mktemp("policy") / "policy.toml",
        runtime_image,
        package_index.url,
        workspace="tests",
        concurrency_limit=4,
    )


@pytest.fixture(scope="session")
def managed_worker(managed_pool, main_policy, docker_client):
    """`prefect worker start --type prefect:managed` serving the pool, in its own process."""
    from services import start_worker

    worker = start_worker(
        managed_pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(main_policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
    )
    yield worker
    worker.service.stop()


@pytest.fixture(scope="session")
def official_pool(prefect_server) -> str:
    """A `prefect:managed` pool whose worker's default image is the official image's
    stand-in (`official_worker`), on the default tier's caps."""
    from helpers import create_pool_with_cli

    return create_pool_with_cli("official-pool")


@pytest.fixture(scope="session")
def official_worker(official_pool, official_image, package_index, tmp_path_factory):
    """The managed worker of `official_pool`: the `tests` workspace, its default image the
    official image's stand-in, otherwise as `managed_worker`."""
    from helpers import worker

    policy = worker_policy(
        tmp_path_factory.mktemp("official") / "policy.toml",
        official_image,
        package_index.url,
        workspace="tests",
        concurrency_limit=4,
    )
    with worker(official_pool, policy, "official-worker") as running:
        yield running


@pytest.fixture
def deploy(flows_repo, managed_pool, managed_worker):
    """Deploy a test flow from git to the managed pool, as Prefect's docs show."""
    from prefect import flow

    def _deploy(
        flow_name: str, name: str, job_variables: dict | None = None, pool: str | None = None
    ):
        # _sync: another test's browser (Playwright's sync API) may leave an event loop
        # running in this thread, which would make Prefect's dispatch return coroutines.
        source = flow.from_source(
            source=flows_repo, entrypoint=f"probe_flows.py:{flow_name}", _sync=True
        )
        return source.deploy(
            name=name,
            work_pool_name=pool or managed_pool,
            job_variables=job_variables or {},
            print_next_steps=False,
            _sync=True,
        )

    return _deploy


@pytest.fixture(scope="session")
def tight_pool(prefect_server):
    """A pool for workers on tight tiers (`small_memory_worker`, `short_run_worker`)."""
    from helpers import create_pool

    return create_pool("tight-pool")


@pytest.fixture
def small_memory_worker(tight_pool, runtime_image, package_index, tmp_path):
    """Serves `tight_pool` on a tier with 512 MiB of memory per run."""
    from helpers import worker

    policy = worker_policy(
        tmp_path / "small-memory.toml", runtime_image, package_index.url, "tight", memory="512m"
    )
    with worker(tight_pool, policy, "small-memory-worker") as running:
        yield running


@pytest.fixture
def short_run_worker(tight_pool, runtime_image, package_index, tmp_path):
    """Serves `tight_pool` on a tier with a 15 s maximum run time."""
    from helpers import worker

    policy = worker_policy(
        tmp_path / "short-run.toml", runtime_image, package_index.url, "tight", max_run_seconds=15
    )
    with worker(tight_pool, policy, "short-run-worker") as running:
        yield running


# -- an HTTPS git server and a runtime image that trusts its CA (module-scoped) ----------


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    return make_test_ca(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="module")
def ca_image(docker_client, runtime_image, test_ca) -> str:
    """The runtime image trusting the test CA (allowed by the default policy's
    ``prefect-managed-runtime:*``)."""
    # Its own tag: another test process builds (and removes) its own at the same time.
    tag = build_image_trusting(
        docker_client, runtime_image, test_ca, f"{runtime_image}-test-ca-{secrets.token_hex(4)}"
    )
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def git_https(tmp_path_factory, test_ca):
    """The HTTPS git server; this process's git (`flow.from_source` clones here too)
    trusts the test CA and never prompts."""
    server = GitHttpServer(
        tmp_path_factory.mktemp("git-https"), f"tok{secrets.token_hex(16)}", test_ca
    ).start()
    saved = {name: os.environ.get(name) for name in ("GIT_SSL_CAINFO", "GIT_TERMINAL_PROMPT")}
    os.environ["GIT_SSL_CAINFO"] = str(test_ca.ca_cert)
    os.environ["GIT_TERMINAL_PROMPT"] = "0"
    yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


def source_worker(pool_name: str, runtime_image: str, package_index, tmp_path_factory):
    """A pool and a worker of the `tests` workspace for a module whose source services
    (an HTTPS git server, storage emulators) start after the session's worker: its policy
    is written once they run, so the default isolated network lists them in
    allowed_destinations, as an operator lists a workspace's sources. A generator for a
    module's `managed_pool`/`managed_worker` fixtures: yields (pool, worker)."""
    from helpers import create_pool_with_cli
    from services import start_worker

    pool = create_pool_with_cli(pool_name)
    policy = worker_policy(
        tmp_path_factory.mktemp(pool_name) / "policy.toml",
        runtime_image,
        package_index.url,
        workspace="tests",
        concurrency_limit=4,
    )
    worker = start_worker(
        pool,
        OUTPUT,
        {
            "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        name=f"{pool_name}-worker",
    )
    try:
        yield pool, worker
    finally:
        worker.service.stop()
