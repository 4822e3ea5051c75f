"""Where a flow run's code comes from, described for the people who read its logs.

A deployment's pull steps (`git_clone`, `pull_from_s3`, `pull_from_gcs`,
`pull_from_azure_blob_storage`, `pull_with_block`, `pip_install_requirements`) run inside
the flow run's container before the flow starts. When one fails (a wrong URL, a missing
branch, bad credentials, a missing bucket or object), Prefect's runner reports only
"Process exited with status code: 1"; the reason is in the container's output. These pure
functions find the failing step and its error there, name the source the step was pulling
from, and keep credentials found in URLs out of what they return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prefect_managed.redact import redact_url_credentials

__all__ = [
    "describe_pull_step_failure",
    "describe_source",
    "redact_url_credentials",
    "repository_destination",
]

_STEP_FAILED = re.compile(r"StepExecutionError: Encountered error while running (?P<fqn>[\w.]+)")
_STEPS_DONE = "All deployment steps completed successfully"
_GIT_PORTS = {"https": 443, "http": 80, "git": 9418, "ssh": 22}
# Prefect's runner logs this (with a traceback of its own) after the real error.
_HOOK_NOISE = "Runner failed to retrieve flow to execute on_crashed hooks"
# "RuntimeError: Failed to clone ...", "botocore.errorfactory.NoSuchBucket: An error ..."
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*): (?P<message>\S.*)$")

_HINTS = {
    "git_clone": (
        "check the repository URL, the branch, tag or commit, and the access token or "
        "credentials block"
    ),
    "pull_from_s3": "check the bucket, the folder and the AWS credentials block",
    "pull_from_gcs": "check the bucket, the folder and the GCP credentials block",
    "pull_from_azure_blob_storage": (
        "check the container, the folder and the Azure Blob Storage credentials block"
    ),
    "pull_with_block": "check the storage block: its bucket or container, folder and credentials",
    "pip_install_requirements": (
        "check the requirements file and the package names and versions in it"
    ),
}


def _short_name(fqn: str) -> str:
    return fqn.rsplit(".", 1)[-1]


def describe_source(step: Mapping[str, Any]) -> str:
    """One pull step (``{fqn: inputs}``) as the source it pulls from, credentials left out."""
    fqn, inputs = next(iter(step.items()))
    inputs = inputs if isinstance(inputs, Mapping) else {}
    name = _short_name(fqn)
    folder = str(inputs.get("folder") or "").strip("/")
    if name == "git_clone":
        text = f"repository {redact_url_credentials(str(inputs.get('repository', '?')))}"
        if inputs.get("commit_sha"):
            text += f" at commit {inputs['commit_sha']}"
        elif inputs.get("branch"):
            text += f" at branch or tag {inputs['branch']}"
        return text
    if name == "pull_from_s3":
        return f"s3://{inputs.get('bucket', '?')}/{folder}"
    if name == "pull_from_gcs":
        return f"gs://{inputs.get('bucket', '?')}/{folder}"
    if name == "pull_from_azure_blob_storage":
        return f"Azure Blob container {inputs.get('container', '?')!r}, folder {folder!r}"
    if name == "pull_with_block":
        slug = inputs.get("block_type_slug", "?")
        return f"storage block {slug}/{inputs.get('block_document_name', '?')}"
    if name == "pip_install_requirements":
        return f"requirements file {inputs.get('requirements_file', 'requirements.txt')}"
    return fqn


def _find_step(fqn: str, pull_steps: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for step in pull_steps:
        if isinstance(step, Mapping) and step and fqn in step:
            return step
    short = _short_name(fqn)
    for step in pull_steps:
        if isinstance(step, Mapping) and step and _short_name(next(iter(step))) == short:
            return step
    return None


def _last_cause(output: Sequence[str]) -> str:
    """The last exception line (``Type: message``) of `output`, before Prefect's hook noise."""
    end = next((i for i, line in enumerate(output) if _HOOK_NOISE in line), len(output))
    for line in reversed(output[:end]):
        match = _EXCEPTION_LINE.match(line.rstrip())
        if match and _is_exception_type(match["type"]):
            return f"{match['type'].rsplit('.', 1)[-1]}: {match['message']}"
    return ""


def _is_exception_type(name: str) -> bool:
    """`RuntimeError`, `botocore.errorfactory.NoSuchBucket`; not `Content` or `Time` (lines
    of an Azure error's body) nor the runner's own StepExecutionError."""
    if name.endswith("StepExecutionError"):
        return False
    return "." in name or name.endswith(("Error", "Exception"))


def _describe_load_failure(
    exit_code: int, output: Sequence[str], pull_steps: Sequence[Mapping[str, Any]]
) -> str | None:
    """Every pull step succeeded, yet the flow never started: its file was not there."""
    if not pull_steps or not any(_STEPS_DONE in line for line in output):
        return None
    sources = "; ".join(describe_source(step) for step in pull_steps if isinstance(step, Mapping))
    cause = _last_cause(output)
    exited = f" (the container exited with code {exit_code})" if exit_code else ""
    reason = f": {cause.rstrip('.')}" if cause else ""
    return redact_url_credentials(
        f"Loading the flow failed after its code was pulled from {sources}{exited}{reason}. "
        "The container's output is in this flow run's logs; check that the source holds "
        "the deployment's entrypoint file at that folder, branch or commit."
    )


def repository_destination(repository: str) -> str | None:
    """The host:port a git repository URL connects to ("git.example.com:443" for
    https://git.example.com/x.git, port 22 for scp-like `git@host:path`), or None."""
    url = urlsplit(repository)
    if url.scheme in _GIT_PORTS and url.hostname:
        try:
            port = url.port or _GIT_PORTS[url.scheme]
        except ValueError:
            return None
        return _checked(f"{url.hostname}:{port}")
    scp = re.fullmatch(r"(?:[^@/]+@)?([A-Za-z0-9.-]+):(?!//).*", repository)
    return _checked(f"{scp[1]}:22") if scp and not url.scheme else None


def _checked(destination: str) -> str | None:
    """A host:port as the policy would write it, or None for anything else (a host name
    with spaces or quotes is not a destination to advise anyone to allow)."""
    from prefect_managed.gateway.tunnel import parse_destination

    try:
        return str(parse_destination(destination))
    except ValueError:
        return None


def describe_pull_step_failure(
    exit_code: int,
    output: Sequence[str],
    pull_steps: Sequence[Mapping[str, Any]],
    reachable: Sequence[str] | None = None,
) -> str | None:
    """The final-state message of a container whose pull step failed, or None when its
    output shows no failed pull step.

    It names the step, the source from the deployment's pull steps, and the error the
    step raised (its first line), with credentials in URLs redacted. `reachable`: the
    destinations of a run on the isolated network; a git repository outside them is
    named with what to ask the operator.
    """
    failed_at = None
    for index in range(len(output) - 1, -1, -1):
        match = _STEP_FAILED.search(output[index])
        if match:
            failed_at, fqn = index, match["fqn"]
            break
    if failed_at is None:
        return _describe_load_failure(exit_code, output, pull_steps)
    cause = _last_cause(output[:failed_at])
    step = _find_step(fqn, pull_steps)
    name = _short_name(fqn)
    source = f" from {describe_source(step)}" if step is not None else ""
    reason = f": {cause.rstrip('.')}" if cause else ""
    hint = _HINTS.get(name, "check the step's settings in the deployment's pull steps")
    if reachable is not None and name == "git_clone" and step is not None:
        # The deployment's own input: any shape, any text.
        inputs = next(iter(step.values()))
        repository = inputs.get("repository", "") if isinstance(inputs, Mapping) else ""
        wanted = repository_destination(str(repository))
        if wanted is not None and wanted not in reachable:
            hint = (
                f"this run's isolated network reaches only the run gateway, the package "
                f"index and the policy's runtime.allowed_destinations, and {wanted} is not "
                f"among them: if it is the workspace's git server, ask the operator to add "
                f"'{wanted}' to allowed_destinations"
            )
    # Prefect's runner reports the run Crashed itself and exits 0; the code says little.
    exited = f" (the container exited with code {exit_code})" if exit_code else ""
    return redact_url_credentials(
        f"Pulling the flow's code failed before the flow started: pull step {name}{source} "
        f"failed{exited}{reason}. The container's output is in this flow run's logs; {hint}."
    )
