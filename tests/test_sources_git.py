"""Flow code from git, run by the managed worker: HTTPS with token credentials, branches,
tags, commit SHAs, git://, a repository's requirements.txt, and what a user sees when the
source is wrong.

Everything is real and on loopback: an HTTPS git server (`git http-backend` behind basic
auth, with a certificate from a CA made for the session), the Prefect server, `prefect
worker start --type prefect:managed`, Docker, and the package index the containers
install from. The containers trust the test CA through a runtime image built with it,
as an operator does with `prefect-managed image build --ca-bundle`.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
from pathlib import Path
from uuid import UUID

import pytest
from conftest import PROBE_MESSAGE, PROBE_VERSION, source_worker
from helpers import flow_run_logs, run_containers, wait_for_final_state, wait_for_log
from prefect import flow
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runner.storage import GitRepository
from services import BIN, wait_for
from source_services import (
    Commit,
    GitHttpServer,
    ensure_wheelhouse,
    link_wheels,
    publish_repository,
    wait_for_crash_message,
)

pytestmark = pytest.mark.docker

REQUIREMENT = "cowsay==6.1"
#: requirements.txt: a package from the registry (downloaded into the loopback index) and
#: one that exists only in the loopback index, which proves pip used that index.
REQUIREMENTS_TXT = f"{REQUIREMENT}\nmanaged-probe=={PROBE_VERSION}\n"


def flow_file(version: str) -> str:
    return textwrap.dedent(
        f"""\
        import time
        from pathlib import Path

        from prefect import flow, get_run_logger

        VERSION = {version!r}


        @flow
        def which_code(sleep_seconds: float = 0.0) -> str:
            get_run_logger().info("code version: %s", VERSION)
            time.sleep(sleep_seconds)
            return VERSION


        @flow
        def uses_requirements() -> str:
            import cowsay
            import managed_probe

            limit = "unknown"
            for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
                try:
                    limit = Path(path).read_text().strip()
                    break
                except OSError:
                    continue
            logger = get_run_logger()
            logger.info("cowsay from requirements.txt: %s", cowsay.get_output_string("cow", "moo")[:40])
            logger.info("probe from requirements.txt: %s", managed_probe.MESSAGE)
            logger.info("cgroup memory limit: %s", limit)
            return "ok"
        """
    )


#: main-1 (tag v1.0) -> main-2 -> feature (branch from main-2) -> main-3 (main's tip)
HISTORY = [
    Commit({"flows.py": flow_file("main-1"), "requirements.txt": REQUIREMENTS_TXT}, tags=["v1.0"]),
    Commit({"flows.py": flow_file("main-2")}),
    Commit({"flows.py": flow_file("feature")}, branch="feature"),
    Commit({"flows.py": flow_file("main-3")}),
]


# The module's own pool and worker, started after its source services (git_https,
# git_server) so that its policy's isolated network reaches them
# (conftest.source_worker).
@pytest.fixture(scope="module")
def _sources(prefect_server, runtime_image, package_index, tmp_path_factory, git_https, git_server):
    yield from source_worker(
        "test-sources-git-pool", runtime_image, package_index, tmp_path_factory
    )


@pytest.fixture(scope="module")
def managed_pool(_sources) -> str:
    return _sources[0]


@pytest.fixture(scope="module")
def managed_worker(_sources):
    return _sources[1]


@pytest.fixture(scope="module")
def repos(git_https: GitHttpServer) -> dict[str, dict[str, str]]:
    """The same history as ``public/flows.git`` and ``private/flows.git``; the SHAs of each."""
    return {
        kind: publish_repository(git_https.root / kind / "flows.git", HISTORY)
        for kind in ("public", "private")
    }


@pytest.fixture(scope="module")
def token_secret(git_https, prefect_server) -> Secret:
    secret = Secret(value=git_https.token)
    secret.save("git-https-token", overwrite=True)
    return Secret.load("git-https-token")


@pytest.fixture(scope="module")
def requirement_wheels(package_index, wheelhouse):
    link_wheels(ensure_wheelhouse(wheelhouse, [REQUIREMENT]), package_index.root)


def deploy_from(storage, name: str, pool: str, image: str, entry: str = "which_code") -> UUID:
    return flow.from_source(source=storage, entrypoint=f"flows.py:{entry}").deploy(
        name=name,
        work_pool_name=pool,
        job_variables={"image": image},
        print_next_steps=False,
    )


def run(deployment_id: UUID, parameters: dict | None = None) -> UUID:
    return run_deployment(deployment_id, parameters=parameters or {}, timeout=0).id


def assert_token_hidden(token: str, flow_run_id: UUID, deployment_id: UUID, worker) -> None:
    """The places a user or operator can read: the run's logs, the stored deployment and
    the worker's own log."""
    logs = "\n".join(flow_run_logs(flow_run_id))
    assert token not in logs
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert token not in deployment.model_dump_json()
    assert token not in worker.service.log()


# -- public and private repositories over HTTPS ------------------------------------------


def test_public_https_repository_runs_the_default_branch(
    git_https, repos, managed_pool, managed_worker, ca_image
):
    deployment_id = deploy_from(
        GitRepository(git_https.url("public/flows.git")), "git-https-public", managed_pool, ca_image
    )
    flow_run_id = run(deployment_id)

    state = wait_for_final_state(flow_run_id, timeout=480).state
    assert state.is_completed(), state
    wait_for_log(flow_run_id, "code version: main-3")


def _credentials(kind: str, token: str, token_secret: Secret):
    """The token as a Secret block or as a provider's credentials block, saved by name."""
    if kind == "secret":
        return {"access_token": token_secret}
    if kind == "github":
        from prefect_github import GitHubCredentials

        GitHubCredentials(token=token).save("git-https-github", overwrite=True)
        return GitHubCredentials.load("git-https-github")
    if kind == "gitlab":
        from prefect_gitlab import GitLabCredentials

        GitLabCredentials(token=token).save("git-https-gitlab", overwrite=True)
        return GitLabCredentials.load("git-https-gitlab")
    from prefect_bitbucket import BitBucketCredentials

    # Bitbucket Server style: a user name and the token as its password. (A user name
    # with `token=` is refused by Prefect 3.9's git_clone step once the block reference is
    # resolved in the container: it looks for `access_token` or `password`.)
    BitBucketCredentials(username="deploy-bot", password=token).save(
        "git-https-bitbucket", overwrite=True
    )
    return BitBucketCredentials.load("git-https-bitbucket")


@pytest.mark.parametrize("kind", ["secret", "github", "gitlab", "bitbucket"])
def test_private_https_repository_with_token_credentials_completes_and_hides_the_token(
    kind, git_https, repos, token_secret, managed_pool, managed_worker, ca_image, docker_client
):
    token = git_https.token
    storage = GitRepository(
        git_https.url("private/flows.git"), credentials=_credentials(kind, token, token_secret)
    )
    deployment_id = deploy_from(storage, f"git-https-private-{kind}", managed_pool, ca_image)
    flow_run_id = run(deployment_id, {"sleep_seconds": 3})

    container = wait_for(
        lambda: next(iter(run_containers(docker_client, flow_run_id)), None),
        120,
        "the run's container appearing",
    )
    inspected = docker_client.api.inspect_container(container.id)
    state = wait_for_final_state(flow_run_id, timeout=480).state

    assert state.is_completed(), state
    wait_for_log(flow_run_id, "code version: main-3")
    assert not any(token in variable for variable in inspected["Config"]["Env"])
    # Nor any path of the worker's host: its home directory is not the run's.
    assert not any(variable.startswith("PREFECT_HOME=") for variable in inspected["Config"]["Env"])
    assert token not in json.dumps(inspected)
    assert_token_hidden(token, flow_run_id, deployment_id, managed_worker)


# -- refs: branch, tag, commit SHA; and git:// ---------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("branch", "feature"), ("tag", "main-1"), ("commit", "main-2")],
)
def test_private_repository_at_a_branch_tag_or_commit_runs_that_code(
    ref, expected, git_https, repos, token_secret, managed_pool, managed_worker, ca_image
):
    options = {
        "branch": {"branch": "feature"},
        "tag": {"branch": "v1.0"},  # git clone --branch takes a tag as well
        "commit": {"commit_sha": repos["private"]["main@1"]},
    }[ref]
    storage = GitRepository(
        git_https.url("private/flows.git"), credentials={"access_token": token_secret}, **options
    )
    deployment_id = deploy_from(storage, f"git-https-{ref}", managed_pool, ca_image)
    flow_run_id = run(deployment_id)

    state = wait_for_final_state(flow_run_id, timeout=480).state
    assert state.is_completed(), state
    wait_for_log(flow_run_id, f"code version: {expected}")


def test_git_protocol_repository_at_a_tag_runs_that_code(git_server, managed_pool, managed_worker):
    publish_repository(git_server.root / "history", HISTORY)
    storage = GitRepository(git_server.url("history"), branch="v1.0")
    deployment_id = deploy_from(storage, "git-daemon-tag", managed_pool, "")
    flow_run_id = run(deployment_id)

    state = wait_for_final_state(flow_run_id, timeout=480).state
    assert state.is_completed(), state
    wait_for_log(flow_run_id, "code version: main-1")


# -- requirements.txt through prefect.yaml's pull steps ------------------------------------


def prefect_deploy(project: Path, prefect_yaml: str, name: str) -> None:
    """`prefect deploy` of one deployment of a prefect.yaml, as a user runs it."""
    (project / "prefect.yaml").write_text(prefect_yaml)
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", name],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_requirements_txt_is_installed_by_the_pull_step_inside_the_memory_cap(
    git_https,
    repos,
    token_secret,
    managed_pool,
    managed_worker,
    ca_image,
    requirement_wheels,
    package_index,
    main_policy,
    tmp_path,
):
    (tmp_path / "flows.py").write_text(flow_file("local"))
    (tmp_path / "requirements.txt").write_text(REQUIREMENTS_TXT)
    prefect_deploy(
        tmp_path,
        textwrap.dedent(
            f"""\
            name: sources-tests
            pull:
            - prefect.deployments.steps.git_clone:
                id: clone
                repository: {git_https.url("private/flows.git")}
                branch: v1.0
                access_token: "{{{{ prefect.blocks.secret.git-https-token }}}}"
            - prefect.deployments.steps.pip_install_requirements:
                directory: "{{{{ clone.directory }}}}"
                requirements_file: requirements.txt
            deployments:
            - name: with-requirements
              entrypoint: flows.py:uses_requirements
              work_pool:
                name: {managed_pool}
                job_variables:
                  image: {ca_image}
            """
        ),
        "uses-requirements/with-requirements",
    )
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("uses-requirements/with-requirements")
    flow_run_id = run(deployment.id)

    state = wait_for_final_state(flow_run_id, timeout=480).state
    assert state.is_completed(), state
    logs = wait_for_log(flow_run_id, "cowsay from requirements.txt")
    from prefect_managed.policy import load_policy

    memory = load_policy(main_policy).tier.memory_bytes
    assert f"cgroup memory limit: {memory}" in logs
    assert f"probe from requirements.txt: {PROBE_MESSAGE}" in logs  # only the loopback index has it
    assert_token_hidden(git_https.token, flow_run_id, deployment.id, managed_worker)


# -- a wrong source: the run ends, its logs say which source and why ---------------------


def _crashed_with_reason(flow_run_id: UUID, *reasons: str) -> str:
    """The run ends Crashed; its state message names the step, the source and the reason,
    and the container's output is in its logs."""
    run_ = wait_for_final_state(flow_run_id, timeout=480)
    assert run_.state.is_crashed(), run_.state
    message = wait_for_crash_message(flow_run_id, "Pulling the flow's code failed")
    for reason in reasons:
        assert reason in message, f"{reason!r} not in the state message: {message}"
    logs = "\n".join(wait_for_log(flow_run_id, "Container output:"))
    return f"{message}\n{logs}"


def test_wrong_repository_url_fails_the_run_naming_the_url(
    git_https, repos, token_secret, managed_pool, managed_worker, ca_image
):
    publish_repository(git_https.root / "private" / "moved.git", HISTORY)
    url = git_https.url("private/moved.git")
    deployment_id = deploy_from(
        GitRepository(url, credentials={"access_token": token_secret}),
        "git-https-moved",
        managed_pool,
        ca_image,
    )
    (git_https.root / "private" / "moved.git").rename(git_https.root / "private" / "elsewhere.git")
    flow_run_id = run(deployment_id)

    text = _crashed_with_reason(flow_run_id, "pull step git_clone", url, "Failed to clone")
    assert git_https.token not in text
    assert_token_hidden(git_https.token, flow_run_id, deployment_id, managed_worker)


def test_missing_branch_fails_the_run_naming_the_branch(
    git_https, token_secret, managed_pool, managed_worker, ca_image
):
    bare = git_https.root / "private" / "branchy.git"
    publish_repository(bare, HISTORY)
    deployment_id = deploy_from(
        GitRepository(
            git_https.url("private/branchy.git"),
            credentials={"access_token": token_secret},
            branch="feature",
        ),
        "git-https-branch-gone",
        managed_pool,
        ca_image,
    )
    subprocess.run(
        ["git", "-C", str(bare), "branch", "-D", "feature"], check=True, capture_output=True
    )
    flow_run_id = run(deployment_id)

    text = _crashed_with_reason(
        flow_run_id, "pull step git_clone", git_https.url("private/branchy.git"), "feature"
    )
    assert git_https.token not in text


def test_bad_credentials_fail_the_run_with_the_token_redacted(
    git_https, repos, managed_pool, managed_worker, ca_image, prefect_server
):
    Secret(value=git_https.token).save("git-https-rotated", overwrite=True)
    url = git_https.url("private/flows.git")
    deployment_id = deploy_from(
        GitRepository(url, credentials={"access_token": Secret.load("git-https-rotated")}),
        "git-https-rotated-token",
        managed_pool,
        ca_image,
    )
    wrong = f"tok{secrets.token_hex(16)}"
    Secret(value=wrong).save("git-https-rotated", overwrite=True)  # the token was revoked
    flow_run_id = run(deployment_id)

    text = _crashed_with_reason(flow_run_id, "pull step git_clone", url, "could not read Password")
    assert wrong not in text
    assert git_https.token not in text
    assert_token_hidden(wrong, flow_run_id, deployment_id, managed_worker)
