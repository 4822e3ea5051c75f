"""pip_packages: validation of untrusted requirement strings (PEP 508).

Entries reach the runtime image as ``EXTRA_PIP_PACKAGES``, a single string the image's
entrypoint splits on whitespace. So an entry is accepted only when it parses as one
requirement and its normal form holds no whitespace; that rules out shell fragments,
paths, options and environment markers.
"""

from __future__ import annotations

from collections.abc import Iterable

from packaging.requirements import InvalidRequirement, Requirement

from prefect_managed.exceptions import InvalidPipPackage
from prefect_managed.redact import redact_url_credentials

__all__ = [
    "CACHE_MOUNT",
    "cache_environment",
    "cache_volume_name",
    "describe_early_exit",
    "normalize_pip_packages",
    "split_extra_pip_packages",
]

#: Where a run's container sees its workspace's dependency cache (a named volume).
#: The runtime image has this directory, owned by its user, so that Docker gives a new
#: volume mounted here that owner (Docker copies a mount point's ownership into an
#: empty volume).
CACHE_MOUNT = "/opt/prefect/cache"

#: The environment variables the dependency cache is configured by; the policy sets
#: them (or removes them), never a deployment.
CACHE_ENV_KEYS = ("UV_CACHE_DIR", "UV_LINK_MODE", "PREFECT_MANAGED_CACHE_MAX_BYTES")


def _normalize(entry: object, allow_urls: bool) -> str:
    if not isinstance(entry, str):
        raise InvalidPipPackage(entry, "it is not a string")
    text = entry.strip()
    if not text:
        raise InvalidPipPackage(entry, "it is empty")
    if text.startswith("-"):
        raise InvalidPipPackage(entry, "installer options are not accepted")
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        raise InvalidPipPackage(entry, f"it is not a valid requirement ({reason})") from exc
    if requirement.marker is not None:
        raise InvalidPipPackage(
            entry, "environment markers (after ';') are not supported in a fixed runtime image"
        )
    if requirement.url is not None and not allow_urls:
        raise InvalidPipPackage(
            entry,
            "direct URL requirements are not allowed by this workspace's policy; "
            "name a package from the package index instead",
        )
    normal = str(requirement)
    if requirement.url is not None:
        # PEP 508 allows 'name@url'; the spaced form would be split by the entrypoint.
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        normal = f"{requirement.name}{extras}@{requirement.url}"
    if any(ch.isspace() for ch in normal):
        raise InvalidPipPackage(entry, "it contains whitespace")
    return normal


def normalize_pip_packages(entries: Iterable[object], *, allow_urls: bool = False) -> list[str]:
    """Validate each entry and return its normal form, duplicates dropped, order kept.

    Raises `InvalidPipPackage` naming the first entry that is not acceptable.
    """
    seen: dict[str, None] = {}
    for entry in entries:
        seen.setdefault(_normalize(entry, allow_urls), None)
    return list(seen)


def split_extra_pip_packages(value: str | None) -> list[str]:
    """Split an ``EXTRA_PIP_PACKAGES`` value the way the image's entrypoint does."""
    return value.split() if value else []


_INSTALL_MARK = "+uv pip install "


def describe_early_exit(exit_code: int, pip_packages: list[str], output: list[str]) -> str:
    """The final-state message of a container that exited before its flow started.

    When pip_packages were asked for and the output shows the installer ran, the
    message names the installation and quotes the installer's first error line.
    """
    installing = bool(pip_packages) and any(line.startswith(_INSTALL_MARK) for line in output)
    if installing:
        start = max(i for i, line in enumerate(output) if line.startswith(_INSTALL_MARK))
        after = output[start + 1 :]
        first = next((i for i, line in enumerate(after) if "error" in line.lower()), None)
        detail = ""
        if first is not None:
            # uv prints the error, then its cause on indented lines below it.
            quoted = [after[first].strip()]
            quoted += [
                line.strip() for line in after[first + 1 : first + 3] if line.startswith(" ")
            ]
            detail = ": " + " ".join(quoted)
        denied = any("Permission denied" in line for line in after)
        next_step = (
            "the image installs packages where the run's non-root uid cannot write (an "
            "image made to run as root, such as the official image): ask the operator to "
            "turn runtime.prebuilt_environments on, which builds them as the image's own "
            "user, or use an image whose Python environment that uid owns"
            if denied
            else "check the package names and versions in pip_packages"
        )
        return (
            f"Installing pip_packages {redact_url_credentials(' '.join(pip_packages))} failed "
            "before the flow started "
            f"(the container exited with code {exit_code}){detail}. The installer's output is "
            f"in this flow run's logs; {next_step}."
        )
    last = next((line.strip().rstrip(".") for line in reversed(output) if line.strip()), "")
    detail = f": {last}" if last else ""
    return (
        f"The flow run's container exited with code {exit_code} before the flow started{detail}. "
        "Its output is in this flow run's logs."
    )


def cache_volume_name(workspace: str, api_digest: str) -> str:
    """The named Docker volume that holds one workspace's dependency cache.

    The digest of the Prefect API URL keeps apart workspaces of the same name on
    different Prefect servers that share a Docker engine.
    """
    return f"prefect-managed-cache-{workspace}-{api_digest[:12]}"


def cache_environment(max_bytes: int) -> dict[str, str]:
    """The environment that points uv at the cache and tells the entrypoint its bound.

    The cache is on another filesystem than the image's virtual environment, so uv
    cannot hardlink from it; ``copy`` says so up front instead of warning on every run.
    """
    return {
        "UV_CACHE_DIR": f"{CACHE_MOUNT}/uv",
        "UV_LINK_MODE": "copy",
        "PREFECT_MANAGED_CACHE_MAX_BYTES": str(max_bytes),
    }
