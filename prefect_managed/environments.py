"""Environments built once per (image, pip_packages) and reused by every later run.

A run with `pip_packages` would install them in its own container on every start. With
`runtime.prebuilt_environments` on, the worker instead looks for an image
`prefect-managed-env:<key>`, where the key is a digest of the runtime image's id, the
normalized packages, the package index, the workspace and the Prefect API: when it is
there, the run's container starts from it with nothing to install; when it is not, a
builder container installs the packages (the same entrypoint and dependency cache a run
uses, under the tier's memory, CPU and process caps, with every capability dropped), is
committed into that image, and removed.

- **Nothing a run does reaches the next run**: a run's changes stay in its own
  container's writable layer; the image it starts from is never written.
- **One build per key**: the builder's container name is the key, and Docker refuses a
  second container of that name; a worker that finds one waits for its image (and
  removes a builder a dead worker left behind).
- **Per workspace**: the workspace is in the key, so two workspaces never share one.
- **Billed**: a successful build's seconds are added to the usage record of the run that
  built it (a label on its container carries them, so a worker that takes the container
  over still bills them); a failed build is recorded as the run's usage by the worker.
- **Bounded**: after each build, a workspace's environments over
  `runtime.environments_max_size` are removed, least recently used first (each use
  re-tags the image, which Docker timestamps), as are those unused for
  `runtime.environments_max_age_days`; an environment in use by a container stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import docker
import docker.errors

from prefect_managed.metering import parse_docker_time

__all__ = [
    "BUILD_SECONDS_LABEL",
    "ENVIRONMENT_LABEL",
    "ENVIRONMENT_REPOSITORY",
    "BuildResult",
    "Environments",
    "environment_key",
]

ENVIRONMENT_REPOSITORY = "prefect-managed-env"
#: On an environment image: its key.
ENVIRONMENT_LABEL = "io.prefect-managed.environment"
#: On an environment image: the workspace it belongs to.
ENVIRONMENT_WORKSPACE_LABEL = "io.prefect-managed.environment-workspace"
#: On a run's container: the seconds its environment took to build (billed with the run).
BUILD_SECONDS_LABEL = "io.prefect-managed.build-seconds"
BUILDER_PREFIX = "prefect-managed-build-"
#: A builder left exited this long is a dead worker's; the live one commits within it.
STALE_BUILDER_SECONDS = 60.0
_POLL_SECONDS = 1.0


def environment_key(
    image_id: str, pip_packages: list[str], index_url: str | None, workspace: str, api: str
) -> str:
    """The digest that names one environment."""
    identity = {
        "image": image_id,
        "packages": sorted(pip_packages),
        "index": index_url or "",
        "workspace": workspace,
        "api": api,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class BuildResult:
    """What `Environments.ensure` did for one run."""

    image: str
    built: bool  # False: an environment already there was used
    seconds: float = 0.0
    #: a failed build: the builder's exit code, OOM flag, output and timestamps
    failed: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    output: list[str] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Environments:
    """Builds and reuses environment images on one Docker engine (blocking calls: run
    them in a worker thread)."""

    def __init__(
        self, get_client: Callable[[], docker.DockerClient], logger: logging.Logger | Any
    ) -> None:
        self._get_client = get_client
        self._logger = logger

    def ensure(
        self,
        *,
        base_image: str,
        pip_packages: list[str],
        build_env: dict[str, str],
        host_config: dict[str, Any],
        user: str | None,
        workspace: str,
        key: str,
        timeout: float,
        output_lines: int,
        entrypoint_prefix: list[str] | None = None,
    ) -> BuildResult:
        """The environment image of `key`, built now if it is not there yet.

        `entrypoint_prefix` goes before the base image's entrypoint in the builder (an
        isolated network's `isolate.sh`); the environment keeps the base's entrypoint.
        `user` None: the builder runs as the image's own user, as `docker build` would."""
        image = f"{ENVIRONMENT_REPOSITORY}:{key[:40]}"
        name = BUILDER_PREFIX + key[:40]
        deadline = time.monotonic() + timeout
        with closing(self._get_client()) as client:
            while True:
                if _touch(client, image):
                    return BuildResult(image=image, built=False)
                entrypoint = None
                if entrypoint_prefix:
                    base = client.api.inspect_image(base_image)["Config"]
                    entrypoint = [*entrypoint_prefix, *(base.get("Entrypoint") or [])]
                try:
                    container = client.api.create_container(
                        base_image,
                        entrypoint=entrypoint,
                        command=["bash", "-c", _build_script(build_env)],
                        user=user,
                        name=name,
                        labels={ENVIRONMENT_WORKSPACE_LABEL: workspace},
                        host_config=client.api.create_host_config(**host_config),
                    )
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:
                        raise
                    # Another worker builds it: wait for its image, or for its builder
                    # to go (then build it here).
                    self._wait_for_other_builder(client, name, image, deadline)
                    continue
                return self._build(
                    client, container["Id"], image, key, workspace, deadline, output_lines
                )

    def _build(
        self,
        client: docker.DockerClient,
        container_id: str,
        image: str,
        key: str,
        workspace: str,
        deadline: float,
        output_lines: int,
    ) -> BuildResult:
        try:
            client.api.start(container_id)
            remaining = max(1.0, deadline - time.monotonic())
            try:
                client.api.wait(container_id, timeout=remaining)
            except Exception:  # the build ran out of time (or the engine stopped answering)
                client.api.kill(container_id)
                client.api.wait(container_id, timeout=30)
            attrs = client.api.inspect_container(container_id)
            state = attrs["State"]
            started = parse_docker_time(state.get("StartedAt", ""))
            finished = parse_docker_time(state.get("FinishedAt", ""))
            seconds = (
                max(0.0, (finished - started).total_seconds()) if started and finished else 0.0
            )
            exit_code, oom = state.get("ExitCode"), bool(state.get("OOMKilled"))
            if exit_code != 0 or oom:
                raw = client.api.logs(container_id, stdout=True, stderr=True, tail=output_lines)
                return BuildResult(
                    image=image,
                    built=False,
                    seconds=seconds,
                    failed=True,
                    exit_code=exit_code,
                    oom_killed=oom,
                    output=raw.decode(errors="replace").splitlines(),
                    started_at=started,
                    finished_at=finished,
                )
            base = client.api.inspect_image(attrs["Image"])["Config"]
            repository, tag = image.split(":", 1)
            client.api.commit(
                container_id,
                repository=repository,
                tag=tag,
                message=f"prefect-managed environment {key}",
                changes=_commit_changes(base, key, workspace),
            )
            self._logger.info("Built environment %s in %.1f s", image, seconds)
            return BuildResult(image=image, built=True, seconds=seconds)
        finally:
            try:
                client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass

    def _wait_for_other_builder(
        self, client: docker.DockerClient, name: str, image: str, deadline: float
    ) -> None:
        while time.monotonic() < deadline:
            if _touch(client, image):
                return
            try:
                attrs = client.api.inspect_container(name)
            except docker.errors.NotFound:
                return  # gone without an image: the caller builds it
            state = attrs["State"]
            finished = parse_docker_time(state.get("FinishedAt", ""))
            stale = (
                not state.get("Running")
                and finished is not None
                and (datetime.now(timezone.utc) - finished).total_seconds() > STALE_BUILDER_SECONDS
            ) or state.get("Status") == "created"
            if stale and state.get("Status") == "created":
                created = parse_docker_time(attrs.get("Created", ""))
                stale = (
                    created is not None
                    and (datetime.now(timezone.utc) - created).total_seconds()
                    > STALE_BUILDER_SECONDS
                )
            if stale:  # a dead worker's builder: nobody will commit it
                try:
                    client.api.remove_container(name, force=True)
                except docker.errors.NotFound:
                    pass
                return
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(f"another worker's build of {image} did not finish in time")

    def evict(self, workspace: str, max_bytes: int, max_age_days: float, keep: str) -> list[str]:
        """Remove the workspace's environments over the size bound (least recently used
        first) or unused for longer than the age bound; returns the removed images.

        `keep` (the environment a run is about to start from) stays whatever its size.
        """
        removed: list[str] = []
        with closing(self._get_client()) as client:
            found = client.api.images(
                filters={"label": f"{ENVIRONMENT_WORKSPACE_LABEL}={workspace}"}
            )
            entries = []
            for item in found:
                attrs = client.api.inspect_image(item["Id"])
                used = parse_docker_time(
                    (attrs.get("Metadata") or {}).get("LastTagTime", "")
                ) or parse_docker_time(attrs.get("Created", ""))
                base = client.api.inspect_image(attrs["Parent"]) if attrs.get("Parent") else None
                own = int(attrs.get("Size") or 0) - int((base or {}).get("Size") or 0)
                entries.append((used, item["Id"], max(0, own), item.get("RepoTags") or []))
            entries.sort(key=lambda e: e[0] or datetime.min.replace(tzinfo=timezone.utc))
            total = sum(size for _, _, size, _ in entries)
            now = datetime.now(timezone.utc)
            for used, image_id, size, tags in entries:
                if keep in tags:
                    continue
                too_old = used is not None and (now - used).total_seconds() > max_age_days * 86400
                if total <= max_bytes and not too_old:
                    continue
                try:
                    client.api.remove_image(image_id)
                except docker.errors.APIError:
                    continue  # in use by a container: kept
                total -= size
                removed.extend(tags or [image_id])
        for image in removed:
            self._logger.info("Evicted environment %s", image)
        return removed


def _touch(client: docker.DockerClient, image: str) -> bool:
    """Whether the image is there; if so, mark it used now (Docker's LastTagTime)."""
    repository, tag = image.split(":", 1)
    try:
        client.api.tag(image, repository, tag)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True


def _commit_changes(base: dict[str, Any], key: str, workspace: str) -> list[str]:
    """Dockerfile instructions that give the environment image its base image's
    entrypoint, command and environment, and not the builder's."""
    changes = [
        f"ENTRYPOINT {json.dumps(base.get('Entrypoint') or [])}",
        f"CMD {json.dumps(base.get('Cmd') or ['bash', '--login'])}",
        f"LABEL {ENVIRONMENT_LABEL}={key} {ENVIRONMENT_WORKSPACE_LABEL}={workspace}",
    ]
    return changes


def _build_script(build_env: dict[str, str]) -> str:
    """The builder's command: the install settings exported in its shell, not in the
    container's environment (Docker would merge those into the committed image), then
    the runtime image's entrypoint, which installs EXTRA_PIP_PACKAGES as a run would."""
    exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in build_env.items())
    return f"export {exports}; exec /opt/prefect/entrypoint.sh true"
