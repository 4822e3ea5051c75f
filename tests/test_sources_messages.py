"""The messages of a failed pull step: pure functions, fed the container output Prefect
3.9's runner prints (trimmed from real runs)."""

from __future__ import annotations

import pytest

from prefect_managed.sources import (
    describe_pull_step_failure,
    describe_source,
    redact_url_credentials,
    repository_destination,
)

GIT_CLONE_OUTPUT = """\
12:00:01.000 | INFO    | Flow run 'cunning-llama' - Running 1 deployment pull step(s)
12:00:01.100 | INFO    | Flow run 'cunning-llama' - Executing deployment step: git_clone
Traceback (most recent call last):
  File "/opt/prefect/venv/lib/python3.11/site-packages/prefect/runner/storage.py", line 657, in _clone_repo
    raise RuntimeError(error_message) from exc_chain
RuntimeError: Failed to clone repository 'https://127.0.0.1:41361/private/flows.git' with exit code 128. git stderr: fatal: could not read Password for 'https://127.0.0.1:41361': No such device or address

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/opt/prefect/venv/lib/python3.11/site-packages/prefect/deployments/steps/core.py", line 285, in run_steps
    raise StepExecutionError(f"Encountered error while running {fqn}") from exc
prefect.deployments.steps.core.StepExecutionError: Encountered error while running prefect.deployments.steps.git_clone
12:00:05.000 | ERROR   | prefect.runner.flow_run_executor - Process exited with status code: 1. Process exited with a general error.
12:00:05.100 | WARNING | Flow run 'cunning-llama' - Runner failed to retrieve flow to execute on_crashed hooks
FileNotFoundError: [Errno 2] No such file or directory: '/tmp/prefect-workspace-attempt-x/workspace.json'
""".splitlines()

S3_OUTPUT = """\
Traceback (most recent call last):
botocore.errorfactory.NoSuchBucket: An error occurred (NoSuchBucket) when calling the ListObjectsV2 operation: The specified bucket does not exist
The above exception was the direct cause of the following exception:
prefect.deployments.steps.core.StepExecutionError: Encountered error while running prefect_aws.deployments.steps.pull_from_s3
""".splitlines()

GIT_STEP = {
    "prefect.deployments.steps.git_clone": {
        "repository": "https://127.0.0.1:41361/private/flows.git",
        "branch": "feature",
        "access_token": "{{ prefect.blocks.secret.git-token }}",
    }
}
S3_STEP = {
    "prefect_aws.deployments.steps.pull_from_s3": {
        "bucket": "no-such-bucket",
        "folder": "project",
        "credentials": "{{ prefect.blocks.aws-credentials.moto }}",
    }
}


@pytest.mark.parametrize(
    ("repository", "destination"),
    [
        ("git://127.0.0.1:9418/flows", "127.0.0.1:9418"),
        ("https://github.com/org/repo.git", "github.com:443"),
        ("https://user:token@git.example.com/org/repo.git", "git.example.com:443"),
        ("http://localhost:8080/repo", "127.0.0.1:8080"),
        ("ssh://git@git.example.com:2222/org/repo", "git.example.com:2222"),
        ("git@github.com:org/repo.git", "github.com:22"),
        ("/srv/git/repo", None),
        ("file:///srv/git/repo", None),
        ("https://host:notaport/x", None),
        ("https://evil host'/x", None),
    ],
)
def test_the_destination_a_repository_url_connects_to(repository, destination):
    assert repository_destination(repository) == destination


def test_a_git_clone_outside_the_isolated_networks_destinations_names_what_to_ask():
    outside = describe_pull_step_failure(
        0, GIT_CLONE_OUTPUT, [GIT_STEP], ("127.0.0.1:4210", "127.0.0.1:9418")
    )
    assert outside is not None
    assert (
        "this run's isolated network reaches only the run gateway, the package index and "
        "the policy's runtime.allowed_destinations, and 127.0.0.1:41361 is not among them: "
        "if it is the workspace's git server, ask the operator to add '127.0.0.1:41361' to "
        "allowed_destinations" in outside
    )
    inside = describe_pull_step_failure(
        0, GIT_CLONE_OUTPUT, [GIT_STEP], ("127.0.0.1:4210", "127.0.0.1:41361")
    )
    assert inside is not None and "check the repository URL" in inside
    assert "allowed_destinations" not in inside


def test_a_pull_step_whose_inputs_are_not_a_table_still_gets_a_message():
    # The deployment's own input: a list where Prefect expects a table.
    step = {"prefect.deployments.steps.git_clone": ["x"]}
    message = describe_pull_step_failure(0, GIT_CLONE_OUTPUT, [step], ("127.0.0.1:4210",))
    assert message is not None and "pull step git_clone" in message


def test_a_containers_isolated_destinations_are_read_from_its_entrypoint():
    from uuid import uuid4

    from prefect_managed.gateway.tunnel import isolation, parse_destination
    from prefect_managed.outcome import ContainerReport

    made = isolation(
        b"k" * 32,
        uuid4(),
        24000,
        [parse_destination("127.0.0.1:9418"), parse_destination("git.example.com:443")],
    )
    attrs = {"Id": "c", "Config": {"Entrypoint": made.entrypoint(["/usr/bin/tini", "--"])}}
    report = ContainerReport.from_inspect(attrs)
    assert sorted(report.isolated_destinations or ()) == [
        "127.0.0.1:24000",
        "127.0.0.1:9418",
        "git.example.com:443",
    ]
    host = ContainerReport.from_inspect({"Id": "c", "Config": {"Entrypoint": ["/usr/bin/tini"]}})
    assert host.isolated_destinations is None


def test_failed_git_clone_names_the_step_the_repository_and_gits_reason():
    message = describe_pull_step_failure(0, GIT_CLONE_OUTPUT, [GIT_STEP])

    assert message is not None
    assert message.startswith("Pulling the flow's code failed before the flow started")
    assert (
        "pull step git_clone from repository https://127.0.0.1:41361/private/flows.git" in message
    )
    assert "at branch or tag feature" in message
    assert "RuntimeError: Failed to clone repository" in message
    assert "could not read Password" in message
    assert "check the repository URL" in message
    assert "workspace.json" not in message  # the runner's hook noise is not the cause


def test_failed_s3_pull_names_the_bucket_and_the_error_type():
    message = describe_pull_step_failure(1, S3_OUTPUT, [S3_STEP])

    assert message is not None
    assert "pull step pull_from_s3 from s3://no-such-bucket/project" in message
    assert "NoSuchBucket: An error occurred (NoSuchBucket)" in message
    assert "(the container exited with code 1)" in message


def test_step_missing_from_the_deployment_is_still_named():
    message = describe_pull_step_failure(1, S3_OUTPUT, [])

    assert message is not None
    assert "pull step pull_from_s3 failed" in message


def test_output_without_a_failed_step_gives_no_pull_message():
    output = ["+uv pip install nothing-here==1.0", "error: No solution found"]

    assert describe_pull_step_failure(1, output, [GIT_STEP]) is None


def test_credentials_in_a_repository_url_are_redacted_everywhere():
    step = {
        "prefect.deployments.steps.git_clone": {
            "repository": "https://bot:s3cr3t@git.example/r.git"
        }
    }
    output = [
        "RuntimeError: Failed to clone repository 'https://bot:s3cr3t@git.example/r.git'",
        "prefect.deployments.steps.core.StepExecutionError: Encountered error while running "
        "prefect.deployments.steps.git_clone",
    ]

    message = describe_pull_step_failure(1, output, [step])

    assert message is not None
    assert "s3cr3t" not in message
    assert "https://***@git.example/r.git" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "clone https://x-access-token:tok123@127.0.0.1:8443/r.git now",
            "clone https://***@127.0.0.1:8443/r.git now",
        ),
        ("'https://tok123@127.0.0.1/r.git'", "'https://***@127.0.0.1/r.git'"),
        ("no url here, mail tests@127.0.0.1", "no url here, mail tests@127.0.0.1"),
        ("https://127.0.0.1:8443/r.git", "https://127.0.0.1:8443/r.git"),
        # a password holding '/' and '@', written raw
        ("https://bot:pa/ss@w0rd@127.0.0.1/r.git", "https://***@127.0.0.1/r.git"),
        ("git+https://u:t@k/en@git.example/r.git@v1", "git+https://***@git.example/r.git@v1"),
        # a revision after the path is not a user
        ("git+https://git.example/org/r.git@v1.2", "git+https://git.example/org/r.git@v1.2"),
        ("https://tok@git.example", "https://***@git.example"),
        # scp-like git addresses: a password is redacted, a plain user is not
        ("clone bot:tok3n@git.example:org/r.git", "clone ***@git.example:org/r.git"),
        ("git@git.example:org/r.git", "git@git.example:org/r.git"),
    ],
)
def test_redact_url_credentials(text, expected):
    assert redact_url_credentials(text) == expected


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"prefect_gcp.deployments.steps.pull_from_gcs": {"bucket": "b", "folder": "f/"}},
            "gs://b/f",
        ),
        (
            {
                "prefect_azure.deployments.steps.pull_from_azure_blob_storage": {
                    "container": "c",
                    "folder": "f",
                }
            },
            "Azure Blob container 'c', folder 'f'",
        ),
        (
            {
                "prefect.deployments.steps.pull_with_block": {
                    "block_type_slug": "s3-bucket",
                    "block_document_name": "flows",
                }
            },
            "storage block s3-bucket/flows",
        ),
        (
            {
                "prefect.deployments.steps.git_clone": {
                    "repository": "git://127.0.0.1/r",
                    "commit_sha": "abc123",
                }
            },
            "repository git://127.0.0.1/r at commit abc123",
        ),
        (
            {
                "prefect.deployments.steps.pip_install_requirements": {
                    "requirements_file": "req.txt"
                }
            },
            "requirements file req.txt",
        ),
    ],
)
def test_describe_source(step, expected):
    assert describe_source(step) == expected


def test_pulled_code_without_the_entrypoint_names_the_source_and_the_missing_file():
    output = [
        "12:00:01.000 | INFO    | Flow run 'x' - Executing deployment step: pull_from_s3",
        "12:00:02.000 | INFO    | Flow run 'x' - All deployment steps completed successfully",
        "Traceback (most recent call last):",
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/prefect-flow-run-1/flows.py'",
        "12:00:03.000 | WARNING | Flow run 'x' - Runner failed to retrieve flow to execute on_crashed hooks",
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/ws/workspace.json'",
    ]

    message = describe_pull_step_failure(0, output, [S3_STEP])

    assert message is not None
    assert message.startswith(
        "Loading the flow failed after its code was pulled from s3://no-such-bucket/project"
    )
    assert "flows.py" in message
    assert "workspace.json" not in message


def test_the_cause_is_the_exception_line_not_a_line_of_its_body():
    output = [
        "azure.core.exceptions.ResourceNotFoundError: The specified container does not exist.",
        "RequestId:5e1a",
        "Time:2026-11-24T21:40:00.000Z",
        "ErrorCode:ContainerNotFound",
        "Content: <?xml version='1.0' encoding='utf-8'?><Error><Code>ContainerNotFound</Code>",
        "prefect.deployments.steps.core.StepExecutionError: Encountered error while running "
        "prefect_azure.deployments.steps.pull_from_azure_blob_storage",
    ]

    message = describe_pull_step_failure(0, output, [])

    assert message is not None
    assert "ResourceNotFoundError: The specified container does not exist" in message
    assert "<?xml" not in message


def test_a_requirement_with_a_token_is_redacted_in_every_message():
    from prefect_managed.dependencies import describe_early_exit, normalize_pip_packages
    from prefect_managed.exceptions import InvalidPipPackage

    entry = "probe @ git+https://bot:s3cr/et@git.example/probe.git"
    with pytest.raises(InvalidPipPackage) as refused:
        normalize_pip_packages([entry])  # URL requirements are not allowed by default
    assert "s3cr" not in str(refused.value) and "***@git.example" in str(refused.value)
    message = describe_early_exit(1, [entry], ["+uv pip install x", "error: failed"])
    assert "s3cr" not in message and "git+https://***@git.example/probe.git" in message
