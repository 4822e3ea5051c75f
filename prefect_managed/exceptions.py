"""The errors prefect-managed raises.

ManagedError
 ├── InvalidPipPackage       a pip_packages entry is not an acceptable requirement
 ├── InvalidJobVariable      another job variable has a value the worker cannot use
 ├── ImageNotAllowed         the image is not in the policy's allow-list
 ├── ImageNotAvailable       the image is neither on the Docker host nor pullable
 ├── GpuNotAvailable         the tier gives GPUs but the Docker host cannot
 ├── PolicyError             the policy file is missing, malformed or invalid
 ├── WorkerNotStarted        a worker refused to start (also a SystemExit: one line)
 ├── ApiOpenWithoutCredential the Prefect API answers without a credential
 ├── LedgerKeyMissing        no key to verify usage records with
 └── RuntimeImageError       the local runtime image could not be built
"""

from __future__ import annotations

from prefect_managed.redact import redact_url_credentials


class ManagedError(Exception):
    """Base class of every error raised by prefect-managed."""


class InvalidPipPackage(ManagedError, ValueError):
    """A pip_packages entry is not a requirement the worker will install."""

    def __init__(self, entry: object, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(
            f"pip_packages entry {redact_url_credentials(repr(entry))} was rejected: {reason}. Give each package as a "
            "PEP 508 requirement such as 'pandas' or 'pandas>=2.2,<3', one per entry."
        )


class InvalidJobVariable(ManagedError, ValueError):
    """A job variable has a value the worker cannot use."""

    def __init__(self, name: str, value: object, hint: str) -> None:
        self.name = name
        self.value = value
        super().__init__(
            f"Job variable {name!r} has the value {redact_url_credentials(repr(value))}, which "
            f"is not usable: {redact_url_credentials(hint)}."
        )


class ImageNotAllowed(ManagedError, ValueError):
    """The image a flow run asked for is not in the policy's allow-list."""

    def __init__(self, image: str, allowed: list[str]) -> None:
        self.image = image
        super().__init__(
            f"Image {image!r} is not allowed in this workspace; allowed images: "
            f"{', '.join(allowed)}. Remove 'image' from the deployment's job variables to use "
            "the default, or ask the operator to allow the image."
        )


class ImageNotAvailable(ManagedError, RuntimeError):
    """The image is allowed but neither on the Docker host nor pullable."""

    def __init__(self, image: str, reason: str) -> None:
        self.image = image
        super().__init__(
            f"Image {image!r} is not on this Docker host and could not be pulled ({reason}). "
            "Check the image name and tag, remove 'image' from the deployment's job "
            "variables to use the default, or ask the operator to provide the image."
        )


class GpuNotAvailable(ManagedError, RuntimeError):
    """The tier gives each run GPUs, but Docker could not start a container with them."""

    def __init__(self, tier: str, gpus: int, reason: str) -> None:
        first_line = reason.strip().splitlines()[0][:300] if reason.strip() else reason
        super().__init__(
            f"The {tier} tier gives each flow run {gpus} GPU(s), but this Docker host could "
            f"not start a container with them ({first_line}). No container was left "
            "behind. Run this tier's worker on a host with NVIDIA GPUs and the NVIDIA "
            "container runtime, or ask the operator for a tier without GPUs."
        )


class PolicyError(ManagedError, ValueError):
    """The policy file is missing, malformed or invalid."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"Policy file {str(path)!r} is not usable: {problem}. Fix the file and start the "
            "worker again (`prefect-managed policy check` checks it without starting one)."
        )


class LedgerKeyMissing(ManagedError, RuntimeError):
    """No ledger key is set and none was generated on this host."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(
            "No ledger key to verify usage records with: PREFECT_INTEGRATIONS_MANAGED_LEDGER_KEY "
            f"is not set and {str(path)!r} does not exist. Set the same key the workspace's "
            "workers use, or run this on a worker's host with its PREFECT_HOME."
        )


class ApiOpenWithoutCredential(ManagedError, RuntimeError):
    """The Prefect API answers without a credential and the policy does not say that
    every flow it runs is trusted."""

    def __init__(self, api_url: str, policy_file: object) -> None:
        self.api_url = api_url
        super().__init__(
            f"The Prefect API {api_url} answers requests that carry no credential, so any "
            "flow run could reach it around the run gateway and edit usage records, "
            "limits and other runs; this worker does not serve managed pools of such a "
            "server. Start the server with PREFECT_SERVER_API_AUTH_STRING='admin:<a long "
            "random password>' and give every worker and client PREFECT_API_AUTH_STRING "
            "with the same value (docs/security.md). If every flow this server runs is "
            f"trusted, say so with `trusted_code_only = true` under [runtime] in "
            f"{str(policy_file)!r}."
        )


class RuntimeImageError(ManagedError, RuntimeError):
    """Building the local runtime image failed."""


class WorkerNotStarted(ManagedError, SystemExit):
    """A worker cannot start as configured (a policy error): one line, exit status 1.

    Also a `SystemExit`: `prefect worker start` reports any other error with a
    traceback and "An exception occurred.", and a `SystemExit` carrying a message is
    printed by Python as that one line, with exit status 1.
    """

    def __init__(self, cause: ManagedError) -> None:
        self.cause = cause
        super().__init__(f"Error: {cause}")
        self.code = f"Error: {cause}"  # SystemExit's own __init__ is not the one called
