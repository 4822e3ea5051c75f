"""The managed pool's form (`ManagedVariables`) and its job configuration.

Job variables are untrusted: a deployment can set any key of the job configuration,
including the ones the form hides (`privileged`, `volumes`, `mem_limit`,
`container_create_kwargs`, ...), and a pool's base job template can be edited. So the
operator's settings are applied last, in `prepare_for_flow_run`, after templating, and
overwrite whatever the templating produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from docker.errors import DockerException
from docker.utils import parse_bytes
from prefect.workers.base import BaseVariables
from prefect_docker.worker import DockerWorkerJobConfiguration
from pydantic import Field

from prefect_managed.exceptions import InvalidJobVariable
from prefect_managed.dependencies import normalize_pip_packages, split_extra_pip_packages
from prefect_managed.settings import ManagedSettings, get_settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = ["MANAGED_LABEL", "ManagedJobConfiguration", "ManagedVariables"]

#: Docker label (after prefect-docker's conversion) on every container this worker creates.
MANAGED_LABEL = "io.prefect-managed.managed"

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

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        settings = get_settings()
        self.image = self.image or settings.default_image
        self.labels = {**self.labels, "prefect-managed.io/managed": "true"}
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self.apply_settings(settings)

    def apply_settings(self, settings: ManagedSettings) -> None:
        """Overwrite every field a deployment could use to lift a cap or loosen hardening.

        Raises `InvalidPipPackage` for a pip_packages entry that is not acceptable, so
        that no container is created for the run.
        """
        requested = [*self.pip_packages, *split_extra_pip_packages(self.env.get("EXTRA_PIP_PACKAGES"))]
        self.pip_packages = normalize_pip_packages(
            requested, allow_urls=settings.allow_url_requirements
        )
        self.env.pop("EXTRA_PIP_PACKAGES", None)
        if self.pip_packages:
            self.env["EXTRA_PIP_PACKAGES"] = " ".join(self.pip_packages)
        if settings.package_index_url:
            self.env["UV_DEFAULT_INDEX"] = settings.package_index_url

        memory = memory_limit_bytes(self.mem_limit, settings.memory_limit)
        self.mem_limit = str(memory)
        self.memswap_limit = str(memory)  # memory + swap = memory: no swap

        self.privileged = False
        self.volumes = []
        self.networks = []
        self.network_mode = settings.network_mode
        self.registry_credentials = None
        self.auto_remove = False  # the worker removes containers once it has read them
        self.container_create_kwargs = hardening_kwargs(settings)


def memory_limit_bytes(requested: str | int | None, cap: str | int) -> int:
    """The memory a run gets: what it asked for, never more than the cap."""
    cap_bytes = parse_bytes(cap)
    if requested in (None, ""):
        return cap_bytes
    try:
        asked = parse_bytes(requested)
    except DockerException as exc:
        raise InvalidJobVariable("mem_limit", requested, "use Docker's units, such as 512m or 1g") from exc
    if asked <= 0:
        raise InvalidJobVariable("mem_limit", requested, "ask for a positive amount, such as 512m")
    return min(asked, cap_bytes)


def hardening_kwargs(settings: ManagedSettings) -> dict[str, Any]:
    """docker-py `containers.create` arguments every managed container gets."""
    return {
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": settings.pids_limit,
    }
