"""The managed pool's form (`ManagedVariables`) and its job configuration.

Job variables are untrusted: a deployment can set any key of the job configuration,
including the ones the form hides (`privileged`, `volumes`, `mem_limit`,
`container_create_kwargs`, ...), and a pool's base job template can be edited. So the
operator's settings are applied last, in `prepare_for_flow_run`, after templating, and
overwrite whatever the templating produced.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any
from uuid import UUID

from docker.errors import DockerException
from docker.utils import parse_bytes
from prefect.settings import PREFECT_API_URL, get_current_settings
from prefect.workers.base import BaseVariables
from prefect_docker.worker import DockerWorkerJobConfiguration
from pydantic import Field

from prefect_managed.dependencies import (
    CACHE_ENV_KEYS,
    CACHE_MOUNT,
    cache_environment,
    cache_volume_name,
    normalize_pip_packages,
    split_extra_pip_packages,
)
from prefect_managed.exceptions import ImageNotAllowed, InvalidJobVariable
from prefect_managed.policy import Policy
from prefect_managed.settings import get_policy

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = ["MANAGED_LABEL", "WORKSPACE_LABEL", "ManagedJobConfiguration", "ManagedVariables"]

#: Docker labels (in Docker's reversed-domain form) on every container this worker creates.
MANAGED_LABEL = "io.prefect-managed.managed"
WORKSPACE_LABEL = "io.prefect-managed.workspace"
API_LABEL = "io.prefect-managed.api"
#: Environment variables only the worker sets: where the flow run reports, and as whom.
WORKER_OWNED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
#: Settings of the worker's process that Prefect passes on to every run (its home
#: directory, a path on the worker's host; its polling) and that are not the run's.
WORKER_ONLY_ENV = ("PREFECT_HOME", "PREFECT_WORKER_", "PREFECT_INTEGRATIONS_MANAGED_")

#: (settings object, network mode, environment): the last `_base_environment` rendered.
_base_env: tuple[object, str | None, dict[str, str]] | None = None


def api_label_value() -> str:
    """Which Prefect API a container belongs to: a digest of the API URL, so that
    workers of different Prefect servers sharing a Docker engine never take over each
    other's containers."""
    url = PREFECT_API_URL.value() or ""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


_IMAGE_DESCRIPTION = (
    "The Prefect image flow runs execute in. Leave it empty to use the workspace's "
    "runtime image, which has Prefect, uv and git installed."
)
_PIP_PACKAGES_DESCRIPTION = (
    "Python packages installed with uv inside the flow run's container before the flow "
    "starts, one PEP 508 requirement per entry (for example 'pandas>=2.2' or "
    "'prefect-aws'). The installation counts against the run's memory limit."
)


class ManagedVariables(BaseVariables):
    """The variables a `prefect:managed` pool offers in its form."""

    image: str | None = Field(
        default=None,
        title="Image",
        description=_IMAGE_DESCRIPTION,
        examples=["prefecthq/prefect:3-latest"],
    )
    pip_packages: list[str] = Field(
        default_factory=list,
        title="Pip Packages",
        description=_PIP_PACKAGES_DESCRIPTION,
        examples=[["pandas>=2.2", "prefect-aws"]],
    )
    mem_limit: str | None = Field(
        default=None,
        title="Memory Limit",
        description=(
            "Memory for each flow run, dependency installation included, with no swap, "
            "in Docker's units (for example 512m or 1g). It can only lower the workspace "
            "tier's limit; leave it empty to get the tier's limit."
        ),
        examples=["512m"],
    )


class ManagedJobConfiguration(DockerWorkerJobConfiguration):
    """prefect-docker's job configuration plus `pip_packages`, with the caps applied."""

    image: str | None = Field(default=None, description=_IMAGE_DESCRIPTION)  # type: ignore[assignment]
    pip_packages: list[str] = Field(
        default_factory=list,
        description=_PIP_PACKAGES_DESCRIPTION,
        json_schema_extra={"template": "{{ pip_packages }}"},
    )

    @classmethod
    def json_template(cls) -> dict[str, Any]:
        """The pool's job configuration template: only the variables the form offers.

        Prefect's server requires every templated field to be a declared variable, and
        the Docker-only fields (volumes, privileged, ...) are not the user's to set.
        """
        offered = ManagedVariables.model_fields
        return {key: value for key, value in super().json_template().items() if key in offered}

    def _base_environment(self) -> dict[str, str]:
        """Prefect's environment for every run (the worker's settings), rendered once
        per settings object and network mode: rendering every setting costs about 15 ms
        of the worker's event loop, and a run needs it twice (Prefect's templating, then
        `apply_policy`)."""
        global _base_env
        settings, mode = get_current_settings(), self.get_network_mode()
        if _base_env is None or _base_env[0] is not settings or _base_env[1] != mode:
            _base_env = (settings, mode, super()._base_environment())
        return dict(_base_env[2])

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        policy = get_policy()
        self.image = self.image or policy.runtime.default_image
        # Before prefect-docker derives the API URL the container uses from the network.
        self.network_mode = policy.runtime.network_mode
        self.networks = []
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self.apply_policy(policy, flow_run)

    def apply_policy(self, policy: Policy, flow_run: FlowRun) -> None:
        """Overwrite every field a deployment could use to lift a cap or loosen hardening.

        Raises `InvalidPipPackage`, `InvalidJobVariable` or `ImageNotAllowed` for a value
        the policy does not accept, so that no container is created for the run.
        """
        runtime, tier = policy.runtime, policy.tier
        if not runtime.image_allowed(self.image or ""):
            raise ImageNotAllowed(str(self.image), runtime.allowed_images)

        requested = [
            *self.pip_packages,
            *split_extra_pip_packages(self.env.get("EXTRA_PIP_PACKAGES")),
        ]
        self.pip_packages = normalize_pip_packages(
            requested, allow_urls=runtime.allow_url_requirements
        )
        self.env.pop("EXTRA_PIP_PACKAGES", None)
        if self.pip_packages:
            self.env["EXTRA_PIP_PACKAGES"] = " ".join(self.pip_packages)
        if runtime.package_index_url:
            # uv installs pip_packages; pip installs a pull step's requirements.txt
            # (`pip_install_requirements`): both use the operator's index only.
            self.env["UV_DEFAULT_INDEX"] = runtime.package_index_url
            self.env["PIP_INDEX_URL"] = runtime.package_index_url
        # Where the run reports is the worker's to say: a run sent to another Prefect API
        # would never report its states to this one.
        base = self._base_environment()
        for key in WORKER_OWNED_ENV:
            if key in self.env and self.env[key] != base.get(key):
                raise InvalidJobVariable(
                    "env",
                    {key: "***" if "KEY" in key or "AUTH" in key else self.env[key]},
                    f"{key} is set by the worker so that the flow run reports to this "
                    "Prefect server; remove it from the deployment's env",
                )
        for key, value in base.items():
            if key.startswith(WORKER_ONLY_ENV) and self.env.get(key) == value:
                del self.env[key]
        # The run's identity is the worker's to say, not the deployment's.
        self.env["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
        self.labels = {
            **self.labels,
            "io.prefect.flow-run-id": str(flow_run.id),
            MANAGED_LABEL: "true",
            WORKSPACE_LABEL: policy.workspace.name,
            API_LABEL: api_label_value(),
        }

        memory = memory_limit_bytes(self.mem_limit, tier.memory_bytes)
        self.mem_limit = str(memory)
        self.memswap_limit = str(memory)  # memory + swap = memory: no swap

        self.privileged = False
        self.volumes = []
        for key in CACHE_ENV_KEYS:
            self.env.pop(key, None)
        if self.pip_packages and runtime.dependency_cache:
            # The workspace's own named volume (not a host path), chosen by the policy.
            volume = cache_volume_name(policy.workspace.name, api_label_value())
            self.volumes = [f"{volume}:{CACHE_MOUNT}:rw"]
            self.env.update(cache_environment(runtime.dependency_cache_max_bytes))
        self.networks = []
        self.network_mode = runtime.network_mode
        self.registry_credentials = None
        self.image_pull_policy = "IfNotPresent"
        self.auto_remove = False  # the worker removes containers once it has read them
        self.container_create_kwargs = {
            "user": runtime.user,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": runtime.pids_limit,
            "nano_cpus": int(tier.cpus * 1e9),
        }


def memory_limit_bytes(requested: str | int | None, cap: int) -> int:
    """The memory a run gets: what it asked for, never more than the cap."""
    if requested in (None, ""):
        return cap
    try:
        asked = parse_bytes(requested)
    except DockerException as exc:
        raise InvalidJobVariable(
            "mem_limit", requested, "use Docker's units, such as 512m or 1g"
        ) from exc
    if asked <= 0:
        raise InvalidJobVariable("mem_limit", requested, "ask for a positive amount, such as 512m")
    return min(asked, cap)
